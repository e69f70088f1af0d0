"""The Ray Train worker loop: student, data shard, teacher client, prefetcher, losses, checkpoints.

Each worker trains data-parallel (DDP via ``ray.train.torch.prepare_model``), pulls its targets
from the shared teacher with K requests in flight, and reports metrics + a checkpoint every
``checkpoint_every`` steps (a report costs ~2 s of controller polling here: never every step).
A restarted worker group resumes from the latest checkpoint's step, not from 0.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from student_workers.client import SyncTeacherClient
from student_workers.data import build_dataset, collate_text, shard
from student_workers.distiller import Distiller
from student_workers.faults import FaultDrill
from student_workers.job_config import JobConfig
from student_workers.prefetch import Prefetcher, align_images
from student_workers.students import build_student

CKPT_FILE = "state.pt"


def say(line: str) -> None:
    """One progress line. Not print(): Ray Train patches print in workers to log AND echo it,
    which shows every line twice on the driver."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def batches(cfg: JobConfig, rank: int, world: int, epoch0: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of this worker's shard, one epoch after another."""
    ds = shard(build_dataset(cfg.data.dataset, **cfg.data.kwargs), rank, world, even=True)
    collate = make_collate(cfg)
    epoch = epoch0
    while True:
        if hasattr(ds, "set_epoch"):
            ds.set_epoch(epoch)
        g = torch.Generator().manual_seed(cfg.train.seed * 1000 + epoch * 10 + rank)
        loader = DataLoader(ds, batch_size=cfg.data.batch_size, shuffle=True, generator=g, drop_last=True,
                            collate_fn=collate, num_workers=0)
        yield from loader
        epoch += 1


def make_collate(cfg: JobConfig):
    """Text datasets are tokenized with the TEACHER's tokenizer; image-caption datasets give both."""
    if cfg.data.dataset == "emoji":
        from student_workers.data_emoji import collate_image_text

        return collate_image_text(cfg.data.tokenizer, cfg.data.max_length)
    if cfg.student.kind == "hf_text":
        return collate_text(cfg.data.tokenizer, cfg.data.max_length)
    return None


