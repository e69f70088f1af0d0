"""Fault drills for the Ray Train loop: make one rank die at a chosen step, once, and record
what every rank restored when the worker group comes back.

A drill is armed by a file in the run directory, ``<run_dir>/FAIL_AT_STEP``, holding
``rank:step`` or ``rank:step:raise``. A file and not an environment variable: Ray Train's
workers are spawned by the raylet with the environment it started with, not the driver's, so a
variable set next to ``fit()`` never reaches them; the run directory does (shared storage). The
named rank, on reaching ``step`` (before training it), writes ``FAIL_AT_STEP.fired`` and then
dies: ``os._exit(1)`` (a crashed worker process, the default) or a ``RuntimeError``
(``:raise``). The marker disarms the drill, so the retry that ``FailureConfig(max_failures)``
starts trains through.

While a drill file exists, every rank that restores a checkpoint writes
``<run_dir>/restored/attempt<a>_rank<r>.pt``: the step, the NCE queues and the OPTIMA bandit
summary exactly as the rank will train with them, to compare with the checkpoint it came from;
and ``final<a>_rank<r>.pt`` after its last step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from student_workers.train.run_dir import DRILL_FILE, FIRED_FILE, RESTORED_DIR


@dataclass(frozen=True)
class FaultDrill:
    rank: int
    step: int
    mode: str  # "exit" or "raise"
    run_dir: Path

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> "FaultDrill | None":
        """The run's drill, or None (no drill file). A malformed file is a ValueError."""
        path = Path(run_dir) / DRILL_FILE
        if not path.is_file():
            return None
        text = path.read_text().strip()
        parts = text.split(":")
        if len(parts) not in (2, 3) or not all(p.strip().isdigit() for p in parts[:2]) or (
                len(parts) == 3 and parts[2] not in ("exit", "raise")):
            raise ValueError(f"{path}: expected 'rank:step' or 'rank:step:exit|raise', got {text!r}")
        return cls(int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else "exit", Path(run_dir))

    @property
    def fired(self) -> bool:
        return (self.run_dir / FIRED_FILE).exists()

    def maybe_fail(self, rank: int, step: int) -> None:
        """Die here if this is the drill's rank and step and the drill has not fired yet."""
        if rank != self.rank or step != self.step or self.fired:
            return
        (self.run_dir / FIRED_FILE).write_text(f"rank {rank} step {step} pid {os.getpid()}\n")
        if self.mode == "raise":
            raise RuntimeError(f"fault drill: rank {rank} fails at step {step}")
        os._exit(1)  # a crashed worker: no exception, no cleanup

    def record(self, kind: str, rank: int, step: int, distiller, scheduler) -> Path:
        """Write this rank's NCE queues and bandit summary to ``<run_dir>/restored/<kind><a>_rank<r>.pt``
        (``kind``: "attempt" right after a restore, "final" after the last step; ``a`` counts
        this rank's earlier files of that kind)."""
        d = self.run_dir / RESTORED_DIR
        d.mkdir(parents=True, exist_ok=True)
        n = len(list(d.glob(f"{kind}*_rank{rank}.pt")))
        path = d / f"{kind}{n}_rank{rank}.pt"
        queues = {m: {k: v.detach().cpu().clone() for k, v in q.state_dict().items()}
                  for m, q in getattr(distiller, "queues", {}).items()}
        torch.save({"step": step, "queues": queues,
                    "optima": scheduler.summary() if scheduler is not None else None}, path)
        return path
