from __future__ import annotations

import pytest
import torch

from samkd.distill.attention import coarse_attention_map
from samkd.distill.objective import DistillationObjective, term_weights
from samkd.settings import DistillationSettings, TeacherSettings

from .distill_helpers import make_capture

TERMS = [
    "encoder_mse",
    "encoder_kl",
    "decoder_mse",
    "decoder_cosine",
    "decoder_kl",
    "attention_kl",
    "rkd_distance",
    "rkd_angle",
]
TEACHERS = [
    TeacherSettings(name="big", model_type="vit_mini", weight=0.75),
    TeacherSettings(name="twin", model_type="vit_t_mini", weight=0.25),
]


def all_terms_settings(**rkd) -> DistillationSettings:
    return DistillationSettings.model_validate(
        {
            "encoder": {"kl_weight": 0.5, "temperature": 2.0},
            "decoder": {"enabled": True, "mse_weight": 0.3, "cosine_weight": 0.7},
            "attention": {"enabled": True, "grid_size": 2, "query_chunk": 5, "weight": 2.0},
            "rkd": {"enabled": True, "grid_size": 2, **rkd},
        }
    )


def features(seed: int, requires_grad: bool = False) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).requires_grad_(requires_grad)

    return {
        "encoder.embed": rand(2, 8, 4, 4),
        "decoder.upscaled": rand(2, 4, 8, 8),
        "decoder.mask_logits": rand(2, 3, 8, 8),
        "encoder.qk.3": make_capture(
            2, 2, (4, 4), window=3, with_bias=True, seed=seed, requires_grad=requires_grad
        ),
    }


def test_every_term_is_zero_on_match_and_positive_otherwise():
    objective = DistillationObjective(all_terms_settings(), TEACHERS[:1], "vit_t_mini")
    same = objective(features(0), {"big": features(0)})
    other = objective(features(0), {"big": features(1)})
    for term in TERMS:
        assert same[f"kd/big/{term}"].item() == pytest.approx(0.0, abs=1e-6), term
        assert other[f"kd/big/{term}"].item() > 1e-4, term


def test_two_teachers_give_the_weighted_sum_and_the_named_dict():
    settings = all_terms_settings(across_batch=True)
    objective = DistillationObjective(settings, TEACHERS, "vit_t_mini")
    terms = objective(features(0), {"big": features(1), "twin": features(2)})
    weights = term_weights(settings)
    expected = sum(
        teacher.weight * sum(weights[t] * terms[f"kd/{teacher.name}/{t}"] for t in TERMS)
        for teacher in TEACHERS
    )
    assert objective.weighted(terms).item() == pytest.approx(float(expected), rel=1e-6)
    specs = objective.term_specs()
    assert list(specs) == list(terms) == [f"kd/{t.name}/{term}" for t in TEACHERS for term in TERMS]
    assert specs["kd/twin/encoder_kl"] == (0.25 * weights["encoder_kl"], "image")
    assert specs["kd/big/decoder_kl"][1] == "object"
    assert specs["kd/big/rkd_angle"][1] == "batch"
    assert specs["kd/big/attention_kl"][1] == "image"
    assert all(value.requires_grad is False for value in terms.values())


def test_without_prompts_decoder_terms_are_left_out():
    objective = DistillationObjective(all_terms_settings(), TEACHERS[:1], "vit_t_mini")
    student = {k: v for k, v in features(0).items() if not k.startswith("decoder.")}
    terms = objective(student, {"big": features(1)}, with_decoder=False)
    assert set(terms) == {f"kd/big/{t}" for t in TERMS if not t.startswith("decoder_")}


