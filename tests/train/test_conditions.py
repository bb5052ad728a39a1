"""Training under the conditions users have: micro-batches that mix labelled and unlabelled
images, micro-batches without prompts, gradient accumulation, bf16 autocast, lambda_kd 0, and
every tensor of the step made on the device of its inputs (checked on the `meta` device)."""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
import torch

from samkd.demo.shapes import write_shapes_dataset
from samkd.runtime import Distributed, resolve_precision
from samkd.train import run_train, setup
from samkd.train.batches import DistillationDataset, collate_training
from samkd.train.forward import prompt_groups
from samkd.train.metrics_log import read_metrics
from samkd.train.state import load_checkpoint
from samkd.train.step import DistillationStep, StepParts, micro_step
from samkd.train.teachers import load_online_teacher
from samkd.train.terms import UnitCounts

from ..nodes import torchrun_nodes
from .conftest import ALL_TERMS, STUDENT, TEACHER, base_assignments, make_settings


def image_ids(data: Path) -> list[str]:
    """Image ids in dataset order."""
    return sorted(path.stem for path in (data / "image").glob("*.png"))


def partly_labelled(source: Path, root: Path, unlabelled: Iterable[str]) -> Path:
    """A copy of a folder dataset whose `unlabelled` images have no masks."""
    shutil.copytree(source, root)
    for image_id in unlabelled:
        shutil.rmtree(root / "mask" / image_id)
    return root


# AdamW divides each gradient by its RMS: where a gradient is a near-cancelling sum, the last-bit
# differences of another summation order move the weight by a visible share of one update
# (lr 1e-3; measured up to 3e-6). A wrong weighting of micro-batches moves many weights by
# about a whole update.
ADAM_ATOL = 1e-4


# All four terms with online teachers at 128 px: a fraction of the cost at 256 px.
SMALL_ALL_TERMS = [
    *ALL_TERMS,
    "distillation.use_precomputed_features=false",
    "data.image_size=128",
    "distillation.attention.grid_size=4",
    "distillation.rkd.grid_size=4",
]


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_a_micro_batch_with_an_unlabelled_image_keeps_its_task_loss(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    assignments = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        f"distillation.features={feature_file}",
        "distillation.decoder.enabled=true",
        "train.steps=1",
    ]
    first_batch = next(setup.step_batches(8, make_settings(*assignments), 0, 0, Distributed()))
    data = partly_labelled(shapes, tmp_path / "data", [image_ids(shapes)[first_batch[0]]])
    run_train(make_settings(*assignments, f"data.train={data}"))
    (record,) = train_records(tmp_path / "run")
    assert record["task/focal"] > 0 and record["task/total"] > 0
    assert record["kd/t/decoder_mse"] > 0
    assert record["loss/total"] > record["kd/weighted"]


def test_unlabelled_images_train_the_encoder_terms_only(
    tmp_path: Path, unlabelled: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    settings = make_settings(
        *base_assignments(unlabelled, teacher_checkpoint, tmp_path / "run"),
        f"distillation.features={feature_file}",
        "distillation.decoder.enabled=true",
        "train.steps=2",
    )
    run_train(settings)
    for record in train_records(tmp_path / "run"):
        assert record["task/focal"] is None and record["kd/t/decoder_kl"] is None
        assert record["kd/t/encoder_mse"] > 0
        assert record["loss/total"] == pytest.approx(record["kd/weighted"])


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "student.pt", weights_only=True)


