"""Knowledge-distillation losses (docs/methods.md sections 1-6).

Importing this package registers every loss under kind "loss" and every layer map under kind
"layer_map" in ``kdserve.registry``.
"""
from __future__ import annotations

from . import attention, combined, data2vec, feature, layer_map, nce, response
from ._reduce import masked_mean, masked_mean_pool
from .attention import attention_head_mean_layers, attention_mse_head_mean, attention_mse_per_head
from .combined import CombinedLoss
from .data2vec import data2vec_loss
from .feature import Projection, feature_loss
from .layer_map import all_average_map, explicit_map, last_map, uniform_map
from .layer_map import layer_map as layer_map_pairs
from .nce import TeacherQueue, distillvlm_finetune_loss, distillvlm_pretrain_loss, token_nce
from .response import (
    hard_label_mix,
    kd_kl,
    kd_kl_topk,
    kd_with_hard_labels,
    logits_mse,
    soft_cross_entropy,
)

__all__ = [
    "CombinedLoss",
    "Projection",
    "TeacherQueue",
    "all_average_map",
    "attention_head_mean_layers",
    "attention_mse_head_mean",
    "attention_mse_per_head",
    "data2vec_loss",
    "distillvlm_finetune_loss",
    "distillvlm_pretrain_loss",
    "explicit_map",
    "feature_loss",
    "hard_label_mix",
    "kd_kl",
    "kd_kl_topk",
    "kd_with_hard_labels",
    "last_map",
    "layer_map_pairs",
    "logits_mse",
    "masked_mean",
    "masked_mean_pool",
    "soft_cross_entropy",
    "token_nce",
    "uniform_map",
]
