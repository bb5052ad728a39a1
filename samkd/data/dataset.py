"""``SegmentationDataset``: lazily decoded samples ready for SAM, and their collation.

Error handling happens in two places:

* Indexing (``build_dataset`` / the layout readers) does cheap checks: missing files,
  unparsable annotation files, malformed segmentations. Problems that make the whole
  dataset unusable (no such folder, unrecognised or ambiguous layout, a COCO file that is
  not JSON) always raise; item-level problems raise or, under ``on_error="skip"``, leave the
  item out and are listed in ``dataset.skipped``.
* Loading (``__getitem__``, in DataLoader workers) decodes images and masks. Under
  ``"skip"`` a bad mask is left out of its sample, and a sample whose image cannot be used
  is replaced by the next loadable record (wrapping around), so a given index always gives
  the same sample. These messages travel with the sample (``Sample.skipped``) because
  worker processes cannot update the dataset in the main process; aggregate them with
  ``summarize_skipped``. ``dataset.validate()`` instead decodes everything once up front,
  removes what is bad and adds it to ``dataset.skipped``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from samkd.data.errors import DataError, OnError, check_on_error, handle_error
from samkd.data.geometry import Geometry
from samkd.data.images import (
    load_rgb_image,
    preprocess_image,
    preprocess_square,
    resize_boxes,
    resize_coords,
)
from samkd.data.layouts import (
    AnnotationMask,
    ImageRecord,
    LabelImage,
    LayoutChoice,
    MaskSource,
    PngMask,
    Sa1bAnnotationFile,
    read_layout,
    read_sa1b_annotation_file,
)
from samkd.data.masks import (
    MASK_THRESHOLD,
    check_mask_threshold,
    decode_segmentation,
    label_ids,
    load_label_image,
    load_png_mask,
    masks_to_boxes,
)
from samkd.data.prompts import PromptKind, PromptSampler, select_objects


@dataclass
class Sample:
    """One image prepared for SAM, with its objects.

    Attributes:
        index: index of the record this sample was loaded from.
        image_id: the image's id in its dataset (file stem, or COCO ``file_name`` without
            extension).
        image: ``3 x S x S`` float32, normalised and padded as ``Sam.preprocess`` does.
        original_size: ``(H, W)`` of the image file (of what a ``Geometry`` kept of it).
        input_size: ``(h, w)`` after resizing the longest side to ``S`` (less, zoomed out by
            a ``Geometry``), before padding.
        masks: ``N x H x W`` bool object masks at original resolution (``N`` may be 0).
        boxes: ``N x 4`` float32 tight XYXY boxes of the masks, original pixel coordinates.
        prompt_boxes: ``N x 4`` float32 jittered XYXY boxes in input coordinates, or
            ``None`` without a prompt sampler.
        point_coords: ``N x K x 2`` float32 ``(x, y)`` points in input coordinates, or
            ``None``.
        point_labels: ``N x K`` int64, 1 positive, 0 negative, -1 padding, or ``None``.
        prompt_kinds: ``"box"`` or ``"points"`` per object (empty without a sampler).
        skipped: messages of masks or images left out while loading under ``"skip"``.
        square_image: ``3 x S x S`` float32, the image as SAM 2 takes it
            (``preprocess_square``), when the dataset's ``square_inputs`` is set.
    """

    index: int
    image_id: str
    image: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    masks: torch.Tensor
    boxes: torch.Tensor
    prompt_boxes: torch.Tensor | None = None
    point_coords: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    prompt_kinds: tuple[PromptKind, ...] = ()
    skipped: tuple[str, ...] = ()
    square_image: torch.Tensor | None = None


@dataclass
class SampleBatch:
    """Samples collated by ``collate_samples``: images stacked, ragged fields as lists.

    ``images`` is ``B x 3 x S x S``; every other field holds one entry per sample, as in
    ``Sample``. ``skipped`` joins the samples' messages.
    """

    indices: list[int]
    image_ids: list[str]
    images: torch.Tensor
    original_sizes: list[tuple[int, int]]
    input_sizes: list[tuple[int, int]]
    masks: list[torch.Tensor]
    boxes: list[torch.Tensor]
    prompt_boxes: list[torch.Tensor | None]
    point_coords: list[torch.Tensor | None]
    point_labels: list[torch.Tensor | None]
    prompt_kinds: list[tuple[PromptKind, ...]]
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.indices)


def collate_samples(samples: Sequence[Sample]) -> SampleBatch:
    """Collate function for a ``DataLoader`` over a ``SegmentationDataset``."""
    return SampleBatch(
        indices=[s.index for s in samples],
        image_ids=[s.image_id for s in samples],
        images=torch.stack([s.image for s in samples]),
        original_sizes=[s.original_size for s in samples],
        input_sizes=[s.input_size for s in samples],
        masks=[s.masks for s in samples],
        boxes=[s.boxes for s in samples],
        prompt_boxes=[s.prompt_boxes for s in samples],
        point_coords=[s.point_coords for s in samples],
        point_labels=[s.point_labels for s in samples],
        prompt_kinds=[s.prompt_kinds for s in samples],
        skipped=[message for s in samples for message in s.skipped],
    )


@dataclass(frozen=True, eq=False)
class LabelObject:
    """One object of a decoded label image: the pixels whose id is ``label_id``."""

    path: Path
    label_id: int
    # H x W ids, shared by the objects of one label image so that it is read once.
    labels: np.ndarray = field(repr=False)


ObjectSource = PngMask | AnnotationMask | LabelObject
"""Where one object's mask is, ready to decode with ``decode_mask``."""


