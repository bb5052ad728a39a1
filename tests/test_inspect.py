"""`samkd inspect` on a training run, on checkpoints and on dataset folders."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from samkd.cli import app
from samkd.inspect import loss_terms, summarize_checkpoint, summarize_dataset, summarize_run
from samkd.models import build_sam, save_state_dict

from .conftest import EmptyMaskRun
from .data.conftest import IMAGE_SIZES, make_dsb_dataset, make_labels_dataset, write_mask_png

TERMS = ["task/focal", "kd/t/encoder_mse", "kd/t/attention_kl", "loss/total"]


def write_run(run_dir: Path) -> None:
    records = []
    for step in (10, 20, 30):
        records.append({"kind": "train", "step": step, "lr": 1e-4, "skipped_steps": 1,
                        "lambda_kd": 1.0, **{term: 1.0 / step for term in TERMS}})  # fmt: skip
        records.append({"kind": "val", "step": step, "val/miou": [0.5, 0.7, 0.6][step // 10 - 1]})
    records[-1]["lambda_kd_change"] = [1.0, 0.5]
    records[0]["nonfinite_terms"] = ["kd/t/encoder_mse", "loss/total"]
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_run_summary_and_one_panel_per_term(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    summary = summarize_run(tmp_path / "run")
    assert summary["steps"] == 30
    assert (summary["best_val_miou"], summary["best_step"]) == (0.7, 20)
    assert summary["lambda_kd_changes"] == [{"step": 30, "from": 1.0, "to": 0.5}]
    assert summary["skipped_steps"] == 1
    assert summary["nonfinite_terms"] == ["kd/t/encoder_mse", "loss/total"]
    assert loss_terms(json_lines(tmp_path / "run" / "metrics.jsonl")) == TERMS
    with Image.open(summary["plot"]) as plot:
        assert plot.size[0] > 400 and plot.size[1] > 200


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_run_json(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["best_step"] == 20


def test_checkpoint_summary(tmp_path: Path) -> None:
    path = tmp_path / "student.pt"
    save_state_dict(build_sam("vit_t_mini"), path)
    summary = summarize_checkpoint(path)
    assert summary["model_type"] == "TinyViT (vit_t family)"
    assert summary["total_parameters"] == sum(
        summary["parameters"][part] for part in ("image_encoder", "prompt_encoder", "mask_decoder")
    )
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": torch.load(path, weights_only=True)}, wrapped)
    assert summarize_checkpoint(wrapped)["total_parameters"] == summary["total_parameters"]


def test_unknown_path_is_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert "not a feature file, run folder, checkpoint or dataset folder" in result.stderr


def dsb_with_problems(root: Path) -> Path:
    """The generated DSB dataset plus an image-sized (medium) object in ``a``, a mask of the
    wrong size in ``a`` and an empty mask in ``b``."""
    make_dsb_dataset(root)
    write_mask_png(root / "a" / "masks" / "full.png", np.ones(IMAGE_SIZES["a"], bool))
    write_mask_png(root / "a" / "masks" / "wrong.png", np.ones((8, 8), bool))
    write_mask_png(root / "b" / "masks" / "empty.png", np.zeros(IMAGE_SIZES["b"], bool))
    return root


def test_dataset_summary(tmp_path: Path) -> None:
    summary = summarize_dataset(dsb_with_problems(tmp_path))
    assert summary["layout"] == "dsb"
    assert (summary["images"], summary["objects"]) == (3, 5)
    assert summary["object_sizes"] == {"small": 4, "medium": 1, "large": 0}
    assert summary["images_without_objects"] == ["c"]
    problems = sorted(summary["problems"])
    assert len(problems) == 2
    assert problems[0].startswith(str(tmp_path / "a" / "masks" / "wrong.png"))
    assert "mask is 8x8 (WxH) but its image is 60x40 (WxH)" in problems[0]
    assert problems[1].startswith(f"{tmp_path / 'b' / 'masks' / 'empty.png'}: mask is empty")


def test_cli_inspects_a_dataset_folder(tmp_path: Path) -> None:
    root = dsb_with_problems(tmp_path / "dsb")
    result = CliRunner().invoke(app, ["inspect", str(root)])
    assert result.exit_code == 1, result.output  # problems were found
    lines = result.stdout.splitlines()
    assert any("layout" in line and "dsb" in line for line in lines)
    assert any("images without objects" in line and "1 (c)" in line for line in lines)
    assert any("problems" in line and line.rstrip(" │").endswith("2") for line in lines)
    assert any(line.strip().startswith(str(root / "b" / "masks" / "empty.png")) for line in lines)


def test_cli_dataset_json_and_layout_setting(tmp_path: Path) -> None:
    make_labels_dataset(tmp_path / "labels")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "labels"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["layout"], summary["images"], summary["objects"]) == ("labels", 3, 4)
    assert summary["problems"] == []
    forced = CliRunner().invoke(
        app, ["inspect", str(tmp_path / "labels"), "--set", "data.layout=dsb"]
    )
    assert forced.exit_code == 1
    assert forced.stderr.strip().startswith(f"error: {tmp_path / 'labels'}: no <id>/images/")


def test_a_run_whose_model_predicts_empty_masks_says_so(empty_mask_run: EmptyMaskRun) -> None:
    summary = summarize_run(empty_mask_run.folder, plot=False)
    assert summary["last_val_empty_fraction"] == 1.0
    result = CliRunner().invoke(app, ["inspect", str(empty_mask_run.folder)])
    assert result.exit_code == 0, result.output
    assert "last val empty masks" in result.stdout and "100%" in result.stdout
    (warning,) = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert warning == (
        "warning: the model predicts empty masks for 100% of objects (last validation): "
        "undertrained or wrong input scale?"
    )
