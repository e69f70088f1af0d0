"""DistributedDataParallel options for the job."""
from __future__ import annotations

from student_workers.train.job_config import JobConfig


def ddp_options(cfg: JobConfig) -> dict:
    """OPTIMA trains a different set of modules each round, so some heads get no gradient on some
    steps: DDP must search for unused parameters every step. Otherwise the set of used parameters
    is the same every step (a student's unused final norm or head stays unused), which
    ``static_graph`` learns once instead of traversing the graph every step."""
    if cfg.distill.optima.enabled:
        return {"find_unused_parameters": True}
    return {"static_graph": True}