def teacher_inputs(batch: dict, teacher_image_size: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """Exactly the view and tokens the student trains on (images resized to the teacher's size
    when they differ): DistillVLM's input alignment."""
    out = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
    if "pixel_values" in batch and teacher_image_size is not None:
        out["pixel_values"] = align_images(batch["pixel_values"], teacher_image_size)
    return out


def student_inputs(batch: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k in ("pixel_values", "input_ids", "attention_mask")}


def batch_labels(batch: dict) -> torch.Tensor | None:
    return batch.get("labels", batch.get("label"))


class ArmPlan:
    """Which modules each step distills, which steps measure, and what each step's request asks
    for (OPTIMA, methods.md section 7).

    A round is ``delta`` steps; its last ``measure`` steps are measurement steps, whose full-model
    losses (every module, whatever the arm) score the round. Requests leave ``depth`` steps ahead
    (the prefetch depth), so step ``t``'s request is built when only steps ``< t - depth`` have
    trained. The arm of a round is drawn after the round before it ends, which is too late for
    the first ``depth`` steps of the round: those, and the measurement steps, ask for every
    module's targets; every other step asks for exactly its arm's. The spec each step was
    requested for is remembered, and :meth:`step_args` refuses to train a step on targets made for
    another arm.
    """

    def __init__(self, distiller, scheduler, dtype: str, delta: int, measure: int, start: int, depth: int = 0):
        self.distiller, self.scheduler, self.dtype = distiller, scheduler, dtype
        self.delta, self.measure, self.next_step, self.depth = delta, measure, start, depth
        self.issued: dict[int, tuple[str, ...] | None] = {}  # step -> arm its request was made for (None: all)

    def is_measured(self, step: int) -> bool:
        return self.scheduler is not None and step % self.delta >= self.delta - self.measure

    def needs_full(self, step: int) -> bool:
        """Every module's targets: without OPTIMA, on measurement steps, and where the step's arm
        is not yet drawn when its request leaves."""
        return self.scheduler is None or self.is_measured(step) or step % self.delta < self.depth

    def arm(self) -> tuple[str, ...] | None:
        return None if self.scheduler is None else tuple(self.scheduler.current_arm())

    def spec_for_next(self):
        step, self.next_step = self.next_step, self.next_step + 1
        arm = None if self.needs_full(step) else self.arm()
        self.issued[step] = arm
        return self.distiller.target_spec(self.dtype, arm)

    def step_args(self, step: int) -> tuple[tuple[str, ...] | None, bool]:
        """(arm, measure) that ``step`` trains with; raises if its targets were requested for another arm."""
        arm = self.arm()
        if step in self.issued:
            made_for = self.issued.pop(step)
            if made_for is not None and made_for != arm:
                raise RuntimeError(f"step {step} trains arm {arm} but its targets were requested for arm {made_for}")
        return arm, self.is_measured(step)

    def end_step(self, step: int, terms: dict) -> dict | None:
        """After a measurement step: the job-wide (rank-mean) full-model losses go to the bandit;
        at a round's end rank 0's decision is broadcast. Returns the round record, if one closed."""
        if not self.is_measured(step):
            return None
        from student_workers.optima import broadcast_state, reduce_losses

        missing = [k for k in self.scheduler.loss_keys if k not in terms]
        if missing:
            raise ValueError(f"measurement step {step} lacks the full-model loss(es) {missing} (have {sorted(terms)})")
        record = self.scheduler.step_end(reduce_losses({k: float(terms[k]) for k in self.scheduler.loss_keys},
                                                       self.scheduler.loss_keys))
        if record is not None:
            broadcast_state(self.scheduler, src=0)
        return record


def teacher_client(cfg: JobConfig, address: str, experiment_id: str, **kwargs) -> SyncTeacherClient:
    """The job's client of the teacher: deadlines, retry budget, token and TLS from ``cfg.teacher``."""
    t = cfg.teacher
    opts = dict(experiment_id=experiment_id, timeout=t.timeout_s, retry_budget_s=t.retry_budget_s,
                auth_token_file=t.auth_token_file, tls_ca_file=t.tls_ca_file)
    return SyncTeacherClient(address, **{**opts, **kwargs})


def lr_at(step: int, cfg: JobConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    p = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def image_size(info) -> tuple[int, int] | None:
    for i in info.inputs:
        if i.name == "pixel_values":
            return int(i.shape[2]), int(i.shape[3])
    return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    # Ray Train logs every report, checkpoint and DDP setup at INFO in the worker; the job's own
    # progress lines are what a user reads.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cfg = JobConfig.model_validate(config["job"])
    address = config["address"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed)  # every rank builds the same initial student

    client = teacher_client(cfg, address, cfg.run.name)
    info = client.describe()
    distiller = Distiller(build_student(cfg.student), cfg.distill, info)
    opt = torch.optim.AdamW(distiller.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = make_scheduler(cfg, distiller)

    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=False)
        if state["fingerprint"] != info.fingerprint:
            raise RuntimeError(
                f"checkpoint was distilled from teacher {state['fingerprint']} but {address} serves "
                f"{info.fingerprint}: resume against the same teacher"
            )
        distiller.load_state_dict(state["distiller"])
        opt.load_state_dict(state["optimizer"])
        if scheduler is not None:
            own = Path(d) / optima_file(rank)
            scheduler.load_state_dict(torch.load(own, map_location="cpu", weights_only=False)
                                      if own.is_file() else state["optima"])
        start = state["step"]
    if scheduler is not None:
        from student_workers.optima import broadcast_state

        broadcast_state(scheduler, src=0)  # one bandit per job, whatever each rank restored
    model = ray.train.torch.prepare_model(distiller, parallel_strategy_kwargs=ddp_options(cfg))
    device = ray.train.torch.get_device()

    writer = None
    run_dir = Path(config["run_dir"])
    drill = FaultDrill.load(run_dir)  # tests only: see student_workers/faults.py
    if drill is not None and ckpt:
        drill.record("attempt", rank, start, distiller, scheduler)
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))

    size = image_size(info)
    source = batches(cfg, rank, world, epoch0=start)
    o = cfg.distill.optima
    plan = ArmPlan(distiller, scheduler, cfg.teacher.target_dtype, o.delta, o.measure_steps, start,
                   depth=cfg.teacher.prefetch_depth)
    rounds_log = run_dir / "optima.jsonl"
    pre = Prefetcher(source, lambda b: (teacher_inputs(b, size), plan.spec_for_next()),
                     client if distiller.needs_teacher else NoTeacher(),
                     depth=cfg.teacher.prefetch_depth,
                     timeout=client.client.max_call_s() + 10, name=address)
    t_log, wait_log, n_log, sums, counts = time.perf_counter(), 0.0, 0, {}, {}
    last_metrics: dict = {}
    try:
        for step in range(start, cfg.train.steps):
            if drill is not None:
                drill.maybe_fail(rank, step)
            batch, targets = next(pre)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            inputs = {k: v.to(device) for k, v in student_inputs(batch).items()}
            arm, measure = plan.step_args(step)
            total, terms = model(inputs, targets, batch_labels(batch), arm, measure=measure)
            opt.zero_grad(set_to_none=True)
            total.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            record = plan.end_step(step, terms)
            if record and rank == 0:
                log_round(rounds_log, record, done_step=step + 1)
                if record["reward"] is not None:
                    writer.add_scalar("optima/reward", record["reward"], step + 1)
                writer.add_scalar("optima/arm_index", record["arm_index"], step + 1)
            n_log += 1
            # Every term is logged, averaged over the steps that computed it (per-module and
            # full-model terms exist on some steps only under OPTIMA).
            for k, v in {"loss": total.detach(), **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
                counts[k] = counts.get(k, 0) + 1
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                now = time.perf_counter()
                waited = pre.total_wait_s - wait_log
                metrics = {k: v / counts[k] for k, v in sums.items()}
                metrics.update(step=done, lr=lr_at(step, cfg), resumed_from=start,
                               samples_per_s=n_log * cfg.data.batch_size * world / (now - t_log),
                               teacher_wait_s=waited)
                if rank == 0:
                    terms_s = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("step", "lr", "samples_per_s", "teacher_wait_s", "resumed_from"))
                    say(f"[{cfg.run.name}] step {done:5d}/{cfg.train.steps} {terms_s} | "
                        f"{metrics['samples_per_s']:.0f} samples/s | teacher wait {waited / (now - t_log):.0%} of step time")
                    for k, v in metrics.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, done)
                    writer.flush()
                t_log, wait_log, n_log, sums, counts = now, pre.total_wait_s, 0, {}, {}
                last_metrics = metrics
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                _report(ray.train, Checkpoint, distiller, opt, scheduler, done, info.fingerprint, rank,
                        {**last_metrics, "resumed_from": start})
        if scheduler is not None:
            write_optima_state(run_dir, rank, scheduler)
        if drill is not None:
            drill.record("final", rank, cfg.train.steps, distiller, scheduler)
    finally:
        pre.close()
        client.close()
        if writer:
            writer.close()


