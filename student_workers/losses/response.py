"""Response-based distillation: losses on the output logits.

Methods: Hinton, Vinyals & Dean 2015 ("Distilling the Knowledge in a Neural Network") for the
temperature-softened KL and the hard-label mixture; Fang et al. 2021 (DistillVLM) eq. 7 for the
soft cross-entropy used in fine-tuning distillation. See docs/methods.md#response-based-kd.

Every function takes logits of shape (..., C): (B, C) for classification, (B, T, C) for per-token
heads. An optional ``mask`` of shape (...) (1 = real position) drops padded positions from the
mean. Teacher tensors are detached: gradients reach the student only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdserve.registry import register

from ._reduce import masked_mean, upcast


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{what}: student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}"
        )


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_j p_j (log p_j - log q_j) over the last axis: (..., C) -> (...).

    Terms with p_j == 0 count as 0 (the limit of p log p); the where() keeps a teacher logit of
    -inf (a masked class) from turning the sum into 0 * -inf = nan.
    """
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


@register("logits_loss", "kl")
def kd_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Temperature-scaled KL distillation loss (Hinton et al. 2015).

    L = T^2 * KL(p || q), p = softmax(z_t / T), q = softmax(z_s / T), averaged over the rows
    (batch, and tokens for (B, T, C) logits). The T^2 factor keeps the gradient magnitude
    roughly independent of T, because d KL / d z_s shrinks as 1/T^2 at high temperature.

    student_logits, teacher_logits: (..., C). mask: optional (...). Returns a scalar.
    """
    _check_temperature(temperature)
    _check_same_shape(student_logits, teacher_logits, "kd_kl")
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)  # (..., C)
    log_p = F.log_softmax(upcast(teacher_logits.detach()) / temperature, dim=-1)  # (..., C)
    return temperature**2 * masked_mean(_kl_rows(log_p, log_q), mask)


@register("logits_loss_topk", "kl")
def kd_kl_topk(
    student_logits: torch.Tensor,
    topk_values: torch.Tensor,
    topk_indices: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL distillation when only the teacher's k largest logits were sent (Hinton et al. 2015).

    Approximation (exact when k = C): the teacher distribution is renormalised over its top-k
    support, p_j = softmax(topk_values / T)_j, i.e. the teacher's tail mass is treated as zero.
    The student log-probabilities are the full softmax over ALL C classes, gathered at the top-k
    indices, so the loss is sum_{j in top-k} p_j (log p_j - log q_j) with sum_{top-k} q_j <= 1.
    It stays >= 0 and is minimised when the student matches p on the support and puts no mass
    elsewhere, so the student is pushed slightly harder than with full logits to empty the tail.
    The relative order of the teacher's top classes, where most of the dark knowledge lives, is kept.

    student_logits: (..., C). topk_values, topk_indices: (..., k) (any order; torch.topk output
    works). mask: optional (...). Returns the scalar T^2-scaled loss.
    """
    _check_temperature(temperature)
    _check_same_shape(topk_values, topk_indices, "kd_kl_topk values/indices")
    if topk_values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"kd_kl_topk: leading shape of top-k {tuple(topk_values.shape[:-1])} != student "
            f"{tuple(student_logits.shape[:-1])}"
        )
    num_classes, k = student_logits.shape[-1], topk_values.shape[-1]
    if k > num_classes:
        raise ValueError(f"kd_kl_topk: k={k} exceeds the number of student classes {num_classes}")
    log_q_all = F.log_softmax(upcast(student_logits) / temperature, dim=-1)  # (..., C)
    log_q = log_q_all.gather(-1, topk_indices.long())  # (..., k)
    log_p = F.log_softmax(upcast(topk_values.detach()) / temperature, dim=-1)  # (..., k)
    return temperature**2 * masked_mean(_kl_rows(log_p, log_q), mask)


@register("logits_loss", "mse")
def logits_mse(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between raw logits (the high-temperature limit of Hinton et al. 2015's KD).

    Mean over classes, then over the (unmasked) rows. (..., C) inputs; returns a scalar.
    """
    _check_same_shape(student_logits, teacher_logits, "logits_mse")
    diff = upcast(student_logits) - upcast(teacher_logits.detach())  # (..., C)
    return masked_mean(diff.pow(2).mean(dim=-1), mask)


@register("logits_loss", "soft_ce")
def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Soft-label cross-entropy CE(q, p) = -sum_j p_j log q_j (DistillVLM eq. 7, L_CLS).

    p = softmax(z_t / tau_d), q = softmax(z_s / tau_d); DistillVLM keeps tau_d = 1. No T^2 factor,
    as in eq. 7. It differs from ``kd_kl`` / T^2 only by the teacher entropy, a constant for the
    student, so both give the same gradients up to that factor.

    (..., C) inputs, optional (...) mask; returns the mean over rows.
    """
    _check_temperature(temperature)
    _check_same_shape(student_logits, teacher_logits, "soft_cross_entropy")
    log_q = F.log_softmax(upcast(student_logits) / temperature, dim=-1)  # (..., C)
    p = F.softmax(upcast(teacher_logits.detach()) / temperature, dim=-1)  # (..., C)
    # A class the teacher gives p = 0 must not contribute 0 * -inf = nan.
    ce_rows = -torch.where(p > 0, p * log_q, torch.zeros_like(p)).sum(dim=-1)  # (...)
    return masked_mean(ce_rows, mask)
