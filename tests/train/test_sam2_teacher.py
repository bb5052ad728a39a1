"""SAM 2 teachers (`hiera_mini`) in training: stored and online alike, in their square frame
and in the student's, with SAM 1 teachers beside them; SAM 2 as a supervised student.

At 64 px: a fraction of the cost at 256 px, every path the same."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

pytest.importorskip("sam2")

from samkd.demo.shapes import write_shapes_dataset  # noqa: E402
from samkd.errors import UsageError  # noqa: E402
from samkd.extract import run_extract  # noqa: E402
from samkd.features import FeatureStoreError  # noqa: E402
from samkd.models import build_teacher  # noqa: E402
from samkd.settings import SettingsError  # noqa: E402
from samkd.train import run_train  # noqa: E402
from samkd.train.batches import collate_training  # noqa: E402
from samkd.train.forward import prompt_groups  # noqa: E402
from samkd.train.step import micro_step  # noqa: E402
from samkd.train.terms import UnitCounts  # noqa: E402

from .conftest import KEEP_ALL_MASKS, make_settings  # noqa: E402
from .test_conditions import (  # noqa: E402
    ABSOLUTE,
    assert_logs_close,
    comparable,
    image_ids,
    meta_parts,
    partly_labelled,
    torchrun,
    train_records,
)

SMALL = [
    "data.image_size=64",
    "student.model_type=vit_t_mini",
    "train.batch_size=2",
    "train.warmup_steps=0",
    "train.lr=1e-3",
    "data.num_workers=0",
    "logging.log_every=1",
    "logging.tensorboard=false",
]
SAM2_TEACHER = "teachers=[{name: h, model_type: hiera_mini}]"
TERMS = [
    "distillation.encoder.kl_weight=1",
    "distillation.decoder.enabled=true",
    "distillation.rkd.enabled=true",
]


def settings_for(data: Path, run_dir: Path, *extra: str):
    return make_settings(f"data.train={data}", *SMALL, f"train.output_dir={run_dir}", *extra)


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "four", 4, (96, 128), seed=0)


@pytest.fixture(scope="module")
def sam2_features(tmp_path_factory: pytest.TempPathFactory, four: Path) -> Path:
    """float32 features of the square-frame `hiera_mini` teacher, with its high-resolution
    maps and automatic masks."""
    output = tmp_path_factory.mktemp("features") / "sam2.h5"
    settings = settings_for(
        four,
        output.parent / "unused",
        SAM2_TEACHER,
        f"extract.output={output}",
        "extract.dtype=float32",
        "extract.high_res=true",
        "extract.pseudo_masks.enabled=true",
        *KEEP_ALL_MASKS,
    )
    run_extract(settings)
    return output


def first_record(run_dir: Path) -> dict:
    return train_records(run_dir)[0]


def test_precomputed_equals_online_for_every_term(
    tmp_path: Path, four: Path, sam2_features: Path
) -> None:
    common = [SAM2_TEACHER, *TERMS, "train.steps=1", "train.lr=1e-12"]
    stored = f"distillation.features={sam2_features}"
    run_train(settings_for(four, tmp_path / "stored", *common, stored))
    online = "distillation.use_precomputed_features=false"
    run_train(settings_for(four, tmp_path / "online", *common, online))
    from_file, computed = first_record(tmp_path / "stored"), first_record(tmp_path / "online")
    terms = [name for name in computed if name.startswith(("kd/h/", "task/"))]
    assert {"kd/h/encoder_kl", "kd/h/decoder_cosine", "kd/h/decoder_kl", "kd/h/rkd_angle"} <= set(
        terms
    )
    for name in terms:
        assert from_file[name] == pytest.approx(computed[name], rel=1e-4, abs=1e-6), name


def test_teacher_masks_stored_and_online_with_clicks_towards_the_teacher(
    tmp_path: Path, four: Path, sam2_features: Path
) -> None:
    """SAM 2's automatic masks prompt the unlabelled images (from the file; online, generated
    at the start of the run), and the prompt loop clicks towards its current masks."""
    ids = image_ids(four)
    data = partly_labelled(four, tmp_path / "data", ids[:2])
    common = [
        SAM2_TEACHER,
        "distillation.decoder.enabled=true",
        "data.prompts.unlabelled=teacher_masks",
        "train.pseudo_mask_weight=0.5",
        "train.prompt_iters=2",
        "train.click_target=teacher",
        "train.steps=2",
        *KEEP_ALL_MASKS,
    ]
    sources = {
        "stored": f"distillation.features={sam2_features}",
        "online": "distillation.use_precomputed_features=false",
    }
    for name, source in sources.items():
        run_train(settings_for(data, tmp_path / name, *common, source))
        records = train_records(tmp_path / name)
        assert all(record["kd/h/decoder_kl@2"] > 0 for record in records), name
    assert (tmp_path / "online" / "pseudo_masks.json").is_file()


def test_file_checks_frame_and_high_res(tmp_path: Path, four: Path, sam2_features: Path) -> None:
    stored = f"distillation.features={sam2_features}"
    in_student_frame = "teachers=[{name: h, model_type: hiera_mini, frame: longest_side}]"
    with pytest.raises(FeatureStoreError, match="in the square frame, the settings say longest"):
        run_train(settings_for(four, tmp_path / "a", in_student_frame, stored, "train.steps=1"))
    without = tmp_path / "no_high_res.h5"
    run_extract(settings_for(four, tmp_path / "b", SAM2_TEACHER, f"extract.output={without}"))
    decoder = ["distillation.decoder.enabled=true", "train.steps=1"]
    with pytest.raises(FeatureStoreError, match="has no tap 'encoder.high_res.0'"):
        without_maps = f"distillation.features={without}"
        run_train(settings_for(four, tmp_path / "c", SAM2_TEACHER, without_maps, *decoder))


def test_refusals_are_one_line(tmp_path: Path, four: Path) -> None:
    with pytest.raises(SettingsError, match="is a SAM 2 teacher") as error:
        settings_for(four, tmp_path, SAM2_TEACHER, "student.decoder_from=h")
    assert "\n" not in str(error.value)
    with pytest.raises(SettingsError, match="runs in the square frame"):
        settings_for(four, tmp_path, SAM2_TEACHER, "distillation.attention.enabled=true")
    student = settings_for(
        four,
        tmp_path,
        "student.model_type=hiera_mini",
        "teachers=[{name: v, model_type: vit_mini}]",
    )
    with pytest.raises(UsageError, match="teachers is not supported with the SAM 2 student"):
        run_train(student)


def test_two_ranks_with_mixed_families_equal_one_process(tmp_path: Path, four: Path) -> None:
    """gloo, online: a SAM 1 and a SAM 2 teacher (its own frame) in one run, decoder terms;
    two of the four images unlabelled, prompted by grid points. 2 ranks x 2 micro-batches of
    1 image give one process's batch of 4 (the prompt loop's draws depend on the rank: tested
    alone)."""
    ids = image_ids(four)
    data = partly_labelled(four, tmp_path / "data", [ids[1], ids[3]])
    assignments = [
        f"data.train={data}",
        *SMALL,
        f"train.output_dir={tmp_path / 'ddp'}",
        "teachers=[{name: v, model_type: vit_mini}, "
        "{name: h, model_type: hiera_mini, weight: 0.5}]",
        "distillation.use_precomputed_features=false",
        "distillation.decoder.enabled=true",
        "data.prompts.unlabelled=points",
        "data.prompts.unlabelled_points=2",
        "student.freeze_bn_stats=true",
        "train.batch_size=4",
        "train.grad_accumulation=2",
        "train.steps=2",
    ]
    config = tmp_path / "config.yaml"
    config.write_text(make_settings(*assignments).to_yaml())
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        torchrun(config, port=29531), capture_output=True, text=True, env=environment, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    single = make_settings(*assignments, "train.grad_accumulation=1")
    single.train.output_dir = tmp_path / "single"
    run_train(single)
    ranks, alone = train_records(tmp_path / "ddp"), train_records(tmp_path / "single")
    assert_logs_close(comparable(ranks), comparable(alone), rtol=1e-4)
    for record in alone:
        for name in ("kd/v/decoder_kl", "kd/h/decoder_kl", "kd/h/encoder_mse"):
            assert record[name] > 0, name


def test_the_step_with_a_sam2_teacher_stays_on_the_meta_device(tmp_path: Path, four: Path) -> None:
    """Every tensor the step makes (frames' grids and valid cells, SAM 2's prompt labels)
    follows its inputs' device: labelled and unlabelled images together, then none."""
    ids = image_ids(four)
    data = partly_labelled(four, tmp_path / "data", [ids[0]])
    settings = make_settings(
        f"data.train={data}",
        "student.model_type=vit_t_mini",
        "data.num_workers=0",
        SAM2_TEACHER,
        *TERMS,
        "data.prompts.unlabelled=points",
        "distillation.use_precomputed_features=false",
        f"train.output_dir={tmp_path / 'run'}",
    )
    parts, dataset = meta_parts(settings, data)
    schema = parts.forward.schema
    for indices in ([0, 1], [0]):
        batch = collate_training([dataset[i] for i in indices]).to(parts.device)
        groups = prompt_groups(batch, parts.device)
        counts = UnitCounts(len(indices), sum(len(g.objects) for g in groups))
        units = schema.unit_counts(counts.vector(parts.device), last_micro_step=True)
        weights = schema.loss_weights(1.0, counts.vector(parts.device), 1)
        loss, sums = micro_step(parts, batch, groups, units, weights)
        loss.backward()
        assert loss.device.type == "meta" and sums.device.type == "meta"