def test_switched_off_terms_are_not_computed_and_need_no_taps():
    full = DistillationObjective(all_terms_settings(), TEACHERS, "vit_t_mini")
    assert full.required_student_taps() == [
        "decoder.mask_logits",
        "decoder.upscaled",
        "encoder.embed",
        "encoder.qk.3",
    ]
    assert full.required_teacher_taps("big") == full.required_student_taps()
    settings = DistillationSettings.model_validate(
        {"encoder": {"enabled": False}, "decoder": {"enabled": True, "kl_weight": 0.0}}
    )
    objective = DistillationObjective(settings, TEACHERS, "vit_t_mini")
    assert objective.required_student_taps() == ["decoder.upscaled"]
    assert objective.required_teacher_taps("twin") == ["decoder.upscaled"]
    only_upscaled = {"decoder.upscaled": features(0)["decoder.upscaled"]}
    terms = objective(only_upscaled, {"big": only_upscaled, "twin": only_upscaled})
    assert {name for name in terms if name.startswith("kd/big/")} == {
        "kd/big/decoder_mse",
        "kd/big/decoder_cosine",
    }
    assert len(objective.adapters["big"]) == 0


def test_gradients_reach_student_and_adapters_never_the_teacher():
    settings = all_terms_settings()
    student = features(0, requires_grad=True)
    student["encoder.embed"] = torch.randn(2, 6, 2, 2, requires_grad=True)
    teacher = features(1, requires_grad=True)
    objective = DistillationObjective(
        settings,
        TEACHERS[:1],
        "vit_t_mini",
        student_shapes={"encoder.embed": (6, 2, 2)},
        teacher_shapes={"big": {"encoder.embed": (8, 4, 4)}},
    )
    objective.weighted(objective(student, {"big": teacher})).backward()
    capture = student["encoder.qk.3"]
    for tensor in (student["encoder.embed"], student["decoder.upscaled"], capture.query):
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0
    assert capture.bias.grad is not None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.parameters())
    assert len(list(objective.parameters())) == 2
    for tensor in teacher.values():
        leaves = [tensor] if isinstance(tensor, torch.Tensor) else [tensor.query, tensor.key]
        assert all(leaf.grad is None for leaf in leaves)


def test_stored_coarse_teacher_map_equals_online_capture():
    objective = DistillationObjective(all_terms_settings(), TEACHERS[:1], "vit_t_mini")
    teacher = features(1)
    stored = dict(teacher)
    stored["encoder.qk.3"] = coarse_attention_map(teacher["encoder.qk.3"], 2)
    online = objective(features(0), {"big": teacher})["kd/big/attention_kl"]
    offline = objective(features(0), {"big": stored})["kd/big/attention_kl"]
    assert online.item() == pytest.approx(offline.item(), rel=1e-6)
    stored["encoder.qk.3"] = torch.zeros(2, 16, 16)
    with pytest.raises(ValueError, match="B x 4 x 4"):
        objective(features(0), {"big": stored})


def test_sampled_rkd_is_seeded_and_resumes_from_the_state_dict():
    settings = all_terms_settings(patches="sample", num_samples=5, seed=3)
    first = DistillationObjective(settings, TEACHERS[:1], "vit_t_mini")
    first.kd_weight.value = 0.5
    state = first.state_dict()
    values = [first(features(0), {"big": features(1)})["kd/big/rkd_angle"] for _ in range(2)]
    assert values[0].item() != values[1].item()
    resumed = DistillationObjective(settings, TEACHERS[:1], "vit_t_mini")
    resumed.load_state_dict(state)
    assert resumed.kd_weight.value == 0.5
    again = resumed(features(0), {"big": features(1)})["kd/big/rkd_angle"]
    assert again.item() == values[0].item()


def test_zero_lambda_switches_every_term_off_and_missing_inputs_are_named():
    objective = DistillationObjective(all_terms_settings(), TEACHERS, "vit_t_mini")
    with pytest.raises(KeyError, match="twin"):
        objective(features(0), {"big": features(1)})
    student = features(0)
    del student["encoder.embed"]
    with pytest.raises(KeyError, match="encoder.embed"):
        objective(student, {"big": features(1), "twin": features(1)})
    settings = all_terms_settings()
    settings.dynamic_lambda.initial = 0.0
    assert term_weights(settings) == {}
    assert DistillationObjective(settings, TEACHERS, "vit_t_mini").required_student_taps() == []
