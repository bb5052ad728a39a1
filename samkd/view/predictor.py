"""Answering a click: each model's masks for the prompts, its times, and the IoU of its masks
with the nearest ground-truth object, computed by `samkd eval`'s own functions
(`encode_images`, `predict_masks`, `mask_iou`).

The image encoder runs once per image per model: its embedding is cached (`EmbeddingCache`),
so a click costs the decoder's time only.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from samkd.data import preprocess_image
from samkd.data.masks import masks_to_boxes
from samkd.evaluate.metrics import mask_iou
from samkd.evaluate.predict import ObjectPrompts, encode_images, predict_masks
from samkd.view.sources import LoadedModel

# Embeddings kept (per model and image): a user going back and forth over a few images
# never waits for the encoder twice; at 1024 px one embedding is 4 MiB.
CACHE_SIZE = 32
POSITIVE, NEGATIVE = 1, 0

T = TypeVar("T")


@dataclass(frozen=True)
class Click:
    """One point prompt in original-image pixels: `label` 1 positive, 0 negative."""

    x: int
    y: int
    label: int


@dataclass(frozen=True)
class Prompts:
    """The prompts of one object: points in click order and at most one box (XYXY, pixels,
    inclusive as `samkd eval`'s boxes)."""

    clicks: tuple[Click, ...] = ()
    box: tuple[int, int, int, int] | None = None

    def __bool__(self) -> bool:
        return bool(self.clicks) or self.box is not None

    def with_click(self, click: Click) -> Prompts:
        return Prompts((*self.clicks, click), self.box)

    def with_box(self, corner: tuple[int, int], other: tuple[int, int]) -> Prompts:
        (x0, y0), (x1, y1) = corner, other
        return Prompts(self.clicks, (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))

    def without_last(self) -> Prompts:
        """The prompts before the latest click (the box is dropped when there are none)."""
        if self.clicks:
            return Prompts(self.clicks[:-1], self.box)
        return Prompts()

    def object_prompts(self) -> ObjectPrompts:
        """As `samkd eval` prompts one object: coords `1 x K x 2`, labels `1 x K`, box `1 x 4`."""
        coords = labels = boxes = None
        if self.clicks:
            coords = torch.tensor([[[c.x, c.y] for c in self.clicks]], dtype=torch.float32)
            labels = torch.tensor([[c.label for c in self.clicks]], dtype=torch.float32)
        if self.box is not None:
            boxes = torch.tensor([self.box], dtype=torch.float32)
        return ObjectPrompts(boxes=boxes, point_coords=coords, point_labels=labels)


@dataclass(frozen=True)
class Embedding:
    """A model's image embedding `1 x 256 x h x w` and the seconds its encoder took."""

    tensor: torch.Tensor
    seconds: float


class EmbeddingCache:
    """Embeddings by (model label, image key), least recently used dropped past `capacity`.

    `get_or_compute` runs the encoder for a key at most once while it is cached, also when
    several requests ask at the same time; `computed` counts encoder runs.
    """

    def __init__(self, capacity: int = CACHE_SIZE) -> None:
        self.capacity = capacity
        self.computed = 0
        self._entries: OrderedDict[tuple[str, str], Embedding] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(
        self, key: tuple[str, str], compute: Callable[[], Embedding]
    ) -> tuple[Embedding, bool]:
        """The cached embedding of `key` (and True), or `compute()`'s, cached (and False)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key], True
            embedding = compute()
            self.computed += 1
            self._entries[key] = embedding
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return embedding, False


@dataclass(frozen=True)
class ModelAnswer:
    """One model's answer to the prompts.

    single: `H x W` bool, the single-mask output; choices: `3 x H x W` bool, the multimask
    outputs; `*_score` SAM's predicted IoUs; `*_iou` the IoU with the target object (None
    without ground truth); times in seconds (`encoder_cached`: the embedding was reused).
    """

    label: str
    image_size: int
    single: np.ndarray
    single_score: float
    choices: np.ndarray
    choice_scores: list[float]
    single_iou: float | None
    choice_ious: list[float] | None
    encoder_seconds: float
    encoder_cached: bool
    decoder_seconds: float

    def mask(self, shown: str) -> tuple[np.ndarray, float, float | None]:
        """The mask that `shown` (a `SHOWN_MASKS` entry) picks, its predicted and true IoU."""
        if shown == SINGLE:
            return self.single, self.single_score, self.single_iou
        index = int(np.argmax(self.choice_scores)) if shown == BEST_SCORE else int(shown[-1]) - 1
        iou = None if self.choice_ious is None else self.choice_ious[index]
        return self.choices[index], self.choice_scores[index], iou


SINGLE = "single output"
BEST_SCORE = "best predicted IoU of 3"
SHOWN_MASKS = (SINGLE, BEST_SCORE, "choice 1", "choice 2", "choice 3")


@dataclass
class ViewImage:
    """The image being looked at: `H x W x 3` uint8 pixels, its ground-truth objects
    (`N x H x W` bool, None for an upload) and a key that names it in the embedding cache."""

    key: str
    name: str
    pixels: np.ndarray
    objects: np.ndarray | None = None
    boxes: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.objects is not None and self.boxes is None:
            self.boxes = masks_to_boxes(self.objects)

    @property
    def size(self) -> tuple[int, int]:
        return (self.pixels.shape[0], self.pixels.shape[1])


class Predictor:
    """The models of the page with one embedding cache."""

    def __init__(self, models: list[LoadedModel], cache: EmbeddingCache | None = None) -> None:
        self.models = models
        self.cache = cache or EmbeddingCache()

    def embed(self, model: LoadedModel, image: ViewImage) -> tuple[Embedding, bool]:
        """`model`'s embedding of `image`, from the cache when it has been computed."""

        def compute() -> Embedding:
            preprocessed, _ = preprocess_image(image.pixels, model.image_size)
            tensor, seconds = timed(lambda: encode_images(model.model, preprocessed[None]), model)
            return Embedding(tensor, seconds)

        return self.cache.get_or_compute((model.label, image.key), compute)

    def answer(self, image: ViewImage, prompts: Prompts) -> list[ModelAnswer]:
        """Every model's masks for `prompts` on `image` (which must have some)."""
        target = nearest_object(image, prompts)
        return [self._answer(model, image, prompts, target) for model in self.models]

    def _answer(
        self, model: LoadedModel, image: ViewImage, prompts: Prompts, target: int | None
    ) -> ModelAnswer:
        embedding, cached = self.embed(model, image)
        given = prompts.object_prompts()

        def decode() -> tuple[torch.Tensor, ...]:
            single = predict_masks(model.model, embedding.tensor, given, image.size, False)
            multi = predict_masks(model.model, embedding.tensor, given, image.size, True)
            return (
                single.masks[0, 0],
                single.iou_predictions[0],
                multi.masks[0],
                multi.iou_predictions[0],
            )

        (single, single_score, choices, choice_scores), seconds = timed(decode, model)
        single_iou = choice_ious = None
        if target is not None:
            assert image.objects is not None
            reference = torch.from_numpy(image.objects[target])
            single_iou = float(mask_iou(single, reference))
            choice_ious = [float(value) for value in mask_iou(choices, reference[None])]
        return ModelAnswer(
            label=model.label,
            image_size=model.image_size,
            single=single.numpy(),
            single_score=float(single_score[0]),
            choices=choices.numpy(),
            choice_scores=[float(value) for value in choice_scores],
            single_iou=single_iou,
            choice_ious=choice_ious,
            encoder_seconds=embedding.seconds,
            encoder_cached=cached,
            decoder_seconds=seconds,
        )


