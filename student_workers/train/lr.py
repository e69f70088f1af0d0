"""The learning-rate schedule."""
from __future__ import annotations

import math

from student_workers.train.job_config import JobConfig


def lr_at(step: int, cfg: JobConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    p = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))
