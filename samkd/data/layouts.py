"""Readers that index a dataset folder into ``ImageRecord``s, one per image.

Five layouts are understood:

* ``folder``: ``<root>/image/<id>.<ext>`` and ``<root>/mask/<id>/*.png``, one PNG per object
  at image size: binary, or greyscale / anti-aliased and thresholded at ``mask_threshold``
  (see ``samkd.data.masks.load_png_mask``). An image without a mask folder has no objects.
* ``coco``: a COCO instances JSON with polygon or RLE (compressed or not) segmentations.
  ``file_name`` is looked up in ``image_dirs`` (default: the JSON's folder). Crowd
  annotations (``iscrowd=1``) are kept as ordinary objects and annotations of every
  category are kept: for distillation and prompt-based fine-tuning an object is an object.
* ``sa1b``: ``<id>.jpg`` and ``<id>.json`` pairs as in SA-1B, with RLE masks. The per-image
  JSON files are parsed when the image is loaded, not when indexing. Their ``bbox`` and
  ``point_coords`` are not used: boxes come from the masks, prompts from ``PromptSampler``.
* ``dsb``: one folder per image as in the 2018 Data Science Bowl, ``<root>/<id>/images/<id>.<ext>``
  and ``<root>/<id>/masks/*.png`` (one PNG per object, read as in ``folder``). A folder
  without ``masks/`` has no objects; plain files in ``root`` are ignored.
* ``labels``: one instance label image per image, as cellpose and micro-sam store them: an
  ``H x W`` image of integer ids, 0 for background and each id > 0 one object (objects are
  ordered by id; see ``samkd.data.masks.load_label_image`` for the formats). Either
  ``<root>/images/<id>.<ext>`` with ``<root>/labels/<id>.<png|tif|tiff>``, or one folder
  with ``<id>.<ext>`` (or cellpose's ``<id>_img.<ext>``) beside ``<id>_masks.<png|tif|tiff>``
  (also ``_labels``, ``_label``). An image without a label image has no objects. The label
  image is read when its image is loaded.

Indexing only does cheap checks (files exist, JSON parses, segmentation structure);
decoding images and masks happens when a sample is loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from samkd.data.errors import DataError, OnError, check_on_error, handle_error
from samkd.data.images import is_image_file
from samkd.data.masks import segmentation_problem

Layout = Literal["folder", "coco", "sa1b", "dsb", "labels"]
LayoutChoice = Literal["auto", "folder", "coco", "sa1b", "dsb", "labels"]
LAYOUTS: tuple[Layout, ...] = ("folder", "coco", "sa1b", "dsb", "labels")

LABEL_EXTENSIONS: frozenset[str] = frozenset({".png", ".tif", ".tiff"})
LABEL_SUFFIXES: tuple[str, ...] = ("_masks", "_labels", "_label")
"""Endings of a label image's name beside its image: ``<id>_masks.png`` (cellpose)."""
IMAGE_SUFFIX_BESIDE_LABELS = "_img"
"""Ending cellpose gives an image beside its label image: ``<id>_img.png``."""

_DSB_EXPECTED = "<id>/images/<id>.png with <id>/masks/*.png"
_LABELS_EXPECTED = "images/<id>.<ext> with labels/<id>.png, or <id>.<ext> beside <id>_masks.png"
_LOOKED_FOR = (
    "image/ and mask/ folders (folder layout), a COCO *.json beside the images or in "
    "annotations/ (coco layout), <id>.jpg + <id>.json pairs (sa1b layout), "
    f"{_DSB_EXPECTED} (dsb layout), {_LABELS_EXPECTED} (labels layout)"
)


@dataclass(frozen=True)
class PngMask:
    """One object stored as a PNG of image size (binary or greyscale, see ``load_png_mask``)."""

    path: Path


@dataclass(frozen=True)
class AnnotationMask:
    """One object stored as a COCO-style polygon list or RLE dict inside a JSON file."""

    segmentation: Any
    source: Path
    label: str


@dataclass(frozen=True)
class Sa1bAnnotationFile:
    """An SA-1B per-image JSON; expands into ``AnnotationMask``s when the image is loaded."""

    path: Path


