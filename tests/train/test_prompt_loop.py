"""Prompt-in-the-loop training (`train.prompt_iters`): the first iteration is today's step
exactly, both teacher modes agree, mixed micro-batches (also under bf16 autocast), the
mask-prompt encoder trains, no syncs, the `meta` device, two DDP ranks, resume, and
validation with one-shot box prompts."""

import dataclasses
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from samkd.errors import UsageError
from samkd.models import build_sam
from samkd.runtime import Distributed, resolve_precision
from samkd.train import loop as loop_module
from samkd.train import prompt_loop, run_train, setup
from samkd.train import step as step_module
from samkd.train.batches import collate_training
from samkd.train.forward import PromptGroup, prompt_groups
from samkd.train.metrics_log import read_metrics
from samkd.train.prompt_loop import (
    PromptLoop,
    TeacherDecoder,
    current_logits,
    next_prompts,
    run_prompt_loop,
)
from samkd.train.step import DistillationStep, micro_step
from samkd.train.terms import UnitCounts
from samkd.train.validation import validation_numbers

from .conftest import (
    KEEP_ALL_MASKS,
    STUDENT,
    TEACHER,
    base_assignments,
    make_settings,
    precomputed_settings,
)
from .test_conditions import (
    final_weights,
    image_ids,
    meta_parts,
    partly_labelled,
    run_two_ranks_rank_one_unlabelled,
    train_records,
)
from .test_syncs import STEP_ASSIGNMENTS, steps_with_syncs

LOOP = ["train.prompt_iters=3"]
# Online teachers at 128 px: a fraction of the cost of the feature file's 256 px.
SMALL_ONLINE = [
    "distillation.use_precomputed_features=false",
    "distillation.decoder.enabled=true",
    "data.image_size=128",
]
MASK_PROMPT = "prompt_encoder.mask_downscaling.0.weight"


def comparable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in train_records(run_dir)]


def test_the_first_iteration_is_todays_step_exactly(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    """The loop's first iteration decodes the sampled prompts as the one-shot step does:
    with clicks towards the teacher, random clicks and mask feedback always on (settings of
    the later iterations), its terms are those of a run without the loop."""
    common = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "unused"),
        *SMALL_ONLINE,
        "data.prompts.mode=mixed",
        "train.steps=1",
    ]
    loop_settings = [
        *LOOP,
        "train.mask_feedback_p=1",
        "train.click_mode=random",
        "train.click_target=teacher",
    ]
    for name, extra in (("today", []), ("loop", loop_settings)):
        settings = make_settings(*common, *extra)
        settings.train.output_dir = tmp_path / name
        run_train(settings)
    (today,) = comparable(tmp_path / "today")
    (looped,) = comparable(tmp_path / "loop")
    terms = [name for name in today if name.startswith(("task/", "kd/t/decoder"))]
    assert {"task/focal", "task/dice", "kd/t/decoder_kl", "kd/t/decoder_mse"} <= set(terms)
    for name in terms:
        assert looped[f"{name}@1"] == today[name], name
        assert looped[f"{name}@3"] != today[name], name  # the later iterations differ
    assert looped["kd/t/encoder_mse"] == today["kd/t/encoder_mse"]


def test_precomputed_equals_online_with_three_iterations(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    common = [*base_assignments(shapes, teacher_checkpoint, tmp_path), *LOOP]
    common += [
        "distillation.decoder.enabled=true",
        "distillation.encoder.kl_weight=1",
        "train.steps=1",
        "train.lr=1e-12",
        "data.prompts.mode=mixed",
    ]
    stored = make_settings(*common, f"distillation.features={feature_file}")
    stored.train.output_dir = tmp_path / "stored"
    run_train(stored)
    online = make_settings(*common, "distillation.use_precomputed_features=false")
    online.train.output_dir = tmp_path / "online"
    run_train(online)
    (from_file,) = train_records(tmp_path / "stored")
    (computed,) = train_records(tmp_path / "online")
    terms = [name for name in computed if name.startswith(("kd/t/", "task/"))]
    assert {"task/focal", "kd/t/decoder_kl", "kd/t/decoder_mse", "kd/t/encoder_mse"} <= set(terms)
    for name in terms:
        assert from_file[name] == pytest.approx(computed[name], rel=1e-4, abs=1e-6), name
    for name in ("task/focal", "kd/t/decoder_kl"):  # logged per iteration, and their mean
        per_iteration = [computed[f"{name}@{index}"] for index in (1, 2, 3)]
        assert computed[name] == pytest.approx(sum(per_iteration) / 3, rel=1e-5)
        assert f"{name}@4" not in computed


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [
            "train.click_target=teacher",
            "train.click_mode=random",
            "train.mask_feedback_p=1",
            "train.precision=bf16",
        ],
    ],
    ids=["gt, farthest", "teacher, random, bf16"],
)
def test_a_micro_batch_mixing_labelled_and_unlabelled_images_loops(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, extra: list[str]
) -> None:
    assignments = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        *SMALL_ONLINE,
        *LOOP,
        *extra,
        "train.steps=2",
    ]
    first_batch = next(setup.step_batches(8, make_settings(*assignments), 0, 0, Distributed()))
    data = partly_labelled(shapes, tmp_path / "data", [image_ids(shapes)[first_batch[0]]])
    result = run_train(make_settings(*assignments, f"data.train={data}"))
    assert result.steps == 2
    for record in train_records(tmp_path / "run"):
        assert record["task/focal"] > 0 and record["kd/t/decoder_mse"] > 0
        assert record["loss/total"] > record["kd/weighted"]
        assert record["skipped_steps"] == 0