def test_accumulation_equals_one_batch_with_uneven_labels(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    ids = image_ids(shapes)
    data = partly_labelled(shapes, tmp_path / "data", [ids[1], ids[2], ids[6]])
    common = [
        *base_assignments(data, teacher_checkpoint, tmp_path / "unused"),
        *SMALL_ALL_TERMS,
        "student.freeze_bn_stats=true",
        "train.batch_size=4",
        "train.steps=2",
    ]
    for name, accumulation in (("one", 1), ("four", 4)):
        settings = make_settings(*common, f"train.grad_accumulation={accumulation}")
        settings.train.output_dir = tmp_path / name
        run_train(settings)
    one, four = final_weights(tmp_path / "one"), final_weights(tmp_path / "four")
    for key, value in one.items():
        torch.testing.assert_close(four[key], value, rtol=1e-4, atol=ADAM_ATOL, msg=key)
    records = zip(train_records(tmp_path / "one"), train_records(tmp_path / "four"), strict=True)
    for left, right in records:
        for name in ("loss/total", "task/total", "kd/t/decoder_kl", "kd/t/rkd_angle"):
            assert left[name] == pytest.approx(right[name], rel=1e-4), name


def test_zero_lambda_trains_without_teachers_features(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        "distillation.dynamic_lambda.initial=0",
        "train.steps=1",
    )
    run_train(settings)  # no feature file needed: no term reads one
    (record,) = train_records(tmp_path / "run")
    assert not any(name.startswith("kd/") for name in record)
    assert record["loss/total"] == pytest.approx(record["task/total"])
    assert record["lambda_kd"] is None


def meta_parts(settings, shapes: Path) -> tuple[StepParts, DistillationDataset]:
    """A training step whose student, objective and teachers live on the meta device."""
    meta = torch.device("meta")
    student = setup.build_student(settings, meta)
    objective = setup.build_objective(settings)
    if objective is not None:
        objective.to(meta)
    schema = setup.build_schema(settings, objective).to(meta)
    step_module = DistillationStep(student, objective, schema)
    required = {} if objective is None else {
        t.name: objective.required_teacher_taps(t.name) for t in settings.teachers
    }  # fmt: skip
    teachers = []
    if objective is not None:
        for entry in settings.teachers:
            taps = setup.stored_taps(required[entry.name])
            teacher = load_online_teacher(entry, 256, taps, torch.device("cpu"), fast="off")
            assert teacher.model is not None
            teacher.model.to(meta)
            teachers.append(teacher)
    dataset = DistillationDataset(
        setup.build_train_dataset(settings), None, setup.Augmentation(), 0
    )
    parts = StepParts(
        step_module, None, teachers, None, None, settings,  # type: ignore[arg-type]
        resolve_precision("fp32", meta), meta, Distributed(),
    )  # fmt: skip
    return parts, dataset


@pytest.mark.parametrize(
    "assignments",
    [
        ["distillation.dynamic_lambda.initial=0"],
        [
            *ALL_TERMS,
            f"teachers=[{{name: big, model_type: {TEACHER}}}, "
            f"{{name: small, model_type: {STUDENT}, weight: 0.5}}]",
        ],
    ],
    ids=["lambda 0", "all terms, two teachers"],
)
def test_the_step_makes_every_tensor_on_the_device_of_its_inputs(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, assignments: list[str]
) -> None:
    ids = image_ids(shapes)
    data = partly_labelled(shapes, tmp_path / "data", [ids[0]])
    settings = make_settings(
        *base_assignments(data, teacher_checkpoint, tmp_path / "run"),
        "distillation.use_precomputed_features=false",
        *assignments,
    )
    parts, dataset = meta_parts(settings, data)
    schema = parts.forward.schema
    for indices in ([0, 1], [0]):  # labelled and unlabelled together; no prompts at all
        batch = collate_training([dataset[i] for i in indices]).to(parts.device)
        groups = prompt_groups(batch, parts.device)
        counts = UnitCounts(len(indices), sum(len(g.objects) for g in groups))
        units = schema.unit_counts(counts.vector(parts.device), last_micro_step=True)
        weights = schema.loss_weights(1.0, counts.vector(parts.device), 1)
        loss, sums = micro_step(parts, batch, groups, units, weights)
        loss.backward()
        assert loss.device.type == "meta" and sums.device.type == "meta"
        assert sums.shape == (len(schema),)
    trainable = [p for p in parts.forward.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in trainable)


def test_bf16_autocast_step_matches_fp32(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    common = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "unused"),
        *SMALL_ALL_TERMS,
        "train.steps=1",
        "train.lr=1e-12",
    ]
    for precision in ("fp32", "bf16"):
        settings = make_settings(*common, f"train.precision={precision}")
        settings.train.output_dir = tmp_path / precision
        run_train(settings)
    fp32, bf16 = train_records(tmp_path / "fp32")[0], train_records(tmp_path / "bf16")[0]
    for name, value in fp32.items():
        if name.startswith(("task/", "kd/", "loss/")):
            # The networks run in bf16 (about 3 significant digits); the losses in float32.
            tolerance = ABSOLUTE.get(name, 1e-4)
            assert bf16[name] == pytest.approx(value, rel=0.1, abs=tolerance), name


# --------------------------------------------------------------------------- two ranks

