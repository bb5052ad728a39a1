"""Training batches: samples with their prompts, low-resolution targets and teacher features.

Photometric changes and flips keep stored teacher features valid:
- photometric changes (brightness, contrast) touch the student's input only: stored teacher
  features are those of the original image, and online teachers are given the original image;
- a horizontal flip mirrors the image, its masks and prompts inside the valid (unpadded)
  region, and the stored feature maps alike. SAM's encoders are not exactly flip-equivariant,
  so a flipped teacher map approximates the teacher's features of the flipped image; the flip
  is off by default and refused with attention matching, whose coarse maps are not mirrored.

Models in the `square` frame (SAM 2) take each image resized to `S x S`
(`Sample.square_image`): a flip mirrors it and a teacher's stored square maps whole.

Geometric changes (crop, scale jitter, quarter turns; `samkd.data.geometry`) are online only:
they change the image that the teachers see, so they run on the image at original resolution
and its masks while the sample is read, boxes and prompts are drawn from the transformed
masks, and student and teachers alike are given the transformed image. Images without masks
are prompted after them (`LabelFree`: grid points on the transformed image, the teacher's
masks transformed alike); an image whose objects a crop left out counts as one without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from samkd.data import Geometry, Sample, SegmentationDataset
from samkd.features import FeatureStore, FeatureStoreError
from samkd.models.frames import SQUARE, Frame
from samkd.train.label_free import LabelFree

LOW_RES_FACTOR = 4  # SAM's mask logits are 4x the embedding grid: image_size / 4


@dataclass(frozen=True)
class Augmentation:
    """Random photometric changes (student input only), horizontal flips and geometric
    changes (online teachers only).

    crop_scale: `(min, max)` fraction of the image's area a crop keeps; scale_jitter: `s`,
    the image's scale in SAM's input is uniform in `[1 - s, 1 + s]`; rotate90: turn by a
    random multiple of 90 degrees (see `Geometry`).
    """

    brightness: float = 0.0
    contrast: float = 0.0
    flip_probability: float = 0.0
    crop_scale: tuple[float, float] = (1.0, 1.0)
    scale_jitter: float = 0.0
    rotate90: bool = False

    @property
    def geometric(self) -> bool:
        return self.crop_scale != (1.0, 1.0) or self.scale_jitter > 0 or self.rotate90

    def draw_geometry(self, rng: np.random.Generator) -> Geometry | None:
        """A random `Geometry`, or None without geometric augmentation."""
        if not self.geometric:
            return None
        # Every value is drawn whichever augmentation is on: each keeps its stream.
        turns = int(rng.integers(4))
        area = rng.uniform(*self.crop_scale)
        zoom = rng.uniform(1 - self.scale_jitter, 1 + self.scale_jitter)
        crop_at, zoom_at = rng.random(2), rng.random(2)
        return Geometry(
            quarter_turns=turns if self.rotate90 else 0,
            area=float(area),
            zoom=float(zoom),
            crop_at=(float(crop_at[0]), float(crop_at[1])),
            zoom_at=(float(zoom_at[0]), float(zoom_at[1])),
        )


@dataclass
class TrainingSample:
    """A dataset sample plus what training needs.

    low_res_targets: `N x S/4 x S/4` float ground truth in the padded input frame;
    teacher_features: `{teacher: {tap: tensor}}` from the feature file (empty when online);
    teacher_image: `3 x S x S` input of online teachers when photometric changes made the
    student's differ (None: the same as the student's); task_weights: `N` weight of each
    object in SAM's task loss, set for an image prompted without masks (`LabelFree`; its
    objects without a target have zero targets and weight 0), None: every object weighs 1.
    """

    sample: Sample
    low_res_targets: torch.Tensor
    teacher_features: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    flipped: bool = False
    teacher_image: torch.Tensor | None = None
    task_weights: torch.Tensor | None = None


@dataclass
class TrainingBatch:
    """Student inputs `B x 3 x S x S`, the samples, online teachers' inputs when they differ
    from the student's (photometric augmentation), and the images in the `square` frame when
    a model takes them (`B x 3 x S x S`, None otherwise)."""

    images: torch.Tensor
    samples: list[TrainingSample]
    teacher_images: torch.Tensor | None = None
    square_images: torch.Tensor | None = None

    @property
    def skipped(self) -> list[str]:
        """What was left out of this batch under `on_error="skip"`, as messages."""
        return [message for item in self.samples for message in item.sample.skipped]

    def num_targets(self) -> int:
        """Objects with a task-loss target (weight above 0). Reads the weights: call it while
        they are on the host."""
        return sum(
            len(item.sample.prompt_kinds)
            if item.task_weights is None
            else int((item.task_weights > 0).sum())
            for item in self.samples
        )

    def teacher_inputs(self, frame: Frame = "longest_side") -> torch.Tensor:
        """Online teachers' input in `frame`."""
        if frame == SQUARE:
            return self.frame_inputs(frame)
        return self.images if self.teacher_images is None else self.teacher_images

    def frame_inputs(self, frame: Frame) -> torch.Tensor:
        """The images as a model in `frame` takes them (the student's, in `longest_side`)."""
        if frame != SQUARE:
            return self.images
        if self.square_images is None:
            raise ValueError("a model in the square frame needs the batch's square images")
        return self.square_images

    def to(self, device: torch.device) -> TrainingBatch:
        """The batch's tensors on `device`. The copies do not block: a blocking host-to-device
        copy waits for all the work already queued on the device."""
        for item in self.samples:
            item.low_res_targets = item.low_res_targets.to(device, non_blocking=True)
            if item.task_weights is not None:
                item.task_weights = item.task_weights.to(device, non_blocking=True)
            item.teacher_features = {
                teacher: {tap: t.to(device, non_blocking=True) for tap, t in taps.items()}
                for teacher, taps in item.teacher_features.items()
            }
        teacher_images, square = self.teacher_images, self.square_images
        if teacher_images is not None:
            teacher_images = teacher_images.to(device, non_blocking=True)
        if square is not None:
            square = square.to(device, non_blocking=True)
        images = self.images.to(device, non_blocking=True)
        return TrainingBatch(images, self.samples, teacher_images, square)

    def pin_memory(self) -> TrainingBatch:
        """Page-locked copies of what `to` moves, so that those copies are asynchronous."""
        self.images = self.images.pin_memory()
        if self.teacher_images is not None:
            self.teacher_images = self.teacher_images.pin_memory()
        if self.square_images is not None:
            self.square_images = self.square_images.pin_memory()
        for item in self.samples:
            item.low_res_targets = item.low_res_targets.pin_memory()
            if item.task_weights is not None:
                item.task_weights = item.task_weights.pin_memory()
            item.teacher_features = {
                teacher: {tap: tensor.pin_memory() for tap, tensor in taps.items()}
                for teacher, taps in item.teacher_features.items()
            }
        return self