def test_the_mask_prompt_encoder_trains_only_in_the_loop(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    common = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "unused"),
        f"distillation.features={feature_file}",
        "train.mask_feedback_p=1",
        "train.steps=1",
    ]
    for name, iterations in (("one", 1), ("three", 3)):
        settings = make_settings(*common, f"train.prompt_iters={iterations}")
        settings.train.output_dir = tmp_path / name
        student = setup.build_student(settings, torch.device("cpu"))
        trainable = {n for n, p in student.named_parameters() if p.requires_grad}
        assert (MASK_PROMPT in trainable) == (iterations > 1)
        run_train(settings)
    # The same initial weights: frozen in one run, trained in the other.
    one, three = final_weights(tmp_path / "one"), final_weights(tmp_path / "three")
    assert not torch.equal(one[MASK_PROMPT], three[MASK_PROMPT])


def test_teacher_clicks_need_the_decoder_terms(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    settings = precomputed_settings(
        shapes, teacher_checkpoint, tmp_path / "run", feature_file,
        *LOOP, "train.click_target=teacher", "train.steps=1",
    )  # fmt: skip
    with pytest.raises(UsageError, match="click_target teacher needs the teachers' decoders"):
        run_train(settings)


def test_looped_steps_do_not_sync(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path, feature_file: Path
) -> None:
    settings = precomputed_settings(
        shapes, teacher_checkpoint, tmp_path / "run", feature_file,
        *STEP_ASSIGNMENTS, *LOOP, "distillation.decoder.enabled=true",
        "train.click_target=teacher", "train.steps=1",
    )  # fmt: skip
    assert steps_with_syncs(settings) == [[]]


def test_the_looped_step_makes_every_tensor_on_the_device_of_its_inputs(
    tmp_path: Path, shapes: Path, teacher_checkpoint: Path
) -> None:
    data = partly_labelled(shapes, tmp_path / "data", [image_ids(shapes)[0]])
    settings = make_settings(
        *base_assignments(data, teacher_checkpoint, tmp_path / "run"),
        "distillation.use_precomputed_features=false",
        "distillation.decoder.enabled=true",
        "data.prompts.mode=mixed",
        *LOOP,
    )
    parts, dataset = meta_parts(settings, data)
    old = parts.forward
    loop = PromptLoop.of(settings.train)
    looped = DistillationStep(old.student, old.objective, old.schema, True, loop)
    parts = dataclasses.replace(parts, forward=looped)
    schema = looped.schema
    for indices in ([0, 1], [0]):  # labelled and unlabelled together; no prompts at all
        batch = collate_training([dataset[i] for i in indices]).to(parts.device)
        groups = prompt_groups(batch, parts.device)
        counts = UnitCounts(len(indices), sum(len(g.objects) for g in groups))
        units = schema.unit_counts(counts.vector(parts.device), last_micro_step=True)
        weights = schema.loss_weights(1.0, counts.vector(parts.device), 1)
        loss, sums = micro_step(parts, batch, groups, units, weights, 7)
        loss.backward()
        assert loss.device.type == "meta" and sums.device.type == "meta"
    trainable = [p for p in looped.parameters() if p.requires_grad]
    assert any(p is looped.student.prompt_encoder.mask_downscaling[0].weight for p in trainable)
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in trainable)


