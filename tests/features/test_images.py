"""Image identity: hashed once, reused by file stat, checked cheaply, and shared between ranks."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import samkd.features.images
from samkd.features import (
    ExtractionPlan,
    FeatureStore,
    FeatureStoreError,
    changed_image,
    index_images,
    known_images,
    open_for_extraction,
    wait_for_index,
)
from samkd.features.images import checkpoint_paths
from samkd.features.layout import read_index_file
from samkd.features.schema import parts_dir

from .feature_helpers import PREPROCESSING, make_teacher, write_all

COUNT = 6


def write_images(folder: Path, count: int = COUNT) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        pixels = np.full((20 + index, 30, 3), index * 40 % 256, dtype=np.uint8)
        path = folder / f"img_{index}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def ids_of(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]


def same_size_edit(path: Path) -> None:
    """Change one byte and the mtime, keep the size."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns + 10**9))


def plan_of(images: tuple) -> ExtractionPlan:
    teacher = make_teacher("vit_h")
    return ExtractionPlan(images, (teacher,), PREPROCESSING, shard_size=2)


def test_a_restart_hashes_only_new_or_changed_files(tmp_path: Path, hashed: list[Path]) -> None:
    paths = write_images(tmp_path / "images")
    first = index_images(paths, ids_of(paths), {})
    assert sorted(hashed) == sorted(paths)
    assert (first[2].height, first[2].width) == (22, 30)
    assert first[2].file_size == paths[2].stat().st_size
    known = {record.id: record for record in first}
    hashed.clear()
    assert index_images(paths, ids_of(paths), known) == first
    assert hashed == []
    os.utime(paths[1], ns=(0, 10**9))  # touched: same bytes, new mtime
    same_size_edit(paths[4])
    again = index_images(paths, ids_of(paths), known)
    assert sorted(hashed) == [paths[1], paths[4]]
    assert again[1] == first[1] and again[1].mtime_ns == 10**9
    assert again[4].sha256 != first[4].sha256


