"""What a worker tells the user: progress lines and TensorBoard scalars of the averaged loss terms,
and Ray Train's own chatter turned down."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path


def say(line: str) -> None:
    """One progress line. Not print(): Ray Train patches print in workers to log AND echo it,
    which shows every line twice on the driver."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def quiet_ray_train() -> None:
    """Ray Train logs every report, checkpoint and DDP setup at INFO in the worker; the job's own
    progress lines are what a user reads. Ray Train V2 also logs "Reporting training result ..."
    for every report of every rank through a logger named after its file (not under "ray.train")."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train: its own logging settings apply
        return
    context.logger.setLevel(logging.WARNING)


class Progress:
    """The loss terms and throughput between two progress lines. Every term is averaged over the
    steps that computed it (per-module and full-model terms exist on some steps only under
    OPTIMA). Rank 0 prints the line and writes the TensorBoard scalars (``writer``)."""

    NOT_TERMS = ("step", "lr", "samples_per_s", "teacher_wait_s", "resumed_from", "teacher_targets_per_step",
                 "teacher_values_per_sample")

    def __init__(self, cfg, rank: int, world: int, start: int, tensorboard_dir: Path):
        self.cfg, self.rank, self.world, self.start = cfg, rank, world, start
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))
        self.last: dict = {}  # the metrics of the last line
        self.requested = {"steps": 0, "targets": 0, "values": 0}  # teacher targets since this start, per sample
        self._restart(0.0)

    def _restart(self, total_wait_s: float) -> None:
        self.t0, self.wait0, self.steps, self.sums, self.counts = time.perf_counter(), total_wait_s, 0, {}, {}
        self.rows = 0

    def add(self, total, terms: dict, targets=None, rows: int | None = None) -> None:
        """One step's loss, its terms and the teacher targets it used (``targets``: name -> (B, ...)); ``rows``:
        the samples the student saw (a pair item is two texts, a hard group 2g), ``data.batch_size`` if not given."""
        self.steps += 1
        self.rows += self.cfg.data.batch_size if rows is None else rows
        got = {f"{k}.{n}": t for k, v in (targets or {}).items()
               for n, t in (v.items() if isinstance(v, dict) else [("", v)])}  # several teachers: {teacher: targets}
        self.requested["steps"] += 1
        self.requested["targets"] += len(got)
        self.requested["values"] += sum(v[0].numel() for v in got.values() if v.dim() > 0 and len(v))
        for k, v in {"loss": total.detach(), **terms}.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def line(self, done: int, lr: float, total_wait_s: float) -> None:
        """Close the interval ending at step ``done``; ``total_wait_s``: the prefetcher's wait so far."""
        elapsed = time.perf_counter() - self.t0
        waited = total_wait_s - self.wait0
        metrics = {k: v / self.counts[k] for k, v in self.sums.items()}
        metrics.update(step=done, lr=lr, resumed_from=self.start,
                       samples_per_s=self.rows * self.world / elapsed,
                       teacher_wait_s=waited,
                       teacher_targets_per_step=self.requested["targets"] / self.requested["steps"],  # run average
                       teacher_values_per_sample=self.requested["values"] / self.requested["steps"])
        if self.rank == 0:
            self._show(metrics, done, waited / elapsed)
        self._restart(total_wait_s)
        self.last = metrics

    def _show(self, metrics: dict, done: int, wait_share: float) -> None:
        terms = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in self.NOT_TERMS)
        say(f"[{self.cfg.run.name}] step {done:5d}/{self.cfg.train.steps} {terms} | "
            f"{metrics['samples_per_s']:.0f} samples/s | teacher wait {wait_share:.0%} of step time")
        for k, v in metrics.items():
            if k != "step":
                self.writer.add_scalar(f"train/{k}", v, done)
        self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
