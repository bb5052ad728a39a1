"""The distillation objective that training calls once per step.

    L = sum_task L_task + lambda_kd(t) * sum_teachers w_t * sum_terms lambda_term * L_term

Inputs are plain mappings from canonical tap names (`encoder.embed`, `encoder.block.<i>`,
`encoder.qk.<i>`, `decoder.upscaled`, `decoder.mask_logits`) to features:

- `student`: tensors, and an `AttentionCapture` for each `encoder.qk.<i>`;
- `teachers`: one mapping per teacher name, the same taps; an `encoder.qk.<i>` entry is either a
  coarse map `B x G^2 x G^2` (read from the feature file) or an `AttentionCapture` (online).

Teacher features are detached: gradients reach the student and the adapters only. A teacher's
map mapped from another frame (SAM 2's square one, `samkd.train.frames`) comes with its valid
cells under `samkd.models.frames.valid_key(tap)`: on the others (the padding, where the teacher
saw no pixels) the student's own value stands in for the teacher's, so they add nothing.

The objective returns the raw value of every switched-on term, `kd/<teacher>/<term>` (before
`lambda_term`, `w_t` and `lambda_kd`): `encoder_mse`, `encoder_kl` (with its `tau^2`),
`decoder_mse`, `decoder_cosine`, `decoder_kl`, `attention_kl`, `rkd_distance` and `rkd_angle`.
Each is a mean over its units (`term_specs`): decoder terms over prompted objects, across-batch
RKD over the batch, every other term over images, so that training can weight a micro-batch by
how many units it holds. A term that is switched off (section disabled, or a zero weight) is
not computed and needs no taps; with `lambda_kd` 0 at the start no term is switched on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from samkd.distill.adapters import adapter_key, build_adapters
from samkd.distill.attention import attention_kl, coarse_attention_map, coarse_attention_support
from samkd.distill.decoder import cosine_distance, mask_logit_kl
from samkd.distill.dynamic_weight import DynamicKDWeight
from samkd.distill.encoder import check_same_shape, encoder_kl, feature_mse
from samkd.distill.pairs import default_attention_pairs, default_encoder_pairs
from samkd.distill.rkd import (
    grid_patches,
    relational_embeddings,
    rkd_angle_loss,
    rkd_distance_loss,
    sample_positions,
    sampled_patches,
)
from samkd.models.attention_capture import AttentionCapture
from samkd.models.frames import valid_key
from samkd.models.taps import DECODER_MASK_LOGITS, DECODER_UPSCALED
from samkd.settings import DistillationSettings, ModelType, TapPair, TeacherSettings

Feature = torch.Tensor | AttentionCapture
Features = Mapping[str, Feature]
Shapes = Mapping[str, Sequence[int]]


def term_weights(settings: DistillationSettings) -> dict[str, float]:
    """`lambda_term` of every switched-on term (section weight times sub-term weight); none when
    `lambda_kd` starts at 0, as it can then never rise."""
    if settings.dynamic_lambda.initial == 0:
        return {}
    encoder, decoder = settings.encoder, settings.decoder
    attention, rkd = settings.attention, settings.rkd
    candidates = {
        "encoder_mse": (encoder.enabled, encoder.weight * encoder.mse_weight),
        "encoder_kl": (encoder.enabled, encoder.weight * encoder.kl_weight),
        "decoder_mse": (decoder.enabled, decoder.weight * decoder.mse_weight),
        "decoder_cosine": (decoder.enabled, decoder.weight * decoder.cosine_weight),
        "decoder_kl": (decoder.enabled, decoder.weight * decoder.kl_weight),
        "attention_kl": (attention.enabled, attention.weight),
        "rkd_distance": (rkd.enabled, rkd.weight * rkd.distance_weight),
        "rkd_angle": (rkd.enabled, rkd.weight * rkd.angle_weight),
    }
    return {name: weight for name, (enabled, weight) in candidates.items() if enabled and weight}


def _target(features: Features, tap: str, owner: str, student: torch.Tensor) -> torch.Tensor:
    """The teacher's `tap`, detached, with `student`'s values on its invalid cells (if any)."""
    target = _tensor(features, tap, owner).detach()
    valid = features.get(valid_key(tap))
    if not isinstance(valid, torch.Tensor) or student.shape != target.shape:
        return target
    return torch.where(valid, target, student.detach().to(target.dtype))


def _tensor(features: Features, tap: str, owner: str) -> torch.Tensor:
    feature = features.get(tap)
    if feature is None:
        raise KeyError(f"{owner} features lack tap '{tap}'")
    if not isinstance(feature, torch.Tensor):
        raise TypeError(f"{owner} tap '{tap}' must be a tensor, got {type(feature).__name__}")
    return feature


class DistillationObjective(nn.Module):
    """Distillation terms for one student and several teachers, plus the learnable adapters.

    Args:
        settings: the `distillation` section.
        teachers: each teacher's name, model type and weight `w_t`.
        student_type: the student's registry name (for the default matched pairs).
        student_shapes: `C x H x W` of the student's encoder-matching taps, declared or probed
            (`samkd.distill.adapters.feature_shapes`); None: every pair is taken to match its
            teacher exactly (identity adapters, checked at each call).
        teacher_shapes: per teacher, `C x H x W` of its encoder-matching taps.

    Attributes:
        adapters: `ModuleDict` teacher name -> `ModuleDict` pair key -> adapter. Put
            `objective.parameters()` in the optimizer and `objective.state_dict()` in training
            checkpoints (it also holds `lambda_kd`'s state and the RKD sampler's state).
        kd_weight: `lambda_kd(t)`; call `kd_weight.step(metric)` after each evaluation.
    """

    def __init__(
        self,
        settings: DistillationSettings,
        teachers: Sequence[TeacherSettings],
        student_type: ModelType,
        student_shapes: Shapes | None = None,
        teacher_shapes: Mapping[str, Shapes] | None = None,
    ) -> None:
        super().__init__()
        if not teachers:
            raise ValueError("distillation needs at least one teacher")
        self.settings = settings
        self.teachers = {teacher.name: teacher for teacher in teachers}
        self.term_weights = term_weights(settings)
        self.encoder_pairs = {
            teacher.name: teacher.encoder_pairs
            or settings.encoder.pairs
            or default_encoder_pairs(student_type, teacher.model_type)
            for teacher in teachers
        }
        self.attention_pairs = {
            teacher.name: teacher.attention_pairs
            or settings.attention.pairs
            or default_attention_pairs(student_type, teacher.model_type)
            for teacher in teachers
        }
        self.adapters = nn.ModuleDict(
            {
                name: self._build_adapters(name, student_shapes, teacher_shapes)
                for name in self.teachers
            }
        )
        self.kd_weight = DynamicKDWeight(settings.dynamic_lambda)
        self.rkd_generator = torch.Generator().manual_seed(settings.rkd.seed)

    def _build_adapters(
        self,
        teacher: str,
        student_shapes: Shapes | None,
        teacher_shapes: Mapping[str, Shapes] | None,
    ) -> nn.ModuleDict:
        if not self._any("encoder_"):
            return nn.ModuleDict()
        pairs = self.encoder_pairs[teacher]
        if student_shapes is None:
            return nn.ModuleDict({adapter_key(pair): nn.Identity() for pair in pairs})
        if teacher_shapes is None or teacher not in teacher_shapes:
            raise KeyError(f"student shapes were given but none for teacher '{teacher}'")
        return build_adapters(pairs, student_shapes, teacher_shapes[teacher])

    def _any(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self.term_weights)

    # ------------------------------------------------------------------ taps

    def required_student_taps(self) -> list[str]:
        """Every tap the objective reads from the student (sorted)."""
        taps: set[str] = set()
        for teacher in self.teachers:
            taps.update(pair.student for pair in self._pairs(teacher))
        taps.update(self._decoder_taps())
        if self._any("rkd_"):
            taps.add(self.settings.rkd.tap)
        return sorted(taps)

    def required_teacher_taps(self, teacher: str) -> list[str]:
        """Every tap the objective reads from one teacher (sorted)."""
        if teacher not in self.teachers:
            raise KeyError(f"unknown teacher '{teacher}'")
        taps = {pair.teacher for pair in self._pairs(teacher)} | set(self._decoder_taps())
        if self._any("rkd_"):
            taps.add(self.settings.rkd.tap)
        return sorted(taps)

    def _pairs(self, teacher: str) -> list[TapPair]:
        pairs = list(self.encoder_pairs[teacher]) if self._any("encoder_") else []
        if self._any("attention_"):
            pairs += self.attention_pairs[teacher]
        return pairs

    def _decoder_taps(self) -> list[str]:
        taps = []
        if "decoder_mse" in self.term_weights or "decoder_cosine" in self.term_weights:
            taps.append(DECODER_UPSCALED)
        if "decoder_kl" in self.term_weights:
            taps.append(DECODER_MASK_LOGITS)
        return taps

    # ------------------------------------------------------------------ loss

    def term_specs(self) -> dict[str, tuple[float, str]]:
        """`kd/<teacher>/<term>` -> (`w_t * lambda_term`, unit) for every computed term, in the
        order `forward` returns them; units are `object`, `image` or `batch`."""
        specs = {}
        for name, teacher in self.teachers.items():
            for term, weight in self.term_weights.items():
                specs[f"kd/{name}/{term}"] = (teacher.weight * weight, self._unit(term))
        return specs

    def _unit(self, term: str) -> str:
        if term.startswith("decoder_"):
            return "object"
        if term.startswith("rkd_") and self.settings.rkd.across_batch:
            return "batch"
        return "image"

    def forward(
        self,
        student: Features,
        teachers: Mapping[str, Features],
        with_decoder: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Every term by name (see `term_specs`), with gradients to the student and adapters.

        Args:
            student: student features by tap.
            teachers: teacher name -> teacher features by tap, for every configured teacher.
            with_decoder: False for a batch without prompts: its decoder terms are left out.
        """
        missing = sorted(set(self.teachers) - set(teachers))
        if missing:
            raise KeyError(f"no features for teacher '{missing[0]}'")
        student_cache: dict[str, torch.Tensor] = {}
        positions = self._rkd_positions(student) if self._any("rkd_") else None
        terms: dict[str, torch.Tensor] = {}
        for name in self.teachers:
            features = teachers[name]
            raw: dict[str, torch.Tensor] = {}
            if self._any("encoder_"):
                raw.update(self._encoder_terms(name, student, features))
            if self._any("decoder_") and with_decoder:
                raw.update(self._decoder_terms(name, student, features))
            if self._any("attention_"):
                raw.update(self._attention_terms(name, student, features, student_cache))
            if self._any("rkd_"):
                raw.update(self._rkd_terms(name, student, features, positions, student_cache))
            terms.update({f"kd/{name}/{term}": value for term, value in raw.items()})
        return terms

    def decoder_terms(
        self, student: Features, teachers: Mapping[str, Features]
    ) -> dict[str, torch.Tensor]:
        """The decoder terms alone, `kd/<teacher>/decoder_*` (one decoding of a prompt loop:
        `forward` with `with_decoder=False` gives the others)."""
        terms: dict[str, torch.Tensor] = {}
        if not self._any("decoder_"):
            return terms
        for name in self.teachers:
            raw = self._decoder_terms(name, student, teachers[name])
            terms.update({f"kd/{name}/{term}": value for term, value in raw.items()})
        return terms

    def weighted(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`sum_t w_t sum_terms lambda_term L_term` of one batch's `terms` (before
        `lambda_kd`)."""
        specs = self.term_specs()
        return torch.stack([specs[name][0] * value for name, value in terms.items()]).sum()

    def _encoder_terms(
        self, teacher: str, student: Features, features: Features
    ) -> dict[str, torch.Tensor]:
        encoder = self.settings.encoder
        adapters = self.adapters[teacher]
        assert isinstance(adapters, nn.ModuleDict)
        mse: list[torch.Tensor] = []
        kl: list[torch.Tensor] = []
        for pair in self.encoder_pairs[teacher]:
            adapted = adapters[adapter_key(pair)](_tensor(student, pair.student, "student"))
            target = _target(features, pair.teacher, f"teacher '{teacher}'", adapted)
            check_same_shape(adapted, target, f"{pair.student} -> {teacher}:{pair.teacher}")
            if "encoder_mse" in self.term_weights:
                mse.append(feature_mse(adapted, target))
            if "encoder_kl" in self.term_weights:
                kl.append(encoder_kl(adapted, target, encoder.temperature, encoder.kl_axis))
        out = {}
        if mse:
            out["encoder_mse"] = torch.stack(mse).mean()
        if kl:
            out["encoder_kl"] = torch.stack(kl).mean()
        return out

    def _decoder_terms(
        self, teacher: str, student: Features, features: Features
    ) -> dict[str, torch.Tensor]:
        owner = f"teacher '{teacher}'"
        out = {}
        if DECODER_UPSCALED in self._decoder_taps():
            upscaled = _tensor(student, DECODER_UPSCALED, "student")
            target = _target(features, DECODER_UPSCALED, owner, upscaled)
            if "decoder_mse" in self.term_weights:
                out["decoder_mse"] = feature_mse(upscaled, target)
            if "decoder_cosine" in self.term_weights:
                out["decoder_cosine"] = cosine_distance(upscaled, target)
        if "decoder_kl" in self.term_weights:
            logits = _tensor(student, DECODER_MASK_LOGITS, "student")
            out["decoder_kl"] = mask_logit_kl(
                logits,
                _target(features, DECODER_MASK_LOGITS, owner, logits),
                self.settings.decoder.temperature,
            )
        return out

    def _attention_terms(
        self,
        teacher: str,
        student: Features,
        features: Features,
        student_cache: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        settings = self.settings.attention
        grid, chunk = settings.grid_size, settings.query_chunk
        losses = []
        for pair in self.attention_pairs[teacher]:
            student_feature = student.get(pair.student)
            if student_feature is None:
                raise KeyError(f"student features lack tap '{pair.student}'")
            if pair.student not in student_cache:
                student_cache[pair.student] = _coarse_map(student_feature, grid, chunk)
            support = None
            if isinstance(student_feature, AttentionCapture) and student_feature.window:
                support = coarse_attention_support(student_feature, grid)
            teacher_feature = features.get(pair.teacher)
            if teacher_feature is None:
                raise KeyError(f"teacher '{teacher}' features lack tap '{pair.teacher}'")
            with torch.no_grad():
                teacher_map = _coarse_map(teacher_feature, grid, chunk)
            losses.append(attention_kl(student_cache[pair.student], teacher_map, support))
        return {"attention_kl": torch.stack(losses).mean()}

    def _rkd_positions(self, student: Features) -> torch.Tensor | None:
        rkd = self.settings.rkd
        if rkd.patches != "sample":
            return None
        features = _tensor(student, rkd.tap, "student")
        batch, _, height, width = features.shape
        return sample_positions(
            batch, height * width, rkd.num_samples, self.rkd_generator, rkd.across_batch
        )

    def _rkd_terms(
        self,
        teacher: str,
        student: Features,
        features: Features,
        positions: torch.Tensor | None,
        student_cache: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        rkd = self.settings.rkd
        student_features = _tensor(student, rkd.tap, "student")
        teacher_features = _target(features, rkd.tap, f"teacher '{teacher}'", student_features)
        if positions is not None and student_features.shape[2:] != teacher_features.shape[2:]:
            raise ValueError(
                f"sampled RKD needs the same grid for student and teacher '{rkd.tap}', got "
                f"{tuple(student_features.shape[2:])} and {tuple(teacher_features.shape[2:])}"
            )

        def patches(feature: torch.Tensor) -> torch.Tensor:
            if positions is None:
                flat = grid_patches(feature, rkd.grid_size)
            else:
                flat = sampled_patches(feature, positions)
            return relational_embeddings(flat, rkd.across_batch)

        cache_key = f"rkd:{rkd.tap}"
        if cache_key not in student_cache:
            student_cache[cache_key] = patches(student_features)
        student_points, teacher_points = student_cache[cache_key], patches(teacher_features)
        out = {}
        if "rkd_distance" in self.term_weights:
            out["rkd_distance"] = rkd_distance_loss(student_points, teacher_points)
        if "rkd_angle" in self.term_weights:
            out["rkd_angle"] = rkd_angle_loss(student_points, teacher_points)
        return out

    # ------------------------------------------------------------------ state

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "kd_weight": self.kd_weight.state_dict(),
            "rkd_generator": self.rkd_generator.get_state(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.kd_weight.load_state_dict(state["kd_weight"])
        self.rkd_generator.set_state(state["rkd_generator"])


def _coarse_map(feature: Feature, grid_size: int, query_chunk: int) -> torch.Tensor:
    """A coarse attention map from a capture, or a stored map checked for its shape."""
    if isinstance(feature, AttentionCapture):
        return coarse_attention_map(feature, grid_size, query_chunk)
    cells = grid_size * grid_size
    if feature.dim() != 3 or feature.shape[1:] != (cells, cells):
        raise ValueError(
            f"a stored coarse attention map must be B x {cells} x {cells} "
            f"(grid_size {grid_size}), got {tuple(feature.shape)}"
        )
    return feature
