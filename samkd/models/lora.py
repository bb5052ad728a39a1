"""Low-rank adapters (LoRA, Hu et al., 2021) on a SAM model's linear layers, built with peft.

An adapted layer computes `W x + (alpha / r) B A x` with `A: r x in` and `B: out x r`; `B`
starts at zero, so a freshly adapted model computes what the plain one does. peft replaces each
adapted `nn.Linear` in place by a layer holding the original one (`base_layer`) and the
adapters, which changes the state-dict keys; `merged_state_dict` folds the adapters back into
the weights under the original keys, so the result loads into the plain model (and a training
checkpoint of an adapted student reads as the merged weights, `samkd.models.checkpoint`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Attention as VitAttention
from segment_anything.modeling.transformer import Attention as DecoderAttention
from torch import nn

from samkd.errors import UsageError
from samkd.models import tiny_vit
from samkd.models.checkpoint import merge_lora_state

if TYPE_CHECKING:
    from samkd.settings import LoraSettings

LayerKind = Literal["attention", "mlp"]
# The modules whose linear layers count as attention projections or as a transformer MLP;
# the decoder's output heads (`mask_decoder.MLP`) are neither.
PARENTS: dict[LayerKind, tuple[type[nn.Module], ...]] = {
    "attention": (tiny_vit.Attention, VitAttention, DecoderAttention),
    "mlp": (tiny_vit.Mlp, MLPBlock),
}
LORA_EXTRA = "pip install 'samkd[lora]'"
ADAPTER_MARK = "lora_"


def lora_targets(model: Sam, parts: Iterable[str], layers: Iterable[LayerKind]) -> list[str]:
    """Names (from the model's root) of the linear layers of `parts` whose parent module is
    of one of the `layers` kinds, e.g. `image_encoder.layers.1.blocks.0.attn.qkv`."""
    parents = tuple(kind for layer in layers for kind in PARENTS[layer])
    targets: list[str] = []
    for part in parts:
        for name, module in model.get_submodule(part).named_modules():
            if isinstance(module, parents):
                targets.extend(
                    f"{part}.{name}.{child_name}"
                    for child_name, child in module.named_children()
                    if isinstance(child, nn.Linear)
                )
    return targets


def add_lora(model: Sam, settings: LoraSettings) -> list[str]:
    """Adds adapters to `model` in place and leaves trainable only them and the parts in
    `settings.train_parts`. Returns the adapted layers' names."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise UsageError(f"student.lora needs peft: {LORA_EXTRA}") from error
    targets = lora_targets(model, settings.parts, settings.layers)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
    )
    inject_adapter_in_model(config, model)
    trained = tuple(f"{part}." for part in settings.train_parts)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(is_adapter(name) or name.startswith(trained))
    return targets


def is_adapter(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to an adapter."""
    return ADAPTER_MARK in name


def merged_state_dict(model: nn.Module, settings: LoraSettings) -> dict[str, torch.Tensor]:
    """The weights of `model` (adapted as `settings` say) with the adapters merged into them,
    under the plain model's keys; `model` itself keeps its adapters."""
    state = model.state_dict()
    if not settings.rank:
        return state
    return merge_lora_state(state, settings.alpha / settings.rank)