def test_two_ranks_run_the_loop(tmp_path: Path, shapes: Path, teacher_checkpoint: Path) -> None:
    """2 gloo ranks x 2 micro-batches, rank 1's first step without labels (no prompts: the
    mask-prompt encoder takes no part there)."""
    assignments = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "ddp"),
        *SMALL_ONLINE,
        *LOOP,
        "train.batch_size=4",
        "train.grad_accumulation=2",
        "train.steps=2",
    ]
    run_two_ranks_rank_one_unlabelled(assignments, shapes, tmp_path, port=29541)
    records = train_records(tmp_path / "ddp")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["task/focal"] > 0 and r["kd/t/decoder_kl"] > 0 for r in records)


def square_targets(count: int, grid: int) -> torch.Tensor:
    """`count x grid x grid` float squares, one per object, in different places."""
    targets = torch.zeros(count, grid, grid)
    for index in range(count):
        start = 2 + 3 * index
        targets[index, start : start + grid // 3, start : start + grid // 3] = 1.0
    return targets


@pytest.mark.parametrize("feedback_p", [1.0, 0.0])
def test_each_iteration_adds_one_corrective_click_per_object(feedback_p: float) -> None:
    torch.manual_seed(0)
    student = build_sam(STUDENT, image_size=128)
    teacher = build_sam(TEACHER, image_size=128)
    with torch.no_grad():
        embeddings = student.image_encoder(torch.randn(1, 3, 128, 128))
        teacher_embeddings = teacher.image_encoder(torch.randn(1, 3, 128, 128))
    groups = [
        PromptGroup(
            torch.tensor([0, 0]), torch.tensor([0, 1]), boxes=torch.tensor([[8.0, 8, 60, 60]] * 2)
        ),
        PromptGroup(
            torch.tensor([0]),
            torch.tensor([2]),
            point_coords=torch.tensor([[[30.0, 30.0]]]),
            point_labels=torch.tensor([[1]]),
            input_sizes=torch.tensor([[96, 128]]),
        ),
    ]
    targets = square_targets(3, 32)
    decoders = [
        TeacherDecoder("t", teacher.prompt_encoder, teacher.mask_decoder, teacher_embeddings)
    ]
    # The first object's target is the student's first mask: its first click is a padding
    # point, and the others' are not.
    (first,) = run_prompt_loop(
        PromptLoop(1, feedback_p, "gt", "farthest"), student.prompt_encoder,
        student.mask_decoder, embeddings, groups, targets, decoders, record_upscaled=False,
        seed=3,
    )  # fmt: skip
    own_mask = current_logits(first.student)[0, 0] > 0
    assert 0 < int(own_mask.sum()) < own_mask.numel()
    targets[0] = own_mask.float()
    loop = PromptLoop(3, feedback_p, "gt", "farthest")
    built: list[tuple[list[PromptGroup], dict[str, list[PromptGroup]]]] = []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        built.append(next_prompts(*args, **kwargs))
        return built[-1]

    with mock.patch.object(prompt_loop, "next_prompts", recorded):
        iterations = run_prompt_loop(
            loop, student.prompt_encoder, student.mask_decoder, embeddings, groups, targets,
            decoders, record_upscaled=False, seed=3,
        )  # fmt: skip
    assert len(iterations) == 3 and len(built) == 2
    assert iterations[0].student.ambiguous.tolist() == [False, False, True]
    for index, (student_groups, teacher_groups) in enumerate(built):
        previous = iterations[index]
        labels = torch.cat([group.point_labels[:, -1] for group in student_groups])
        cells = torch.cat([group.point_coords[:, -1] for group in student_groups]) // 4
        predicted = current_logits(previous.student)[:, 0] > 0
        for obj, (label, (x, y)) in enumerate(zip(labels, cells.long(), strict=True)):
            missed = bool(targets[obj, y, x] > 0 and not predicted[obj, y, x])
            extra = bool(predicted[obj, y, x] and not targets[obj, y, x] > 0)
            assert int(label) == (1 if missed else 0 if extra else -1), (index, obj)
        assert student_groups[1].point_coords.shape == (1, 2 + index, 2)
        assert student_groups[0].point_coords.shape == (2, 1 + index, 2)
        assert all(group.boxes is not None for group in (student_groups[0], teacher_groups["t"][0]))
        fed = torch.cat([group.mask_feedback for group in student_groups])
        assert fed.tolist() == [feedback_p == 1.0] * 3
        own = torch.cat([group.mask_inputs for group in teacher_groups["t"]])
        torch.testing.assert_close(own, current_logits(previous.teachers["t"]))
        mine = torch.cat([group.mask_inputs for group in student_groups])
        torch.testing.assert_close(mine, current_logits(previous.student).detach())
        for theirs, ours in zip(teacher_groups["t"], student_groups, strict=True):
            assert torch.equal(theirs.point_coords, ours.point_coords)
            assert torch.equal(theirs.point_labels, ours.point_labels)
    first_clicks = torch.cat([group.point_labels[:, -1] for group in built[0][0]])
    assert first_clicks[0] == -1 and (first_clicks[1:] != -1).all()
    assert torch.equal(built[0][0][0].point_coords[0, -1], torch.tensor([1.5, 1.5]))
    # The last object's image is 96 px high: its clicks stay in the top 24 of 32 rows.
    assert all(group[1].point_coords[0, -1, 1] < 96 for group, _ in built)


class Interrupted(Exception):
    """Stands for a crash right after a checkpoint."""


def test_a_resumed_loop_run_reproduces_the_log_and_reads_its_teacher_masks_back(
    tmp_path: Path,
    shapes: Path,
    shapes_val: Path,
    teacher_checkpoint: Path,
    generated_teacher_masks: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two iterations, an unlabelled image prompted by the online teacher's masks, and
    validation: interrupted after step 2's checkpoint and resumed, the run logs what an
    uninterrupted one does, and the resumed run makes no teacher mask (the cache is read)."""
    assignments = [
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "unused"),
        *SMALL_ONLINE,
        "train.prompt_iters=2",
        *KEEP_ALL_MASKS,
        "data.prompts.unlabelled=teacher_masks",
        "train.pseudo_mask_weight=0.5",
        "train.mask_feedback_p=0.5",
        f"data.val={shapes_val}",
        "extract.pseudo_masks.points_per_side=2",
        "train.steps=3",
        "train.val_every=2",
        "train.checkpoint_every=2",
    ]
    first_batch = next(setup.step_batches(8, make_settings(*assignments), 0, 0, Distributed()))
    data = partly_labelled(shapes, tmp_path / "data", [image_ids(shapes)[first_batch[0]]])
    assignments.append(f"data.train={data}")
    reference = make_settings(*assignments)
    reference.train.output_dir = tmp_path / "reference"
    run_train(reference)
    assert sorted(generated_teacher_masks) == image_ids(shapes)

    save = loop_module.save_checkpoint

    def crash_after_step_two(state: dict[str, Any], path: Path) -> None:
        save(state, path)
        if state["progress"]["step"] == 2 and path.name == "last.pt":
            raise Interrupted

    interrupted = make_settings(*assignments)
    interrupted.train.output_dir = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        patch.setattr(loop_module, "save_checkpoint", crash_after_step_two)
        with pytest.raises(Interrupted):
            run_train(interrupted)
    generated_teacher_masks.clear()
    run_train(interrupted, resume=tmp_path / "interrupted")
    assert generated_teacher_masks == []
    resumed, uninterrupted = (
        [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_metrics(log)]
        for log in (tmp_path / run / "metrics.jsonl" for run in ("interrupted", "reference"))
    )
    assert [(r["kind"], r["step"]) for r in resumed] == [
        ("train", 1), ("train", 2), ("val", 2), ("train", 3), ("val", 3),
    ]  # fmt: skip
    assert resumed == uninterrupted
    assert all(r["task/focal@2"] > 0 for r in resumed if r["kind"] == "train")


def test_validation_keeps_one_shot_box_prompts_when_the_loop_is_on(
    tmp_path: Path,
    shapes: Path,
    shapes_val: Path,
    teacher_checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_settings(
        *base_assignments(shapes, teacher_checkpoint, tmp_path / "run"),
        *SMALL_ONLINE,
        *LOOP,
        "data.prompts.mode=mixed",
        f"data.val={shapes_val}",
    )
    cpu, single = torch.device("cpu"), Distributed()
    student = setup.build_student(settings, cpu)
    train_data = setup.build_train_dataset(settings)
    objective, _, teachers = setup.build_distillation(settings, student, train_data, cpu)
    schema = setup.build_schema(settings, objective)
    precision = resolve_precision("fp32", cpu)
    validation = setup.build_validation(settings, teachers, cpu, precision, single)
    assert validation is not None and validation.with_teachers is not None
    kinds = {kind for i in range(2) for kind in validation.with_teachers[i].sample.prompt_kinds}
    assert kinds == {"box"}
    loops: list[int] = []
    real = step_module.run_prompt_loop

    def counted(*args: Any, **kwargs: Any) -> Any:
        loops.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(step_module, "run_prompt_loop", counted)
    numbers = []
    for loop in (PromptLoop.of(settings.train), None):
        module = DistillationStep(student, objective, schema, settings.train.task_loss, loop)
        numbers.append(validation_numbers(module, validation, single))
    assert loops == []
    assert numbers[0] == numbers[1] and numbers[0].kd_loss > 0
