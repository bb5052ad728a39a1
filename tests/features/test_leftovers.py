"""What a failed extraction leaves: nothing when it computed nothing, its finished shards
otherwise, never a temporary file; the next run removes what a killed one left; files get
the umask's mode."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import samkd.extract
from samkd.cli import app
from samkd.errors import UsageError
from samkd.features import FeatureStoreError, inspect_feature_file, open_for_extraction
from samkd.features.lock import lock_path
from samkd.features.schema import decoder_path, parts_dir, shard_path
from samkd.files import atomic_path

from .fault_helpers import Mount, extract_arguments, files_under
from .feature_helpers import extract, make_plan, write_all


def test_a_run_that_fails_before_computing_leaves_nothing(
    tmp_path: Path, shapes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failed run's parts folder would refuse the corrected command (its plan is the
    failed one's): a run that finished no shard removes it."""
    output = tmp_path / "f.h5"

    def unusable_checkpoint(*args: object, **kwargs: object) -> None:
        raise UsageError("teacher checkpoint does not fit vit_mini")

    with monkeypatch.context() as patch:
        patch.setattr(samkd.extract, "build_teacher", unusable_checkpoint)
        failed = CliRunner().invoke(
            app, extract_arguments(shapes, output, "--set", "extract.dtype=float32")
        )
    assert failed.exit_code == 1
    assert failed.stderr.strip().splitlines()[-1] == (
        "error: teacher checkpoint does not fit vit_mini"
    )
    assert files_under(tmp_path) == []
    corrected = CliRunner().invoke(app, extract_arguments(shapes, output))
    assert corrected.exit_code == 0, corrected.stderr[-2000:]
    assert inspect_feature_file(output).status == "complete"
    assert files_under(tmp_path) == ["f.h5"]


def test_a_run_that_fails_midway_keeps_its_finished_shards(
    tmp_path: Path, shapes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "f.h5"
    compute = samkd.extract.teacher_batch_features
    calls: list[int] = []

    def fails_on_the_third_batch(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise FeatureStoreError("teacher gave up")
        return compute(*args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(samkd.extract, "teacher_batch_features", fails_on_the_third_batch)
        failed = CliRunner().invoke(app, extract_arguments(shapes, output))
    assert failed.exit_code == 1
    assert failed.stderr.strip().splitlines()[-1] == "error: teacher gave up"
    assert files_under(parts_dir(output) / "vit_mini") == [
        "decoder.h5",
        "part-00000.h5",
        "part-00001.h5",
    ]
    assert not lock_path(output).exists()
    resumed = CliRunner().invoke(app, extract_arguments(shapes, output))
    assert resumed.exit_code == 0, resumed.stderr[-2000:]
    assert "resuming, 2 of 3 shards done" in resumed.stderr
    assert files_under(tmp_path) == ["f.h5"]


def test_a_refusal_names_the_folder_to_delete(tmp_path: Path) -> None:
    output = tmp_path / "f.h5"
    with open_for_extraction(output, make_plan()) as writer:
        write_all(writer, limit=6)
    with pytest.raises(FeatureStoreError) as error:
        open_for_extraction(output, make_plan(dtype="float32"))
    assert str(error.value) == (
        f"f.h5: was extracted with dtype float16, now float32 (use another output, or delete "
        f"{parts_dir(output)} to start over)"
    )


def test_the_next_run_removes_every_temporary_file_a_killed_one_left(tmp_path: Path) -> None:
    output = tmp_path / "f.h5"
    plan = make_plan(num_images=8, shard_size=4)
    with open_for_extraction(output, plan) as writer:
        write_all(writer, limit=3)  # decoders stored, shard 0 of vit_h unfinished
    killed = [
        tmp_path / ".f.h5.4242-0123abcd.tmp",  # the join
        parts_dir(output) / ".plan.json.4242-0123abcd.tmp",
        parts_dir(output) / ".index.h5.4242-0123abcd.tmp",
        parts_dir(output) / ".image-hashes-0123456789abcdef.h5.4242-0123abcd.tmp",
        decoder_path(output, "vit_b").with_name(".decoder.h5.4242-0123abcd.tmp"),
        shard_path(output, "vit_b", 1).with_name(".part-00001.h5.4242.tmp"),
    ]
    for path in killed:
        path.write_bytes(b"\x89HDF\r\n" + b"x" * 999)
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("someone else's")
    with open_for_extraction(output, plan) as writer:
        assert [path for path in killed if path.exists()] == []
        write_all(writer)
        writer.finish()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".notes.tmp", "f.h5"]


# Fills each tmpfs given on the command line (check off), prints what each run left.
FILL_UP = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from feature_helpers import make_plan, write_all
    from samkd.features import open_for_extraction
    from samkd.files import is_temporary
    import numpy as np
    big = {"mask_decoder.weight": np.ones((512, 1024), dtype=np.float32)}  # 2 MiB
    for disk in map(Path, sys.argv[2:]):
        error = None
        try:
            plan = make_plan(num_images=10, shard_size=2)
            with open_for_extraction(disk / "f.h5", plan, check_free_space=False) as writer:
                if disk.name.startswith("decoder"):
                    writer.write_decoder_state("vit_h", big)
                write_all(writer)
                writer.finish()
        except Exception as failure:
            error = f"{type(failure).__name__}: {failure}"
        left = [str(p) for p in disk.rglob("*") if is_temporary(p)]
        print(json.dumps({"disk": str(disk), "error": error, "temporaries": left}), flush=True)
    """
)


def test_a_full_disk_leaves_no_temporary_file(tmpfs: Mount) -> None:
    """Disks too small for the decoders, for some shards, for the join: each failure is one
    line and removes the temporary file it was writing."""
    disks = [tmpfs("decoder", "1m")]
    disks += [tmpfs(f"disk-{size}", size) for size in ("60k", "300k", "700k", "1200k", "4500k")]
    folder = str(Path(__file__).parent)
    completed = subprocess.run(
        [sys.executable, "-c", FILL_UP, folder, *map(str, disks)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    reports = [json.loads(line) for line in completed.stdout.splitlines()]
    assert len(reports) == len(disks)
    for report in reports:
        assert report["temporaries"] == [], report
        assert report["error"] is not None and "\n" not in report["error"], report
        assert report["error"].startswith("StorageError: f.h5: no space left on "), report
    first, *_, last = reports
    assert f" writing {first['disk']}/f.h5.parts/vit_h/.decoder.h5." in first["error"]
    assert f" writing {last['disk']}/.f.h5." in last["error"]  # 4.5 MiB: the join does not
    assert Path(last["disk"], "f.h5.parts", "vit_b", "part-00004.h5").exists()


def test_files_get_the_umasks_mode(tmp_path: Path) -> None:
    previous = os.umask(0o002)
    try:
        output = extract(tmp_path / "out" / "f.h5", make_plan(num_images=4), layout="virtual")
        with atomic_path(tmp_path / "state.json") as temporary:
            temporary.write_text("{}")
    finally:
        os.umask(previous)
    assert output is not None
    published = [output, tmp_path / "state.json", *parts_dir(output).rglob("*")]
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in published}
    for name, mode in modes.items():
        assert mode == (0o775 if name in ("vit_h", "vit_b") else 0o664), (name, oct(mode))
