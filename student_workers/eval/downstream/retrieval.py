"""Recall@k of cosine retrieval (reverse dictionary: definition -> headword)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def recall_at_k(queries: np.ndarray, candidates: np.ndarray, gold: np.ndarray, ks: Sequence[int] = (1, 10)) -> dict[int, float]:
    """Fraction of queries whose gold candidate ranks in the top k by cosine similarity.

    queries (Q, D), candidates (N, D), gold (Q,) indices into candidates. Rank = 1 + number of
    candidates scoring strictly higher than the gold one (ties count in the query's favour).
    """
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
    c = candidates / np.linalg.norm(candidates, axis=1, keepdims=True).clip(1e-12)
    sims = q @ c.T  # (Q, N)
    gold_sim = sims[np.arange(len(gold)), gold][:, None]  # (Q, 1)
    rank = 1 + (sims > gold_sim).sum(axis=1)  # (Q,)
    return {k: float((rank <= k).mean()) for k in ks}
