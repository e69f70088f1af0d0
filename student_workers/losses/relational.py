"""Relational embedding distillation: the student copies the teacher's neighbourhoods within a batch,
not its vectors (docs/methods.md#relational-embedding-loss).

Retrieval ranks candidates by the cosine similarity of sentence embeddings, so what a small encoder
has to learn from a large one is which sentences are near which. For each anchor ``i`` of a batch, the
teacher's cosine similarities to the other ``B - 1`` sentences, divided by a temperature ``tau`` and
softmaxed, are a distribution over its neighbours; the student's similarities give another, and the
loss is their KL divergence, averaged over anchors. This is SEED's objective (Fang et al., ICLR 2021)
and CompRess's (Abbasi Koohpayegani et al., NeurIPS 2020) with the batch as the anchor set instead of
a memory bank. Only ``B x B`` similarity matrices meet, so the widths need no projection, and the
student's own embedding, the one users retrieve with, is what is trained (a pointwise loss through a
learned ``W`` can be met by moving ``W h`` while ``h``'s own geometry degrades).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._reduce import upcast


def neighbour_logits(x: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, D) -> (B, B - 1): each row's cosine similarities to the other rows, divided by ``tau``."""
    x = F.normalize(upcast(x), dim=-1)
    b = x.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=x.device)
    return (x @ x.T)[off].view(b, b - 1) / tau  # (B, B-1)


def relational_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """``mean_i KL(p^t_i || p^s_i)``, ``p_i = softmax_j(cos(x_i, x_j) / tau)`` over ``j != i``.

    student: (B, D_s); teacher: (B, D_t) (detached: a fixed target). Needs B >= 3 (two neighbours)."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"relational_kl: (B, D_s) and (B, D_t) with one B; got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if student.shape[0] < 3:
        raise ValueError(f"relational_kl: a batch of {student.shape[0]} has no neighbourhoods to compare (needs >= 3)")
    log_p_s = F.log_softmax(neighbour_logits(student, tau), dim=-1)  # (B, B-1)
    log_p_t = F.log_softmax(neighbour_logits(teacher.detach(), tau), dim=-1)  # (B, B-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def listwise_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float = 0.05) -> torch.Tensor:
    """``mean_i KL(p^t_i || p^s_i)``, ``p_i = softmax_j(cos(q_i, a_j) / tau)``: each query's distribution over the
    batch's answers, for a batch of (query, answer) pairs side by side (rows 0, 2, 4... queries, 1, 3, 5... their
    answers, as ``wordnet_pairs`` batches are).

    The relational KL restricted to what retrieval ranks: queries against candidates, not queries against
    queries. It is the in-batch listwise distillation of dense retrievers (RocketQAv2, Ren et al., EMNLP 2021;
    TAS-B, Hofstaetter et al., SIGIR 2021, with the teacher's scores as soft labels). student: (B, D_s); teacher:
    (B, D_t), B even and >= 4 (two pairs)."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"listwise_kl: (B, D_s) and (B, D_t) with one B; got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if student.shape[0] < 4 or student.shape[0] % 2:
        raise ValueError(f"listwise_kl: a batch of {student.shape[0]} rows is not (query, answer) pairs (needs an "
                         "even B >= 4)")

    def log_p(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(upcast(x), dim=-1)
        return F.log_softmax(x[0::2] @ x[1::2].T / tau, dim=-1)  # (B/2, B/2): query i over answers j

    return F.kl_div(log_p(student), log_p(teacher.detach()), log_target=True, reduction="batchmean")
