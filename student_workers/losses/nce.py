"""Token-wise NCE hidden-state loss with a teacher sample queue (DistillVLM, Fang et al. 2021).

docs/methods.md#token-wise-nce. The positive of a student token embedding (after the projection phi) is
the teacher embedding of the same token of the same sample; the negatives are K teacher token
embeddings kept in a FIFO queue (DistillVLM eq. 6, following CoDIR / MoCo / SEED). The teacher
is frozen, so the queued embeddings stay consistent without a momentum encoder.

Also the DistillVLM total losses (eq. 8 and 9).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


from ._reduce import masked_mean, masked_mean_pool, upcast


def token_nce(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queue: torch.Tensor,
    tau: float = 1.0,
    mask: torch.Tensor | None = None,
    mean_pooled: bool = False,
) -> torch.Tensor:
    """L_HID of DistillVLM eq. 6: InfoNCE with cosine similarities and a queue of negatives.

    For each student token h_s with teacher positive h_t and queue entries q_1..q_K:
        L = -log( e^{cos(h_s, h_t)/tau} / (e^{cos(h_s, h_t)/tau} + sum_k e^{cos(h_s, q_k)/tau}) )
    averaged over the real tokens of the batch.

    student: (B, T, D_t), already projected by phi (``Projection``); teacher: (B, T, D_t).
    queue: (K, D_t) negatives, e.g. ``TeacherQueue.negatives()``; K may be 0.
    mask: optional (B, T), 1 for real tokens.
    mean_pooled: CoDIR's variant (DistillVLM table 3, marked *): average the tokens of each
    sample first and compute one NCE term per sample; the queue should then hold pooled teacher
    embeddings too.
    """
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if student.shape != teacher.shape:
        raise ValueError(f"token_nce: student {tuple(student.shape)} vs teacher {tuple(teacher.shape)}")
    if queue.ndim != 2 or queue.shape[-1] != student.shape[-1]:
        raise ValueError(f"token_nce: queue must be (K, {student.shape[-1]}), got {tuple(queue.shape)}")
    s, t = upcast(student), upcast(teacher.detach())  # (B, T, D)
    if mean_pooled:
        s, t = masked_mean_pool(s, mask), masked_mean_pool(t, mask)  # (B, D)
        mask = None  # padding is already out of the pooled vectors
    s = F.normalize(s, dim=-1)
    t = F.normalize(t, dim=-1)
    q = F.normalize(upcast(queue.detach()).to(s.dtype), dim=-1)  # (K, D)
    pos = (s * t).sum(dim=-1, keepdim=True) / tau  # (B, T, 1) or (B, 1)
    neg = s @ q.transpose(0, 1) / tau  # (B, T, K) or (B, K)
    logits = torch.cat([pos, neg], dim=-1)  # (..., 1 + K)
    per_token = torch.logsumexp(logits, dim=-1) - pos.squeeze(-1)  # (B, T) or (B,)
    return masked_mean(per_token, mask)


class TeacherQueue(nn.Module):
    """FIFO of the K most recent teacher embeddings, the negatives of ``token_nce``.

    The state lives in registered buffers (``queue`` (K, D), ``ptr``, ``filled``), so it moves
    with ``.to(device)`` and is saved and restored with the student's state_dict: a resumed run
    sees the same negatives as an uninterrupted one. ``ptr`` is the slot written next, which,
    once the queue is full, holds the oldest entry.
    """

    queue: torch.Tensor
    ptr: torch.Tensor
    filled: torch.Tensor

    def __init__(self, dim: int, size: int = 4096, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if dim <= 0 or size <= 0:
            raise ValueError(f"TeacherQueue needs dim > 0 and size > 0, got dim={dim}, size={size}")
        self.register_buffer("queue", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.queue.shape[0]

    def __len__(self) -> int:
        return int(self.filled)

    @torch.no_grad()
    def enqueue(self, emb: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Append teacher embeddings, dropping the oldest once K are held.

        emb: (N, D), or (B, T, D) with an optional (B, T) mask selecting the real tokens.
        When more than K arrive at once only the last K are kept.
        """
        if emb.shape[-1] != self.queue.shape[-1]:
            raise ValueError(f"TeacherQueue holds dim {self.queue.shape[-1]}, got embeddings {tuple(emb.shape)}")
        flat = emb.detach().reshape(-1, emb.shape[-1])  # (N, D)
        if mask is not None:
            flat = flat[mask.reshape(-1).bool()]
        flat = flat.to(self.queue.dtype)
        n, k = flat.shape[0], self.size
        if n == 0:
            return
        if n >= k:
            self.queue.copy_(flat[-k:])
            self.ptr.zero_()
            self.filled.fill_(k)
            return
        slots = (int(self.ptr) + torch.arange(n, device=self.queue.device)) % k  # (N,)
        self.queue[slots] = flat
        self.ptr.fill_((int(self.ptr) + n) % k)
        self.filled.fill_(min(int(self.filled) + n, k))

    def negatives(self) -> torch.Tensor:
        """The filled part of the queue, (filled, D); zero rows never act as negatives.

        Until the queue first fills, writes start at slot 0 without wrapping, so the filled
        part is the prefix. Returned in storage order (the loss does not depend on the order).
        """
        return self.queue[: int(self.filled)]

    def ordered(self) -> torch.Tensor:
        """The held embeddings from oldest to newest, (filled, D) (for inspection and tests)."""
        if int(self.filled) < self.size:
            return self.queue[: int(self.filled)]
        return torch.roll(self.queue, shifts=-int(self.ptr), dims=0)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.queue.shape[-1]}"


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order (MoCo's concat_all_gather, for a different
    row count per rank: token-wise NCE enqueues only real tokens). rows: (N_r, D) -> (sum_r N_r, D).

    Under DDP each rank must enqueue the same rows: DDP copies rank 0's buffers to every rank before
    each forward, so a queue filled from the local shard alone would keep only rank 0's negatives.
    Without a process group it is the identity.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    world = dist.get_world_size()
    count = torch.tensor([rows.shape[0]], dtype=torch.long, device=rows.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    most = max(int(c) for c in counts)
    padded = rows.new_zeros(most, rows.shape[-1])  # (max N_r, D): all_gather needs equal shapes
    padded[: rows.shape[0]] = rows
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[: int(c)] for part, c in zip(parts, counts)])
