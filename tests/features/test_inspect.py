"""inspect_feature_file: fields, JSON, table, and status on complete / incomplete / corrupt."""

from __future__ import annotations

import io
import json
from pathlib import Path

import h5py
import numpy as np
from rich.console import Console

from samkd.features import inspect_feature_file, open_for_extraction, render_report
from samkd.features.schema import parts_dir

from .feature_helpers import extract, make_plan, write_all


def test_report_of_a_complete_file(tmp_path: Path) -> None:
    output = extract(tmp_path / "features.h5", make_plan(num_images=6))
    assert output is not None
    report = inspect_feature_file(output, sample=3)
    assert (report.status, report.exit_code, report.source) == ("complete", 0, "file")
    assert report.num_images == 6 and report.schema_version == 1 and report.layout == "copy"
    assert [teacher.name for teacher in report.teachers] == ["vit_h", "vit_b"]
    teacher = report.teachers[0]
    assert (teacher.images_done, teacher.images_total, teacher.decoder_tensors) == (6, 6, 2)
    embed = teacher.taps[0]
    assert embed.name == "encoder.embed" and embed.shape == [256, 16, 16]
    assert embed.dtype == "float16" and embed.chunks == [1, 256, 16, 16]
    assert embed.compression == "none" and embed.kind == "spatial"
    assert embed.bytes_on_disk == 6 * 256 * 16 * 16 * 2
    assert embed.bytes_per_image == 256 * 16 * 16 * 2
    assert embed.images_sampled == 3
    assert embed.mean is not None and abs(embed.mean) < 0.05
    assert embed.std is not None and abs(embed.std - 1) < 0.05
    assert embed.min is not None and embed.max is not None and embed.min < -3 < 3 < embed.max
    assert embed.nan_count == embed.inf_count == 0
    assert report.bytes_on_disk == output.stat().st_size
    assert json.loads(report.to_json())["teachers"][1]["taps"][2]["kind"] == "attention"
    console = Console(file=io.StringIO(), width=200)
    render_report(report, console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "complete" in text and "encoder.block.3" in text
    checked = inspect_feature_file(output, check=True)
    assert checked.status == "complete" and checked.teachers[1].taps[0].images_sampled == 6


def test_report_of_an_unfinished_extraction(tmp_path: Path) -> None:
    output = tmp_path / "features.h5"
    plan = make_plan(num_images=10, shard_size=4)
    with open_for_extraction(output, plan) as writer:
        write_all(writer, limit=9)
        writer.drain()
        for path in (output, parts_dir(output)):
            report = inspect_feature_file(path, check=True)
            assert (report.status, report.exit_code, report.source) == ("incomplete", 1, "parts")
            assert [t.images_done for t in report.teachers] == [8, 0]
            assert report.teachers[0].taps[0].bytes_on_disk == 8 * 256 * 16 * 16 * 2
            assert report.teachers[0].taps[0].images_sampled == 8
            assert any("being written" in problem for problem in report.problems)


def test_an_extraction_killed_before_its_plan_is_incomplete(tmp_path: Path) -> None:
    """Killed between making its parts folder and publishing `plan.json` (the random-kill
    test lands there now and then): nothing to resume, and the rerun starts over."""
    output = tmp_path / "features.h5"
    parts_dir(output).mkdir()
    (parts_dir(output) / ".plan.json.123-abcd.tmp").write_text('{"images": ')
    report = inspect_feature_file(output)
    assert (report.status, report.exit_code, report.source) == ("incomplete", 1, "parts")
    assert report.problems == ["features.h5: stopped before it wrote its plan; a rerun starts over"]
    with open_for_extraction(output, make_plan(num_images=2)) as writer:
        assert writer.message.startswith("features.h5: starting")


def test_truncated_file_is_corrupt(tmp_path: Path) -> None:
    output = extract(tmp_path / "features.h5", make_plan(num_images=4))
    assert output is not None
    size = output.stat().st_size
    with open(output, "r+b") as handle:
        handle.truncate(size // 2)
    report = inspect_feature_file(output)
    assert (report.status, report.exit_code) == ("corrupt", 2)
    assert report.problems and "\n" not in report.problems[0]


def test_garbled_data_is_found_by_check(tmp_path: Path) -> None:
    output = extract(tmp_path / "features.h5", make_plan(num_images=4))
    assert output is not None
    with h5py.File(output, "r") as handle:
        offset = handle["teachers/vit_b/taps/encoder.block.3"].id.get_offset()
    assert offset is None  # chunked: find the chunk's address instead
    with h5py.File(output, "r") as handle:
        info = handle["teachers/vit_b/taps/encoder.block.3"].id.get_chunk_info(2)
    with open(output, "r+b") as handle:
        handle.seek(info.byte_offset + 100)
        handle.write(np.full(16, 0x7B, dtype=np.uint8).tobytes())
    assert inspect_feature_file(output).status == "complete"  # sampling does not verify
    report = inspect_feature_file(output, check=True)
    assert report.status == "corrupt"
    assert report.problems == ["teacher 'vit_b' tap 'encoder.block.3': 1 images fail their crc32"]


def test_missing_file_is_corrupt(tmp_path: Path) -> None:
    report = inspect_feature_file(tmp_path / "nothing.h5")
    assert report.status == "corrupt" and "does not exist" in report.problems[0]
