"""Building SAM 2 models from the `sam2` package's own Hydra configs.

`build_sam2_model` composes a config of the installed package (`configs/sam2.1/...yaml`), with
the overrides `build_sam2` applies for inference (`dynamic_multimask_via_stability`), the
input size, and samkd's two classes in place of `SAM2Base` and `ImageEncoder`
(`samkd.models.sam2_model`), then instantiates it: every part is sam2's own module.

The `sam2` package is an optional dependency (`pip install 'samkd[sam2]'`); without it,
`require_sam2` raises one line saying how to install it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch

from samkd.errors import UsageError

SAM2_INSTALL = "SAM2_BUILD_CUDA=0 pip install 'samkd[sam2]'"
SAM2_MODEL_TARGET = "samkd.models.sam2_model.Sam2Model"
SAM2_ENCODER_TARGET = "samkd.models.sam2_image_encoder.Sam2ImageEncoder"
# What `sam2.build_sam.build_sam2` adds for inference (its `apply_postprocessing`).
INFERENCE_OVERRIDES = (
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
    "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
)


@dataclass(frozen=True)
class Sam2Config:
    """A SAM 2 model type: the package's config and samkd's overrides of it (a preset)."""

    config: str
    overrides: tuple[str, ...] = ()


def require_sam2(model_type: str) -> None:
    """Raise a one-line `UsageError` when the `sam2` package is not installed."""
    if importlib.util.find_spec("sam2") is None:
        raise UsageError(
            f"model type '{model_type}' needs the sam2 package (SAM 2 / 2.1), which is not "
            f"installed: {SAM2_INSTALL}"
        )


def compose_config(spec: Sam2Config, image_size: int, extra: Sequence[str] = ()) -> Any:
    """The resolved Hydra config of `spec` at `image_size`, with samkd's classes."""
    import sam2  # noqa: F401  (initialises Hydra on the package's configs)
    from hydra import compose
    from omegaconf import OmegaConf

    grid = image_size // 16
    overrides = [
        f"++model._target_={SAM2_MODEL_TARGET}",
        f"++model.image_encoder._target_={SAM2_ENCODER_TARGET}",
        f"++model.image_size={image_size}",
        # Memory attention's rotary embeddings are laid out for the stride-16 grid.
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{grid},{grid}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{grid},{grid}]",
        *INFERENCE_OVERRIDES,
        *spec.overrides,
        *extra,
    ]
    config = compose(config_name=spec.config, overrides=overrides)
    OmegaConf.resolve(config)
    return config


def build_sam2_model(
    model_type: str,
    spec: Sam2Config,
    image_size: int,
    checkpoint: str | PathLike[str] | None,
    device: torch.device,
) -> Any:
    """A `Sam2Model` in eval mode on `device`, with `checkpoint`'s weights loaded strictly.

    `device="meta"` builds the structure without memory: it is built on the CPU without
    initialising the weights, then moved (Hiera's constructor reads a tensor's value, which
    the meta device has not).
    """
    require_sam2(model_type)
    from hydra.utils import instantiate

    from samkd.models.checkpoint import SkippedInit, load_weights

    config = compose_config(spec, image_size)
    skip = checkpoint is not None or device.type == "meta"
    with SkippedInit() if skip else contextlib.nullcontext():
        model = instantiate(config.model, _recursive_=True)
    if checkpoint is not None:
        load_weights(model, checkpoint, model_type)
    return model.to(device).eval()
