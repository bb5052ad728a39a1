"""Writing: schema, round trips, value checks, resume and refusal, ranks and shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import samkd
from samkd.features import (
    SCHEMA_VERSION,
    FeatureStore,
    FeatureStoreError,
    ensure_free_space,
    join_shards,
    open_for_extraction,
    planned_bytes,
    read_decoder_state_dict,
)
from samkd.features.schema import parts_dir, shard_path

from .feature_helpers import (
    PREPROCESSING,
    TAPS,
    decoder_state_for,
    extract,
    features_for,
    make_plan,
    read_datasets,
    write_all,
)


def test_file_schema_and_metadata(tmp_path: Path) -> None:
    plan = make_plan(num_images=10, shard_size=4)
    output = extract(tmp_path / "features.h5", plan)
    assert output == tmp_path / "features.h5"
    assert not parts_dir(output).exists()
    with h5py.File(output, "r") as handle:
        assert handle.attrs["format"] == "samkd-features"
        assert handle.attrs["schema_version"] == SCHEMA_VERSION
        assert handle.attrs["samkd_version"] == samkd.__version__
        assert handle.attrs["created"].endswith("+00:00")
        assert "dtype: float16" in handle.attrs["settings"]
        assert json.loads(handle.attrs["plan"])["shard_size"] == 4
        images = handle["images"]
        assert list(images["ids"].asstr()[()]) == [image.id for image in plan.images]
        assert images["original_sizes"][3].tolist() == [483, 640]
        assert images["sha256"][0].decode() == plan.images[0].sha256
        assert json.loads(images.attrs["preprocessing"]) == PREPROCESSING
        teacher = handle["teachers/vit_h"]
        assert teacher.attrs["model_type"] == "vit_h"
        assert teacher.attrs["image_size"] == 1024
        assert teacher.attrs["checkpoint_name"] == "sam_vit_h.pth"
        assert teacher.attrs["checkpoint_sha256"] == "ab" * 32
        assert json.loads(teacher.attrs["taps"]) == [tap.name for tap in TAPS]
        embed = teacher["taps/encoder.embed"]
        assert embed.shape == (10, 256, 16, 16)
        assert embed.dtype == np.float16
        assert embed.chunks == (1, 256, 16, 16)
        assert embed.compression is None
        assert teacher["taps/encoder.attn.3"].attrs["kind"] == "attention"
        assert teacher["done"][()].all()
        assert teacher["crc32/encoder.embed"].shape == (10,)


def test_decoder_weights_are_stored(tmp_path: Path) -> None:
    output = extract(tmp_path / "features.h5", make_plan())
    state = read_decoder_state_dict(output, "vit_b")
    expected = decoder_state_for("vit_b")
    assert set(state) == {
        "prompt_encoder.point_embeddings.0.weight",
        "mask_decoder.iou_token.weight",
    }
    for key, value in state.items():
        assert value.dtype == torch.float32
        assert torch.equal(value, torch.from_numpy(expected[key]))
    with pytest.raises(FeatureStoreError, match="no teacher 'vit_l'"):
        read_decoder_state_dict(output, "vit_l")


@pytest.mark.parametrize("compression", ["none", "gzip", "lzf"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_of_every_tap_kind(tmp_path: Path, dtype: str, compression: str) -> None:
    plan = make_plan(num_images=7, shard_size=3, dtype=dtype, compression=compression)
    output = extract(tmp_path / "features.h5", plan)
    store = FeatureStore(output)
    for index in (0, 4, 6):
        for teacher in plan.teacher_names:
            expected = features_for(plan, teacher, [index])
            for tap in TAPS:
                got = store[index][teacher][tap.name]
                assert got.dtype == torch.float32
                assert got.shape == tap.shape
                want = expected[tap.name][0].astype(dtype).astype(np.float32)
                assert np.array_equal(got.numpy(), want)
    store.close()  # a compressed tap reads through HDF5: the store holds the file open
    with h5py.File(output, "r") as handle:
        dataset = handle["teachers/vit_h/taps/encoder.embed"]
        assert dataset.dtype == np.dtype(dtype)
        assert dataset.compression == (None if compression == "none" else compression)


def test_torch_tensors_are_accepted(tmp_path: Path) -> None:
    plan = make_plan(num_images=2, teachers=("vit_h",), shard_size=2)
    with open_for_extraction(tmp_path / "f.h5", plan) as writer:
        features = features_for(plan, "vit_h", [0, 1])
        tensors = {tap: torch.from_numpy(value).bfloat16() for tap, value in features.items()}
        writer.write_batch("vit_h", [0, 1], tensors)
        output = writer.finish()
    assert output is not None
    got = FeatureStore(output)[1]["vit_h"]["encoder.embed"]
    want = torch.from_numpy(features["encoder.embed"][1]).bfloat16().half().float()
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("bad_value", "message"),
    [(1e5, "value 100000 is beyond the float16 range"), (np.nan, "value nan is not finite")],
)
def test_out_of_range_values_are_refused(tmp_path: Path, bad_value: float, message: str) -> None:
    plan = make_plan(num_images=4, teachers=("vit_h",), shard_size=2)
    output = tmp_path / "features.h5"
    with open_for_extraction(output, plan) as writer:
        features = features_for(plan, "vit_h", [2, 3])
        features["encoder.block.3"][1, 5, 2, 2] = bad_value
        writer.write_batch("vit_h", [0, 1], features_for(plan, "vit_h", [0, 1]))
        writer.write_batch("vit_h", [2, 3], features)
        with pytest.raises(FeatureStoreError) as error:
            writer.finish()
    text = str(error.value)
    assert "\n" not in text
    assert "features.h5: teacher 'vit_h' tap 'encoder.block.3' image 'img_0003.jpg'" in text
    assert message in text
    assert shard_path(output, "vit_h", 0).exists()  # what was fine stays on disk
    assert not shard_path(output, "vit_h", 1).exists()


def test_flags_allow_storing_overflow_and_nonfinite(tmp_path: Path) -> None:
    plan = make_plan(num_images=2, teachers=("vit_h",), allow_overflow=True, allow_nonfinite=True)
    with open_for_extraction(tmp_path / "f.h5", plan) as writer:
        features = features_for(plan, "vit_h", [0, 1])
        features["decoder.iou"][0] = [1e6, np.nan, -np.inf]
        writer.write_batch("vit_h", [0, 1], features)
        output = writer.finish()
    assert output is not None
    iou = FeatureStore(output)[0]["vit_h"]["decoder.iou"]
    assert iou[0] == np.inf and iou[1].isnan() and iou[2] == -np.inf


def test_wrong_shapes_and_indices_fail_at_once(tmp_path: Path) -> None:
    plan = make_plan(num_images=4, teachers=("vit_h",), shard_size=2)
    with open_for_extraction(tmp_path / "f.h5", plan, queue_size=1) as writer:
        features = features_for(plan, "vit_h", [0])
        with pytest.raises(FeatureStoreError, match=r"got shape \(1, 256, 16, 16\), expected"):
            writer.write_batch("vit_h", [0, 1], features)
        features.pop("decoder.iou")
        with pytest.raises(FeatureStoreError, match="got taps"):
            writer.write_batch("vit_h", [0], features)
        writer.write_batch("vit_h", [0], features_for(plan, "vit_h", [0]))
        with pytest.raises(FeatureStoreError, match="image 0 is not pending"):
            writer.write_batch("vit_h", [0], features_for(plan, "vit_h", [0]))
        with pytest.raises(FeatureStoreError, match="3 images of teacher 'vit_h' were never"):
            writer.finish()


def test_resume_after_stop_matches_uninterrupted_run(tmp_path: Path) -> None:
    plan = make_plan(num_images=10, shard_size=3)
    reference = extract(tmp_path / "reference.h5", plan)
    output = tmp_path / "features.h5"
    with open_for_extraction(output, plan) as writer:
        write_all(writer, batch_size=2, limit=7)  # images 0-7: stops inside shard [6, 9)
    with open_for_extraction(output, plan) as writer:
        assert "resuming, 2 of 8 shards done" in writer.message
        assert writer.todo("vit_h") == [6, 7, 8, 9]
        write_all(writer, batch_size=2)
        writer.finish()
    assert reference is not None
    assert read_datasets(output) == read_datasets(reference)


def test_finished_rerun_has_nothing_to_do(tmp_path: Path) -> None:
    plan = make_plan()
    output = extract(tmp_path / "features.h5", plan)
    assert output is not None
    modified = os.stat(output).st_mtime_ns
    with open_for_extraction(output, plan) as writer:
        assert writer.nothing_to_do
        assert writer.message == "features.h5: already complete, nothing to do"
        assert writer.todo("vit_h") == []
        assert writer.finish() == output
    assert os.stat(output).st_mtime_ns == modified


@pytest.mark.parametrize("finished", [False, True])
def test_changed_settings_are_refused(tmp_path: Path, finished: bool) -> None:
    output = tmp_path / "features.h5"
    with open_for_extraction(output, make_plan()) as writer:
        write_all(writer, limit=None if finished else 3)
        if finished:
            writer.finish()
    assert output.exists() == finished
    with pytest.raises(FeatureStoreError) as error:
        open_for_extraction(output, make_plan(image_size=512))
    assert str(error.value).startswith(
        "features.h5: teacher 'vit_h' was extracted with image_size 1024, now 512"
    )
    with pytest.raises(FeatureStoreError, match="dtype float16, now float32"):
        open_for_extraction(output, make_plan(dtype="float32"))
    with pytest.raises(FeatureStoreError, match=r"teachers \['vit_h', 'vit_b'\], now \['vit_h'\]"):
        open_for_extraction(output, make_plan(teachers=("vit_h",)))
    with pytest.raises(FeatureStoreError, match="was extracted for 10 images, now 11"):
        open_for_extraction(output, make_plan(num_images=11))
    changed = make_plan()
    images = list(changed.images)
    images[4] = type(images[4])(images[4].id, 1, 1, images[4].sha256)
    with pytest.raises(FeatureStoreError, match="image 'img_0004.jpg' was 484x640, now 1x1"):
        open_for_extraction(output, make_plan().__class__(**{**vars(changed), "images": images}))


def test_two_ranks_joined_equal_a_single_process(tmp_path: Path) -> None:
    plan = make_plan(num_images=11, shard_size=2)
    single = extract(tmp_path / "single" / "features.h5", plan)
    output = tmp_path / "ranks" / "features.h5"
    output.parent.mkdir()
    writers = [open_for_extraction(output, plan, rank=r, world_size=2) for r in range(2)]
    for writer in writers:
        assert set(writer.todo("vit_h")).isdisjoint(writers[1 - writer.rank].todo("vit_h"))
    for writer in reversed(writers):  # rank 1 first: order must not matter
        write_all(writer, batch_size=3)
        assert writer.finish() is None  # ranks never join by themselves
    join_shards(output)
    assert single is not None
    assert read_datasets(output) == read_datasets(single)


def test_missing_shard_is_an_error(tmp_path: Path) -> None:
    plan = make_plan(num_images=8, shard_size=2)
    output = tmp_path / "features.h5"
    with open_for_extraction(output, plan, rank=0, world_size=2) as writer:
        write_all(writer)
        writer.finish()
    missing = r"4 shards missing \(features.h5.parts/vit_h/part-00001.h5, "
    with pytest.raises(FeatureStoreError, match=missing):
        join_shards(output)
    assert not output.exists()
    with pytest.raises(FeatureStoreError, match="extraction not finished"):
        FeatureStore(output)


def test_virtual_join_reads_like_a_copy_and_refuses_lost_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = make_plan(num_images=9, shard_size=4)
    copied = extract(tmp_path / "copy" / "features.h5", plan)
    virtual = extract(tmp_path / "virtual" / "features.h5", plan, layout="virtual")
    assert virtual is not None and copied is not None
    monkeypatch.chdir(tmp_path)  # sources resolve relative to the file, not the cwd
    assert read_datasets(virtual) == read_datasets(copied)
    with h5py.File(virtual, "r") as handle:
        assert handle["teachers/vit_h/taps/encoder.embed"].is_virtual
    assert torch.equal(
        FeatureStore(virtual)[8]["vit_b"]["encoder.embed"],
        FeatureStore(copied)[8]["vit_b"]["encoder.embed"],
    )
    shard_path(virtual, "vit_b", 1).unlink()
    with pytest.raises(FeatureStoreError, match="shard features.h5.parts/vit_b/part-00001.h5 is"):
        FeatureStore(virtual)


def test_planned_bytes_and_free_space_check(tmp_path: Path) -> None:
    plan = make_plan(num_images=10)
    tap_bytes = sum(tap.numel for tap in TAPS) * 2 * 10 * 2
    assert tap_bytes <= planned_bytes(plan) < tap_bytes * 1.01
    output = extract(tmp_path / "features.h5", plan)
    assert output is not None
    assert output.stat().st_size < planned_bytes(plan) * 1.1
    with pytest.raises(FeatureStoreError, match=r"^f.h5: needs 1024.0 TiB free on .*available$"):
        ensure_free_space(tmp_path / "f.h5", 1 << 50)


def test_writer_thread_keeps_a_bounded_queue(tmp_path: Path) -> None:
    plan = make_plan(num_images=12, teachers=("vit_h",), shard_size=4)
    seen: list[int] = []
    with open_for_extraction(
        tmp_path / "f.h5", plan, queue_size=1, on_progress=lambda _, n: seen.append(n)
    ) as writer:
        assert writer._queue.maxsize == 1
        write_all(writer, batch_size=1)
        writer.finish()
    assert sum(seen) == 12


def test_a_rerun_once_every_shard_exists_only_joins(tmp_path: Path) -> None:
    plan = make_plan(num_images=8, shard_size=2)
    output = tmp_path / "features.h5"
    for rank in range(2):
        with open_for_extraction(output, plan, rank=rank, world_size=2) as writer:
            write_all(writer)
            assert writer.finish() is None
    killed_join = output.with_name(f".{output.name}.12345-deadbeef.tmp")
    killed_join.write_bytes(b"\x89HDF\r\n" + b"x" * 999)
    with open_for_extraction(output, plan) as writer:
        assert writer.message == "features.h5: all shards of rank 0 are on disk, nothing to compute"
        assert writer.finish() == output
    assert not killed_join.exists()
    single = extract(tmp_path / "single" / "features.h5", plan)
    assert single is not None
    assert read_datasets(output) == read_datasets(single)
