"""Reference computations written out with loops, shared by tests that check the fast code against them."""
from __future__ import annotations

import math

import torch


def naive_data2vec(hs: list[torch.Tensor], eps: float) -> torch.Tensor:
    """LayerNorm(mean_l InstanceNorm_tokens(H_l)), written out with loops (float64)."""
    B, T, D = hs[0].shape
    avg = torch.zeros(B, T, D, dtype=torch.float64)
    for h in hs:
        h = h.double()
        for b in range(B):
            for d in range(D):
                col = h[b, :, d]
                mu = col.sum() / T
                var = ((col - mu) ** 2).sum() / T
                avg[b, :, d] += (col - mu) / math.sqrt(var + eps)
    avg /= len(hs)
    y = torch.empty_like(avg)
    for b in range(B):
        for t in range(T):
            row = avg[b, t]
            mu = row.sum() / D
            var = ((row - mu) ** 2).sum() / D
            y[b, t] = (row - mu) / math.sqrt(var + eps)
    return y.float()
