"""samkd.files: atomic publication (fsync, rename, fsync the folder) and waiting for files."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from samkd.files import atomic_path, is_temporary, publish, remove_temporaries, wait_for_paths


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What was fsynced: 'file NAME' or 'folder NAME', in order."""
    calls: list[str] = []
    real = os.fsync

    def recording(descriptor: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{descriptor}"))
        calls.append(f"{'folder' if path.is_dir() else 'file'} {path.name}")
        real(descriptor)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


def test_atomic_path_syncs_renames_and_syncs_the_folder(tmp_path: Path, synced: list[str]):
    path = tmp_path / "sub" / "state.json"
    with atomic_path(path, suffix=".json") as temporary:
        assert temporary.parent == path.parent and temporary.suffix == ".json"
        assert not path.exists()
        temporary.write_text("{}")
        synced_name = temporary.name
    assert path.read_text() == "{}"
    assert synced == [f"file {synced_name}", "folder sub"]
    assert sorted(item.name for item in path.parent.iterdir()) == ["state.json"]


def test_a_failed_block_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as temporary:
        temporary.write_text("half")
        raise RuntimeError
    assert path.read_text() == "old"
    assert [item.name for item in tmp_path.iterdir()] == ["state.json"]


def test_exclusive_keeps_the_first_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    for text in ("first", "second"):
        with atomic_path(path, exclusive=True) as temporary:
            temporary.write_text(text)
    assert path.read_text() == "first"
    assert [item.name for item in tmp_path.iterdir()] == ["plan.json"]
    late = tmp_path / ".late.tmp"
    late.write_text("third")
    assert publish(late, path, exclusive=True) is False and not late.exists()


def test_remove_temporaries_removes_only_those_of_the_path(tmp_path: Path) -> None:
    path = tmp_path / "features.h5"
    with atomic_path(path) as temporary:
        stale = temporary.with_name(temporary.name.replace(str(os.getpid()), "1"))
        stale.write_text("killed")
        assert is_temporary(stale)
        other = tmp_path / ".features.h5.parts.1-ab.tmp"
        other.write_text("another file's")
        remove_temporaries(path)
        assert not stale.exists() and other.exists()
        temporary.write_text("done")
    assert path.read_text() == "done"


def test_wait_for_paths_returns_once_all_exist(tmp_path: Path) -> None:
    paths = [tmp_path / f"part-{index}.h5" for index in range(3)]
    paths[0].write_text("")
    found: list[int] = []

    def publish_later() -> None:
        for path in paths[1:]:
            time.sleep(0.05)
            path.write_text("")

    writer = threading.Thread(target=publish_later)
    writer.start()
    wait_for_paths(paths, poll_seconds=0.01, on_found=found.append)
    writer.join()
    assert sum(found) == 3
