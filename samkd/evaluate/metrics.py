"""Mask IoU and its means, split by prompt kind, output mode and object size."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

# COCO's object-size thresholds, in pixels of the original image.
SMALL_AREA = 32**2
LARGE_AREA = 96**2
SIZE_NAMES = ("small", "medium", "large")


def mask_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Intersection over union of boolean masks.

    predicted, target: `... x H x W` boolean. Returns `...` float32. Two empty masks have
    IoU 1 (they agree perfectly); one empty and one not, 0.
    """
    predicted = predicted.bool()
    target = target.bool()
    intersection = (predicted & target).flatten(-2).sum(-1).float()
    union = (predicted | target).flatten(-2).sum(-1).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))


def size_bucket(area: int) -> str:
    """COCO's size class of an object of `area` pixels: small, medium or large."""
    if area < SMALL_AREA:
        return "small"
    if area < LARGE_AREA:
        return "medium"
    return "large"


@dataclass
class IoUTable:
    """Running per-object IoUs, grouped by (prompt kind, output mode) and by size."""

    values: dict[tuple[str, str, str], list[float]] = field(
        default_factory=lambda: defaultdict(list)
    )

    def add(self, prompt: str, output: str, ious: torch.Tensor, areas: torch.Tensor) -> None:
        """Record the IoUs (`N`) of N objects whose ground-truth areas are `areas` (`N`)."""
        for iou, area in zip(ious.tolist(), areas.tolist(), strict=True):
            self.values[(prompt, output, "all")].append(iou)
            self.values[(prompt, output, size_bucket(int(area)))].append(iou)

    def mean(self, prompt: str, output: str, size: str = "all") -> float | None:
        """Mean IoU of a group, or None when it has no objects."""
        found = self.values.get((prompt, output, size))
        return sum(found) / len(found) if found else None

    def count(self, prompt: str, output: str, size: str = "all") -> int:
        return len(self.values.get((prompt, output, size), ()))

    def groups(self) -> list[tuple[str, str]]:
        """(prompt, output) pairs in the order they were first recorded."""
        seen: dict[tuple[str, str], None] = {}
        for prompt, output, _ in self.values:
            seen.setdefault((prompt, output), None)
        return list(seen)

    def summary(self) -> dict[str, dict[str, dict[str, float | int | None]]]:
        """`{prompt: {output: {"miou": ..., "count": ..., "miou_small": ..., ...}}}`."""
        result: dict[str, dict[str, dict[str, float | int | None]]] = {}
        for prompt, output in self.groups():
            entry: dict[str, float | int | None] = {
                "miou": self.mean(prompt, output),
                "count": self.count(prompt, output),
            }
            for size in SIZE_NAMES:
                entry[f"miou_{size}"] = self.mean(prompt, output, size)
                entry[f"count_{size}"] = self.count(prompt, output, size)
            result.setdefault(prompt, {})[output] = entry
        return result
