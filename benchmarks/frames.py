"""Frames: what it costs to compare a square-frame SAM 2 teacher with the student's frame.

SAM 2 resizes the whole image to a square; the student (MobileSAM, samkd's pipeline) resizes
the longest side and pads. A teacher can run in its own frame with its outputs mapped into the
student's (samkd's default, `samkd.models.frames`), or on the student's padded input. On a
trained `hiera_mini` (trained by `samkd train` in the square frame, as SAM 2 was), box prompts
on held-out generated images, each way's masks at the original resolution:

- native: the teacher in its frame, masks as `SAM2ImagePredictor` makes them;
- mapped: the same teacher, prompts given in the student's frame and mapped in, its
  low-resolution logits mapped into the student's frame and post-processed as SAM's are there
  (what training compares and what the teacher's masks are to the student);
- padded: the same weights run on the student's padded input (`frame: longest_side`).

    python -m benchmarks --only frames
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console

from benchmarks.common import ResultTable, Section
from samkd.data import build_dataset, resize_boxes
from samkd.demo.shapes import write_shapes_dataset
from samkd.evaluate.metrics import mask_iou
from samkd.evaluate.predict import encode_images, model_inputs, predict_masks
from samkd.evaluate.prompts import box_prompts
from samkd.models import build_teacher
from samkd.settings import load_settings
from samkd.train import run_train
from samkd.train.forward import PromptGroup
from samkd.train.frames import decode_in_frame

NAME = "frames"


@dataclass(frozen=True)
class Size:
    train_images: int
    test_images: int
    image_size: int
    steps: int
    batch_size: int


FULL = Size(train_images=400, test_images=60, image_size=128, steps=600, batch_size=8)
QUICK = Size(train_images=8, test_images=3, image_size=64, steps=2, batch_size=2)
# Generated images of the demo's aspect (3:4) and a wider one (9:16).
SHAPES = ((96, 128), (72, 128))


def train_teacher(data: Path, run_dir: Path, size: Size) -> Path:
    """hiera_mini trained with SAM's task loss in the square frame, as the demo trains its
    teacher (box prompts); returns its weights."""
    settings = load_settings(
        None,
        [
            f"data.train={data}",
            f"data.image_size={size.image_size}",
            "data.num_workers=1",
            "student.model_type=hiera_mini",
            f"train.output_dir={run_dir}",
            f"train.steps={size.steps}",
            f"train.batch_size={size.batch_size}",
            "train.lr=1e-3",
            f"train.warmup_steps={max(1, size.steps // 20)}",
            f"train.checkpoint_every={size.steps}",
            "logging.tensorboard=false",
            f"logging.log_every={max(1, size.steps // 10)}",
        ],
        environ={},
    )
    run_train(settings, console=Console(quiet=True))
    return run_dir / "student.pt"


def mapped_masks(
    model: torch.nn.Module, sample: object, boxes: torch.Tensor, image_size: int
) -> torch.Tensor:
    """The teacher's single masks for `boxes` (original pixels) through the student's frame:
    prompts resized as the dataset does, decoded by the square-frame teacher with the mapping,
    its logits post-processed as SAM's (upscale, crop the padding, resize)."""
    original = sample.original_size  # type: ignore[attr-defined]
    height, width = sample.input_size  # type: ignore[attr-defined]
    pipeline = torch.tensor(resize_boxes(boxes.numpy(), original, image_size)).float()
    features = encode_images(model, model_inputs(model, [sample]))  # type: ignore[list-item]
    count = len(boxes)
    group = PromptGroup(
        torch.zeros(count, dtype=torch.long),
        torch.arange(count),
        boxes=pipeline,
        input_sizes=torch.tensor([[height, width]]).expand(count, 2),
    )
    with torch.inference_mode():
        outputs = decode_in_frame(
            model.prompt_encoder,
            model.mask_decoder,
            features.image_embed,
            [group],
            False,
            features.high_res,
            "square",
        )
    logits = outputs.mask_logits[:, :1]
    upscaled = F.interpolate(logits, (image_size, image_size), mode="bilinear")
    cropped = upscaled[..., :height, :width]
    return F.interpolate(cropped, original, mode="bilinear")[:, 0] > 0