def test_bf16_autocast_with_a_sam2_teacher_matches_fp32(tmp_path: Path, four: Path) -> None:
    common = [
        SAM2_TEACHER,
        *TERMS,
        "distillation.use_precomputed_features=false",
        "train.steps=1",
        "train.lr=1e-12",
    ]
    for precision in ("fp32", "bf16"):
        run_train(settings_for(four, tmp_path / precision, *common, f"train.precision={precision}"))
    fp32, bf16 = first_record(tmp_path / "fp32"), first_record(tmp_path / "bf16")
    for name, value in fp32.items():
        if name.startswith(("task/", "kd/", "loss/")):
            tolerance = ABSOLUTE.get(name, 1e-4)
            assert bf16[name] == pytest.approx(value, rel=0.1, abs=tolerance), name


def test_sam2_student_trains_supervised_and_becomes_a_teacher(
    tmp_path: Path, four: Path, shapes_val: Path
) -> None:
    """hiera_mini trained with SAM's task loss (in its square frame, prompt loop, flips,
    validation), exported in the official layout, which loads strictly as a teacher."""
    run_train(
        settings_for(
            four,
            tmp_path / "teacher",
            "student.model_type=hiera_mini",
            f"data.val={shapes_val}",
            "train.steps=2",
            "train.val_every=2",
            "train.prompt_iters=2",
            "train.augment.flip=0.5",
        )
    )
    records = train_records(tmp_path / "teacher")
    assert records[-1]["task/total"] < records[0]["task/total"]
    weights = tmp_path / "teacher" / "student.pt"
    state = torch.load(weights, weights_only=True)
    assert "no_mem_embed" in state and "sam_mask_decoder.conv_s0.weight" in state
    teacher = build_teacher("hiera_mini", 64, weights, torch.device("cpu"))
    assert torch.equal(teacher.state_dict()["no_mem_embed"], state["no_mem_embed"])
