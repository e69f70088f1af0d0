"""Reductions shared by the KD losses (masked means over tokens, dtype handling)."""
from __future__ import annotations

import torch

_HALF = (torch.float16, torch.bfloat16)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs to float32; softmax/log of fp16 teacher payloads loses too much."""
    return x.float() if x.dtype in _HALF else x


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` is true (all positions without a mask).

    values: (...), mask: (...) of the same shape, 1/True for real tokens. A batch made only of
    padding gives 0 instead of nan so one empty micro-batch cannot poison the optimiser state.
    """
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tuple(values.shape)}")
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def masked_mean_pool(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the token axis of (B, T, D) -> (B, D), padding excluded."""
    if mask is None:
        return x.mean(dim=1)
    m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
