"""Latency and throughput of the image encoder and of the mask decoder."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from segment_anything.modeling import Sam

from samkd.models.taps import is_sam2


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and 90th percentile over `repeats` calls."""

    median_s: float
    p90_s: float
    repeats: int


@dataclass(frozen=True)
class SpeedReport:
    device: str
    image_size: int
    encoder_latency: Timing
    encoder_batch_size: int
    encoder_images_per_s: float
    decoder_latency_per_prompt: Timing

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def time_calls(
    call: Callable[[], object], device: torch.device, warmup: int, repeats: int
) -> Timing:
    """Time `call` after `warmup` untimed calls, synchronising CUDA around each one."""
    for _ in range(warmup):
        call()
    durations = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        call()
        _synchronize(device)
        durations.append(time.perf_counter() - start)
    ordered = sorted(durations)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return Timing(statistics.median(ordered), p90, repeats)


@torch.inference_mode()
def measure_speed(model: Sam, batch_size: int, warmup: int, repeats: int) -> SpeedReport:
    """Encoder latency (batch 1), encoder throughput (`batch_size`), decoder latency (1 box)."""
    device = model.device
    size = model.image_encoder.img_size
    single = torch.randn(1, 3, size, size, device=device)
    batch = torch.randn(batch_size, 3, size, size, device=device)
    latency = time_calls(lambda: model.image_encoder(single), device, warmup, repeats)
    batched = time_calls(lambda: model.image_encoder(batch), device, warmup, max(1, repeats // 2))
    box = torch.tensor([[size * 0.25, size * 0.25, size * 0.75, size * 0.75]], device=device)
    decode = _sam2_decode(model, single, box) if is_sam2(model) else _sam_decode(model, single, box)
    decoder = time_calls(decode, device, warmup, repeats)
    return SpeedReport(
        device=str(device),
        image_size=size,
        encoder_latency=latency,
        encoder_batch_size=batch_size,
        encoder_images_per_s=batch_size / batched.median_s,
        decoder_latency_per_prompt=decoder,
    )


def _sam_decode(model: Sam, image: torch.Tensor, box: torch.Tensor) -> Callable[[], object]:
    embedding = model.image_encoder(image)

    def decode() -> object:
        sparse, dense = model.prompt_encoder(points=None, boxes=box, masks=None)
        return model.mask_decoder(
            image_embeddings=embedding,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
        )

    return decode


def _sam2_decode(model: Sam, image: torch.Tensor, box: torch.Tensor) -> Callable[[], object]:
    """SAM 2's decoding as `SAM2ImagePredictor._predict` runs it (box corners as points,
    high-resolution maps), without the upscaling to the image's size."""
    encoder: Any = model.image_encoder
    embedding, high_res = encoder.encode(image)
    corners = box.reshape(-1, 2, 2)
    labels = torch.tensor([[2, 3]], device=box.device)

    def decode() -> object:
        sparse, dense = model.prompt_encoder(points=(corners, labels), boxes=None, masks=None)
        return model.mask_decoder(
            image_embeddings=embedding,
            image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            repeat_image=False,
            high_res_features=list(high_res),
        )

    return decode


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
