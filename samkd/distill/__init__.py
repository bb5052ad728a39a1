"""The distillation objective: loss terms, adapters, default matched taps and lambda_kd(t)."""

from samkd.distill.adapters import FeatureAdapter, adapter_key, build_adapters, feature_shapes
from samkd.distill.attention import attention_kl, coarse_attention_map, coarse_attention_support
from samkd.distill.decoder import cosine_distance, mask_logit_kl
from samkd.distill.dynamic_weight import DynamicKDWeight, WeightChange
from samkd.distill.encoder import encoder_kl, feature_mse
from samkd.distill.objective import DistillationObjective, term_weights
from samkd.distill.pairs import default_attention_pairs, default_encoder_pairs, encoder_layout
from samkd.distill.rkd import (
    angle_potential,
    distance_potential,
    rkd_angle_loss,
    rkd_distance_loss,
)

__all__ = [
    "DistillationObjective",
    "DynamicKDWeight",
    "FeatureAdapter",
    "WeightChange",
    "adapter_key",
    "angle_potential",
    "attention_kl",
    "build_adapters",
    "coarse_attention_map",
    "coarse_attention_support",
    "cosine_distance",
    "default_attention_pairs",
    "default_encoder_pairs",
    "distance_potential",
    "encoder_kl",
    "encoder_layout",
    "feature_mse",
    "feature_shapes",
    "mask_logit_kl",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "term_weights",
]
