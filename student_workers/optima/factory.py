"""The job's OPTIMA scheduler, built from ``distill.optima``."""
from __future__ import annotations

from student_workers.optima.scheduler import OptimaScheduler
from student_workers.train.job_config import JobConfig


def make_scheduler(cfg: JobConfig, distiller) -> OptimaScheduler | None:
    """The OPTIMA bandit over the distilled modules, or None. Only a round's last ``measure_steps``
    steps report to it (see ArmPlan), so its round closes after ``reports_per_round = measure_steps``
    reports; ``distill.optima.delta`` is the round's length in training steps."""
    o = cfg.distill.optima
    if not o.enabled:
        return None
    keys = tuple(k for k, w in (("kd", cfg.distill.logits_weight), ("hid", cfg.distill.feature_weight),
                                ("attn", cfg.distill.attention_weight)) if w > 0)
    if not keys:
        raise ValueError("distill.optima needs at least one of logits_weight, feature_weight, attention_weight > 0")
    if o.measure_steps >= o.delta:
        raise ValueError(f"distill.optima.delta ({o.delta}) must exceed measure_steps ({o.measure_steps})")
    return OptimaScheduler(distiller.modules_list, reports_per_round=o.measure_steps, gamma=o.gamma,
                           warmup_rounds=o.warmup_rounds, seed=o.seed, loss_keys=keys, variance_scale=o.variance_scale)