def low_res_targets(
    masks: torch.Tensor, input_size: tuple[int, int], image_size: int
) -> torch.Tensor:
    """Masks `N x H x W` (original frame) -> `N x S/4 x S/4` in {0, 1}, aligned with SAM's
    low-resolution logits: resized like the image, padded bottom-right, then downsampled."""
    size = image_size // LOW_RES_FACTOR
    if masks.shape[0] == 0:
        return torch.zeros(0, size, size)
    resized = F.interpolate(masks[:, None].float(), size=input_size, mode="bilinear")
    padded = F.pad(resized, (0, image_size - input_size[1], 0, image_size - input_size[0]))
    low = F.interpolate(padded, size=(size, size), mode="area")
    return (low[:, 0] > 0.5).float()


class DistillationDataset(Dataset[TrainingSample]):
    """Samples of a `SegmentationDataset` joined with their rows of a `FeatureStore`.

    Workers read both, so decoding and HDF5 reads overlap with the training step. `epoch` is
    mixed into the augmentation seed; set it before each epoch's iterator is created.
    Geometric augmentation needs online teachers: no `store`.
    """

    def __init__(
        self,
        dataset: SegmentationDataset,
        store: FeatureStore | None,
        augmentation: Augmentation,
        seed: int,
        label_free: LabelFree | None = None,
    ) -> None:
        if store is not None and augmentation.geometric:
            raise ValueError(
                "geometric augmentation needs online teachers: stored features are those of "
                "the untransformed image"
            )
        self.dataset = dataset
        self.store = store
        self.augmentation = augmentation
        self.seed = seed
        self.label_free = label_free or LabelFree()
        self.epoch = 0
        # Stored teachers whose maps cover the whole image (square frame): a flip mirrors all.
        self.square_teachers = frozenset(
            teacher.name for teacher in (store.teachers if store else []) if teacher.frame == SQUARE
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """Draw new prompts and augmentations for `epoch` (before creating its iterator)."""
        self.epoch = epoch
        self.dataset.seed = self.seed + epoch

    def __getitems__(self, indices: list[int]) -> list[TrainingSample]:
        """A micro-batch (what a DataLoader worker fetches): its stored rows are asked of the
        disk together first (`FeatureStore.prefetch`), then read one by one."""
        if self.store is not None:
            self.store.prefetch([self.dataset.records[index].image_id for index in indices])
        return [self[index] for index in indices]

    def __getitem__(self, index: int) -> TrainingSample:
        geometry = self.augmentation.draw_geometry(
            np.random.default_rng((self.seed, self.epoch, index, 13))
        )
        sample, features = self._sample_with_features(index, geometry)
        task_weights = None
        if self.label_free.mode != "none" and not sample.prompt_kinds:
            prompt_rng = np.random.default_rng((self.seed, self.epoch, index, 11))
            sample, task_weights = self.label_free.prompt(
                sample, self.dataset, prompt_rng, geometry
            )
        rng = np.random.default_rng((self.seed, self.epoch, index, 7))
        flip = bool(rng.random() < self.augmentation.flip_probability)
        if flip:
            image_size = sample.image.shape[-1]
            features = flip_features(
                features, sample.input_size[1], image_size, self.square_teachers
            )
            sample = flip_sample(sample)
        clean_image = sample.image
        sample.image = photometric(clean_image, sample.input_size, self.augmentation, rng)
        teacher_image = None if sample.image is clean_image else clean_image
        targets = low_res_targets(sample.masks, sample.input_size, sample.image.shape[-1])
        if len(targets) < len(sample.prompt_kinds):  # grid points: no target
            targets = targets.new_zeros(len(sample.prompt_kinds), *targets.shape[1:])
        return TrainingSample(sample, targets, features, flip, teacher_image, task_weights)

    def _sample_with_features(
        self, index: int, geometry: Geometry | None
    ) -> tuple[Sample, dict[str, dict[str, Tensor]]]:
        """The sample (after `geometry`, online only) and its stored features. Under
        `on_error="skip"` the store reads a damaged row as `{}`: the next sample takes its
        place, as the dataset does for an unreadable image, and the message travels with it
        (`Sample.skipped`)."""
        if self.store is None:
            return self.dataset.sample(index, geometry), {}
        failures: list[str] = []
        for offset in range(len(self)):
            sample = self.dataset[(index + offset) % len(self)]
            features = self.store.read(sample.image_id)
            if features:
                return replace(sample, skipped=sample.skipped + tuple(failures)), features
            failures.append(self.store.skipped_rows[sample.image_id])
        raise FeatureStoreError(f"{self.store.path.name}: no image has intact features")


def photometric(
    image: torch.Tensor,
    input_size: tuple[int, int],
    augmentation: Augmentation,
    rng: np.random.Generator,
) -> torch.Tensor:
    """Random contrast and brightness on the valid region of a normalised `3 x S x S` image."""
    if augmentation.brightness == 0 and augmentation.contrast == 0:
        return image
    contrast = 1 + rng.uniform(-augmentation.contrast, augmentation.contrast)
    brightness = rng.uniform(-augmentation.brightness, augmentation.brightness)
    height, width = input_size
    changed = image.clone()
    changed[:, :height, :width] = image[:, :height, :width] * contrast + brightness
    return changed


def flip_sample(sample: Sample) -> Sample:
    """Mirror a sample horizontally: image inside its valid width, masks, boxes and prompts."""
    height, width = sample.input_size
    image = sample.image.clone()
    image[:, :height, :width] = sample.image[:, :height, :width].flip(-1)
    original_width = sample.original_size[1]
    boxes = _flip_boxes(sample.boxes, original_width)
    prompt_boxes = None if sample.prompt_boxes is None else _flip_boxes(sample.prompt_boxes, width)
    points = sample.point_coords
    if points is not None:
        points = points.clone()
        points[..., 0] = width - 1 - points[..., 0]
    return Sample(
        index=sample.index,
        image_id=sample.image_id,
        image=image,
        original_size=sample.original_size,
        input_size=sample.input_size,
        masks=sample.masks.flip(-1),
        boxes=boxes,
        prompt_boxes=prompt_boxes,
        point_coords=points,
        point_labels=sample.point_labels,
        prompt_kinds=sample.prompt_kinds,
        skipped=sample.skipped,
        square_image=None if sample.square_image is None else sample.square_image.flip(-1),
    )


def flip_features(
    features: dict[str, dict[str, torch.Tensor]],
    input_width: int,
    image_size: int,
    square: frozenset[str] = frozenset(),
) -> dict[str, dict[str, torch.Tensor]]:
    """Mirror every `C x H x W` feature map inside the columns that cover the image (the rest
    is padding; all of them for the teachers in `square`, whose maps cover the whole image);
    other taps are left as they are."""
    flipped: dict[str, dict[str, torch.Tensor]] = {}
    for teacher, taps in features.items():
        flipped[teacher] = {}
        for tap, tensor in taps.items():
            if tensor.ndim != 3:
                flipped[teacher][tap] = tensor
                continue
            valid = tensor.shape[-1]
            if teacher not in square:
                valid = -(-input_width * tensor.shape[-1] // image_size)
            mirrored = tensor.clone()
            mirrored[..., :valid] = tensor[..., :valid].flip(-1)
            flipped[teacher][tap] = mirrored
    return flipped


def _flip_boxes(boxes: torch.Tensor, width: int) -> torch.Tensor:
    flipped = boxes.clone()
    flipped[:, 0] = width - 1 - boxes[:, 2]
    flipped[:, 2] = width - 1 - boxes[:, 0]
    return flipped


def collate_training(items: list[TrainingSample]) -> TrainingBatch:
    images = torch.stack([item.sample.image for item in items])
    teacher_images = None
    if any(item.teacher_image is not None for item in items):
        teacher_images = torch.stack(
            [
                item.sample.image if item.teacher_image is None else item.teacher_image
                for item in items
            ]
        )
    square = None
    if all(item.sample.square_image is not None for item in items):
        square = torch.stack([item.sample.square_image for item in items])  # type: ignore[misc]
    return TrainingBatch(images, items, teacher_images, square)
