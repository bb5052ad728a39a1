"""Forward time of the small presets vs the real-size MobileSAM student (informational).

Batch 1, random weights, one box prompt: image encoder, prompt encoder and mask decoder
(3 masks), in inference mode. The models alternate over rounds; each reports its median.

    python -m benchmarks --only preset_speed
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from segment_anything.modeling import Sam

from benchmarks.common import NOISE_NOTE, ResultTable, Section, interleaved_seconds, median, ratio
from samkd.models import build_sam

NAME = "preset_speed"

# (model type, image size); the last one is the baseline.
FULL = (("vit_mini", 256), ("vit_t_mini", 256), ("vit_t", 256), ("vit_t", 1024))
QUICK = (("vit_mini", 128), ("vit_t_mini", 128), ("vit_t", 256))


@torch.inference_mode()
def predict(model: Sam, image: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    embedding = model.image_encoder(image)
    sparse, dense = model.prompt_encoder(points=None, boxes=box, masks=None)
    masks, _ = model.mask_decoder(
        image_embeddings=embedding,
        image_pe=model.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=True,
    )
    return masks


def forward_of(model_type: str, image_size: int) -> tuple[str, Callable[[], torch.Tensor]]:
    model = build_sam(model_type, image_size=image_size).eval()
    image = torch.randn(1, 3, image_size, image_size)
    box = torch.tensor([[0.25, 0.25, 0.75, 0.75]]) * image_size
    predict(model, image, box)  # warm-up
    return f"{model_type} @ {image_size} px", lambda: predict(model, image, box)


def run(quick: bool = False) -> Section:
    torch.manual_seed(0)
    models = QUICK if quick else FULL
    functions = dict(forward_of(model_type, size) for model_type, size in models)
    times = interleaved_seconds(functions, rounds=1 if quick else 3)
    medians = {name: median(values) for name, values in times.items()}
    baseline_name = list(medians)[-1]
    table = ResultTable(["model", "forward (ms)", f"ratio to {baseline_name}"])
    for name, seconds in medians.items():
        table.add(name, f"{seconds * 1e3:.0f}", ratio(seconds, medians[baseline_name]))
    return Section(
        name=NAME,
        title="Preset forward speed",
        description=(
            "Batch 1, random weights, one box prompt, image encoder + prompt encoder + mask "
            "decoder (3 masks) in inference mode; median of alternating rounds. The presets "
            "keep SAM's full-size mask decoder, so at small inputs it is a visible share."
        ),
        tables=[table],
        notes=[NOISE_NOTE],
    )
