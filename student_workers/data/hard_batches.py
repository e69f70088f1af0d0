"""Hard batches: groups of lexically close texts, batched together.

An in-batch loss (the relational KL, a contrastive loss) only learns from the texts that meet in a
batch. Random WordNet definitions are mostly unrelated, so the teacher's ranking among them says
little about the top of the ranking that retrieval reads. DPR (Karpukhin et al., 2020, sec. 3.2 and
table 3) showed that in-batch training gains from lexical hard negatives (BM25's top passages); here
TF-IDF cosine plays BM25's part: each group is an anchor and the nearest texts no other group took.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def neighbour_groups(texts: Sequence[str], size: int, seed: int = 0) -> list[list[int]]:
    """A partition of ``range(len(texts))`` into groups of ``size`` lexical neighbours.

    Greedy: anchors in a random order (``seed``); an anchor not yet taken opens a group with its nearest
    untaken texts by TF-IDF cosine (among its ``4 * size`` nearest). Groups left short are pooled and cut
    into groups of ``size`` in anchor order; the last ``len(texts) % size`` indices are left out."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    n = len(texts)
    if size < 2 or n < size:
        raise ValueError(f"neighbour_groups: groups of {size} from {n} texts (needs 2 <= size <= len(texts))")
    x = TfidfVectorizer(sublinear_tf=True, stop_words="english").fit_transform(texts)  # (N, V), rows L2-normed
    near = nearest(x, min(n, 4 * size + 1))  # (N, k)
    taken = np.zeros(n, dtype=bool)
    full, short = [], []
    for a in np.random.default_rng(seed).permutation(n):
        if taken[a]:
            continue
        group = [int(a)]
        taken[a] = True
        for j in near[a]:
            if len(group) == size:
                break
            if not taken[j]:
                group.append(int(j))
                taken[j] = True
        (full if len(group) == size else short).append(group)
    rest = [i for g in short for i in g]
    full += [rest[i:i + size] for i in range(0, len(rest) - size + 1, size)]
    return full


def nearest(x, k: int, rows: int = 1024) -> np.ndarray:
    """(N, k): each row's ``k`` largest dot products with the rows of ``x`` (itself among them), best first;
    in blocks of ``rows``, so the (N, N) similarities are never held whole."""
    out = []
    for i in range(0, x.shape[0], rows):
        sim = (x[i:i + rows] @ x.T).toarray()  # (rows, N)
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sim, top, axis=1), axis=1, kind="stable")
        out.append(np.take_along_axis(top, order, axis=1))
    return np.concatenate(out)
