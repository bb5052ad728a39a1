"""Per-part learning rates (`train.lr_scale`), layer-wise decay (`train.layer_decay`) and their
schedule: the optimizer's groups read back from `optimizer.param_groups`."""

import pytest
import torch
from segment_anything.modeling import Sam
from torch import nn

from samkd.models import build_sam
from samkd.settings import Settings, SettingsError
from samkd.train import setup
from samkd.train.optim import (
    build_optimizer,
    build_scheduler,
    encoder_layer_lr_scales,
    scheduled_lr,
)

from .conftest import STUDENT, TEACHER, make_settings

LR = 1e-3
PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def tiny_student(*assignments: str) -> tuple[Settings, Sam]:
    settings = make_settings(
        f"student.model_type={STUDENT}", "data.image_size=64", f"train.lr={LR}", *assignments
    )
    return settings, setup.build_student(settings, torch.device("cpu"))


def student_optimizer(settings: Settings, student: Sam) -> torch.optim.AdamW:
    train = settings.train
    return build_optimizer(
        [student], train.lr, train.weight_decay, setup.lr_scales(settings, student)
    )


def group_of(optimizer: torch.optim.Optimizer) -> dict[nn.Parameter, dict]:
    """Each parameter's group; fails when a parameter is in two groups."""
    groups: dict[nn.Parameter, dict] = {}
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            assert parameter not in groups, "a parameter is in two groups"
            groups[parameter] = group
    return groups


def test_each_part_trains_at_its_scale_with_decay_on_matrices_only() -> None:
    settings, student = tiny_student(
        "train.lr_scale={image_encoder: 0.1, mask_decoder: 0.5}",
        "train.frozen_until={prompt_encoder: -1}",
    )
    groups = group_of(student_optimizer(settings, student))
    trainable = {p for p in student.parameters() if p.requires_grad}
    assert set(groups) == trainable  # every trainable parameter, each in one group
    assert not any(p in groups for p in student.prompt_encoder.parameters())
    for part, scale in (("image_encoder", 0.1), ("mask_decoder", 0.5)):
        for parameter in getattr(student, part).parameters():
            if parameter.requires_grad:
                group = groups[parameter]
                assert group["lr"] == pytest.approx(LR * scale)
                assert group["weight_decay"] == (0.01 if parameter.ndim >= 2 else 0.0)


def test_the_schedule_keeps_the_ratios_between_parts() -> None:
    settings, student = tiny_student(
        "train.lr_scale={image_encoder: 0.1, prompt_encoder: 2.0, mask_decoder: 0.5}"
    )
    optimizer = student_optimizer(settings, student)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=10)
    groups = group_of(optimizer)
    first = {part: next(getattr(student, part).parameters()) for part in PARTS}
    for _ in range(4):  # through the warmup into the cosine
        optimizer.step()
        scheduler.step()
        base = scheduled_lr(scheduler, LR)
        assert 0 < base <= LR
        for part, scale in (("image_encoder", 0.1), ("prompt_encoder", 2.0), ("mask_decoder", 0.5)):
            assert groups[first[part]]["lr"] == pytest.approx(base * scale)


def test_equal_scales_give_the_two_groups_of_one_learning_rate() -> None:
    settings, student = tiny_student()
    optimizer = student_optimizer(settings, student)
    decay, no_decay = optimizer.param_groups
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert [id(p) for p in decay["params"]] == [id(p) for p in trainable if p.ndim >= 2]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in trainable if p.ndim < 2]
    assert (decay["lr"], no_decay["lr"]) == (LR, LR)
    scheduler = build_scheduler(optimizer, warmup_steps=3, total_steps=10)
    optimizer.step()
    scheduler.step()
    assert scheduled_lr(scheduler, LR) == scheduler.get_last_lr()[0]


def test_layer_decay_lowers_the_rate_block_by_block() -> None:
    settings, student = tiny_student("train.lr_scale.image_encoder=0.1", "train.layer_decay=0.5")
    groups = group_of(student_optimizer(settings, student))
    encoder = student.image_encoder
    blocks = [block for stage in encoder.layers for block in stage.blocks]
    top = len(blocks) + 1

    def lr_of(module: nn.Module) -> float:
        return groups[next(module.parameters())]["lr"]

    assert lr_of(encoder.patch_embed) == pytest.approx(LR * 0.1 * 0.5**top)
    for depth, block in enumerate(blocks, start=1):
        assert lr_of(block) == pytest.approx(LR * 0.1 * 0.5 ** (top - depth))
    assert lr_of(encoder.layers[0].downsample) == lr_of(encoder.layers[0].blocks[-1])
    assert lr_of(encoder.neck) == pytest.approx(LR * 0.1)
    assert lr_of(student.mask_decoder) == LR


def test_layer_decay_of_a_vit_counts_its_blocks_and_position_embedding() -> None:
    encoder = build_sam(TEACHER, image_size=64).image_encoder
    scales = encoder_layer_lr_scales(encoder, 0.5)
    top = len(encoder.blocks) + 1
    assert scales[encoder.pos_embed] == 0.5**top
    assert [scales[next(block.parameters())] for block in encoder.blocks] == [
        0.5 ** (top - depth) for depth in range(1, top)
    ]
    assert scales[next(encoder.neck.parameters())] == 1.0


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("train.lr_scale.image_encoder=-0.1", "train.lr_scale.image_encoder: Input should be"),
        ("train.lr_scale.image_encoder=0", "train.lr_scale.image_encoder: Input should be"),
        ("train.lr_scale.mask_decodr=0.1", "unknown key 'train.lr_scale.mask_decodr'"),
        ("train.layer_decay=0", "train.layer_decay: Input should be"),
        ("train.layer_decay=1.5", "train.layer_decay: Input should be"),
    ],
)
def test_bad_scales_are_refused_in_one_line(assignment: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message) as error:
        make_settings(assignment)
    assert "\n" not in str(error.value)
