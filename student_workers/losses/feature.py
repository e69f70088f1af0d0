"""Feature-based distillation: regress teacher activations (docs/methods.md#feature-based-kd).

The student regresses hidden states of the teacher (FitNets, Romero et al. 2015; TinyBERT's
hidden-state loss, DistillVLM eq. 5) with MSE, L1 or cosine distance. When the hidden sizes
differ, a learnable linear map W: D_s -> D_t on the student side (``Projection``) makes them
comparable; it belongs to the distillation head and is thrown away with the teacher.
Which student layer regresses which teacher layer comes from ``layer_map``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdserve.registry import get, register

from ._reduce import masked_mean, upcast

# Distances between (..., D) vectors, reduced over D: (..., D) x (..., D) -> (...).
@register("feature_distance", "mse")
def mse_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (s - t).pow(2).mean(dim=-1)


@register("feature_distance", "l1")
def l1_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (s - t).abs().mean(dim=-1)


@register("feature_distance", "cosine")
def cosine_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8)


def feature_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str = "mse",
    mask: torch.Tensor | None = None,
    projection: nn.Module | None = None,
) -> torch.Tensor:
    """Distance between student and teacher features, averaged over the real tokens.

    student: (B, T, D_s) or (B, D_s); teacher: (B, T, D_t) or (B, D_t).
    kind: "mse" (mean squared error over D), "l1" (mean absolute error over D) or "cosine"
    (1 - cosine similarity per token). mask: optional (B, T), 1 for real tokens, so padded text
    tokens take no part. projection: applied to the student first (see ``Projection``).
    """
    dist = get("feature_distance", kind)
    s = projection(student) if projection is not None else student  # (B, T, D_t)
    if s.shape != teacher.shape:
        raise ValueError(
            f"feature_loss: student {tuple(s.shape)} vs teacher {tuple(teacher.shape)}; "
            "when hidden sizes differ pass projection=Projection(d_student, d_teacher)"
        )
    per_token = dist(upcast(s), upcast(teacher.detach()))  # (B, T) or (B,)
    return masked_mean(per_token, mask)


class Projection(nn.Module):
    """Learnable W: D_s -> D_t on the student side (FitNets regressor, DistillVLM's W_h / phi).

    Identity when the sizes already match, unless ``force`` asks for a learnable map anyway
    (a square W can still help when the two feature spaces are rotated w.r.t. each other).
    """

    def __init__(self, d_student: int, d_teacher: int, force: bool = False, bias: bool = True) -> None:
        super().__init__()
        if d_student <= 0 or d_teacher <= 0:
            raise ValueError(f"hidden sizes must be positive, got d_student={d_student}, d_teacher={d_teacher}")
        self.d_student, self.d_teacher = d_student, d_teacher
        needed = force or d_student != d_teacher
        self.proj: nn.Module = nn.Linear(d_student, d_teacher, bias=bias) if needed else nn.Identity()

    @property
    def is_identity(self) -> bool:
        return isinstance(self.proj, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (..., D_s) -> (..., D_t)
