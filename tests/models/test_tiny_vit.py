from __future__ import annotations

import warnings

import pytest
import torch
from segment_anything.modeling import Sam

from samkd.models import TinyViT, build_sam
from samkd.models.tiny_vit import Attention

BOX = (100.0, 150.0, 700.0, 600.0)


@pytest.fixture(scope="module")
def mobile_sam() -> Sam:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mobile_sam import build_sam_vit_t

        return build_sam_vit_t()


def layout(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def test_state_dict_layout_matches_mobile_sam(mobile_sam: Sam) -> None:
    ours = build_sam("vit_t", device="meta")
    assert layout(ours) == layout(mobile_sam)
    persistent = set(ours.state_dict())
    index_buffers = [name for name, _ in ours.named_buffers() if "attention_bias_idxs" in name]
    assert len(index_buffers) == 10
    assert persistent.isdisjoint(index_buffers)


def test_attention_bias_index_matches_mobile_sam() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mobile_sam.modeling.tiny_vit_sam import Attention as MobileSamAttention

    for window in (1, 3, 7):
        official = MobileSamAttention(16, 8, 2, attn_ratio=1, resolution=(window, window))
        ours = Attention(16, 2, window)
        assert torch.equal(ours.attention_bias_idxs, official.attention_bias_idxs)


def test_matches_mobile_sam_at_1024(mobile_sam: Sam, randomize, predict_masks) -> None:
    ours = randomize(build_sam("vit_t"), seed=3).eval()
    mobile_sam.load_state_dict(ours.state_dict(), strict=True)
    # MobileSAM caches attention biases when switched to eval mode, so switch after loading.
    mobile_sam.eval()
    images = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        expected = predict_masks(mobile_sam, images, BOX)
        actual = predict_masks(ours, images, BOX)
    for want, got in zip(expected, actual, strict=True):
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("height, width", [(256, 256), (256, 320), (448, 192), (64, 64)])
def test_any_size_multiple_of_16(height: int, width: int) -> None:
    encoder = build_sam("vit_t_mini").image_encoder
    with torch.no_grad():
        embedding = encoder(torch.randn(2, 3, height, width))
    assert embedding.shape == (2, 256, height // 16, width // 16)


def test_rejects_size_not_multiple_of_16() -> None:
    encoder = TinyViT(embed_dims=(16, 32, 32, 64), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="multiple of 16"):
        encoder(torch.randn(1, 3, 72, 64))


def test_rejects_inconsistent_stage_config() -> None:
    with pytest.raises(ValueError, match="one entry per stage"):
        TinyViT(depths=(1, 1, 1))


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", ["vit_t_mini", "vit_mini"])
def test_gradient_checkpointing_changes_nothing(model_type: str, randomize) -> None:
    encoder = randomize(build_sam(model_type)).image_encoder.train()
    images = torch.randn(2, 3, 256, 256)
    results = []
    for checkpointed in (False, True):
        encoder.set_gradient_checkpointing(checkpointed)
        encoder.zero_grad()
        embedding = encoder(images)
        embedding.square().mean().backward()
        results.append((embedding.detach(), gradients(encoder)))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed, plain)
    assert plain_grads.keys() == checkpointed_grads.keys()
    assert len(plain_grads) > 0
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, msg=name)
