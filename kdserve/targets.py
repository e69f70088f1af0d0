"""Target reductions shared by the teacher server and the student losses.

The teacher computes these on the server so fewer bytes cross the network; the student builds its
prediction with the very same functions, so both sides of a loss are defined once.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def instance_norm_tokens(h: torch.Tensor, eps: float = 1e-5, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise each channel over the tokens of its sample (Data2Vec's per-layer instance norm).

    h: (B, T, D). mask: optional (B, T) with 1 for real tokens; padding takes no part in the
    statistics (and its output is zeroed) so a padded batch gives the same targets as unpadded.
    """
    h = h.float()
    if mask is None:
        mu = h.mean(dim=1, keepdim=True)  # (B, 1, D)
        var = h.var(dim=1, unbiased=False, keepdim=True)  # (B, 1, D)
        return (h - mu) / torch.sqrt(var + eps)
    m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    n = m.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1, 1)
    mu = (h * m).sum(dim=1, keepdim=True) / n
    var = (((h - mu) ** 2) * m).sum(dim=1, keepdim=True) / n
    return (h - mu) / torch.sqrt(var + eps) * m


def data2vec_target(
    hiddens: Sequence[torch.Tensor], eps: float = 1e-5, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Contextualised target of Data2Vec (Baevski et al. 2022; docs/methods.md#data2vec-targets).

    Y = LayerNorm( (1/L) * sum_l InstanceNorm(H_l) ), the layer norm without affine parameters.
    hiddens: L tensors (B, T, D). Returns (B, T, D) float32.
    """
    if len(hiddens) == 0:
        raise ValueError("data2vec_target needs at least one layer")
    avg = torch.stack([instance_norm_tokens(h, eps, mask) for h in hiddens]).mean(dim=0)  # (B, T, D)
    return F.layer_norm(avg, avg.shape[-1:], eps=eps)


def mean_pool(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sentence embedding as sentence-transformers' mean pooling computes it (Reimers and Gurevych
    2019): the mean of a block's token states over the sample's real tokens.

    h: (B, T, D); mask: optional (B, T), 1 for real tokens (padding takes no part). Returns (B, D)
    float32: one vector per sample, whatever the padding.
    """
    h = h.float()
    if mask is None:
        return h.mean(dim=1)
    m = mask.to(h.dtype).unsqueeze(-1)  # (B, T, 1)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, D)


def head_mean(attn: torch.Tensor) -> torch.Tensor:
    """OPTIMA's head-averaged attention map: (B, H, T, T) -> (B, T, T)."""
    return attn.mean(dim=1)


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per row of the last axis.

    Returns (q, scales): q int8 of x's shape, scales float32 of shape x.shape[:-1].
    |dequantize(q, s) - x| <= s / 2 = max|row| / 254 elementwise.
    """
    x = x.float()
    amax = x.abs().amax(dim=-1)  # (...,)
    # an all-zero row gets scale 1; a row with NaN keeps a NaN scale, so is_finite(scales) sees it
    scales = torch.where(amax == 0, torch.ones_like(amax), amax / 127.0)
    q = torch.round(x / scales.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float().unsqueeze(-1)


def is_finite(t: torch.Tensor) -> bool:
    """No NaN and no Inf in ``t`` (integer tensors always pass).

    One reduction pass (``aminmax``: a NaN anywhere makes both ends NaN, an Inf is one of them),
    several times cheaper than ``isfinite(t).all()``, which writes a bool tensor first.
    """
    if not t.is_floating_point() or not t.numel():
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())
