"""LoRA adapters: which layers get them, what trains, and the merged weights."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from segment_anything.modeling import Sam

from samkd.errors import UsageError
from samkd.models import build_sam
from samkd.models.lora import add_lora, lora_targets, merged_state_dict
from samkd.settings import LoraSettings

from .conftest import randomize_

BOX = (100.0, 150.0, 700.0, 600.0)


def test_targets_are_attention_projections_and_transformer_mlps() -> None:
    model = build_sam("vit_t_mini", device="meta")
    attention = lora_targets(model, ["image_encoder", "mask_decoder"], ["attention"])
    mlp = lora_targets(model, ["image_encoder", "mask_decoder"], ["mlp"])
    endings = {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] for name in attention}
    assert {e.split(".")[1] for e in endings} == {
        "qkv",
        "proj",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
    }
    assert {name.rsplit(".", 1)[-1] for name in mlp} == {"fc1", "fc2", "lin1", "lin2"}
    # The decoder's output heads and the neck are neither.
    assert not any("hypernetworks" in name or "iou_prediction" in name for name in attention + mlp)
    assert all(
        name.startswith("image_encoder.")
        for name in lora_targets(model, ["image_encoder"], ["attention"])
    )
    vit = build_sam("vit_mini", device="meta")
    assert {
        n.rsplit(".", 1)[-1] for n in lora_targets(vit, ["image_encoder"], ["attention", "mlp"])
    } == {
        "qkv",
        "proj",
        "lin1",
        "lin2",
    }


def test_only_adapters_and_train_parts_are_trainable() -> None:
    model = build_sam("vit_t_mini")
    targets = add_lora(model, LoraSettings(rank=2, train_parts=["prompt_encoder"]))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapters = {name for name in trainable if "lora_" in name}
    assert len(adapters) == 2 * len(targets)
    assert trainable - adapters == {
        name for name, _ in model.prompt_encoder.named_parameters(prefix="prompt_encoder")
    }


def test_fresh_adapters_leave_the_output_unchanged(mini_student: Sam, predict_masks) -> None:
    images = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        plain = predict_masks(mini_student.eval(), images, (20.0, 30.0, 200.0, 180.0))
        add_lora(mini_student, LoraSettings(rank=4, layers=["attention", "mlp"]))
        adapted = predict_masks(mini_student.eval(), images, (20.0, 30.0, 200.0, 180.0))
    for want, got in zip(plain, adapted, strict=True):
        assert torch.equal(want, got)


def test_merged_weights_load_strictly_into_mobile_sam_and_give_the_same_masks(
    randomize, predict_masks
) -> None:
    ours = build_sam("vit_t")
    settings = LoraSettings(rank=4, alpha=8, layers=["attention", "mlp"])
    add_lora(ours, settings)
    randomize(ours, seed=5).eval()  # trained adapters: B is no longer 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mobile_sam import build_sam_vit_t

        upstream = build_sam_vit_t()
    upstream.load_state_dict(merged_state_dict(ours, settings), strict=True)
    # MobileSAM caches attention biases when switched to eval mode, so switch after loading.
    upstream.eval()
    images = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        _, expected, expected_iou = predict_masks(ours, images, BOX)
        _, actual, actual_iou = predict_masks(upstream, images, BOX)
    assert (actual - expected).abs().max() < 1e-3
    assert (actual_iou - expected_iou).abs().max() < 1e-4
    assert torch.equal(actual > 0, expected > 0)
    assert any("lora_" in key for key in ours.state_dict())  # the model keeps its adapters


def test_merged_weights_equal_peft_merging_the_layers(mini_student: Sam) -> None:
    settings = LoraSettings(rank=2, alpha=6, layers=["attention", "mlp"])
    add_lora(mini_student, settings)
    randomize_(mini_student, seed=4)
    merged = merged_state_dict(mini_student, settings)
    from peft.tuners.lora import LoraLayer

    for name, module in list(mini_student.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(mini_student.get_submodule(parent), child, module.get_base_layer())
    expected = mini_student.state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(merged[key], expected[key], atol=1e-6) for key in expected)


def test_missing_peft_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(UsageError, match=r"student.lora needs peft: pip install 'samkd\[lora\]'"):
        add_lora(build_sam("vit_t_mini", device="meta"), LoraSettings(rank=4))
