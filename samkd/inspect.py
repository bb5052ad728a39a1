"""`samkd inspect`: explain a feature file, a training run, a checkpoint or a dataset folder
to a person."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from samkd.data import DataError, SegmentationDataset
from samkd.data.images import load_rgb_image
from samkd.data.layouts import LayoutChoice, read_layout
from samkd.data.masks import MASK_THRESHOLD
from samkd.errors import UsageError
from samkd.evaluate.metrics import (
    LARGE_AREA,
    SIZE_NAMES,
    SMALL_AREA,
    empty_mask_warning,
    size_bucket,
)
from samkd.features import FeatureStore, file_sha256, inspect_feature_file, render_report
from samkd.features.layout import PSEUDO_MASK_COUNTS
from samkd.features.pseudo_masks import decode_pseudo_masks
from samkd.features.reader import no_pseudo_masks, open_feature_file
from samkd.files import atomic_path
from samkd.models import load_state_dict_file
from samkd.models.checkpoint import STUDENT_PREFIX, is_training_checkpoint, read_torch_file
from samkd.models.lora import is_adapter
from samkd.settings import DataSettings
from samkd.train.metrics_log import read_metrics

PLOT_NAME = "loss_curves.png"
OVERLAY_IMAGES = 4
MODEL_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
PROBLEMS_SHOWN = 10
EXAMPLE_IDS = 5
SIZE_LABELS = {
    "small": f"small (area < {SMALL_AREA} px)",
    "medium": f"medium ({SMALL_AREA} to {LARGE_AREA - 1} px)",
    "large": f"large (area >= {LARGE_AREA} px)",
}


def run_inspect(
    path: Path,
    as_json: bool = False,
    check: bool = False,
    console: Console | None = None,
    overlay: Path | None = None,
    images: Sequence[str] = (),
    data: DataSettings | None = None,
) -> int:
    """Print what `path` is and holds; returns the exit status (non-zero: incomplete/corrupt).

    `overlay` (a feature file's only): also write a PNG of the pseudo-masks of `images`
    (ids; default a few that have some), see `plot_pseudo_masks`. `data`: how a dataset
    folder is read (its layout, annotation_file and mask_threshold)."""
    console = console or Console()
    feature_file = path.suffix in (".h5", ".hdf5") or path.with_name(path.name + ".parts").is_dir()
    if images and overlay is None:
        raise UsageError("--image picks the images of --overlay; pass --overlay FILE.png too")
    if overlay is not None and not feature_file:
        raise UsageError(f"{path}: --overlay draws the pseudo-masks of a feature file (.h5)")
    if path.is_dir() and (path / "metrics.jsonl").exists():
        summary = summarize_run(path, plot=True)
        _show(summary, as_json, console, render_run)
        if "plot_error" in summary:
            raise UsageError(summary["plot_error"])
        return 0
    if feature_file:
        report = inspect_feature_file(path, check=check)
        if as_json:
            console.print_json(report.to_json())
        else:
            render_report(report, console)
        if overlay is not None:
            written = plot_pseudo_masks(path, overlay, images)
            if not as_json:
                console.print(f"pseudo-mask overlay: {written}")
        return report.exit_code
    if path.is_file():
        return _show(summarize_checkpoint(path), as_json, console, render_checkpoint)
    if path.is_dir():
        data = data or DataSettings()
        summary = summarize_dataset(path, data.layout, data.annotation_file, data.mask_threshold)
        _show(summary, as_json, console, render_dataset)
        return 1 if summary["problems"] else 0
    raise UsageError(f"{path}: not a feature file, run folder, checkpoint or dataset folder")


def _show(summary: dict[str, Any], as_json: bool, console: Console, render: Any) -> int:
    if as_json:
        console.print_json(json.dumps(summary))
    else:
        render(summary, console)
    return 0


# --------------------------------------------------------------------------- runs


def summarize_run(run_dir: Path, plot: bool = True) -> dict[str, Any]:
    """Steps, best validation mIoU and when, the share of empty predicted masks at the last
    validation, lambda_kd changes, skipped steps, last terms."""
    records = read_metrics(run_dir / "metrics.jsonl")
    summary = summarize_records(run_dir, records)
    if plot and summary["train_records"]:
        try:
            summary["plot"] = str(plot_run(records, run_dir / PLOT_NAME))
        except OSError as error:
            # The summary is still worth printing: the run folder may be read-only.
            summary["plot_error"] = f"{run_dir / PLOT_NAME}: not written: {error.strerror}"
    return summary


def summarize_records(run_dir: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """`summarize_run`'s summary of the run in `run_dir` that logged `records`."""
    train = [record for record in records if record.get("kind") == "train"]
    val = [record for record in records if record.get("kind") == "val"]
    best = max(val, key=lambda record: record["val/miou"], default=None)
    changes = [
        {"step": record["step"], "from": record["lambda_kd_change"][0],
         "to": record["lambda_kd_change"][1]}
        for record in val
        if "lambda_kd_change" in record
    ]  # fmt: skip
    summary: dict[str, Any] = {
        "run": str(run_dir),
        "steps": train[-1]["step"] if train else 0,
        "train_records": len(train),
        "validations": len(val),
        "best_val_miou": None if best is None else best["val/miou"],
        "best_step": None if best is None else best["step"],
        "last_val_miou": val[-1]["val/miou"] if val else None,
        "last_val_empty_fraction": val[-1].get("val/empty_fraction") if val else None,
        "lambda_kd_changes": changes,
        "skipped_steps": train[-1].get("skipped_steps", 0) if train else 0,
        "nonfinite_terms": sorted({t for r in train for t in r.get("nonfinite_terms", [])}),
        "last_terms": {k: v for k, v in (train[-1] if train else {}).items() if "/" in k},
        "exported": str(run_dir / "student.pt") if (run_dir / "student.pt").exists() else None,
    }
    return summary


def loss_terms(records: list[dict[str, Any]]) -> list[str]:
    """Every logged loss term (`task/...`, `kd/<teacher>/...`, `loss/total`), in log order."""
    names: dict[str, None] = {}
    for record in records:
        if record.get("kind") != "train":
            continue
        for name in record:
            if name.startswith(("task/", "kd/", "loss/")):
                names.setdefault(name, None)
    return list(names)


def plot_run(
    records: list[dict[str, Any]], path: Path, panels: Sequence[str] | None = None
) -> Path:
    """One panel per loss term plus validation mIoU, or per name in `panels` (`val/` names
    from the validation records, the others from the training records), saved as a PNG
    (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [record for record in records if record.get("kind") == "train"]
    val = [record for record in records if record.get("kind") == "val"]
    if panels is None:
        panels = loss_terms(records) + (["val/miou"] if val else [])
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
    for axis, name in zip(axes.flat, panels, strict=False):
        source = val if name.startswith("val/") else train
        points = [(r["step"], r[name]) for r in source if name in r and r[name] is not None]
        axis.plot(
            [p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None
        )
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    return save_figure(figure, path)


def render_run(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"training run {summary['run']}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    best = summary["best_val_miou"]
    table.add_row("steps", str(summary["steps"]))
    table.add_row("validations", str(summary["validations"]))
    if best is not None:
        table.add_row("best val mIoU", f"{best:.4f} at step {summary['best_step']}")
        table.add_row("last val mIoU", f"{summary['last_val_miou']:.4f}")
    empty = summary["last_val_empty_fraction"]
    if empty is not None:
        table.add_row("last val empty masks", f"{empty:.0%}")
    skipped = str(summary["skipped_steps"])
    if summary["nonfinite_terms"]:
        skipped += f" ({', '.join(summary['nonfinite_terms'])})"
    table.add_row("skipped steps (non-finite loss or gradients)", skipped)
    changes = summary["lambda_kd_changes"]
    table.add_row(
        "lambda_kd changes",
        ", ".join(f"step {c['step']}: {c['from']:g} -> {c['to']:g}" for c in changes) or "none",
    )
    table.add_row("exported student", summary["exported"] or "not yet")
    console.print(table)
    terms = Table(title="loss terms at the last logging step", title_justify="left")
    terms.add_column("term")
    terms.add_column("value", justify="right")
    for name, value in summary["last_terms"].items():
        terms.add_row(name, f"{value:.5g}")
    console.print(terms)
    if "plot" in summary:
        console.print(f"loss curves: {summary['plot']}")
    warning = empty_mask_warning(empty, "last validation")
    if warning is not None:
        console.print(Text(f"warning: {warning}"), style="yellow", soft_wrap=True)


# --------------------------------------------------------------------------- pseudo-masks


def plot_pseudo_masks(
    features: Path, path: Path, image_ids: Sequence[str] = (), count: int = OVERLAY_IMAGES
) -> Path:
    """One panel per image of its stored pseudo-masks, each mask in a colour, saved as a PNG
    (atomically): the images `image_ids`, default the first `count` that have masks. Masks
    are drawn over the image when the dataset named in the file's settings still holds it
    with the same bytes (sha256), else over black."""
    store = FeatureStore(features, teachers=[])
    if store.pseudo_mask_teacher is None:
        raise no_pseudo_masks(features)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if image_ids:
        rows = [store.index_of(image_id) for image_id in image_ids]
    else:
        with open_feature_file(features) as handle:
            counts = handle["teachers"][store.pseudo_mask_teacher][PSEUDO_MASK_COUNTS][()]
        rows = [int(row) for row in np.flatnonzero(counts > 0)[:count]]
        rows = rows or list(range(min(count, len(store))))
    wanted = {store.image_ids[row]: store.image_hashes[row] for row in rows}
    images = dataset_images(features, wanted)
    figure, axes = plt.subplots(1, max(len(rows), 1), figsize=(4 * max(len(rows), 1), 4))
    colours = matplotlib.colormaps["tab20"]
    for axis, row in zip(np.atleast_1d(axes), rows, strict=False):
        image_id = store.image_ids[row]
        height, width = (int(side) for side in store.image_sizes[row])
        masks = store.pseudo_masks(row)
        axis.axis("off")
        axis.set_title(f"{image_id}: {len(masks)} masks", fontsize=9)
        if row in store.skipped_images or not height * width:
            axis.set_title(f"{image_id}: skipped at extraction", fontsize=9)
            continue
        image = images.get(image_id)
        canvas = np.zeros((height, width, 3)) if image is None else image / 255.0
        decoded = decode_pseudo_masks(masks, (height, width))
        for index in reversed(range(len(decoded))):  # the highest predicted IoU on top
            colour = np.array(colours(index % colours.N)[:3])
            canvas[decoded[index]] = 0.45 * canvas[decoded[index]] + 0.55 * colour
        axis.imshow(canvas)
        if image is None:
            axis.set_xlabel("image not found in the dataset", fontsize=8)
    return save_figure(figure, path)


def dataset_images(features: Path, wanted: dict[str, str]) -> dict[str, np.ndarray]:
    """`H x W x 3` uint8 images of `wanted` (id -> sha256) from the dataset named in the
    feature file's settings (`data.train`): those it still holds with the same bytes."""
    try:
        with open_feature_file(features) as handle:
            data = yaml.safe_load(handle.attrs["settings"])["data"]
        annotation_file = data.get("annotation_file")
        index = read_layout(
            Path(data["train"]),
            layout=data.get("layout", "auto"),
            annotation_file=Path(annotation_file) if annotation_file else None,
            on_error="skip",
        )
    except (DataError, OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return {}
    found = {}
    for record in index.records:
        digest = wanted.get(record.image_id)
        if digest is not None and file_sha256(record.image_path) == digest:
            try:
                found[record.image_id] = load_rgb_image(record.image_path)
            except DataError:
                continue
    return found


# --------------------------------------------------------------------------- datasets


def summarize_dataset(
    root: Path,
    layout: LayoutChoice = "auto",
    annotation_file: str | None = None,
    mask_threshold: float = MASK_THRESHOLD,
) -> dict[str, Any]:
    """Layout, images, objects by COCO size class, images without objects and every problem
    the readers report (unreadable files, empty masks, size mismatches, ...), decoding each
    image and mask once. Bad items are listed, not raised.

    Raises:
        DataError: the folder is missing or matches no layout, or one ambiguously.
    """
    index = read_layout(
        root,
        layout=layout,
        annotation_file=Path(annotation_file) if annotation_file else None,
        on_error="skip",
    )
    dataset = SegmentationDataset(index.records, on_error="skip", mask_threshold=mask_threshold)
    problems = list(index.skipped)
    sizes = dict.fromkeys(SIZE_NAMES, 0)
    without_objects: list[str] = []
    for position, record in enumerate(dataset.records):
        try:
            loaded = dataset.load_objects(position)
        except DataError as error:
            problems.append(str(error))
            continue
        problems.extend(loaded.skipped)
        for area in loaded.masks.sum(axis=(1, 2)).tolist():
            sizes[size_bucket(area)] += 1
        if not len(loaded.masks):
            without_objects.append(record.image_id)
    return {
        "path": str(root),
        "layout": index.layout,
        "images": len(index.records),
        "objects": sum(sizes.values()),
        "object_sizes": sizes,
        "images_without_objects": without_objects,
        "problems": problems,
    }


def render_dataset(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"dataset {summary['path']}", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("layout", summary["layout"])
    table.add_row("images", str(summary["images"]))
    table.add_row("objects", str(summary["objects"]))
    for size, count in summary["object_sizes"].items():
        table.add_row(f"  {SIZE_LABELS[size]}", str(count))
    without = summary["images_without_objects"]
    examples = ", ".join(without[:EXAMPLE_IDS]) + (", ..." if len(without) > EXAMPLE_IDS else "")
    shown = f"{len(without)} ({examples})" if without else "0"
    table.add_row("images without objects", Text(shown))
    table.add_row("problems", str(len(summary["problems"])))
    console.print(table)
    problems = summary["problems"]
    for message in problems[:PROBLEMS_SHOWN]:
        console.print(Text(f"  {message}"), soft_wrap=True)
    if len(problems) > PROBLEMS_SHOWN:
        console.print(f"  ... and {len(problems) - PROBLEMS_SHOWN} more (--json lists all)")


# --------------------------------------------------------------------------- checkpoints


def summarize_checkpoint(path: Path) -> dict[str, Any]:
    """Model type guess, parameter counts per part, what else the file holds, its settings."""
    raw = read_torch_file(path)
    training = is_training_checkpoint(raw)
    weights = raw["model"] if training else load_state_dict_file(path)
    student = {
        k.removeprefix(STUDENT_PREFIX): v
        for k, v in weights.items()
        if not k.startswith("objective.")
    }
    adapters = {k: v for k, v in weights.items() if k.startswith("objective.")}
    lora = {k: v for k, v in student.items() if is_adapter(k)}
    parts = {
        part: sum(
            v.numel() for k, v in student.items() if k.startswith(f"{part}.") and k not in lora
        )
        for part in MODEL_PARTS
    }
    settings = yaml.safe_load(raw["settings"]) if training else None
    summary: dict[str, Any] = {
        "path": str(path),
        "kind": "training checkpoint" if training else "model weights",
        "model_type": _guess_model_type(student, settings),
        "parameters": parts,
        "total_parameters": sum(parts.values()),
        "adapter_parameters": sum(
            v.numel() for v in adapters.values() if isinstance(v, torch.Tensor)
        ),
        "lora_parameters": sum(v.numel() for v in lora.values()),
        "holds": sorted(raw) if training else ["weights"],
    }
    if training:
        summary["step"] = raw["progress"]["step"]
        summary["samkd_version"] = raw.get("samkd_version")
        summary["settings"] = settings
    return summary


def _guess_model_type(weights: dict[str, torch.Tensor], settings: dict[str, Any] | None) -> str:
    if settings is not None:
        return str(settings["student"]["model_type"])
    if "image_encoder.layers.0.blocks.0.conv1.c.weight" in weights:
        return "TinyViT (vit_t family)"
    blocks = {k.split(".")[2] for k in weights if k.startswith("image_encoder.blocks.")}
    width = weights.get("image_encoder.patch_embed.proj.weight")
    known = {(12, 768): "vit_b", (24, 1024): "vit_l", (32, 1280): "vit_h"}
    if width is not None:
        return known.get((len(blocks), width.shape[0]), f"SAM ViT ({len(blocks)} blocks)")
    return "unknown"


def render_checkpoint(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{summary['kind']} {summary['path']}", title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("model type", summary["model_type"])
    for part, count in summary["parameters"].items():
        table.add_row(f"{part} parameters", f"{count:,}")
    table.add_row("total parameters", f"{summary['total_parameters']:,}")
    if summary["adapter_parameters"]:
        table.add_row("adapter parameters", f"{summary['adapter_parameters']:,}")
    if summary["lora_parameters"]:
        table.add_row("LoRA parameters (not merged)", f"{summary['lora_parameters']:,}")
    table.add_row("holds", ", ".join(summary["holds"]))
    if "step" in summary:
        table.add_row("step", str(summary["step"]))
    console.print(table)
    if summary.get("settings"):
        console.print("[bold]settings it was trained with[/]")
        console.print(yaml.safe_dump(summary["settings"], sort_keys=False))


def save_figure(figure: Any, path: Path) -> Path:
    """Write `figure` to `path` as PNG (temporary name, then rename) and close it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    try:
        with atomic_path(path, suffix=".png") as temporary:
            figure.savefig(temporary, dpi=90)
    finally:
        plt.close(figure)
    return path
