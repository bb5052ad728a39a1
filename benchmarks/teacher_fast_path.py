"""Teacher image encoder on the CPU: reference attention vs the fast path (SDPA with the
relative position bias as mask), float32.

Random weights (relative position tables perturbed so the bias is not zero), batch 2, in
inference mode. The two run alternately over rounds; each reports its median, and the ratio
is fast / reference images/s of the same run. The maximum absolute difference of the image
embeddings is taken on the same batch.

    python -m benchmarks --only teacher_fast_path
"""

from __future__ import annotations

import torch
from segment_anything.modeling import Sam

from benchmarks.common import NOISE_NOTE, ResultTable, Section, interleaved_seconds, median
from samkd.models import build_sam, fast_attention
from samkd.models.fast_attention import FLOAT32_TOLERANCE

NAME = "teacher_fast_path"
BATCH = 2

FULL = (("vit_b", 256), ("vit_b", 512))
QUICK = (("vit_mini", 128),)


def teacher(model_type: str, image_size: int) -> Sam:
    model = build_sam(model_type, image_size=image_size).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.image_encoder.named_parameters():
            if "rel_pos" in name:
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.add_(noise * 0.1)
    return model


def measure(model_type: str, image_size: int, rounds: int) -> list[str]:
    model = teacher(model_type, image_size)
    encoder = model.image_encoder
    images = torch.randn(BATCH, 3, image_size, image_size)

    def reference() -> torch.Tensor:
        with torch.inference_mode():
            return encoder(images)

    def fast() -> torch.Tensor:
        with torch.inference_mode(), fast_attention(encoder):
            return encoder(images)

    error = (reference() - fast()).abs().max().item()  # also the warm-up
    times = interleaved_seconds({"reference": reference, "fast": fast}, rounds=rounds)
    reference_rate = BATCH / median(times["reference"])
    fast_rate = BATCH / median(times["fast"])
    return [
        f"{model_type} @ {image_size} px",
        f"{reference_rate:.2f}",
        f"{fast_rate:.2f}",
        f"{fast_rate / reference_rate:.2f}x",
        f"{error:.1e}",
    ]


def run(quick: bool = False) -> Section:
    torch.manual_seed(0)
    table = ResultTable(
        [
            "teacher encoder, float32",
            "reference (images/s)",
            "fast path (images/s)",
            "fast / reference",
            "max abs difference",
        ]
    )
    for model_type, size in QUICK if quick else FULL:
        table.add(*measure(model_type, size, rounds=1 if quick else 3))
    return Section(
        name=NAME,
        title="Teacher fast path on the CPU",
        description=(
            f"SAM ViT image encoder alone, batch {BATCH}, random weights with non-zero relative "
            "positions, float32, inference mode; reference = segment-anything's attention, fast "
            "path = `samkd.models.fast_attention` (scaled_dot_product_attention with the "
            "decomposed relative position bias as additive mask, no compile). Median of "
            "alternating rounds; max abs difference of the image embeddings on the same batch "
            f"(tested bound in float32: {FLOAT32_TOLERANCE:.0e}). On the CPU the fast path is "
            "off by default (`extract.fast_teacher=auto`); it is meant for CUDA (bf16, fused "
            "kernels, no full attention matrix), where `benchmarks/gpu_check.sh` measures it."
        ),
        tables=[table],
        notes=[NOISE_NOTE],
    )