# Two ranks against one process on the same micro-batches, in bf16: the networks round to
# about 3 significant digits, and a last-bit difference in the reduced gradients can move a
# later bf16 rounding, so logged values agree to this relative tolerance (measured: 5e-3 at
# most). SAM's IoU target is the IoU of thresholded masks, where such a rounding flips pixels:
# task/iou_mse (a mean square of IoU errors) agrees to an absolute 1e-3 (measured: 3e-4).
BF16_RTOL = 1e-2
ABSOLUTE = {"task/iou_mse": 1e-3}


@pytest.fixture(scope="module")
def sixteen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("data") / "sixteen", 16, (96, 128), seed=2)


def realistic_assignments(data: Path, val: Path, teacher: Path, run_dir: Path) -> list[str]:
    """Everything on at once: four terms, two teachers, bf16, accumulation, dynamic lambda on
    the validation distillation loss."""
    return [
        *base_assignments(data, teacher, run_dir),
        *ALL_TERMS,
        f"teachers=[{{name: big, model_type: {TEACHER}, checkpoint: {teacher}}}, "
        f"{{name: small, model_type: {STUDENT}, weight: 0.5}}]",
        "distillation.use_precomputed_features=false",
        "data.image_size=128",  # bf16 is slow on most CPUs
        "distillation.attention.grid_size=4",
        "distillation.rkd.grid_size=4",
        f"data.val={val}",
        "distillation.dynamic_lambda.enabled=true",
        "distillation.dynamic_lambda.metric=val/kd_loss",
        "distillation.dynamic_lambda.patience=0",
        "distillation.dynamic_lambda.threshold=10",  # lowers lambda_kd at every validation
        "student.freeze_bn_stats=true",
        "train.precision=bf16",
        "train.batch_size=8",
        "train.grad_accumulation=2",
        "train.steps=4",
        "train.val_every=2",
        "train.checkpoint_every=1",
    ]


def unlabelled_for_two_ranks(settings) -> list[int]:
    """About 40% of the images: all of rank 0's share of step 0, and one image in each of
    three micro-batches of step 1, so that labelled and unlabelled images share them."""
    ranks = [Distributed(rank, rank, 2) for rank in range(2)]
    micro = [list(setup.step_batches(16, settings, 0, 0, dist)) for dist in ranks]
    # micro[rank] holds that rank's micro-batches: two per step.
    return [*micro[0][0], *micro[0][1], micro[0][2][0], micro[1][2][0], micro[1][3][0]]


SAMKD = ("-m", "samkd")


def torchrun(config: Path, *extra: str, port: int, program: Sequence[str] = SAMKD) -> list[str]:
    """The command of `samkd train` on 2 ranks; `program`: how to start `samkd` (a script
    with its arguments before samkd's)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={port}", *program, "train", *extra, "--config", str(config),
    ]  # fmt: skip


def run_two_ranks_rank_one_unlabelled(
    assignments: list[str],
    shapes: Path,
    tmp_path: Path,
    port: int,
    program: Sequence[str] = SAMKD,
) -> Path:
    """Train under torchrun on 2 ranks, with every image rank 1 sees in the first step
    unlabelled (a copy of `shapes` under tmp_path/data, returned); `program` as `torchrun`'s."""
    rank_one = list(setup.step_batches(8, make_settings(*assignments), 0, 0, Distributed(1, 1, 2)))
    unlabelled = [image_ids(shapes)[i] for i in (*rank_one[0], *rank_one[1])]
    data = partly_labelled(shapes, tmp_path / "data", unlabelled)
    config = tmp_path / "config.yaml"
    config.write_text(make_settings(*assignments, f"data.train={data}").to_yaml())
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        torchrun(config, port=port, program=program),
        capture_output=True,
        text=True,
        env=environment,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return data


def comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def assert_logs_close(left: list[dict], right: list[dict], rtol: float) -> None:
    assert [(r["kind"], r["step"]) for r in left] == [(r["kind"], r["step"]) for r in right]
    for one, other in zip(left, right, strict=True):
        assert one.keys() == other.keys()
        for name, value in one.items():
            if isinstance(value, float):
                tolerance = ABSOLUTE.get(name, 1e-6)
                assert other[name] == pytest.approx(value, rel=rtol, abs=tolerance), (
                    one["step"],
                    name,
                )
            else:
                assert other[name] == value, (one["step"], name)


