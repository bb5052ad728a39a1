"""`samkd inspect` on a training run and on checkpoints."""

import json
from pathlib import Path

import torch
from PIL import Image
from typer.testing import CliRunner

from samkd.cli import app
from samkd.inspect import loss_terms, summarize_checkpoint, summarize_run
from samkd.models import build_sam, save_state_dict

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
    assert "not a feature file, run folder or checkpoint" in result.stderr
