"""`samkd export` end to end, its one-line errors, and `samkd eval --onnx`."""

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from samkd.cli import app
from samkd.errors import UsageError
from samkd.evaluate import run_eval
from samkd.export import OnnxSam, run_export
from samkd.export.run import model_to_export
from samkd.models import build_sam, save_state_dict
from samkd.settings import Settings, load_settings

from ..conftest import EmptyMaskRun
from .conftest import IMAGE_SIZE, MODEL, Export, export_settings

pytest.importorskip("onnxruntime")

runner = CliRunner()
MIOU_ATOL = 0.005


def one_line_error(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


def test_missing_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, checkpoint: Path
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(
        UsageError, match=r"^onnxruntime is not installed.*: pip install samkd\[export\]$"
    ):
        run_export(export_settings(None, checkpoint, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_source_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", str(tmp_path / "nowhere"), "-o", str(tmp_path)])
    assert result.exit_code == 1
    expected = f"error: {tmp_path / 'nowhere'}: no such training run folder or checkpoint"
    assert one_line_error(result) == expected


def test_checkpoint_of_another_model_type_is_one_line(tmp_path: Path, checkpoint: Path) -> None:
    weights = shutil.copy(checkpoint, tmp_path / "weights.pt")  # outside its run folder
    result = runner.invoke(
        app,
        ["export", str(weights), "--model-type", "vit_mini", "-o", str(tmp_path / "onnx"),
         "--set", f"data.image_size={IMAGE_SIZE}"],
    )  # fmt: skip
    assert result.exit_code == 1
    message = one_line_error(result)
    assert message.startswith(f"error: checkpoint {weights} does not fit model type 'vit_mini'")


def test_cli_exports_a_run_folder(exported: Export, run_folder: Path) -> None:
    assert "ONNX vs PyTorch" in exported.stdout
    assert exported.summary["model"] == {
        "label": "student",
        "model_type": MODEL,
        "checkpoint": str(run_folder / "student.pt"),
        "image_size": IMAGE_SIZE,
    }
    assert exported.summary["opset"] == 17


def test_eval_onnx_matches_the_checkpoint(exported: Export, shapes: Path, checkpoint: Path) -> None:
    settings = export_settings(shapes, checkpoint, exported.folder, "eval.prompts=[box]")
    from_checkpoint = run_eval(settings)
    from_onnx = run_eval(settings, onnx=exported.folder)
    assert from_onnx["model"]["label"] == "onnx fp32"
    for output in ("single", "best"):
        expected = from_checkpoint["quality"]["box"][output]["miou"]
        assert from_onnx["quality"]["box"][output]["miou"] == pytest.approx(expected, abs=MIOU_ATOL)


def test_cli_eval_onnx_int8(exported: Export, shapes: Path) -> None:
    json_path = exported.folder.parent / "eval-int8.json"
    result = runner.invoke(
        app,
        ["eval", "--onnx", str(exported.folder / "image_encoder.int8.onnx"), "--data", str(shapes),
         "--json", str(json_path), "--set", "eval.prompts=[box]", "--set", "eval.repeats=1",
         "--set", "eval.warmup=0", "--set", "data.num_workers=0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(json_path.read_text())
    assert report["model"]["label"] == "onnx int8"
    assert report["model"]["image_size"] == IMAGE_SIZE
    int8 = exported.summary["parity"]["int8"]
    assert report["quality"]["box"]["single"]["miou"] == pytest.approx(int8["miou_onnx"])
    assert report["speed"]["model"]["device"] == "cpu (onnxruntime)"


@pytest.mark.slow
def test_real_size_mobile_sam(tmp_path: Path) -> None:
    """MobileSAM (vit_t) at 1024 px with random weights, fp32 and int8, on one generated
    image."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "mobile_sam.pt"
    save_state_dict(build_sam("vit_t"), checkpoint)
    settings = load_real_size_settings(checkpoint, tmp_path / "onnx")
    summary = run_export(settings)
    fp32, int8 = summary["parity"]["fp32"], summary["parity"]["int8"]
    assert summary["model"]["image_size"] == 1024
    assert int8["miou_delta"] is not None
    assert fp32["embedding_max_abs_diff"] <= settings.export.embedding_atol
    assert fp32["mask_logits_max_abs_diff"] <= settings.export.mask_logits_atol
    assert fp32["miou_onnx"] == pytest.approx(fp32["miou_pytorch"], abs=MIOU_ATOL)


def load_real_size_settings(checkpoint: Path, output: Path) -> Settings:
    return load_settings(
        None,
        ["student.model_type=vit_t", f"student.checkpoint={checkpoint}",
         f"export.output={output}", "export.parity_images=1", "export.quantize=int8",
         "data.num_workers=0"],
        environ={},
    )  # fmt: skip


def test_eval_of_a_broken_onnx_file_is_one_line(tmp_path: Path, shapes: Path) -> None:
    (tmp_path / "image_encoder.onnx").write_text("not a model")
    (tmp_path / "decoder.onnx").write_text("not a model")
    result = runner.invoke(app, ["eval", "--onnx", str(tmp_path), "--data", str(shapes)])
    assert result.exit_code == 1
    message = one_line_error(result)
    assert message.startswith(
        f"error: {tmp_path / 'image_encoder.onnx'}: onnxruntime cannot load it"
    )


def test_a_run_checkpoint_exports_as_the_run_trained_it(
    tmp_path: Path, empty_mask_run: EmptyMaskRun
) -> None:
    """`vit_t_mini` trained at 128 px (the defaults: vit_t, its own size): its checkpoints,
    its student.pt and its folder export as vit_t_mini at 128 px; a contradicting setting is
    a one-line error."""
    run = empty_mask_run.folder
    best = run / "checkpoints" / "best.pt"
    result = runner.invoke(
        app,
        ["export", str(best), "-o", str(tmp_path / "onnx"), "--set", "export.parity_images=1",
         "--set", "data.num_workers=0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "onnx" / "parity.json").read_text())
    assert summary["model"] == {
        "label": "student", "model_type": "vit_t_mini", "checkpoint": str(best), "image_size": 128
    }  # fmt: skip
    assert OnnxSam.load(tmp_path / "onnx").info.image_size == 128
    defaults = load_settings(None, [], environ={})
    agreeing = load_settings(
        None, ["student.model_type=vit_t_mini", "data.image_size=128"], environ={}
    )
    for settings in (defaults, agreeing):
        for source in (run / "checkpoints" / "last.pt", run / "student.pt", run):
            spec = model_to_export(settings, source)
            assert (spec.model_type, spec.image_size) == ("vit_t_mini", 128), source
    for flags, contradiction in (
        (
            ["--model-type", "vit_t"],
            "student.model_type vit_t contradicts it (leave out --model-type)",
        ),
        (["--set", "data.image_size=256"], "data.image_size 256 contradicts it (leave it out)"),
    ):
        result = runner.invoke(app, ["export", str(best), *flags, "-o", str(tmp_path / "no")])
        assert result.exit_code == 1
        assert one_line_error(result) == (
            f"error: {best}: trained as vit_t_mini at 128 px; {contradiction}"
        )
    assert not (tmp_path / "no").exists()
