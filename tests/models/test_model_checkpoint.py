from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from samkd.models import (
    MODEL_TYPES,
    CheckpointError,
    SkippedInit,
    build_sam,
    load_state_dict_file,
    load_weights,
    save_state_dict,
)

SMALL_TYPES = ("vit_t", "vit_mini", "vit_t_mini")
FULL_TEACHERS = ("vit_b", "vit_l", "vit_h")


def assert_same_weights(left: torch.nn.Module, right: torch.nn.Module) -> None:
    left_state, right_state = left.state_dict(), right.state_dict()
    assert left_state.keys() == right_state.keys()
    for key, value in left_state.items():
        assert torch.equal(value, right_state[key]), key


@pytest.mark.parametrize("model_type", SMALL_TYPES)
def test_round_trip_through_file(model_type: str, tmp_path: Path, randomize) -> None:
    model = randomize(build_sam(model_type))
    path = tmp_path / "weights" / f"{model_type}.pt"
    save_state_dict(model, path)
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    loaded = build_sam(model_type, checkpoint=path)
    assert_same_weights(loaded, model)
    # Built without random initialisation: the buffers outside the state dict must still be
    # computed (pixel statistics, TinyViT's attention bias indices), and the outputs equal.
    buffers = dict(loaded.named_buffers())
    for name, buffer in model.named_buffers():
        assert torch.equal(buffers[name], buffer), name


def test_skipped_init_leaves_tensors_as_they_are() -> None:
    weight, bias = torch.zeros(4, 3), torch.zeros(4)
    with SkippedInit():
        torch.nn.init.kaiming_uniform_(weight, a=1.0)  # what nn.Linear and nn.Conv2d use
        torch.nn.init.uniform_(bias, -1.0, 1.0)
        torch.nn.init.normal_(bias)
        shifted = bias + 2  # other functions run as usual
    assert not weight.any() and not bias.any()
    assert torch.equal(shifted, torch.full((4,), 2.0))


@pytest.mark.parametrize("model_type", FULL_TEACHERS)
def test_full_teacher_accepts_its_own_layout(model_type: str) -> None:
    model = build_sam(model_type, device="meta")
    load_weights(model, build_sam(model_type, device="meta").state_dict(), model_type)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda state: {"model": state, "step": 3},
        lambda state: {"state_dict": state, "optimizer": {"lr": 1e-3}},
        lambda state: {f"module.{key}": value for key, value in state.items()},
    ],
    ids=["model", "state_dict", "module-prefix"],
)
def test_unwraps_training_checkpoints(wrap, tmp_path: Path, mini_student) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save(wrap(mini_student.state_dict()), path)
    assert load_state_dict_file(path).keys() == mini_student.state_dict().keys()
    fresh = build_sam("vit_t_mini")
    load_weights(fresh, path, "vit_t_mini")
    assert_same_weights(fresh, mini_student)


def test_samkd_training_checkpoint_reads_as_its_student(tmp_path: Path, mini_student) -> None:
    """`checkpoints/best.pt` of a run: the training step's state (the student's weights beside
    the objective's, not all tensors), optimizer, progress and settings; it loads wherever
    weights do, as the student's."""
    step_state = {f"student.{key}": value for key, value in mini_student.state_dict().items()}
    checkpoint = {
        "model": {**step_state, "objective._extra_state": {"kd_weight": {"value": 1.0}}},
        "optimizer": {"state": {}, "param_groups": []},
        "progress": {"step": 3},
        "settings": "student:\n  model_type: vit_t_mini\n",
        "samkd_version": "0",
    }
    path = tmp_path / "best.pt"
    torch.save(checkpoint, path)
    assert load_state_dict_file(path).keys() == mini_student.state_dict().keys()
    fresh = build_sam("vit_t_mini", checkpoint=path)
    assert_same_weights(fresh, mini_student)


