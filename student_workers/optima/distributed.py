"""One bandit per data-parallel job: losses reduced over ranks, state broadcast from one."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from student_workers.optima.reward import loss_value
from student_workers.optima.scheduler import OptimaScheduler


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_losses(losses: Mapping[str, Any], keys: Sequence[str]) -> dict[str, float]:
    """Mean of each of ``keys`` over the data-parallel ranks (identity without a process group).

    Each rank sees only its shard of the batch; the job's full-model loss, and so the reward
    every rank folds into its bandit, is the mean over ranks. Collective: every rank must call it
    on the same steps.
    """
    import torch.distributed as dist

    vals = [loss_value(losses, k, "step") for k in keys]
    if not _distributed():
        return dict(zip(keys, vals))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def broadcast_state(scheduler: "OptimaScheduler", src: int = 0) -> None:
    """Every rank adopts rank ``src``'s bandit state (means, counts, arm, RNG, history).

    With reduced losses and one seed the ranks already compute the same state; broadcasting makes
    rank ``src`` the one place the arm is decided, so the data-parallel gradients can never mix
    objectives (a float differing in the last bit would otherwise be enough to split the ranks).
    Collective; a no-op without a process group.
    """
    import torch.distributed as dist

    if not _distributed():
        return
    box = [scheduler.state_dict() if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    if dist.get_rank() != src:
        scheduler.load_state_dict(box[0])
