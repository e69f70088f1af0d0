"""Checkpoints a worker writes through ``ray.train.report``, and reads back on a restart."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from student_workers.train.run_dir import CKPT_FILE, optima_checkpoint_file


def restore(ckpt, distiller, opt, scheduler, rank: int, fingerprint: str, address: str) -> int:
    """Load a Ray Train checkpoint into the distiller, optimizer and bandit; returns its step.

    Refuses a checkpoint distilled from another teacher. Each rank restores its own copy of the
    bandit state (the checkpoint's shared one when the rank's file is missing)."""
    with ckpt.as_directory() as d:
        state = torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=False)
        if state["fingerprint"] != fingerprint:
            raise RuntimeError(
                f"checkpoint was distilled from teacher {state['fingerprint']} but {address} serves "
                f"{fingerprint}: resume against the same teacher"
            )
        distiller.load_state_dict(state["distiller"])
        opt.load_state_dict(state["optimizer"])
        if scheduler is not None:
            own = Path(d) / optima_checkpoint_file(rank)
            scheduler.load_state_dict(torch.load(own, map_location="cpu", weights_only=False)
                                      if own.is_file() else state["optima"])
    return state["step"]


def write_checkpoint(distiller, opt, scheduler, step: int, fingerprint: str, rank: int, metrics: dict) -> None:
    """Every rank reports (Ray Train syncs on it). Rank 0 writes the model and optimizer; every
    rank writes its own bandit state (identical on all ranks), so each restores its own copy."""
    import ray.train

    metrics = {**metrics, "step": step}
    if rank != 0 and scheduler is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if scheduler is not None:
            torch.save(scheduler.state_dict(), Path(d) / optima_checkpoint_file(rank))
        if rank == 0:
            torch.save({"distiller": distiller.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "fingerprint": fingerprint, "optima": scheduler.state_dict() if scheduler else None},
                       Path(d) / CKPT_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