def test_wrong_architecture_names_type_and_keys(tmp_path: Path, mini_student) -> None:
    path = tmp_path / "student.pt"
    save_state_dict(mini_student, path)
    with pytest.raises(CheckpointError) as error:
        build_sam("vit_mini", checkpoint=path)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"checkpoint {path} does not fit model type 'vit_mini': ")
    assert "missing keys (image_encoder.pos_embed, image_encoder.patch_embed.proj.weight" in message
    assert "unexpected (image_encoder.patch_embed.seq.0.c.weight" in message
    assert isinstance(error.value, ValueError)


def test_shape_mismatch_is_reported(mini_student) -> None:
    with pytest.raises(CheckpointError, match="'vit_t': .* with other shapes") as error:
        load_weights(build_sam("vit_t", device="meta"), mini_student.state_dict(), "vit_t")
    assert "image_encoder.patch_embed.seq.0.c.weight: 16x3x3x3 vs 32x3x3x3" in str(error.value)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_file(tmp_path / "absent.pt")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch weights file") as error:
        load_state_dict_file(text)
    assert "\n" not in str(error.value)


class Payload:
    """Something that a weights-only load must refuse to unpickle."""


def test_refuses_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(CheckpointError, match="refused by weights-only loading") as error:
        load_state_dict_file(path)
    assert "\n" not in str(error.value)


def test_rejects_files_without_state_dict(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_state_dict_file(path)


def test_teacher_positions_follow_image_size(mini_teacher) -> None:
    larger = build_sam("vit_mini", image_size=320)
    load_weights(larger, mini_teacher.state_dict(), "vit_mini")
    encoder = larger.image_encoder
    assert encoder.pos_embed.shape == (1, 20, 20, 192)
    assert encoder.blocks[1].attn.rel_pos_h.shape == (39, 64)
    same_window = mini_teacher.image_encoder.blocks[0].attn.rel_pos_h
    assert torch.equal(encoder.blocks[0].attn.rel_pos_h, same_window)
    with torch.no_grad():
        assert larger.image_encoder(torch.randn(1, 3, 320, 320)).shape == (1, 256, 20, 20)


def test_save_replaces_existing_file(tmp_path: Path, mini_student) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"old")
    save_state_dict(mini_student.state_dict(), path)
    assert load_state_dict_file(path).keys() == mini_student.state_dict().keys()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]


def test_every_model_type_is_covered() -> None:
    # The SAM 2 types' checkpoints are tested in tests/models/test_sam2.py.
    sam2 = {name for name in MODEL_TYPES if "hiera" in name}
    assert set(SMALL_TYPES) | set(FULL_TEACHERS) | sam2 == set(MODEL_TYPES)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "the file is empty"),
        (b"text\n", "neither a zip nor a pickle"),
        (b"{'weights': 1}\n", "neither a zip nor a pickle"),
        (b"PK\x03\x04" + b"\0" * 40, "not a readable PyTorch weights file"),
    ],
)
def test_unreadable_files_are_one_line_errors(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as error:
        load_state_dict_file(path)
    assert str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_nonfinite_weights_are_not_written(tmp_path: Path, mini_student) -> None:
    state = mini_student.state_dict()
    state["mask_decoder.iou_prediction_head.layers.0.weight"][0, 0] = float("nan")
    state["image_encoder.neck.0.weight"][0] = float("inf")
    path = tmp_path / "student.pt"
    with pytest.raises(CheckpointError, match=r"refusing to write .*: 2 of \d+ tensors hold NaN"):
        save_state_dict(state, path)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_and_leaves_nothing(tmpfs, mini_student) -> None:
    folder = tmpfs("disk", "256k")
    path = folder / "student.pt"
    with pytest.raises(CheckpointError, match=r"student\.pt: cannot write: .* free there\)"):
        save_state_dict(mini_student, path)
    assert list(folder.iterdir()) == []


def test_files_are_written_with_the_umask(tmp_path: Path, mini_student) -> None:
    previous = os.umask(0o002)
    try:
        save_state_dict(mini_student, tmp_path / "student.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "student.pt").stat().st_mode & 0o777 == 0o664