def test_two_ranks_with_accumulation_equal_one_batch(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    """fp32: 2 ranks x 2 micro-batches of 1 image, rank 1 given only unlabelled images in the
    first step, prompted by grid points (decoder terms without task targets), against one
    process with one batch of 4."""
    assignments = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "ddp"),
        "distillation.use_precomputed_features=false",
        "distillation.decoder.enabled=true",
        "data.prompts.unlabelled=points",
        "data.prompts.unlabelled_points=2",
        "student.freeze_bn_stats=true",
        "train.batch_size=4",
        "train.grad_accumulation=2",
        "train.steps=2",
    ]
    data = run_two_ranks_rank_one_unlabelled(assignments, shapes, tmp_path, port=29517)
    single = make_settings(*assignments, f"data.train={data}", "train.grad_accumulation=1")
    single.train.output_dir = tmp_path / "single"
    run_train(single)
    distributed, alone = train_records(tmp_path / "ddp"), train_records(tmp_path / "single")
    assert_logs_close(comparable(distributed), comparable(alone), rtol=1e-4)
    for key, value in final_weights(tmp_path / "single").items():
        torch.testing.assert_close(
            final_weights(tmp_path / "ddp")[key], value, rtol=1e-4, atol=ADAM_ATOL, msg=key
        )


def test_two_nodes_train_to_the_end_as_one_process(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    """`torchrun --nnodes 2 --nproc_per_node 1` from a feature file: each node's global rank
    takes its half of every batch and rank 0 alone writes the run, so the log and weights
    are those of one process with the same batches."""
    assignments = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "nodes"),
        f"distillation.features={feature_file}",
        "student.freeze_bn_stats=true",
        "train.steps=2",
    ]
    config = tmp_path / "config.yaml"
    config.write_text(make_settings(*assignments).to_yaml())
    nodes = torchrun_nodes(["-m", "samkd", "train", "--config", str(config)], port=29563)
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    single = make_settings(*assignments)
    single.train.output_dir = tmp_path / "single"
    run_train(single)
    distributed = train_records(tmp_path / "nodes")
    assert [record["step"] for record in distributed] == [1, 2]  # one writer of the log
    assert_logs_close(comparable(distributed), comparable(train_records(tmp_path / "single")), 1e-4)
    for key, value in final_weights(tmp_path / "single").items():
        torch.testing.assert_close(
            final_weights(tmp_path / "nodes")[key], value, rtol=1e-4, atol=ADAM_ATOL, msg=key
        )


def test_two_ranks_with_uneven_labels_match_one_process_and_resume(
    tmp_path: Path, sixteen: Path, shapes_val: Path, teacher_checkpoint: Path
) -> None:
    assignments = realistic_assignments(sixteen, shapes_val, teacher_checkpoint, tmp_path / "x")
    unlabelled = unlabelled_for_two_ranks(make_settings(*assignments))
    data = partly_labelled(sixteen, tmp_path / "data", [image_ids(sixteen)[i] for i in unlabelled])
    assignments = [*assignments, f"data.train={data}"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    def config(run_dir: Path, *extra: str) -> Path:
        settings = make_settings(*assignments, *extra)
        settings.train.output_dir = run_dir
        path = tmp_path / f"{run_dir.name}.yaml"
        path.write_text(settings.to_yaml())
        return path

    # Two ranks, killed after step 2's checkpoint, then resumed on two ranks.
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        torchrun(config(killed), port=29532), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env=environment, start_new_session=True,
    )  # fmt: skip
    checkpoint = killed / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if checkpoint.exists() and load_checkpoint(checkpoint)["progress"]["step"] >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    resumed = subprocess.run(
        torchrun(config(killed), "--resume", str(killed), port=29533)[:-2], capture_output=True,
        text=True, env=environment, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = read_metrics(killed / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    names = {k for k in train[0] if k.startswith(("task/", "kd/", "loss/"))}
    for record in train:  # every term at every logging step, with a value
        assert {k for k in record if k.startswith(("task/", "kd/", "loss/"))} == names
        assert all(record[name] is not None for name in names)
    assert {"task/focal", "kd/big/decoder_kl", "kd/small/attention_kl", "kd/big/rkd_angle"} <= names
    # The first evaluation always improves; the second cannot (threshold 10).
    assert [r["lambda_kd"] for r in records if r["kind"] == "val"] == [1.0, 0.5]

    # One process, uninterrupted, the same global batches in the same micro-batches (4 of 2
    # images): the same log.
    single = config(tmp_path / "single", "train.grad_accumulation=4")
    command = [sys.executable, "-m", "samkd", "train", "--config", str(single)]
    alone = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert_logs_close(
        comparable(records), comparable(read_metrics(tmp_path / "single" / "metrics.jsonl")),
        BF16_RTOL,
    )  # fmt: skip
