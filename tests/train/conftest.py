"""Shared fixtures for training tests: generated data, a teacher checkpoint, feature files."""

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import samkd.train.teacher_masks
from samkd.data.layouts import ImageRecord
from samkd.demo.shapes import write_shapes_dataset
from samkd.extract import run_extract
from samkd.models import build_sam, save_state_dict
from samkd.settings import Settings, load_settings

STUDENT = "vit_t_mini"
TEACHER = "vit_mini"


@pytest.fixture(scope="session")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "train", 8, (96, 128), seed=0)


@pytest.fixture(scope="session")
def shapes_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "val", 2, (96, 128), seed=1)


@pytest.fixture(scope="session")
def unlabelled(tmp_path_factory: pytest.TempPathFactory, shapes: Path) -> Path:
    """The training images without any masks (pure distillation)."""
    root = tmp_path_factory.mktemp("data") / "unlabelled"
    shutil.copytree(shapes / "image", root / "image")
    return root


def write_teacher_weights(path: Path, seed: int) -> Path:
    """Random `TEACHER` weights, the same for the same seed."""
    torch.manual_seed(seed)
    save_state_dict(build_sam(TEACHER), path)
    return path


@pytest.fixture(scope="session")
def teacher_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_teacher_weights(tmp_path_factory.mktemp("weights") / "teacher.pt", seed=1)


def make_settings(*assignments: str) -> Settings:
    return load_settings(None, list(assignments), environ={})


def precomputed_settings(
    data: Path, teacher: Path, run_dir: Path, features: Path, *extra: str
) -> Settings:
    """The base settings training from `features`, plus `extra` assignments."""
    return make_settings(
        *base_assignments(data, teacher, run_dir), f"distillation.features={features}", *extra
    )


def base_assignments(data: Path, teacher: Path, run_dir: Path) -> list[str]:
    return [
        f"data.train={data}",
        f"student.model_type={STUDENT}",
        f"teachers=[{{name: t, model_type: {TEACHER}, checkpoint: {teacher}}}]",
        f"train.output_dir={run_dir}",
        "train.batch_size=2",
        "train.warmup_steps=0",
        "train.lr=1e-3",
        "data.num_workers=0",
        "logging.log_every=1",
        "logging.tensorboard=false",
    ]


ALL_TERMS = [
    "distillation.encoder.kl_weight=1",
    "distillation.decoder.enabled=true",
    "distillation.attention.enabled=true",
    "distillation.rkd.enabled=true",
]


@pytest.fixture(scope="session")
def feature_file(
    tmp_path_factory: pytest.TempPathFactory, shapes: Path, teacher_checkpoint: Path
) -> Path:
    """float32 teacher features with every tap that all four terms need."""
    output = tmp_path_factory.mktemp("features") / "features.h5"
    return extract_float32(shapes, teacher_checkpoint, output, "[encoder.embed, encoder.qk.3]")


def extract_float32(data: Path, teacher: Path, output: Path, taps: str, *extra: str) -> Path:
    """Extract the teacher's `taps` of `data` into `output`, in float32."""
    settings = make_settings(
        *base_assignments(data, teacher, output.parent / "unused"),
        f"extract.output={output}",
        "extract.dtype=float32",
        f"extract.taps={taps}",
        *extra,
    )
    run_extract(settings)
    return output


# A random teacher's predicted IoUs and stability scores are low: keep every mask.
KEEP_ALL_MASKS = [
    "extract.pseudo_masks.pred_iou_thresh=0",
    "extract.pseudo_masks.stability_score_thresh=0",
    "extract.pseudo_masks.points_per_side=4",
    "extract.pseudo_masks.max_masks=4",
]


@pytest.fixture(scope="session")
def pseudo_mask_file(
    tmp_path_factory: pytest.TempPathFactory, shapes: Path, teacher_checkpoint: Path
) -> Path:
    """float32 `encoder.embed` and the teacher's automatic masks of every image."""
    output = tmp_path_factory.mktemp("features") / "pseudo.h5"
    masks = ["extract.pseudo_masks.enabled=true", *KEEP_ALL_MASKS]
    return extract_float32(shapes, teacher_checkpoint, output, "[encoder.embed]", *masks)


@pytest.fixture
def generated_teacher_masks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The ids of the images whose teacher masks an online run generates (the image read
    for them), in call order."""
    calls: list[str] = []
    real = samkd.train.teacher_masks.load_record_image

    def counting(record: ImageRecord, **options: Any) -> np.ndarray:
        calls.append(record.image_id)
        return real(record, **options)

    monkeypatch.setattr(samkd.train.teacher_masks, "load_record_image", counting)
    return calls
