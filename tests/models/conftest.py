"""Fixtures for the model tests: small models with weights that exercise every term."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from segment_anything.modeling import Sam
from torch import nn

from samkd.models import build_sam

# Zero-initialised terms (relative positions, attention biases, last MBConv batch norms) need
# to be non-zero for the tests to check them.
NOISE_STD = 0.1


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Perturbs every floating-point parameter and buffer of `model` in place, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.randn(tensor.shape, generator=generator) * NOISE_STD
            tensor.add_(noise.to(tensor.device, tensor.dtype))
            if name.endswith("running_var"):
                tensor.abs_()
    return model


@pytest.fixture
def randomize() -> Callable[..., nn.Module]:
    return randomize_


@pytest.fixture
def mini_teacher() -> Sam:
    return randomize_(build_sam("vit_mini"), seed=1)


@pytest.fixture
def mini_student() -> Sam:
    return randomize_(build_sam("vit_t_mini"), seed=2)


def box_prompt(model: Sam, box: tuple[float, float, float, float]) -> tuple[torch.Tensor, ...]:
    """Sparse and dense prompt embeddings and the dense positional encoding for one box."""
    sparse, dense = model.prompt_encoder(points=None, boxes=torch.tensor([box]), masks=None)
    return sparse, dense, model.prompt_encoder.get_dense_pe()


@pytest.fixture
def predict_masks() -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Runs encoder, prompt encoder and decoder for one box; returns embedding, masks, iou."""

    def run(
        model: Sam, images: torch.Tensor, box: tuple[float, float, float, float]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embedding = model.image_encoder(images)
        sparse, dense, dense_pe = box_prompt(model, box)
        masks, iou = model.mask_decoder(embedding, dense_pe, sparse, dense, True)
        return embedding, masks, iou

    return run