def label_objects(path: Path, image_size: tuple[int, int]) -> list[LabelObject]:
    """The objects of the label image ``path`` for an image of size ``(H, W)``, by id.

    Raises:
        DataError: see ``load_label_image``.
    """
    labels = load_label_image(path, image_size)
    return [LabelObject(path, label_id, labels) for label_id in label_ids(labels)]


@dataclass
class LoadedObjects:
    """One record decoded without SAM's preprocessing.

    Attributes:
        image: ``H x W x 3`` uint8 RGB.
        masks: ``N x H x W`` bool object masks (``N`` may be 0).
        skipped: messages of masks left out under ``on_error="skip"``.
    """

    image: np.ndarray
    masks: np.ndarray
    skipped: list[str]


class SegmentationDataset(Dataset[Sample]):
    """Images and object masks, decoded lazily in ``__getitem__``.

    Args:
        records: images and where their masks are, from a layout reader.
        image_size: ``S``, the side of SAM's square input (1024 for SAM and MobileSAM).
        prompt_sampler: samples prompts per object; ``None`` gives samples without prompts.
        on_error: ``"raise"`` on the first bad image or mask, or ``"skip"`` it (see the
            module docstring for where skipped items are reported).
        max_objects: keep at most this many objects per image, chosen by
            ``select_objects`` from ``(seed, index)`` before masks are decoded.
        seed: seed for object selection and prompts; a sample depends only on
            ``(seed, index)``.
        exif_transpose: apply EXIF orientation to images (masks must then be annotated
            on the rotated image).
        mask_threshold: fraction of its format's full range from which a greyscale PNG
            mask pixel is foreground (see ``load_png_mask``); in ``(0, 1]``.
        skipped: messages of items already skipped while indexing.

    Attributes:
        square_inputs: also give each sample its ``square_image`` (for SAM 2 models in the
            ``square`` frame); off unless set.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int = 1024,
        prompt_sampler: PromptSampler | None = None,
        on_error: OnError = "raise",
        *,
        max_objects: int | None = None,
        seed: int = 0,
        exif_transpose: bool = False,
        mask_threshold: float = MASK_THRESHOLD,
        skipped: Sequence[str] = (),
    ) -> None:
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if max_objects is not None and max_objects < 0:
            raise ValueError(f"max_objects must be non-negative, got {max_objects}")
        self.records = list(records)
        self.image_size = image_size
        self.prompt_sampler = prompt_sampler
        self.on_error = check_on_error(on_error)
        self.max_objects = max_objects
        self.seed = seed
        self.exif_transpose = exif_transpose
        self.mask_threshold = check_mask_threshold(mask_threshold)
        self.skipped: list[str] = list(skipped)
        self.square_inputs = False

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return self.sample(index)

    def sample(self, index: int, geometry: Geometry | None = None) -> Sample:
        """``dataset[index]``, turned, cropped and zoomed by ``geometry`` when given: the
        sample is then that of the transformed image, its objects those whose masks are
        still in it, their boxes and prompts drawn from the transformed masks."""
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} samples")
        failures: list[str] = []
        # Under "skip", an unusable image is replaced by the next record, deterministically.
        for offset in range(len(self.records)):
            record_index = (index + offset) % len(self.records)
            try:
                loaded = self._load_objects(self.records[record_index], record_index)
            except DataError as error:
                failures.append(handle_error(error, self.on_error, "image skipped"))
                continue
            return self._make_sample(record_index, loaded, failures, geometry)
        raise DataError(self.records[index].image_path, "no loadable image in the dataset")

    def load_objects(self, index: int) -> LoadedObjects:
        """Decode record ``index``'s image and masks (at most ``max_objects``) as they are
        stored, without SAM's preprocessing; a bad mask raises or is skipped per
        ``on_error``.

        Raises:
            DataError: the image cannot be used (whatever ``on_error``).
        """
        return self._load_objects(self.records[index], index)

    def _load_objects(self, record: ImageRecord, index: int) -> LoadedObjects:
        image = load_record_image(record, exif_transpose=self.exif_transpose)
        size = (image.shape[0], image.shape[1])
        skipped: list[str] = []
        sources = self._expand_sources(record.mask_sources, size, skipped)
        chosen = select_objects(len(sources), self.max_objects, seed=self.seed, index=index)
        masks = []
        for position in chosen:
            try:
                masks.append(decode_mask(sources[position], size, self.mask_threshold))
            except DataError as error:
                skipped.append(handle_error(error, self.on_error, "mask skipped"))
        stacked = np.stack(masks) if masks else np.zeros((0, *size), dtype=bool)
        return LoadedObjects(image, stacked, skipped)

    def _expand_sources(
        self, sources: Sequence[MaskSource], image_size: tuple[int, int], skipped: list[str]
    ) -> list[ObjectSource]:
        """One source per object: SA-1B files and label images are read here."""
        expanded: list[ObjectSource] = []
        for source in sources:
            try:
                if isinstance(source, Sa1bAnnotationFile):
                    expanded.extend(read_sa1b_annotation_file(source.path))
                elif isinstance(source, LabelImage):
                    expanded.extend(label_objects(source.path, image_size))
                else:
                    expanded.append(source)
            except DataError as error:
                skipped.append(handle_error(error, self.on_error, "masks skipped"))
        return expanded

    def _make_sample(
        self,
        index: int,
        loaded: LoadedObjects,
        failures: list[str],
        geometry: Geometry | None = None,
    ) -> Sample:
        record = self.records[index]
        long_side = self.image_size
        if geometry is not None:
            loaded = reframed(loaded, geometry)
            long_side = geometry.long_side(self.image_size)
        original_size = (loaded.image.shape[0], loaded.image.shape[1])
        image, input_size = preprocess_image(loaded.image, self.image_size, long_side)
        sample = Sample(
            index=index,
            image_id=record.image_id,
            image=image,
            original_size=original_size,
            input_size=input_size,
            masks=torch.from_numpy(loaded.masks),
            boxes=torch.from_numpy(masks_to_boxes(loaded.masks)),
            skipped=tuple(failures + loaded.skipped),
            square_image=(
                preprocess_square(loaded.image, self.image_size) if self.square_inputs else None
            ),
        )
        if self.prompt_sampler is None:
            return sample
        return with_prompts(sample, loaded.masks, self.prompt_sampler, self.seed)

    def validate(self) -> list[str]:
        """Decode every image and mask once; drop what fails and record it in ``skipped``.

        Under ``"raise"`` the first problem raises ``DataError``. Under ``"skip"`` bad
        records and bad mask sources are removed, so that later loading is clean, and the
        new messages are returned (and appended to ``skipped``). Ignores ``max_objects``:
        every mask is checked. Decodes the whole dataset, so it costs one epoch of loading.
        """
        found: list[str] = []
        kept: list[ImageRecord] = []
        for record in self.records:
            checked = self._validate_record(record, found)
            if checked is not None:
                kept.append(checked)
        self.records = kept
        self.skipped.extend(found)
        return found

    def _validate_record(self, record: ImageRecord, found: list[str]) -> ImageRecord | None:
        try:
            image = load_record_image(record, exif_transpose=self.exif_transpose)
        except DataError as error:
            found.append(handle_error(error, self.on_error, "image skipped"))
            return None
        size = (image.shape[0], image.shape[1])
        good: list[MaskSource] = []
        for source in record.mask_sources:
            objects = self._expand_sources([source], size, found)
            checked = [item for item in objects if self._decodes(item, size, found)]
            if isinstance(source, LabelImage):
                # A label image is kept whole, not as its decoded ids, so records stay small;
                # its objects pass or fail together (reading it checks the size).
                if checked:
                    good.append(source)
            else:
                good.extend(item for item in checked if not isinstance(item, LabelObject))
        return replace(record, mask_sources=tuple(good))

    def _decodes(self, source: ObjectSource, size: tuple[int, int], found: list[str]) -> bool:
        try:
            decode_mask(source, size, self.mask_threshold)
        except DataError as error:
            found.append(handle_error(error, self.on_error, "mask skipped"))
            return False
        return True


def reframed(loaded: LoadedObjects, geometry: Geometry) -> LoadedObjects:
    """`loaded` turned and cropped by `geometry`, without the objects it leaves no pixel of
    (prompts are drawn from non-empty masks)."""
    masks = geometry.masks(loaded.masks)
    kept = masks[masks.any(axis=(1, 2))]
    return LoadedObjects(geometry.image(loaded.image), kept, loaded.skipped)


def with_prompts(sample: Sample, masks: np.ndarray, sampler: PromptSampler, seed: int) -> Sample:
    """`sample` with prompts drawn by `sampler` from its objects, `masks` (`N x H x W` bool,
    original frame; the numpy array behind `sample.masks`), fixed by `(seed, sample.index)`."""
    prompts = sampler.sample(masks, seed=seed, index=sample.index)
    size = sample.original_size
    # The resized image's longest side: S, or less for an image zoomed out by a `Geometry`.
    image_size = max(sample.input_size)
    return replace(
        sample,
        prompt_boxes=_float_tensor(resize_boxes(prompts.boxes, size, image_size)),
        point_coords=_float_tensor(resize_coords(prompts.point_coords, size, image_size)),
        point_labels=torch.from_numpy(prompts.point_labels),
        prompt_kinds=prompts.kinds,
    )


def _float_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def load_record_image(record: ImageRecord, *, exif_transpose: bool = False) -> np.ndarray:
    """Decode a record's image to ``H x W x 3`` uint8 RGB, checking its declared size.

    Raises:
        DataError: unreadable image, or a size other than the annotation file declares.
    """
    image = load_rgb_image(record.image_path, exif_transpose=exif_transpose)
    size = (image.shape[0], image.shape[1])
    if record.expected_size is not None and record.expected_size != size:
        declared_height, declared_width = record.expected_size
        raise DataError(
            record.image_path,
            f"image is {size[1]}x{size[0]} but its annotation file says "
            f"{declared_width}x{declared_height} (WxH)",
        )
    return image


def decode_mask(
    source: ObjectSource,
    image_size: tuple[int, int],
    mask_threshold: float = MASK_THRESHOLD,
) -> np.ndarray:
    """Decode one object mask to an ``H x W`` bool array checked against ``image_size``.

    ``mask_threshold`` applies to greyscale PNG masks only (see ``load_png_mask``).

    Raises:
        DataError: unreadable, malformed, wrongly sized or empty mask.
    """
    if isinstance(source, PngMask):
        return load_png_mask(source.path, image_size, mask_threshold)
    if isinstance(source, LabelObject):
        return source.labels == source.label_id
    return decode_segmentation(source.segmentation, image_size, source.source, source.label)


def build_dataset(
    root: str | Path,
    *,
    layout: LayoutChoice = "auto",
    annotation_file: str | Path | None = None,
    image_dir: str | Path | None = None,
    image_size: int = 1024,
    on_error: OnError = "raise",
    prompts: PromptSampler | None = None,
    max_objects: int | None = None,
    seed: int = 0,
    exif_transpose: bool = False,
    mask_threshold: float = MASK_THRESHOLD,
) -> SegmentationDataset:
    """Index the dataset in ``root`` and wrap it in a ``SegmentationDataset``.

    Args:
        root: the dataset folder.
        layout: ``"folder"``, ``"coco"``, ``"sa1b"``, ``"dsb"``, ``"labels"``, or ``"auto"``
            to detect it.
        annotation_file: COCO annotation JSON (implies ``layout="coco"`` under auto).
        image_dir: folder COCO ``file_name``s are relative to (default: the JSON's folder,
            then ``root``).
        image_size, on_error, max_objects, seed, exif_transpose, mask_threshold: see
            ``SegmentationDataset``.
        prompts: prompt sampler, or ``None`` for samples without prompts.

    Raises:
        DataError: unusable dataset, or under ``on_error="raise"`` any bad item found
            while indexing.
    """
    mask_threshold = check_mask_threshold(mask_threshold)
    index = read_layout(
        Path(root),
        layout=layout,
        annotation_file=None if annotation_file is None else Path(annotation_file),
        image_dir=None if image_dir is None else Path(image_dir),
        on_error=on_error,
    )
    return SegmentationDataset(
        index.records,
        image_size,
        prompts,
        on_error,
        max_objects=max_objects,
        seed=seed,
        exif_transpose=exif_transpose,
        mask_threshold=mask_threshold,
        skipped=index.skipped,
    )