@dataclass(frozen=True)
class LabelImage:
    """An instance label image (``H x W`` ids, 0 background) holding all of an image's objects.

    Expands into one object per id > 0 when the image is loaded (see ``load_label_image``).
    """

    path: Path


MaskSource = PngMask | AnnotationMask | Sa1bAnnotationFile | LabelImage


@dataclass(frozen=True)
class ImageRecord:
    """Where one image and its object masks are stored.

    ``expected_size`` is the ``(H, W)`` an annotation file declares for the image, checked
    against the decoded image; ``None`` when the layout declares none.
    """

    image_id: str
    image_path: Path
    mask_sources: tuple[MaskSource, ...] = ()
    expected_size: tuple[int, int] | None = None


@dataclass
class DatasetIndex:
    """The records of one dataset and the messages of items skipped while indexing."""

    layout: Layout
    records: list[ImageRecord]
    skipped: list[str] = field(default_factory=list)


def natural_sort_key(path: Path) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``obj_2`` before ``obj_10``."""
    parts = re.split(r"(\d+)", path.name)
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in parts)


def _visible_files(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=natural_sort_key,
    )


def _images_by_stem(folder: Path, on_error: OnError, skipped: list[str]) -> dict[str, Path]:
    images = ((path.stem, path) for path in _visible_files(folder) if is_image_file(path))
    return _files_by_id(images, "image", on_error, skipped)


def _files_by_id(
    files_with_ids: Iterable[tuple[str, Path]], kind: str, on_error: OnError, skipped: list[str]
) -> dict[str, Path]:
    """Map each id to its file; a second file with the same id is an error."""
    files: dict[str, Path] = {}
    for file_id, path in files_with_ids:
        if file_id in files:
            error = DataError(path, f"another {kind} has the same id {file_id!r}")
            skipped.append(handle_error(error, on_error, f"{kind} skipped"))
            continue
        files[file_id] = path
    return files


def read_folder_layout(root: Path, *, on_error: OnError = "raise") -> DatasetIndex:
    """Index ``<root>/image/<id>.<ext>`` with masks ``<root>/mask/<id>/*.png``.

    Masks of an image are ordered naturally by file name (``obj_2`` before ``obj_10``).

    Raises:
        DataError: no ``image/`` folder; under ``on_error="raise"`` also a mask folder or
            file without an image, or a mask that is not a PNG.
    """
    on_error = check_on_error(on_error)
    image_dir, mask_dir = root / "image", root / "mask"
    if not image_dir.is_dir():
        raise DataError(root, "no image/ folder (folder layout expects image/<id>.<ext>)")
    skipped: list[str] = []
    images = _images_by_stem(image_dir, on_error, skipped)
    masks: dict[str, list[Path]] = {}
    if mask_dir.is_dir():
        masks = _index_mask_folders(mask_dir, set(images), on_error, skipped)
    records = [
        ImageRecord(image_id, path, tuple(PngMask(p) for p in masks.get(image_id, [])))
        for image_id, path in sorted(images.items())
    ]
    return DatasetIndex("folder", records, skipped)


def _index_mask_folders(
    mask_dir: Path, image_ids: set[str], on_error: OnError, skipped: list[str]
) -> dict[str, list[Path]]:
    masks: dict[str, list[Path]] = {}
    for entry in sorted(mask_dir.iterdir(), key=natural_sort_key):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            error = DataError(entry, "expected a folder mask/<id>/ holding one PNG per object")
            skipped.append(handle_error(error, on_error, "file ignored"))
            continue
        if entry.name not in image_ids:
            error = DataError(entry, f"mask folder has no image image/{entry.name}.*")
            skipped.append(handle_error(error, on_error, "masks skipped"))
            continue
        masks[entry.name] = _png_masks(entry, on_error, skipped)
    return masks


def _png_masks(folder: Path, on_error: OnError, skipped: list[str]) -> list[Path]:
    """The PNG files of a folder of one-object masks, in natural order."""
    pngs = []
    for path in _visible_files(folder):
        if path.suffix.lower() == ".png":
            pngs.append(path)
        else:
            error = DataError(path, "mask must be a PNG file")
            skipped.append(handle_error(error, on_error, "mask skipped"))
    return pngs


def load_json(path: Path) -> Any:
    """Parse a JSON file, turning every failure into a one-line ``DataError``."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError as error:
        raise DataError(path, "annotation file not found") from error
    except json.JSONDecodeError as error:
        raise DataError(
            path, f"malformed JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from error
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(path, f"cannot read annotation file ({error})") from error


def read_coco_layout(
    annotation_file: Path,
    *,
    image_dirs: Sequence[Path] = (),
    on_error: OnError = "raise",
) -> DatasetIndex:
    """Index a COCO instances JSON.

    ``file_name`` of each image is looked up in ``image_dirs`` in order (default: the
    annotation file's folder). The image id is ``file_name`` without its extension. All
    annotations are kept, including ``iscrowd=1`` and every category.

    Raises:
        DataError: the file is missing, not JSON or has no ``images`` list; under
            ``on_error="raise"`` also a bad image entry, an image file that does not
            exist, an annotation of an unknown image, or a malformed segmentation.
    """
    on_error = check_on_error(on_error)
    data = load_json(annotation_file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(annotation_file, "not a COCO instances file (no 'images' list)")
    annotations = data.get("annotations", [])
    if not isinstance(annotations, list):
        raise DataError(annotation_file, "'annotations' must be a list")
    folders = list(image_dirs) or [annotation_file.parent]
    skipped: list[str] = []
    images = _read_coco_images(data["images"], annotation_file, folders, on_error, skipped)
    listed = {entry.get("id") for entry in data["images"] if isinstance(entry, dict)}
    objects = _read_coco_annotations(
        annotations, annotation_file, images, listed, on_error, skipped
    )
    records = [
        ImageRecord(image_id, path, tuple(objects.get(coco_id, [])), size)
        for coco_id, (image_id, path, size) in images.items()
    ]
    return DatasetIndex("coco", records, skipped)


def _read_coco_images(
    entries: list[Any],
    annotation_file: Path,
    folders: list[Path],
    on_error: OnError,
    skipped: list[str],
) -> dict[Any, tuple[str, Path, tuple[int, int]]]:
    images: dict[Any, tuple[str, Path, tuple[int, int]]] = {}
    for position, entry in enumerate(entries):
        try:
            coco_id, file_name, size = _parse_coco_image(entry, position, annotation_file)
            if coco_id in images:
                raise DataError(annotation_file, f"image id {coco_id!r} appears twice")
            path = _find_image(file_name, folders, annotation_file, coco_id)
        except DataError as error:
            skipped.append(handle_error(error, on_error, "image skipped"))
            continue
        image_id = Path(file_name).with_suffix("").as_posix()
        images[coco_id] = (image_id, path, size)
    return images


def _parse_coco_image(
    entry: Any, position: int, annotation_file: Path
) -> tuple[Any, str, tuple[int, int]]:
    if not isinstance(entry, dict):
        raise DataError(annotation_file, f"images[{position}] is not an object")
    coco_id, file_name = entry.get("id"), entry.get("file_name")
    height, width = entry.get("height"), entry.get("width")
    if coco_id is None or not isinstance(file_name, str) or not file_name:
        raise DataError(annotation_file, f"images[{position}] needs an 'id' and a 'file_name'")
    if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
        raise DataError(
            annotation_file, f"image id {coco_id!r}: 'height' and 'width' must be positive ints"
        )
    return coco_id, file_name, (height, width)


def _find_image(file_name: str, folders: list[Path], annotation_file: Path, coco_id: Any) -> Path:
    for folder in folders:
        path = folder / file_name
        if path.is_file():
            return path
    searched = ", ".join(str(folder) for folder in folders)
    raise DataError(
        annotation_file, f"image id {coco_id!r}: file {file_name!r} not found in {searched}"
    )


def _read_coco_annotations(
    annotations: list[Any],
    annotation_file: Path,
    images: dict[Any, tuple[str, Path, tuple[int, int]]],
    listed: set[Any],
    on_error: OnError,
    skipped: list[str],
) -> dict[Any, list[MaskSource]]:
    objects: dict[Any, list[MaskSource]] = {}
    for position, annotation in enumerate(annotations):
        try:
            coco_id, mask = _parse_coco_annotation(annotation, position, annotation_file)
            if coco_id not in listed:
                raise DataError(
                    annotation_file, f"{mask.label}: image_id {coco_id!r} is not in 'images'"
                )
        except DataError as error:
            skipped.append(handle_error(error, on_error, "annotation skipped"))
            continue
        # Annotations of images skipped above are dropped silently: the image was reported.
        if coco_id in images:
            objects.setdefault(coco_id, []).append(mask)
    return objects


def _parse_coco_annotation(
    annotation: Any, position: int, annotation_file: Path
) -> tuple[Any, AnnotationMask]:
    if not isinstance(annotation, dict):
        raise DataError(annotation_file, f"annotations[{position}] is not an object")
    label = f"annotation id {annotation.get('id', f'#{position}')!r}"
    if "image_id" not in annotation:
        raise DataError(annotation_file, f"{label}: no 'image_id'")
    if "segmentation" not in annotation:
        raise DataError(annotation_file, f"{label}: no 'segmentation'")
    problem = segmentation_problem(annotation["segmentation"])
    if problem is not None:
        raise DataError(annotation_file, f"{label}: {problem}")
    return annotation["image_id"], AnnotationMask(
        annotation["segmentation"], annotation_file, label
    )


def read_sa1b_layout(root: Path, *, on_error: OnError = "raise") -> DatasetIndex:
    """Index SA-1B style ``<id>.jpg`` + ``<id>.json`` pairs in ``root``.

    An image without a JSON has no objects. The JSON files are only parsed when their
    image is loaded (see ``read_sa1b_annotation_file``).

    Raises:
        DataError: ``root`` is not a folder; under ``on_error="raise"`` also a JSON
            without an image.
    """
    on_error = check_on_error(on_error)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    skipped: list[str] = []
    images = _images_by_stem(root, on_error, skipped)
    annotation_files = {p.stem: p for p in _visible_files(root) if p.suffix.lower() == ".json"}
    for stem, path in annotation_files.items():
        if stem not in images:
            error = DataError(path, f"annotation file has no image {stem}.jpg")
            skipped.append(handle_error(error, on_error, "annotations skipped"))
    records = [
        ImageRecord(
            image_id,
            path,
            (Sa1bAnnotationFile(annotation_files[image_id]),)
            if image_id in annotation_files
            else (),
        )
        for image_id, path in sorted(images.items())
    ]
    return DatasetIndex("sa1b", records, skipped)


def read_sa1b_annotation_file(path: Path) -> list[AnnotationMask]:
    """Parse one SA-1B JSON into its object masks, checking their structure.

    Raises:
        DataError: the file is missing or malformed, or an annotation has no valid RLE.
    """
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(path, "not an SA-1B annotation file (no 'annotations' list)")
    masks = []
    for position, annotation in enumerate(data["annotations"]):
        label = f"annotation {position}"
        segmentation = annotation.get("segmentation") if isinstance(annotation, dict) else None
        if not isinstance(segmentation, dict):
            raise DataError(path, f"{label}: 'segmentation' must be an RLE dict")
        masks.append(AnnotationMask(segmentation, path, label))
    return masks


def read_dsb_layout(root: Path, *, on_error: OnError = "raise") -> DatasetIndex:
    """Index Data Science Bowl 2018 folders ``<root>/<id>/images/<id>.<ext>`` with one PNG
    per object in ``<root>/<id>/masks/``.

    Masks of an image are ordered naturally by file name. Plain files in ``root`` are
    ignored: a DSB download keeps CSVs of run-length labels beside the image folders.

    Raises:
        DataError: ``root`` is missing or has no ``<id>/images/`` folder; under
            ``on_error="raise"`` also a folder without its image, or a mask that is not a
            PNG.
    """
    on_error = check_on_error(on_error)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    folders = _visible_folders(root)
    if not any((folder / "images").is_dir() for folder in folders):
        raise DataError(root, f"no <id>/images/ folders (dsb layout expects {_DSB_EXPECTED})")
    skipped: list[str] = []
    records = []
    for folder in folders:
        try:
            image_path = _dsb_image(folder)
        except DataError as error:
            skipped.append(handle_error(error, on_error, "image skipped"))
            continue
        mask_dir = folder / "masks"
        masks = _png_masks(mask_dir, on_error, skipped) if mask_dir.is_dir() else []
        records.append(ImageRecord(folder.name, image_path, tuple(PngMask(p) for p in masks)))
    return DatasetIndex("dsb", records, skipped)


def _visible_folders(root: Path) -> list[Path]:
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=natural_sort_key,
    )


def _dsb_image(folder: Path) -> Path:
    """The image ``<folder>/images/<folder name>.<ext>`` of one DSB folder."""
    image_dir = folder / "images"
    if not image_dir.is_dir():
        raise DataError(folder, f"no images/ folder (dsb layout expects {_DSB_EXPECTED})")
    found = [p for p in _visible_files(image_dir) if is_image_file(p) and p.stem == folder.name]
    if not found:
        raise DataError(
            image_dir, f"no image {folder.name}.<ext> (dsb layout names the image after its folder)"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DataError(image_dir, f"several images of id {folder.name!r} ({names})")
    return found[0]


def _has_dsb_folders(root: Path) -> bool:
    return any(
        (folder / "images").is_dir()
        and any(
            is_image_file(p) and p.stem == folder.name for p in _visible_files(folder / "images")
        )
        for folder in _visible_folders(root)
    )


def read_labels_layout(root: Path, *, on_error: OnError = "raise") -> DatasetIndex:
    """Index images with instance label images: ``images/<id>.<ext>`` with
    ``labels/<id>.<png|tif|tiff>``, or, when ``root`` has no ``images/`` folder, images
    beside ``<id>_masks.png`` label images in ``root`` (see the module docstring).

    Raises:
        DataError: ``root`` is missing, or has neither ``images/`` nor a label image beside
            an image; under ``on_error="raise"`` also a label image without an image, or two
            images (or label images) of one id.
    """
    on_error = check_on_error(on_error)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    skipped: list[str] = []
    if (root / "images").is_dir():
        images = _images_by_stem(root / "images", on_error, skipped)
        labels = _label_files(root / "labels", on_error, skipped)
    else:
        images, labels = _images_beside_labels(root, on_error, skipped)
        if not labels:
            raise DataError(
                root,
                f"no images/ folder or label images (labels layout expects {_LABELS_EXPECTED})",
            )
    for image_id, path in labels.items():
        if image_id not in images:
            error = DataError(path, f"label image has no image of id {image_id!r}")
            skipped.append(handle_error(error, on_error, "label image skipped"))
    records = [
        ImageRecord(image_id, path, (LabelImage(labels[image_id]),) if image_id in labels else ())
        for image_id, path in sorted(images.items())
    ]
    return DatasetIndex("labels", records, skipped)


def _label_files(folder: Path, on_error: OnError, skipped: list[str]) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    files = _visible_files(folder)
    labels = ((p.stem, p) for p in files if p.suffix.lower() in LABEL_EXTENSIONS)
    return _files_by_id(labels, "label image", on_error, skipped)


def label_image_id(path: Path) -> str | None:
    """The image id of a label image named ``<id>_masks.png`` (or ``_labels``, ``_label``;
    PNG or TIFF), else ``None``."""
    if path.suffix.lower() not in LABEL_EXTENSIONS:
        return None
    for suffix in LABEL_SUFFIXES:
        if path.stem.endswith(suffix) and len(path.stem) > len(suffix):
            return path.stem.removesuffix(suffix)
    return None


def _image_id_beside_labels(path: Path) -> str:
    return path.stem.removesuffix(IMAGE_SUFFIX_BESIDE_LABELS) or path.stem


def _files_beside_labels(root: Path) -> tuple[list[tuple[str, Path]], list[tuple[str, Path]]]:
    """``(image id, path)`` of the images and of the label images in one folder."""
    image_files: list[tuple[str, Path]] = []
    label_files: list[tuple[str, Path]] = []
    for path in _visible_files(root):
        label_id = label_image_id(path)
        if label_id is not None:
            label_files.append((label_id, path))
        elif is_image_file(path):
            image_files.append((_image_id_beside_labels(path), path))
    return image_files, label_files


def _images_beside_labels(
    root: Path, on_error: OnError, skipped: list[str]
) -> tuple[dict[str, Path], dict[str, Path]]:
    """Images and label images of one folder, each by image id."""
    image_files, label_files = _files_beside_labels(root)
    images = _files_by_id(image_files, "image", on_error, skipped)
    labels = _files_by_id(label_files, "label image", on_error, skipped)
    return images, labels


def _has_label_images(root: Path) -> bool:
    label_dir = root / "labels"
    if (root / "images").is_dir() and label_dir.is_dir():
        # YOLO datasets also pair images/ with labels/, holding boxes as text files.
        return any(p.suffix.lower() in LABEL_EXTENSIONS for p in _visible_files(label_dir))
    image_files, label_files = _files_beside_labels(root)
    return not {image_id for image_id, _ in image_files}.isdisjoint(
        label_id for label_id, _ in label_files
    )


def find_coco_annotation_files(root: Path) -> list[Path]:
    """JSON files in ``root`` not paired with a same-named image, plus ``annotations/*.json``."""
    if not root.is_dir():
        return []
    files = _visible_files(root)
    image_stems = {p.stem for p in files if is_image_file(p)}
    found = [p for p in files if p.suffix.lower() == ".json" and p.stem not in image_stems]
    annotations_dir = root / "annotations"
    if annotations_dir.is_dir():
        found += [p for p in _visible_files(annotations_dir) if p.suffix.lower() == ".json"]
    return found


def _has_sa1b_pairs(root: Path) -> bool:
    files = _visible_files(root)
    json_stems = {p.stem for p in files if p.suffix.lower() == ".json"}
    return any(is_image_file(p) and p.stem in json_stems for p in files)


def detect_layout(root: Path, annotation_file: Path | None = None) -> Layout:
    """Guess the layout of ``root``; an explicit ``annotation_file`` means COCO.

    Raises:
        DataError: ``root`` is missing, matches no layout, or matches more than one.
    """
    if annotation_file is not None:
        return "coco"
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    matches: list[Layout] = []
    if (root / "image").is_dir():
        matches.append("folder")
    if find_coco_annotation_files(root):
        matches.append("coco")
    if _has_sa1b_pairs(root):
        matches.append("sa1b")
    if _has_dsb_folders(root):
        matches.append("dsb")
    if _has_label_images(root):
        matches.append("labels")
    if not matches:
        raise DataError(root, f"no dataset layout recognised; looked for {_LOOKED_FOR}")
    if len(matches) > 1:
        raise DataError(
            root,
            f"ambiguous dataset layout, looks like {' and '.join(matches)}; "
            f"pass layout= one of {', '.join(matches)}",
        )
    return matches[0]


def read_layout(
    root: Path,
    *,
    layout: LayoutChoice = "auto",
    annotation_file: Path | None = None,
    image_dir: Path | None = None,
    on_error: OnError = "raise",
) -> DatasetIndex:
    """Index ``root`` with the given layout, or the detected one for ``layout="auto"``.

    For COCO, ``annotation_file`` defaults to the single annotation file found in ``root``
    (or ``root/annotations``); images are looked up in ``image_dir`` if given, else in the
    annotation file's folder and then in ``root``.

    Raises:
        DataError: see ``detect_layout`` and the layout readers.
        ValueError: an unknown ``layout`` or ``on_error``.
    """
    on_error = check_on_error(on_error)
    root = Path(root)
    chosen = detect_layout(root, annotation_file) if layout == "auto" else layout
    if chosen == "folder":
        return read_folder_layout(root, on_error=on_error)
    if chosen == "sa1b":
        return read_sa1b_layout(root, on_error=on_error)
    if chosen == "dsb":
        return read_dsb_layout(root, on_error=on_error)
    if chosen == "labels":
        return read_labels_layout(root, on_error=on_error)
    if chosen == "coco":
        annotation_file = _coco_annotation_file(root, annotation_file)
        folders = [image_dir] if image_dir is not None else [annotation_file.parent, root]
        unique_folders = list(dict.fromkeys(folders))
        return read_coco_layout(annotation_file, image_dirs=unique_folders, on_error=on_error)
    raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")


def _coco_annotation_file(root: Path, annotation_file: Path | None) -> Path:
    if annotation_file is not None:
        return Path(annotation_file)
    found = find_coco_annotation_files(root)
    if not found:
        raise DataError(root, "no COCO annotation file (*.json) found; pass annotation_file")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise DataError(root, f"several COCO annotation files ({names}); pass annotation_file")
    return found[0]
