"""SAM 2 models for the tests: samkd's, and the sam2 package's own with the same config."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from samkd.models.registry import model_type_info
from samkd.models.sam2_build import compose_config

# The package's own classes, in place of samkd's two.
PACKAGE_CLASSES = (
    "++model._target_=sam2.modeling.sam2_base.SAM2Base",
    "++model.image_encoder._target_=sam2.modeling.backbones.image_encoder.ImageEncoder",
)


def package_model(model_type: str, image_size: int) -> nn.Module:
    """sam2's `SAM2Base` (all the package's classes) of `model_type`'s config, in eval mode."""
    from hydra.utils import instantiate

    spec = model_type_info(model_type).sam2
    assert spec is not None
    config = compose_config(spec, image_size, PACKAGE_CLASSES)
    model: nn.Module = instantiate(config.model, _recursive_=True)
    return model.eval()


def perturbed(model: nn.Module, seed: int = 0, std: float = 0.05) -> nn.Module:
    """`model` with every floating-point tensor of its state dict moved by seeded noise (the
    zero-initialised ones too), in place."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * std)
    return model


def non_square_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth random `H x W x 3` uint8 image with two bright rectangles."""
    rng = np.random.default_rng(seed)
    image = rng.integers(40, 90, size=(height, width, 3), dtype=np.uint8)
    image[height // 5 : height // 2, width // 6 : width // 2] = (220, 60, 60)
    image[height // 2 : 4 * height // 5, 3 * width // 5 : 9 * width // 10] = (60, 200, 90)
    return image
