"""Training on input it must not train on: features of other teachers, numbers that cannot
train, outputs it cannot write. Each is a one-line error before anything wrong is saved."""

import shutil
from pathlib import Path

import h5py
import pytest
import torch
from loguru import logger

from samkd.extract import run_extract
from samkd.features import FeatureChecksumError, FeatureStore, FeatureStoreError
from samkd.files import OutputNotWritable
from samkd.train import run_train, setup
from samkd.train.metrics_log import read_metrics
from samkd.train.state import NonFiniteWeightsError, load_checkpoint

from .conftest import (
    TEACHER,
    base_assignments,
    make_settings,
    precomputed_settings,
    write_teacher_weights,
)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_teacher_weights(tmp_path_factory.mktemp("weights") / "other.pt", seed=2)


def test_features_of_other_teacher_weights_are_refused(
    tmp_path: Path, shapes: Path, feature_file: Path, other_checkpoint: Path
) -> None:
    settings = precomputed_settings(shapes, other_checkpoint, tmp_path / "run", feature_file)
    with pytest.raises(FeatureStoreError) as error:
        run_train(settings)
    message = str(error.value)
    assert "teacher 't' was extracted with teacher.pt (sha256 " in message
    assert f"the settings name {other_checkpoint}" in message
    assert "rebuild the features for these settings with `samkd extract`" in message
    assert not (tmp_path / "run").exists()


def test_features_of_another_model_type_are_refused(
    tmp_path: Path, shapes: Path, feature_file: Path
) -> None:
    settings = precomputed_settings(
        shapes, Path("unused"), tmp_path / "run", feature_file,
        "teachers=[{name: t, model_type: vit_t_mini}]",
    )  # fmt: skip
    with pytest.raises(FeatureStoreError, match="'t' was extracted as vit_mini, the settings say"):
        run_train(settings)


def test_features_without_the_checkpoint_are_used_as_stored(
    tmp_path: Path, shapes: Path, feature_file: Path
) -> None:
    settings = precomputed_settings(
        shapes, Path("unused"), tmp_path / "run", feature_file,
        f"teachers=[{{name: t, model_type: {TEACHER}}}]", "train.steps=1",
    )  # fmt: skip
    assert run_train(settings).steps == 1


def test_weights_that_turn_nonfinite_are_never_saved(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    # A finite loss and a huge learning rate: the first update makes the weights infinite,
    # the steps after it are skipped (non-finite loss) until the checkpoint check stops it.
    run_dir = tmp_path / "run"
    settings = precomputed_settings(
        shapes, teacher_checkpoint, run_dir, feature_file,
        "train.lr=1e300", "train.grad_clip=0", "train.steps=4", "train.checkpoint_every=1",
        "train.max_nonfinite_steps=10",
    )  # fmt: skip
    with pytest.raises(
        NonFiniteWeightsError, match=r"step 1: \d+ weight tensors hold NaN"
    ) as error:
        run_train(settings)
    assert "no checkpoint was written before; lower train.lr" in str(error.value)
    assert not (run_dir / "student.pt").exists()
    assert list((run_dir / "checkpoints").glob("*")) == []
    assert read_metrics(run_dir / "metrics.jsonl")[0]["lr"] > 1e200
    # Without a checkpoint, the folder takes a new run, whose log starts afresh.
    settings = precomputed_settings(
        shapes, teacher_checkpoint, run_dir, feature_file, "train.steps=1"
    )
    run_train(settings)
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert len(records) == 1 and records[0]["lr"] <= 1e-3


def test_the_last_good_checkpoint_is_good(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    # Step 1's update is huge but finite; step 2's forward makes the batch-norm statistics
    # infinite.
    run_dir = tmp_path / "run"
    settings = precomputed_settings(
        shapes, teacher_checkpoint, run_dir, feature_file,
        "train.lr=1e30", "train.grad_clip=0", "train.steps=3", "train.checkpoint_every=1",
    )  # fmt: skip
    last = run_dir / "checkpoints" / "last.pt"
    with pytest.raises(
        NonFiniteWeightsError, match=f"step 2: .*the last good checkpoint is {last}"
    ):
        run_train(settings)
    state = load_checkpoint(last)
    assert state["progress"]["step"] == 1
    weights = [v for v in state["model"].values() if torch.is_tensor(v) and v.is_floating_point()]
    assert all(torch.isfinite(weight).all() for weight in weights)
    assert not (run_dir / "student.pt").exists()


def test_a_read_only_run_folder_fails_before_training(
    tmpfs, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    folder = tmpfs("disk", "64k", read_only=True)
    settings = precomputed_settings(shapes, teacher_checkpoint, folder / "run", feature_file)
    with pytest.raises(OutputNotWritable, match=f"train.output_dir {folder}/run is not writable"):
        run_train(settings)


@pytest.fixture
def corrupted_features(tmp_path: Path, feature_file: Path) -> Path:
    """The feature file with image 1's stored embedding changed under its checksum."""
    path = tmp_path / "corrupted.h5"
    shutil.copyfile(feature_file, path)
    with h5py.File(path, "r+") as handle:
        embed = handle["teachers/t/taps/encoder.embed"]
        embed[1] = embed[1] * 2 + 1
    return path


def test_a_corrupted_feature_row_stops_training(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, corrupted_features: Path
) -> None:
    settings = precomputed_settings(
        shapes, teacher_checkpoint, tmp_path / "run", corrupted_features,
        "train.batch_size=8", "train.steps=1",
    )  # fmt: skip
    with pytest.raises(FeatureChecksumError, match="tap 'encoder.embed' image 'shape_00001'"):
        run_train(settings)
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_a_corrupted_feature_row_is_skipped_on_request(
    tmp_path: Path,
    shapes: Path,
    teacher_checkpoint: Path,
    corrupted_features: Path,
    feature_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read: list[str] = []
    original = setup.DistillationDataset.__getitem__

    def recording(self, index: int):  # type: ignore[no-untyped-def]
        item = original(self, index)
        read.append(item.sample.image_id)
        return item

    monkeypatch.setattr(setup.DistillationDataset, "__getitem__", recording)
    settings = precomputed_settings(
        shapes, teacher_checkpoint, tmp_path / "run", corrupted_features,
        "train.batch_size=8", "train.steps=1", "data.on_error=skip",
    )  # fmt: skip
    assert run_train(settings).steps == 1
    damaged = FeatureStore(feature_file).image_ids[1]
    # Its place in the batch is taken by the next image.
    assert damaged not in read
    assert len(read) == 8


def test_images_skipped_at_extraction_are_left_out(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(shapes, data)
    (data / "image" / "shape_00003x.jpg").write_bytes(b"")  # sorts between images 3 and 4
    output = tmp_path / "features.h5"
    assignments = [
        *base_assignments(data, teacher_checkpoint, tmp_path / "run"),
        "data.on_error=skip",
    ]
    run_extract(make_settings(*assignments, f"extract.output={output}"))
    assert list(FeatureStore(output).skipped_images) == [4]
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        settings = make_settings(*assignments, f"distillation.features={output}", "train.steps=1")
        assert run_train(settings).steps == 1
    finally:
        logger.remove(sink)
    left_out = [m for m in messages if "skipped at extraction and are left out" in m]
    assert len(left_out) == 1 and "first: 'shape_00003x'" in left_out[0]
