"""The run tab's reading of a run folder: every logged term, a log still being written."""

import json
from pathlib import Path

import pytest

import samkd.view.runs
from samkd.errors import UsageError
from samkd.view.runs import change_token, logged_terms, read_records, read_run

from .conftest import TERMS, training_records, write_log

OTHER_TRAIN_NUMBERS = ["lr", "lambda_kd", "images_per_s", "skipped_steps"]
VAL_NUMBERS = ["val/miou", "val/kd_loss"]


def test_every_logged_number_is_a_term_loss_terms_first() -> None:
    records = training_records(range(1, 5))
    records[0]["lambda_kd"] = None  # not a number: left out of its curve
    terms = logged_terms(records)
    names = TERMS + ["lr", "images_per_s", "skipped_steps", "lambda_kd"] + VAL_NUMBERS
    assert [term.name for term in terms] == names
    by_name = {term.name: term for term in terms}
    assert by_name["loss/total"].steps == [1, 2, 3, 4]
    assert by_name["lambda_kd"].kind == "train" and by_name["lambda_kd"].steps == [2, 3, 4]
    assert by_name["val/miou"].kind == "val"
    assert by_name["val/miou"].values == pytest.approx([0.2, 0.4])


def test_the_curves_have_a_panel_per_term(
    monkeypatch: pytest.MonkeyPatch, student_run: Path
) -> None:
    plotted: list[list[str]] = []
    real = samkd.view.runs.plot_run

    def recording(records: list[dict], path: Path, panels: list[str]) -> Path:
        plotted.append(list(panels))
        return real(records, path, panels)

    monkeypatch.setattr(samkd.view.runs, "plot_run", recording)
    snapshot = read_run(student_run)
    assert plotted == [snapshot.term_names]
    assert snapshot.term_names == TERMS + OTHER_TRAIN_NUMBERS + VAL_NUMBERS
    assert snapshot.curves is not None and snapshot.curves.shape[1] > 800
    assert snapshot.summary["best_val_miou"] == pytest.approx(0.4)
    assert "model_type: vit_t_mini" in snapshot.settings


def test_a_line_being_written_waits(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"kind": "train", "step": 1, "a/b": 1.0}) + '\n{"kind": "train", "st'
    )
    assert [record["step"] for record in read_records(tmp_path / "metrics.jsonl")] == [1]
    (tmp_path / "metrics.jsonl").write_text('{"kind": \n')
    with pytest.raises(UsageError, match="metrics.jsonl: line 1 is not JSON"):
        read_records(tmp_path / "metrics.jsonl")


def test_the_token_changes_when_the_run_writes(tmp_path: Path) -> None:
    assert change_token(tmp_path) is None
    with pytest.raises(UsageError, match="not a training run folder"):
        read_run(tmp_path)
    write_log(tmp_path, training_records(range(1, 3)))
    before = change_token(tmp_path)
    assert before is not None and read_run(tmp_path, plot=False).records == 3
    write_log(tmp_path, [{"kind": "train", "step": 3, "task/new_term": 0.5}])
    assert change_token(tmp_path) != before
    assert "task/new_term" in read_run(tmp_path, plot=False).term_names
