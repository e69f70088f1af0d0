"""Attention-map distillation (docs/methods.md#attention-maps).

Maps are post-softmax attention probabilities, (B, H, T, T) per layer: row i of head h is the
distribution of query token i over the keys. Two forms:

* DistillVLM (Fang et al. 2021, eq. 4): last layer, per head; needs H_s == H_t.
* OPTIMA (module-wise adaptive distillation): every mapped layer, maps averaged over heads first,
  so the head counts may differ and the teacher may send H times fewer bytes.

An optional ``mask`` (B, T), 1 for real tokens, restricts both the query rows and the key
columns to real tokens, with T replaced by the sample's number of real tokens n.
"""
from __future__ import annotations

import torch

from kdserve.registry import register
from kdserve.targets import head_mean

from ._reduce import upcast


def _token_pair_mean(sq: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, T) squared errors -> mean over the (query, key) pairs of each sample, then over B."""
    if mask is None:
        return sq.mean()
    if mask.shape != sq.shape[:2]:
        raise ValueError(f"attention mask must be (B, T) = {tuple(sq.shape[:2])}, got {tuple(mask.shape)}")
    m = mask.to(sq.dtype)  # (B, T)
    pair = m.unsqueeze(-1) * m.unsqueeze(-2)  # (B, T, T): real query and real key
    n = m.sum(dim=-1).clamp_min(1.0)  # (B,)
    return ((sq * pair).sum(dim=(-2, -1)) / (n * n)).mean()


def _check_maps(a: torch.Tensor, name: str, ndims: tuple[int, ...]) -> None:
    if a.ndim not in ndims or a.shape[-1] != a.shape[-2]:
        want = " or ".join(("(B, H, T, T)" if d == 4 else "(B, T, T)") for d in ndims)
        raise ValueError(f"{name} must be {want}, got {tuple(a.shape)}")


@register("attention_loss", "per_head")
def attention_mse_per_head(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_ATT = (1 / (T * H)) * sum_i sum_h MSE(A_s[h, i, :], A_t[h, i, :]) (DistillVLM eq. 4).

    MSE over a row is the mean over its T key entries, (1/T) sum_j (A_s[h,i,j] - A_t[h,i,j])^2,
    so per sample L_ATT = (1 / (T^2 H)) sum_{h,i,j} (A_s - A_t)^2, the mean over every entry of
    the (H, T, T) map; the batch loss is the mean of that over the B samples.

    student_attn, teacher_attn: (B, H, T, T) post-softmax. H_s must equal H_t; otherwise use
    ``attention_mse_head_mean``. mask: optional (B, T). Returns a scalar.
    """
    _check_maps(student_attn, "student_attn", (4,))
    _check_maps(teacher_attn, "teacher_attn", (4,))
    if student_attn.shape[1] != teacher_attn.shape[1]:
        raise ValueError(
            f"per-head attention distillation needs as many student as teacher heads "
            f"(H_s={student_attn.shape[1]}, H_t={teacher_attn.shape[1]}); "
            "use attention_head_mean (OPTIMA head averaging) instead"
        )
    if student_attn.shape != teacher_attn.shape:
        raise ValueError(
            f"attention maps differ: student {tuple(student_attn.shape)} vs teacher {tuple(teacher_attn.shape)}"
        )
    sq = (upcast(student_attn) - upcast(teacher_attn.detach())).pow(2)  # (B, H, T, T)
    # The mean over h commutes with the masked mean over (i, j), so reduce heads first.
    return _token_pair_mean(sq.mean(dim=1), mask)


def _as_head_mean(attn: torch.Tensor) -> torch.Tensor:
    return head_mean(attn) if attn.ndim == 4 else attn  # (B, T, T)


@register("attention_loss", "head_mean")
def attention_mse_head_mean(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """OPTIMA's per-layer attention loss: MSE(Abar_t, Abar_s) with Abar = mean_h A[h].

    student_attn: (B, H_s, T, T) or already averaged (B, T, T).
    teacher_attn: (B, H_t, T, T) or the head-averaged (B, T, T) the server can send instead;
    H_s and H_t may differ. MSE is the mean over the T x T entries, then over the batch.
    The Distiller sums it over the layer map's pairs.
    """
    _check_maps(student_attn, "student_attn", (3, 4))
    _check_maps(teacher_attn, "teacher_attn", (3, 4))
    s = _as_head_mean(upcast(student_attn))  # (B, T, T)
    t = _as_head_mean(upcast(teacher_attn.detach()))  # (B, T, T)
    if s.shape != t.shape:
        raise ValueError(f"head-averaged maps differ: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    return _token_pair_mean((s - t).pow(2), mask)
