"""Student side of the contextualised-target loss of Data2Vec (Baevski et al. 2022; docs/methods.md#data2vec-targets).

The teacher server sends Y_t = LayerNorm(mean_l InstanceNorm(H_t^l)) over all teacher layers.
The student builds Y_s the same way from all of its own layers with the very same function,
``kdserve.targets.data2vec_target``, so the two sides cannot drift apart; L_s != L_t is fine.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kdserve.targets import data2vec_target

from .feature import feature_loss


def data2vec_loss(
    student_hiddens: Sequence[torch.Tensor],
    teacher_target: torch.Tensor,
    eps: float = 1e-5,
    mask: torch.Tensor | None = None,
    projection: nn.Module | None = None,
) -> torch.Tensor:
    """MSE between the student's and the teacher's Data2Vec targets (Baevski et al. 2022, eq. 1-2).

    student_hiddens: L_s tensors (B, T, D_s), the outputs of every student block.
    teacher_target: (B, T, D_t), Y_t computed by the teacher server.
    eps: of the instance and layer norms (Data2Vec's code uses a small constant on the std).
    mask: optional (B, T), 1 for real tokens; padding is left out of the norm statistics (as on
    the teacher side, which must be given the same mask) and out of the mean.
    projection: maps Y_s from D_s to D_t; required when they differ.

    Loss = mean over real tokens (CLS included) of the per-token MSE, itself a mean over D_t.
    """
    y_s = data2vec_target(student_hiddens, eps=eps, mask=mask)  # (B, T, D_s) float32
    if projection is not None:
        y_s = projection(y_s)  # (B, T, D_t)
    if y_s.shape != teacher_target.shape:
        raise ValueError(
            f"data2vec_loss: student prediction {tuple(y_s.shape)} vs teacher target "
            f"{tuple(teacher_target.shape)}; pass projection=Projection(d_student, d_teacher) "
            "when hidden sizes differ"
        )
    return feature_loss(y_s, teacher_target.float(), kind="mse", mask=mask)