def ddp_options(cfg: JobConfig) -> dict:
    """OPTIMA trains a different set of modules each round, so some heads get no gradient on some
    steps: DDP must search for unused parameters every step. Otherwise the set of used parameters
    is the same every step (a student's unused final norm or head stays unused), which
    ``static_graph`` learns once instead of traversing the graph every step."""
    if cfg.distill.optima.enabled:
        return {"find_unused_parameters": True}
    return {"static_graph": True}


class NoTeacher:
    """Stands in for the client when the losses need no targets (the no-KD baseline)."""

    def submit(self, inputs, spec, *args):
        import concurrent.futures

        f = concurrent.futures.Future()
        f.set_result({})
        return f


def make_scheduler(cfg: JobConfig, distiller):
    """The OPTIMA bandit over the distilled modules, or None. One round closes after its
    ``measure_steps`` measured steps (see ArmPlan), so the scheduler's own round length is that."""
    o = cfg.distill.optima
    if not o.enabled:
        return None
    from student_workers.optima import OptimaScheduler

    keys = tuple(k for k, w in (("kd", cfg.distill.logits_weight), ("hid", cfg.distill.feature_weight),
                                ("attn", cfg.distill.attention_weight)) if w > 0)
    if not keys:
        raise ValueError("distill.optima needs at least one of logits_weight, feature_weight, attention_weight > 0")
    measure = o.measure_steps
    if measure >= o.delta:
        raise ValueError(f"distill.optima.delta ({o.delta}) must exceed measure_steps ({measure})")
    return OptimaScheduler(distiller.modules_list, delta=measure, gamma=o.gamma, warmup_rounds=o.warmup_rounds,
                           seed=o.seed, loss_keys=keys, variance_scale=o.variance_scale)


def log_round(path: Path, record: dict, done_step: int) -> None:
    """One JSON line per OPTIMA round (python -m student_workers.plot_optima reads it)."""
    from student_workers.optima import record_to_json

    rec = {**record, "step": done_step}
    with path.open("a") as f:
        f.write(record_to_json(rec) + "\n")
    say(f"[optima] round {rec['round']} arm {'+'.join(rec['arm'])} reward "
        f"{rec['reward'] if rec['reward'] is None else round(rec['reward'], 4)}")


def optima_file(rank: int) -> str:
    """Each rank's copy of the bandit state inside a checkpoint (Ray Train merges the ranks' files)."""
    return f"optima_rank{rank}.pt"


def write_optima_state(run_dir: Path, rank: int, scheduler) -> None:
    """``<run_dir>/optima_state_rank<r>.json``: this rank's bandit state at the end of training,
    to check that the ranks ran one bandit."""
    import json

    path = Path(run_dir) / f"optima_state_rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scheduler.summary(), sort_keys=True))


def _report(train, Checkpoint, distiller, opt, scheduler, step: int, fingerprint: str, rank: int,
            metrics: dict) -> None:
    """Every rank reports (Ray Train syncs on it). Rank 0 writes the model and optimizer; every
    rank writes its own bandit state (identical on all ranks), so each restores its own copy."""
    metrics = {**metrics, "step": step}
    if rank != 0 and scheduler is None:
        train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        if scheduler is not None:
            torch.save(scheduler.state_dict(), os.path.join(d, optima_file(rank)))
        if rank == 0:
            torch.save({"distiller": distiller.state_dict(), "optimizer": opt.state_dict(), "step": step,
                        "fingerprint": fingerprint, "optima": scheduler.state_dict() if scheduler else None},
                       os.path.join(d, CKPT_FILE))
        train.report(metrics, checkpoint=Checkpoint.from_directory(d))
