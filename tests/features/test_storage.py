"""A full or read-only disk: checked before the work, one line when met anyway, no
temporary file left, and a rerun with room finishes the file as an undisturbed run does."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import samkd.extract
from samkd.cli import app
from samkd.features import open_for_extraction
from samkd.features.lock import lock_path
from samkd.features.schema import JoinLayout, parts_dir
from samkd.features.writer import DATASET_OVERHEAD, space_needed
from samkd.files import is_temporary

from .fault_helpers import (
    ONE_THREAD,
    Mount,
    extract_arguments,
    files_under,
    remount,
    run_extract_process,
)
from .feature_helpers import decoder_state_for, make_plan, read_datasets, write_all


def one_line_error(stderr: str) -> str:
    """The error line of a failed command, checking that there is no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    return stderr.strip().splitlines()[-1]


def temporaries(folder: Path) -> list[str]:
    return [str(path) for path in folder.rglob("*") if is_temporary(path)]


def test_an_extraction_that_does_not_fit_stops_before_writing(
    tmpfs: Mount, shapes: Path, reference: Path
) -> None:
    disk = tmpfs("disk", "8m")
    output = disk / "f.h5"
    result = CliRunner().invoke(app, extract_arguments(shapes, output))
    assert result.exit_code == 1
    line = one_line_error(result.stderr)
    assert re.fullmatch(
        rf"error: f\.h5: needs ([\d.]+) MiB free on {disk} \(teacher decoders [\d.]+ MiB, "
        r"shards [\d.]+ KiB, joined file [\d.]+ MiB\), only 8\.0 MiB available",
        line,
    ), line
    assert files_under(disk) == []  # no lock, no parts folder, no temporary file
    # The estimate bounds what the extraction writes: it fits in as much as it asked for.
    needed = float(re.findall(r"needs ([\d.]+) MiB", line)[0])
    remount(disk, f"size={int((needed + 0.2) * 1024)}k")
    completed = run_extract_process(shapes, output)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert files_under(disk) == ["f.h5"]
    assert read_datasets(output) == read_datasets(reference)


def test_a_disk_that_fills_up_midway_stops_with_one_line_and_resumes(
    tmpfs: Mount, shapes: Path, reference: Path
) -> None:
    """Without the check, the join runs out of room: the error names the file and the space
    left, no temporary file stays, and the shards stay for the rerun, which only joins."""
    disk = tmpfs("disk", "24m")
    output = disk / "f.h5"
    failed = run_extract_process(shapes, output, patches=("--no-space-check",))
    assert failed.returncode == 1, failed.stderr[-3000:]
    line = one_line_error(failed.stderr)
    assert re.fullmatch(
        rf"error: f\.h5: no space left on {disk} \([\d.]+ [KM]iB free\) writing "
        rf"{disk}/\.f\.h5\.\d+-[0-9a-f]+\.tmp; free some space or set extract\.output to "
        r"another disk, then rerun",
        line,
    ), line
    assert temporaries(disk) == []
    assert not lock_path(output).exists()
    assert len(list(parts_dir(output).glob("*/part-*.h5"))) == 3  # the computed work stays
    remount(disk, "size=64m")
    completed = run_extract_process(shapes, output)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "all shards of rank 0 are on disk, nothing to compute" in completed.stderr
    assert files_under(disk) == ["f.h5"]
    assert read_datasets(output) == read_datasets(reference)


def test_a_read_only_output_is_refused_before_any_work(
    tmpfs: Mount, shapes: Path, hashed: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmpfs("disk", "8m", read_only=True)
    monkeypatch.setattr(samkd.extract, "build_teacher", pytest.fail)
    result = CliRunner().invoke(app, extract_arguments(shapes, disk / "sub" / "f.h5"))
    assert result.exit_code == 1
    assert one_line_error(result.stderr) == (
        f"error: extract.output {disk / 'sub'} is not writable: Read-only file system"
    )
    assert hashed == []  # refused before hashing a single image


def test_an_output_made_read_only_midway_is_refused_and_resumed(
    tmpfs: Mount, shapes: Path, reference: Path
) -> None:
    """A stopped extraction's parts folder on a disk remounted read-only: refused at once,
    resumed once writable again."""
    disk = tmpfs("disk", "64m")
    output = disk / "f.h5"
    process = subprocess.run(
        [sys.executable, "-c", STOP_AFTER_TWO_SHARDS, *extract_arguments(shapes, output)],
        capture_output=True,
        text=True,
        env=ONE_THREAD,
        timeout=300,
    )
    assert process.returncode == 3, process.stderr[-3000:]
    assert len(list(parts_dir(output).glob("*/part-*.h5"))) == 2
    remount(disk, "ro")
    result = CliRunner().invoke(app, extract_arguments(shapes, output))
    assert result.exit_code == 1
    assert one_line_error(result.stderr) == (
        f"error: extract.output {disk} is not writable: Read-only file system"
    )
    remount(disk, "rw")
    completed = run_extract_process(shapes, output)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "resuming, 2 of 3 shards done" in completed.stderr
    assert read_datasets(output) == read_datasets(reference)


# Stops (exit 3) once two shards are on disk, as a kill would.
STOP_AFTER_TWO_SHARDS = textwrap.dedent(
    """
    import os, sys
    import samkd.features.writer as writer
    publish = writer._OpenShard.publish
    count = 0
    def stop_after_two(shard):
        global count
        publish(shard)
        count += 1
        if count == 2:
            os._exit(3)
    writer._OpenShard.publish = stop_after_two
    from samkd.cli import app
    app(sys.argv[1:], prog_name="samkd")
    """
)


@pytest.mark.parametrize("layout", ["copy", "virtual"])
def test_the_space_estimate_bounds_the_files_written(
    tmpfs: Mount, tmp_path: Path, layout: JoinLayout
) -> None:
    """Decoders, shards and the joined file together fit in what `space_needed` asks for
    (plus the few KiB of the plan, index and lock, written before it is asked)."""
    plan = make_plan(num_images=10, shard_size=4)
    everything = {teacher: list(range(plan.num_images)) for teacher in plan.teacher_names}
    decoder = sum(v.nbytes + DATASET_OVERHEAD for v in decoder_state_for("vit_h").values())
    needed = space_needed(tmp_path / "f.h5", plan, everything, layout=layout, decoder_bytes=decoder)
    disk = tmpfs("disk", f"{(needed.total >> 10) + 64}k")
    output = disk / "f.h5"
    with open_for_extraction(output, plan, layout=layout, decoder_bytes=decoder) as writer:
        write_all(writer)
        assert writer.finish() == output
