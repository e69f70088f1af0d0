"""What a client counts about its teacher, and the reply size it expects before asking."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from kdserve import limits, wire
from kdserve.v1 import teacher_pb2 as pb


@dataclass
class ClientStats:
    """Counters for the progress line: how much the run depends on (and waits for) the teacher."""

    requests: int = 0  # target requests answered
    samples: int = 0
    bytes_received: int = 0  # tensor payload (data + scales)
    wait_s: float = 0.0  # wall time inside get_targets, retries and backoff included
    retries: int = 0
    streamed: int = 0  # requests answered with StreamTargets
    chunks: int = 0
    teacher_queue_ms: float = 0.0  # as reported by the teacher (Timings)
    teacher_compute_ms: float = 0.0

    def line(self) -> str:
        mb = self.bytes_received / 2**20
        per = self.wait_s / self.requests if self.requests else 0.0
        return (f"teacher: {self.requests} req, {mb:.1f} MiB, wait {self.wait_s:.2f} s "
                f"({per * 1e3:.1f} ms/req), {self.retries} retries")


def estimate_reply_bytes(info: pb.TeacherInfo, inputs: Mapping[str, torch.Tensor], spec: pb.TargetSpec,
                         texts: Sequence = ()) -> int:
    """Bytes of the targets ``spec`` asks for, from Describe alone (the teacher's own formula,
    kdserve.limits). Used to pick StreamTargets before a unary reply would exceed ``max_reply_bytes``.
    ``texts``: raw texts instead of inputs, counted at the teacher's max_tokens each (an upper bound:
    the teacher pads them to the longest)."""
    if texts:
        return limits.estimate_reply_bytes(info, len(texts), info.tokenizer.max_tokens, spec)
    ids = inputs.get("input_ids")
    seq = int(ids.shape[1]) if ids is not None and ids.dim() > 1 else 0
    return limits.estimate_reply_bytes(info, wire.batch_size(inputs), seq, spec)