def test_a_killed_indexing_resumes_from_its_checkpoints(
    tmp_path: Path, hashed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_images(tmp_path / "images")
    output = tmp_path / "features.h5"
    monkeypatch.setattr(samkd.features.images, "CHECKPOINT_FILES", 2)
    real = samkd.features.images.describe_image_file

    def dies_on_the_fifth(path: Path, image_id: str | None = None):  # type: ignore[no-untyped-def]
        if path == paths[4]:
            raise KeyboardInterrupt
        return real(path, image_id)

    monkeypatch.setattr(samkd.features.images, "describe_image_file", dies_on_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        index_images(paths, ids_of(paths), known_images(output), parts_dir(output))
    assert len(checkpoint_paths(output)) == 2  # images 0-1 and 2-3
    monkeypatch.setattr(samkd.features.images, "describe_image_file", real)
    hashed.clear()
    images = index_images(paths, ids_of(paths), known_images(output), parts_dir(output))
    assert sorted(hashed) == paths[4:]
    with open_for_extraction(output, plan_of(images)) as writer:
        assert checkpoint_paths(output) == []  # the parts folder's index now holds them
        write_all(writer)
        writer.finish()
    hashed.clear()
    assert index_images(paths, ids_of(paths), known_images(output)) == images
    assert hashed == []  # a finished output is the cache


def test_touched_files_refresh_the_parts_index(tmp_path: Path, hashed: list[Path]) -> None:
    paths = write_images(tmp_path / "images")
    output = tmp_path / "features.h5"
    images = index_images(paths, ids_of(paths), {})
    with open_for_extraction(output, plan_of(images)) as writer:
        write_all(writer, limit=2)
    for path in paths:
        os.utime(path, ns=(0, 10**9))
    touched = index_images(paths, ids_of(paths), known_images(output))
    with open_for_extraction(output, plan_of(touched)) as writer:
        assert "resuming" in writer.message  # same bytes: the same plan
    assert [record.mtime_ns for record in read_index_file(parts_dir(output) / "index.h5")] == [
        10**9
    ] * COUNT
    hashed.clear()
    index_images(paths, ids_of(paths), known_images(output))
    assert hashed == []


def test_changed_image_names_the_image_and_its_file(tmp_path: Path, hashed: list[Path]) -> None:
    paths = write_images(tmp_path / "images")
    stored = index_images(paths, ids_of(paths), {})
    hashed.clear()
    assert changed_image(stored, paths) is None
    assert hashed == []  # unchanged stats: nothing is read
    os.utime(paths[0], ns=(0, 10**9))
    assert changed_image(stored, paths) is None and hashed == [paths[0]]
    same_size_edit(paths[3])
    now = samkd.features.images.file_sha256(paths[3])
    assert changed_image(stored, paths) == (
        f"image 'img_3.png' ({paths[3]}) has changed since extraction "
        f"(sha256 {stored[3].sha256[:12]}..., now {now[:12]}...)"
    )
    Image.new("RGB", (5, 5)).save(paths[5])
    assert changed_image(stored, paths, indices=[5]) == (
        f"image 'img_5.png' ({paths[5]}) has changed since extraction "
        f"({stored[5].file_size} bytes, now {paths[5].stat().st_size})"
    )
    assert changed_image(stored, paths, indices=[0, 1, 2]) is None
    paths[1].unlink()
    assert changed_image(stored, paths) == f"image 'img_1.png' ({paths[1]}) is missing"


def test_at_most_max_hashed_files_are_hashed(tmp_path: Path, hashed: list[Path]) -> None:
    paths = write_images(tmp_path / "images")
    stored = index_images(paths, ids_of(paths), {})
    for path in paths:  # a copied dataset: new mtimes everywhere
        os.utime(path, ns=(0, 10**9))
    hashed.clear()
    assert changed_image(stored, paths, max_hashed=3) is None
    assert hashed == [paths[0], paths[2], paths[4]]  # spread evenly


def test_training_check_of_image_files(tmp_path: Path, hashed: list[Path]) -> None:
    paths = write_images(tmp_path / "images")
    output = tmp_path / "features.h5"
    with open_for_extraction(output, plan_of(index_images(paths, ids_of(paths), {}))) as writer:
        write_all(writer)
        writer.finish()
    store = FeatureStore(output)
    hashed.clear()
    store.check_matches(image_ids=ids_of(paths), image_files=paths)
    assert hashed == []
    same_size_edit(paths[2])
    with pytest.raises(FeatureStoreError) as error:
        store.check_matches(image_ids=ids_of(paths), image_files=paths)
    message = str(error.value)
    assert message.startswith(f"features.h5: image 'img_2.png' ({paths[2]}) has changed since")
    assert "\n" not in message
    with pytest.raises(FeatureStoreError, match="holds 6 images, the dataset has 5"):
        store.check_matches(image_files=paths[:5])


def test_files_are_hashed_on_several_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    paths = write_images(tmp_path / "images", count=200)
    threads: set[int] = set()
    real = samkd.features.images.file_sha256

    def recording(path: Path, *args: object) -> str:
        threads.add(threading.get_ident())
        time.sleep(0.001)
        return real(path)

    monkeypatch.setattr(samkd.features.images, "file_sha256", recording)
    index_images(paths, ids_of(paths), {})
    assert len(threads) > 1


def test_progress_is_shown_for_long_hashing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    paths = write_images(tmp_path / "images")
    shown: list[tuple[str, int]] = []
    advanced: list[int] = []

    @contextmanager
    def progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
        shown.append((description, total))
        yield advanced.append

    index_images(paths, ids_of(paths), {}, progress=progress)
    assert shown == []  # a few KB: too quick to show
    monkeypatch.setattr(samkd.features.images, "PROGRESS_BYTES", 1)
    index_images(paths, ids_of(paths), {}, progress=progress)
    assert shown == [("hashing images", COUNT)] and sum(advanced) == COUNT


def test_other_ranks_wait_for_the_index_of_rank_0(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "images")
    output = tmp_path / "features.h5"
    images = index_images(paths, ids_of(paths), {})
    got: list[tuple] = []
    waiter = threading.Thread(target=lambda: got.append(wait_for_index(output, 0.01)))
    waiter.start()
    time.sleep(0.2)
    assert waiter.is_alive()  # nothing published yet
    open_for_extraction(output, plan_of(images)).close()
    waiter.join(timeout=10)
    assert got == [images]
    assert [record.mtime_ns for record in got[0]] == [record.mtime_ns for record in images]
