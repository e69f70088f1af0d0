"""Knowledge-distillation losses (docs/methods.md#response-based-kd to #layer-maps), pure functions of tensors.

Importing this package registers, in ``kdserve.registry``, every choice a job config names:
``logits_loss`` (kl, soft_ce, mse; ``logits_loss_topk``: kl), ``attention_loss`` (per_head,
head_mean), ``feature_distance`` (mse, l1, cosine) and ``layer_map`` (uniform, last, explicit,
all-average). The Distiller looks its terms up there by name, so a new loss is one function plus
one ``@register`` line, and configs accept exactly the registered names.

``student_workers.losses.distiller.Distiller`` (not imported here) combines them into a job's objective.
"""
from __future__ import annotations

from ._reduce import masked_mean, masked_mean_pool
from .attention import attention_mse_head_mean, attention_mse_per_head
from .data2vec import data2vec_loss
from .feature import Projection, feature_loss
from .layer_map import all_average_map, explicit_map, last_map, uniform_map
from .nce import TeacherQueue, gather_rows, token_nce
from .relational import NeighbourBank, listwise_kl, relational_kl
from .response import kd_kl, kd_kl_topk, logits_mse, soft_cross_entropy

__all__ = [
    "NeighbourBank",
    "Projection",
    "TeacherQueue",
    "all_average_map",
    "attention_mse_head_mean",
    "attention_mse_per_head",
    "data2vec_loss",
    "explicit_map",
    "feature_loss",
    "gather_rows",
    "listwise_kl",
    "relational_kl",
    "kd_kl",
    "kd_kl_topk",
    "last_map",
    "logits_mse",
    "masked_mean",
    "masked_mean_pool",
    "soft_cross_entropy",
    "token_nce",
    "uniform_map",
]
