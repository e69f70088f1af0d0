"""The Ray Train worker loop: student, data shard, teacher client, prefetcher, losses, checkpoints.

Each worker trains data-parallel (DDP via ``ray.train.torch.prepare_model``), pulls its targets
from the shared teacher with K requests in flight, and reports metrics + a checkpoint every
``checkpoint_every`` steps (a report costs ~2 s of controller polling here: never every step).
A restarted worker group resumes from the latest checkpoint's step, not from 0.
"""
from __future__ import annotations

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
    """Which modules each step distills, and which steps request FULL-model targets (OPTIMA).

    Requests go out ``prefetch_depth`` steps ahead, so the spec of step s is chosen when step s is
    requested: the last ``measure`` steps of every round ask for all modules (the round's reward is
    measured on the full model there), every other step only for the arm being played. With
    ``measure >= prefetch_depth`` the first steps of a new round always hold a superset of their arm.
    """

    def __init__(self, distiller, scheduler, dtype: str, delta: int, measure: int, start: int):
        self.distiller, self.scheduler, self.dtype = distiller, scheduler, dtype
        self.delta, self.measure, self.next_step = delta, measure, start

    def is_measured(self, step: int) -> bool:
        return self.scheduler is not None and step % self.delta >= self.delta - self.measure

    def arm(self) -> tuple[str, ...] | None:
        return None if self.scheduler is None else tuple(self.scheduler.current_arm())

    def spec_for_next(self):
        step, self.next_step = self.next_step, self.next_step + 1
        arm = None if self.is_measured(step) else self.arm()
        return self.distiller.target_spec(self.dtype, arm)


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


def _image_size(info) -> tuple[int, int] | None:
    for i in info.inputs:
        if i.name == "pixel_values":
            return int(i.shape[2]), int(i.shape[3])
    return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

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
            scheduler.load_state_dict(state["optima"])
        start = state["step"]
    model = ray.train.torch.prepare_model(distiller, parallel_strategy_kwargs=ddp_options(cfg))
    device = ray.train.torch.get_device()

    writer = None
    run_dir = Path(config["run_dir"])
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))

    size = _image_size(info)
    source = batches(cfg, rank, world, epoch0=start)
    o = cfg.distill.optima
    plan = ArmPlan(distiller, scheduler, cfg.teacher.target_dtype, o.delta,
                   max(o.measure_steps, cfg.teacher.prefetch_depth), start)
    rounds_log = run_dir / "optima.jsonl"
    pre = Prefetcher(source, lambda b: (teacher_inputs(b, size), plan.spec_for_next()),
                     client if distiller.needs_teacher else NoTeacher(),
                     depth=cfg.teacher.prefetch_depth,
                     timeout=client.client.max_call_s() + 10, name=address)
    t_log, wait_log, n_log, sums = time.perf_counter(), 0.0, 0, {}
    last_metrics: dict = {}
    try:
        for step in range(start, cfg.train.steps):
            batch, targets = next(pre)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            inputs = {k: v.to(device) for k, v in student_inputs(batch).items()}
            total, terms = model(inputs, targets, batch_labels(batch), plan.arm())
            opt.zero_grad(set_to_none=True)
            total.backward()
            if cfg.train.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            if plan.is_measured(step):
                record = scheduler.step_end({k: float(terms[k]) if k in terms else 0.0
                                             for k in scheduler.loss_keys})
                if record and rank == 0:
                    log_round(rounds_log, record, done_step=step + 1)
            n_log += 1
            for k, v in {"loss": total.detach(), **terms}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            done = step + 1
            if done % cfg.train.log_every == 0 or done == cfg.train.steps:
                now = time.perf_counter()
                waited = pre.total_wait_s - wait_log
                metrics = {k: v / n_log for k, v in sums.items()}
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
                t_log, wait_log, n_log, sums = now, pre.total_wait_s, 0, {}
                last_metrics = metrics
            if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps:
                _report(ray.train, Checkpoint, distiller, opt, scheduler, done, info.fingerprint, rank,
                        {**last_metrics, "resumed_from": start})
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
    ``measure`` measured steps (see ArmPlan), so the scheduler's own round length is that."""
    o = cfg.distill.optima
    if not o.enabled:
        return None
    from student_workers.optima import OptimaScheduler

    keys = tuple(k for k, w in (("kd", cfg.distill.logits_weight), ("hid", cfg.distill.feature_weight),
                                ("attn", cfg.distill.attention_weight)) if w > 0)
    if not keys:
        raise ValueError("distill.optima needs at least one of logits_weight, feature_weight, attention_weight > 0")
    measure = max(o.measure_steps, cfg.teacher.prefetch_depth)
    if measure >= o.delta:
        raise ValueError(f"distill.optima.delta ({o.delta}) must exceed measure_steps/prefetch_depth ({measure})")
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


def _report(train, Checkpoint, distiller, opt, scheduler, step: int, fingerprint: str, rank: int,
            metrics: dict) -> None:
    """Every rank reports (Ray Train syncs on it); rank 0 attaches the checkpoint."""
    metrics = {**metrics, "step": step}
    if rank != 0:
        train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save({"distiller": distiller.state_dict(), "optimizer": opt.state_dict(), "step": step,
                    "fingerprint": fingerprint, "optima": scheduler.state_dict() if scheduler else None},
                   os.path.join(d, CKPT_FILE))
        train.report(metrics, checkpoint=Checkpoint.from_directory(d))
