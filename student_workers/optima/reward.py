"""OPTIMA's round reward (eq. 6): the relative decrement of the full-model losses between rounds."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

DEFAULT_LOSS_KEYS: tuple[str, ...] = ("kd", "hid", "attn")  # the full-model losses a reward averages



def loss_value(losses: Mapping[str, Any], key: str, what: str) -> float:
    if key not in losses:
        raise ValueError(f"{what} losses lack key {key!r} (have {sorted(losses)!r})")
    return float(losses[key])  # float() also takes 0-d tensors


def _clipped_decrement(prev: float, now: float) -> float:
    """clip((prev - now) / prev, 0, 1): the relative loss decrement of OPTIMA eq. 6.

    Returns 0 when ``prev <= 0`` (a loss that is already zero has nothing left to decrease and the
    ratio is undefined; a negative one would flip the sign) and when either value is not finite
    (a NaN reward would poison the arm's EMA mean for the rest of training).
    """
    if not (math.isfinite(prev) and math.isfinite(now)) or prev <= 0.0:
        return 0.0
    return min(max((prev - now) / prev, 0.0), 1.0)


def round_reward(
    prev: Mapping[str, Any], now: Mapping[str, Any], keys: Sequence[str] = DEFAULT_LOSS_KEYS
) -> float:
    """OPTIMA reward (eq. 6): mean over ``keys`` of the clipped relative decrement of each loss.

    ``r = (1/|keys|) * sum_X clip((X_prev - X_now) / X_prev, 0, 1)``; with the default keys
    ``("kd", "hid", "attn")`` this is the paper's ``1/3`` average over the logit KD loss and the
    full-model hidden-state and attention losses. Normalising by ``X_prev`` keeps losses of
    different scales on equal footing; clipping keeps ``r`` in ``[0, 1]``.

    A key missing from ``prev`` or ``now`` raises ``ValueError`` (a silently smaller average would
    change the reward's meaning). A key whose ``X_prev <= 0`` or whose values are not finite
    contributes 0 but still counts in the denominator.
    """
    keys = tuple(keys)
    if not keys:
        raise ValueError("round_reward needs at least one loss key")
    total = 0.0
    for key in keys:
        total += _clipped_decrement(loss_value(prev, key, "previous"), loss_value(now, key, "current"))
    return total / len(keys)


class RoundAverager(torch.nn.Module):
    """Sums per-step losses over one round and returns their mean.

    OPTIMA compares round-averaged losses rather than single-step values because one SGD step's
    loss is too noisy to tell arms apart (sec. 3, eq. 6). The running sums live in buffers so a
    checkpoint taken in the middle of a round resumes the round exactly.
    """

    def __init__(self, keys: Sequence[str] = DEFAULT_LOSS_KEYS) -> None:
        super().__init__()
        self.keys = tuple(keys)
        if not self.keys or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"loss keys must be non-empty and unique, got {self.keys!r}")
        # float64: a round may hold thousands of steps; float32 sums would lose digits.
        self.register_buffer("sums", torch.zeros(len(self.keys), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def add(self, losses: Mapping[str, Any]) -> None:
        """Add one step's losses; keys outside ``self.keys`` are ignored, missing ones raise."""
        vals = [loss_value(losses, k, "step") for k in self.keys]
        self.sums += torch.tensor(vals, dtype=torch.float64, device=self.sums.device)
        self.count += 1

    def mean(self) -> dict[str, float]:
        """Mean of each loss over the steps added since the last :meth:`reset`."""
        n = int(self.count)
        if n == 0:
            raise ValueError("RoundAverager.mean() called before any step was added")
        return {k: float(s) / n for k, s in zip(self.keys, self.sums.tolist())}

    def reset(self) -> None:
        self.sums.zero_()
        self.count.zero_()

    def __len__(self) -> int:
        return int(self.count)
