"""Images that cannot be read: skipped and recorded under `data.on_error=skip`, keeping the
index aligned with the dataset's records; one line naming the file under `raise`."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from samkd.cli import app
from samkd.extract import load_extraction_dataset
from samkd.features import FeatureStore, inspect_feature_file, open_for_extraction, render_report
from samkd.features.schema import SKIPPED_SCHEMA_VERSION
from samkd.runtime import input_image_size
from samkd.settings import load_settings

from .fault_helpers import extract_arguments, files_under
from .feature_helpers import extract, features_for, make_plan, read_datasets, write_all

SKIP = ("--set", "data.on_error=skip")


@pytest.fixture
def broken(tmp_path: Path, shapes: Path) -> Path:
    """`shapes` with three files among its images that cannot be read: an empty `.jpg`, a
    text file named `.jpg` (both fail as the index is built) and a truncated PNG (whose
    header reads, but not its pixels)."""
    root = tmp_path / "broken"
    shutil.copytree(shapes, root)
    (root / "image" / "shape_00001x.jpg").write_bytes(b"")
    (root / "image" / "shape_00002x.jpg").write_text("not an image\n")
    png = (root / "image" / "shape_00003.png").read_bytes()
    (root / "image" / "shape_00004x.png").write_bytes(png[: len(png) // 2])
    return root


def record_ids(root: Path) -> list[str]:
    settings = load_settings(None, [f"data.train={root}", "student.model_type=vit_t_mini"], {})
    dataset = load_extraction_dataset(settings, input_image_size(settings))
    return [record.image_id for record in dataset.records]


def test_unreadable_images_are_skipped_and_recorded(
    tmp_path: Path, broken: Path, reference: Path
) -> None:
    output = tmp_path / "out" / "f.h5"
    result = CliRunner().invoke(app, extract_arguments(broken, output, *SKIP))
    assert result.exit_code == 0, result.stderr[-3000:]
    store = FeatureStore(output)
    assert store.image_ids == record_ids(broken)  # one row per record: training ids match
    skipped = {store.image_ids[index]: reason for index, reason in store.skipped_images.items()}
    assert sorted(skipped) == ["shape_00001x", "shape_00002x", "shape_00004x"]
    for image_id, reason in skipped.items():
        assert reason.startswith(f"{broken / 'image' / image_id}."), reason
        assert "\n" not in reason
    for index in store.skipped_images:
        assert all(not tap.any() for tap in store[index]["vit_mini"].values())
    # The images that were read have the features an extraction without the bad ones has
    # (up to rounding: batches differ), so no row went to another image.
    clean = FeatureStore(reference)
    for image_id in clean.image_ids:
        got = store[image_id]["vit_mini"]["encoder.embed"]
        want = clean[image_id]["vit_mini"]["encoder.embed"]
        assert torch.allclose(got, want, rtol=1e-2, atol=1e-2), image_id
    with h5py.File(output, "r") as handle:
        assert handle.attrs["schema_version"] == SKIPPED_SCHEMA_VERSION
    report = inspect_feature_file(output, check=True)
    assert report.status == "complete" and report.problems == []
    assert [image.id for image in report.skipped_images] == sorted(skipped)
    assert report.teachers[0].taps[0].images_sampled == len(clean.image_ids)
    shown = CliRunner().invoke(app, ["inspect", str(output)])
    assert "3 images skipped at extraction" in shown.stdout
    assert "shape_00002x: " in shown.stdout
    # A rerun resumes nothing and reads the recorded skips, not the files, again.
    again = CliRunner().invoke(app, extract_arguments(broken, output, *SKIP))
    assert again.exit_code == 0 and "already complete, nothing to do" in again.stderr


@pytest.mark.parametrize(
    ("bad", "left"),
    [
        ("shape_00001x.jpg", []),  # found by the index, before any work
        ("shape_00002x.jpg", []),
        ("shape_00004x.png", ["part-00000.h5", "part-00001.h5"]),  # found by the loader
    ],
)
def test_an_unreadable_image_stops_the_default_policy_with_one_line(
    tmp_path: Path, broken: Path, bad: str, left: list[str]
) -> None:
    """Under `data.on_error=raise` the bad image stops the extraction with one line naming
    it; nothing stays but the shards finished before it (resumable)."""
    for other in {"shape_00001x.jpg", "shape_00002x.jpg", "shape_00004x.png"} - {bad}:
        (broken / "image" / other).unlink()
    output = tmp_path / "out" / "f.h5"
    result = CliRunner().invoke(app, extract_arguments(broken, output))
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {broken / 'image' / bad}: "), line
    shards = sorted(path.name for path in output.parent.rglob("part-*.h5"))
    assert shards == left
    if not left:
        assert files_under(output.parent) == []
    assert not any(path.name.endswith((".tmp", ".lock")) for path in output.parent.rglob("*"))


def test_the_writer_records_skipped_images(tmp_path: Path) -> None:
    """`write_skipped` by the writer, for both join layouts: flags, zeros, reasons, and a
    store that reads them; a file with none stays schema version 1."""
    plan = make_plan(num_images=7, shard_size=3)
    files = {}
    for layout in ("copy", "virtual"):
        output = tmp_path / layout / "f.h5"
        with open_for_extraction(output, plan, layout=layout) as writer:
            for teacher in plan.teacher_names:
                writer.write_skipped(teacher, [1, 5], ["a.jpg: cannot be read", "b.jpg: empty"])
            write_all(writer)
            writer.finish()
        files[layout] = output
        store = FeatureStore(output)
        assert store.skipped_images == {1: "a.jpg: cannot be read", 5: "b.jpg: empty"}
        assert not store[5]["vit_b"]["encoder.embed"].any()
        want = features_for(plan, "vit_b", [4])["encoder.embed"][0].astype(np.float16)
        assert np.array_equal(store[4]["vit_b"]["encoder.embed"].numpy(), want)
        console = Console(file=io.StringIO(), width=300)
        render_report(inspect_feature_file(output), console)
        assert "2 images skipped at extraction" in console.file.getvalue()  # type: ignore[attr-defined]
    assert read_datasets(files["copy"]) == read_datasets(files["virtual"])
    plain = extract(tmp_path / "plain" / "f.h5", plan)
    assert plain is not None and FeatureStore(plain).skipped_images == {}
    with h5py.File(plain, "r") as handle:
        assert handle.attrs["schema_version"] == 1 and "skipped" not in handle["images"]


def test_skipped_images_need_a_reason_and_must_be_pending(tmp_path: Path) -> None:
    plan = make_plan(num_images=4, teachers=("vit_h",), shard_size=2)
    with open_for_extraction(tmp_path / "f.h5", plan) as writer:
        with pytest.raises(Exception, match="one non-empty reason per skipped image"):
            writer.write_skipped("vit_h", [0, 1], ["only one"])
        writer.write_skipped("vit_h", [0], ["x.jpg: empty"])
        with pytest.raises(Exception, match="image 0 is not pending"):
            writer.write_skipped("vit_h", [0], ["x.jpg: empty"])
