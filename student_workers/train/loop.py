"""The Ray Train worker loop: student, data shard, teacher client, prefetcher, losses, checkpoints.

Each worker trains data-parallel (DDP via ``ray.train.torch.prepare_model``), pulls its targets
from the shared teacher with K requests in flight, and reports metrics + a checkpoint every
``checkpoint_every`` steps (a report costs ~2 s of controller polling here: never every step).
A restarted worker group resumes from the latest checkpoint's step, not from 0. A teacher that is
gone (the client's retry budget spent) or changed ends the run once, through the driver's abort
signal (``student_workers.train.abort``): no restart waits out the budget again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from student_workers.losses.several import make_distiller
from student_workers.models.build import build_student
from student_workers.optima.distributed import broadcast_state
from student_workers.optima.factory import make_scheduler
from student_workers.optima.plan import ArmPlan
from student_workers.optima.rounds import log_round, round_scalars, write_optima_state
from student_workers.train.batches import batch_labels, student_inputs
from student_workers.train.checkpoint import restore, write_checkpoint
from student_workers.train.ddp import ddp_options
from student_workers.train.faults import FaultDrill
from student_workers.train.job_config import JobConfig
from student_workers.train.job_teachers import JobTeachers
from student_workers.train.lr import lr_at
from student_workers.train.progress import Progress, quiet_ray_train
from student_workers.train.run_dir import optima_log, tensorboard_dir


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One worker's run. With ``config["abort"]`` (the driver's AbortSignal), a teacher that is gone or
    changed is reported there and the worker waits to be stopped instead of raising."""
    from student_workers.train.abort import FATAL, already_set, stop_for_good

    quiet_ray_train()
    signal = config.get("abort")
    reason = already_set(signal)
    if reason:  # the run is being stopped: a group started meanwhile must not wait on the teacher again
        stop_for_good(signal, RuntimeError(reason))
    try:
        train(config)
    except FATAL as e:
        stop_for_good(signal, e)


@dataclass
class Worker:
    """One rank's share of the run: what every step uses."""

    cfg: JobConfig
    address: str
    rank: int
    world: int
    teachers: JobTeachers  # each teacher's client and/or the job's target store
    info: Any  # the default teacher's TeacherInfo (from the store's manifest in store mode read)
    distiller: Any  # Distiller, or MultiDistiller with several teachers
    opt: torch.optim.Optimizer
    scheduler: Any  # OptimaScheduler or None
    start: int = 0  # the step it starts (or resumes) at
    resumed: bool = False


def start_worker(config: dict[str, Any]) -> Worker:
    """The student, its optimizer and bandit, restored from the latest checkpoint if there is one."""
    import ray.train

    cfg = JobConfig.model_validate(config["job"])
    address = config["address"]
    ctx = ray.train.get_context()
    torch.manual_seed(cfg.train.seed)  # every rank builds the same initial student
    teachers = JobTeachers.open(cfg, address, config.get("addresses"), config.get("auth"))
    info = teachers.info
    distiller = make_distiller(build_student(cfg.student), cfg, teachers.infos(), teachers.texts())
    opt = torch.optim.AdamW(distiller.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    w = Worker(cfg, address, ctx.get_world_rank(), ctx.get_world_size(), teachers, info, distiller, opt,
               make_scheduler(cfg, distiller))
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        w.start = restore(ckpt, distiller, opt, w.scheduler, w.rank, teachers.fingerprint, teachers.address)
        w.resumed = True
    if w.scheduler is not None:
        broadcast_state(w.scheduler, src=0)  # one bandit per job, whatever each rank restored
    return w


def train_step(w: Worker, model, plan: ArmPlan, pre, step: int, device) -> tuple[torch.Tensor, dict, dict, int]:
    """One optimizer step on the next batch; (total loss, its terms, the teacher targets it used, its rows)."""
    batch, targets = next(pre)
    for g in w.opt.param_groups:
        g["lr"] = lr_at(step, w.cfg)
    inputs = {k: v.to(device) for k, v in student_inputs(batch).items()}
    arm, measure = plan.step_args(step)
    total, terms = model(inputs, targets, batch_labels(batch), arm, measure=measure)
    w.opt.zero_grad(set_to_none=True)
    total.backward()
    if w.cfg.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), w.cfg.train.grad_clip)
    w.opt.step()
    return total, terms, targets, len(next(iter(inputs.values())))


def train(config: dict[str, Any]) -> None:
    """Train this rank's steps from where the run stands; report, log and checkpoint on the way."""
    import ray.train.torch

    w = start_worker(config)
    cfg, run_dir = w.cfg, Path(config["run_dir"])
    model = ray.train.torch.prepare_model(w.distiller, parallel_strategy_kwargs=ddp_options(cfg))
    device = ray.train.torch.get_device()
    drill = FaultDrill.load(run_dir)  # tests only: see student_workers/train/faults.py
    if drill is not None and w.resumed:
        drill.record("attempt", w.rank, w.start, w.distiller, w.scheduler)
    o = cfg.distill.optima
    plan = ArmPlan(w.scheduler, o.delta, o.measure_steps, w.start, depth=cfg.teacher.most_in_flight())
    pre = w.teachers.prefetcher(w.distiller, plan, w.rank, w.world, w.start)
    progress = Progress(cfg, w.rank, w.world, w.start, tensorboard_dir(run_dir))
    try:
        for step in range(w.start, cfg.train.steps):
            if drill is not None:
                drill.maybe_fail(w.rank, step)
            total, terms, targets, rows = train_step(w, model, plan, pre, step, device)
            done = step + 1
            record = plan.end_step(step, terms)
            if record and w.rank == 0:
                log_round(optima_log(run_dir), record, done_step=done)
                round_scalars(progress.writer, record, done)
            progress.add(total, terms, targets, rows)
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                progress.line(done, lr_at(step, cfg), pre.total_wait_s)
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                w.teachers.flush()  # the store's shards before the checkpoint that counts on them
                write_checkpoint(w.distiller, w.opt, w.scheduler, done, w.teachers.fingerprint, w.rank,
                                 {**progress.last, "resumed_from": w.start})
        if w.scheduler is not None:
            write_optima_state(run_dir, w.rank, w.scheduler)
        if drill is not None:
            drill.record("final", w.rank, cfg.train.steps, w.distiller, w.scheduler)
    finally:
        pre.close()
        w.teachers.close()
        progress.close()
