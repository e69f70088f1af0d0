"""Relational embedding distillation: the student copies the teacher's neighbourhoods within a batch,
not its vectors (docs/methods.md#relational-embedding-loss).

Retrieval ranks candidates by the cosine similarity of sentence embeddings, so what a small encoder
has to learn from a large one is which sentences are near which. For each anchor ``i`` of a batch, the
teacher's cosine similarities to the other ``B - 1`` sentences, divided by a temperature ``tau`` and
softmaxed, are a distribution over its neighbours; the student's similarities give another, and the
loss is their KL divergence, averaged over anchors. This is SEED's objective (Fang et al., ICLR 2021)
and CompRess's (Abbasi Koohpayegani et al., NeurIPS 2020) with the batch as the anchor set; with a
``NeighbourBank`` the last K texts join the batch's, as CompRess's memory banks do, so each anchor is
ranked against B - 1 + K neighbours instead of B - 1. Only similarities meet, so the widths need no
projection, and the student's own embedding, the one users retrieve with, is what is trained (a
pointwise loss through a learned ``W`` can be met by moving ``W h`` while ``h``'s own geometry degrades).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._reduce import upcast
from .nce import TeacherQueue


def neighbour_logits(x: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, D) -> (B, B - 1): each row's cosine similarities to the other rows, divided by ``tau``."""
    x = F.normalize(upcast(x), dim=-1)
    b = x.shape[0]
    off = ~torch.eye(b, dtype=torch.bool, device=x.device)
    return (x @ x.T)[off].view(b, b - 1) / tau  # (B, B-1)


def relational_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float = 0.05,
                  student_bank: torch.Tensor | None = None, teacher_bank: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_i KL(p^t_i || p^s_i)``, ``p_i = softmax_j(cos(x_i, x_j) / tau)`` over ``j != i``.

    student: (B, D_s); teacher: (B, D_t) (detached: a fixed target). Needs B >= 3 (two neighbours).
    With banks, each anchor's neighbours are the rest of the batch and the bank's K rows: the teacher's
    anchors against ``teacher_bank`` (K, D_t), the student's against ``student_bank`` (K, D_s), the same
    K texts embedded by each (CompRess's two memory banks, Abbasi Koohpayegani et al., NeurIPS 2020,
    sec. 3); row k of one bank must be the text of row k of the other. Both banks are constants."""
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"relational_kl: (B, D_s) and (B, D_t) with one B; got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    if student.shape[0] < 3:
        raise ValueError(f"relational_kl: a batch of {student.shape[0]} has no neighbourhoods to compare (needs >= 3)")
    logits_s = neighbour_logits(student, tau)  # (B, B-1)
    logits_t = neighbour_logits(teacher.detach(), tau)  # (B, B-1)
    if (student_bank is None) != (teacher_bank is None):
        raise ValueError("relational_kl: a student bank and a teacher bank, or neither")
    if student_bank is not None and student_bank.shape[0] > 0:
        if student_bank.shape[0] != teacher_bank.shape[0] or student_bank.shape[1] != student.shape[1] \
                or teacher_bank.shape[1] != teacher.shape[1]:
            raise ValueError(f"relational_kl: banks (K, D_s) and (K, D_t) with one K; got {tuple(student_bank.shape)} "
                             f"and {tuple(teacher_bank.shape)} for a student of width {student.shape[1]} and a "
                             f"teacher of width {teacher.shape[1]}")
        logits_s = torch.cat([logits_s, bank_logits(student, student_bank, tau)], dim=-1)  # (B, B-1+K)
        logits_t = torch.cat([logits_t, bank_logits(teacher.detach(), teacher_bank, tau)], dim=-1)  # (B, B-1+K)
    log_p_s = F.log_softmax(logits_s, dim=-1)
    log_p_t = F.log_softmax(logits_t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def bank_logits(x: torch.Tensor, bank: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, D), (K, D) -> (B, K): cosine similarities of the batch's rows to the bank's, divided by ``tau``."""
    x = F.normalize(upcast(x), dim=-1)
    return x @ F.normalize(upcast(bank.detach()).to(x.dtype), dim=-1).T / tau  # (B, K)


class NeighbourBank(nn.Module):
    """The relational loss's memory: the last K texts' embeddings by the student and by the teacher, row
    for row (two FIFO ``TeacherQueue`` of one length, so checkpoints carry them and a resumed run sees the
    same neighbours). The student's rows are its embeddings as they were when enqueued, detached: they
    lag the student by at most K / (texts per step) steps, which a small learning rate keeps close."""

    def __init__(self, student_dim: int, teacher_dim: int, size: int) -> None:
        super().__init__()
        self.student = TeacherQueue(student_dim, size)
        self.teacher = TeacherQueue(teacher_dim, size)

    def __len__(self) -> int:
        return len(self.student)

    @torch.no_grad()
    def enqueue(self, student: torch.Tensor, teacher: torch.Tensor) -> None:
        """student: (N, D_s), teacher: (N, D_t), the same N texts in the same order."""
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(f"NeighbourBank: {student.shape[0]} student rows against {teacher.shape[0]} teacher rows")
        self.student.enqueue(student.detach())
        self.teacher.enqueue(teacher.detach())

    def banks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(K', D_s), (K', D_t): the filled rows, aligned."""
        return self.student.negatives(), self.teacher.negatives()


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