def timed(call: Callable[[], T], model: LoadedModel) -> tuple[T, float]:
    """`call()` and its seconds (the device's queue drained first, for CUDA)."""
    device = model.model.device
    _synchronize(device)
    began = time.perf_counter()
    result = call()
    _synchronize(device)
    return result, time.perf_counter() - began


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nearest_object(image: ViewImage, prompts: Prompts) -> int | None:
    """The ground-truth object the prompts point at: the smallest object under the first
    positive click, else the object nearest to it; without positive clicks, the object whose
    box overlaps the drawn box most. None without ground truth or positive prompts."""
    if image.objects is None or not len(image.objects):
        return None
    positive = next((click for click in prompts.clicks if click.label == POSITIVE), None)
    if positive is not None:
        return _nearest_to_point(image.objects, positive.x, positive.y)
    if prompts.box is not None:
        assert image.boxes is not None
        return _best_box(image.boxes, prompts.box)
    return None


def _nearest_to_point(objects: np.ndarray, x: int, y: int) -> int:
    under = [index for index, mask in enumerate(objects) if mask[y, x]]
    if under:
        return min(under, key=lambda index: int(objects[index].sum()))
    distances = [np.inf] * len(objects)
    for index, mask in enumerate(objects):
        rows, columns = np.nonzero(mask)
        if rows.size:
            distances[index] = float(np.min((rows - y) ** 2 + (columns - x) ** 2))
    return int(np.argmin(distances))


def _best_box(boxes: np.ndarray, box: tuple[int, int, int, int]) -> int:
    drawn = np.asarray(box, dtype=np.float64)
    # Inclusive pixel boxes: a box from column 3 to 5 is 3 pixels wide.
    width = np.clip(
        np.minimum(boxes[:, 2], drawn[2]) - np.maximum(boxes[:, 0], drawn[0]) + 1, 0, None
    )
    height = np.clip(
        np.minimum(boxes[:, 3], drawn[3]) - np.maximum(boxes[:, 1], drawn[1]) + 1, 0, None
    )
    overlap = width * height
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    drawn_area = (drawn[2] - drawn[0] + 1) * (drawn[3] - drawn[1] + 1)
    return int(np.argmax(overlap / (areas + drawn_area - overlap)))