def measure(data: Path, weights: Path, image_size: int) -> dict[str, torch.Tensor]:
    """Per object: the IoU with the ground truth of each way's mask, and with the native one."""
    teacher = build_teacher("hiera_mini", image_size, weights, torch.device("cpu"))
    dataset = build_dataset(data, image_size=image_size)
    dataset.square_inputs = True
    ious: dict[str, list[torch.Tensor]] = {
        key: [] for key in ("native", "mapped", "padded", "mapped_vs_native", "padded_vs_native")
    }
    for sample in dataset:
        if not sample.masks.shape[0]:
            continue
        prompts = box_prompts(sample.masks)
        assert prompts.boxes is not None
        teacher.frame = "square"
        features = encode_images(teacher, model_inputs(teacher, [sample]))
        native = predict_masks(teacher, features, prompts, sample.original_size, False).masks[:, 0]
        mapped = mapped_masks(teacher, sample, prompts.boxes, image_size)
        teacher.frame = "longest_side"
        features = encode_images(teacher, model_inputs(teacher, [sample]))
        padded = predict_masks(teacher, features, prompts, sample.original_size, False).masks[:, 0]
        for key, masks in (("native", native), ("mapped", mapped), ("padded", padded)):
            ious[key].append(mask_iou(masks, sample.masks))
        ious["mapped_vs_native"].append(mask_iou(mapped, native))
        ious["padded_vs_native"].append(mask_iou(padded, native))
    return {key: torch.cat(values) for key, values in ious.items()}


def run(quick: bool = False) -> Section:
    size = QUICK if quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="samkd-bench-frames-"))
    began = time.perf_counter()
    try:
        train = write_shapes_dataset(workdir / "train", size.train_images, SHAPES[0], seed=0)
        weights = train_teacher(train, workdir / "teacher", size)
        trained = time.perf_counter() - began
        results = {}
        for index, shape in enumerate(SHAPES):
            test = write_shapes_dataset(
                workdir / f"test-{index}", size.test_images, shape, seed=1 + index
            )
            results[shape] = measure(test, weights, size.image_size)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return section(results, size, trained)


def section(
    results: dict[tuple[int, int], dict[str, torch.Tensor]], size: Size, trained: float
) -> Section:
    table = ResultTable(
        [
            "test images (H x W)",
            "objects",
            "native box mIoU",
            "mapped box mIoU",
            "padded box mIoU",
            "mapped vs native IoU",
            "padded vs native IoU",
        ]
    )
    for (height, width), ious in results.items():
        table.add(
            f"{height} x {width}",
            len(ious["native"]),
            *(f"{ious[key].mean().item():.3f}" for key in ("native", "mapped", "padded")),
            f"{ious['mapped_vs_native'].mean().item():.3f}",
            f"{ious['padded_vs_native'].mean().item():.3f}",
        )
    return Section(
        name=NAME,
        title="Frames: a square-frame SAM 2 teacher in the student's frame",
        description=(
            f"`hiera_mini` trained in the square frame by `samkd train` ({size.steps} steps, "
            f"batch {size.batch_size}, {size.image_size} px, {size.train_images} generated 3:4 "
            f"images, box prompts; {trained:.0f} s), then box prompts (single mask) on "
            f"{size.test_images} held-out images of each shape. *native*: the "
            "teacher in its own frame (`SAM2ImagePredictor`'s way); *mapped*: prompts from "
            "the student's frame mapped in and the logits mapped into the student's frame, "
            "post-processed there (what distillation compares); *padded*: the same weights "
            "on the student's padded input. The last two columns: mean IoU of each way's "
            "masks with the native ones."
        ),
        tables=[table],
        notes=[verdict(results), DEFAULT_NOTE],
    )


DEFAULT_NOTE = (
    "samkd runs SAM 2 teachers in their own frame (`teachers[i].frame: auto`), mapped into the "
    "student's; `frame: longest_side` runs one on the student's padded input instead."
)


def verdict(results: dict[tuple[int, int], dict[str, torch.Tensor]]) -> str:
    """Which way loses less of the native masks' agreement, in words, from the numbers."""
    mapped = min(ious["mapped_vs_native"].mean().item() for ious in results.values())
    padded = max(ious["padded_vs_native"].mean().item() for ious in results.values())
    better = "mapping" if mapped >= padded else "the padded input"
    return (
        f"Agreement with the native masks: mapped at least {mapped:.3f}, padded at most "
        f"{padded:.3f}, so {better} keeps more of what the teacher answers in its own frame."
    )
