"""Fill a job's target store before the job: ``kdserve-precompute --config job.yaml``.

    kdserve-precompute --config configs/quickstart_store.yaml            # what that job will request
    kdserve-precompute --config job.yaml --epochs 3                        # 3 whole passes instead
    python -m kdjob.precompute --config job.yaml --set teacher.store=s3://bucket/targets

Requests exactly what the job's workers will: each of ``train.num_workers`` ranks' batches (the same
seed, data order, sharding and views: ``student_workers.train.batches``) for ``train.steps`` steps
(``--epochs N``: N passes over each rank's shard), under the job's target spec. The teacher runs at
its best batch (``max_batch_size``, or ``--batch``), rows of several requests in one forward: in this
process (``teacher.local``, its ``TeacherEngine``) when ``teacher.address`` is empty, else through
that served teacher. Keys the store holds already are skipped, so an interrupted run resumes where
it stopped (the store commits a shard every ``--shard-mb``), and a sample seen in several epochs is
computed once. The store's manifest keeps the teacher's Describe: a job in store mode ``read`` needs
nothing else of the teacher. A job with several teachers fills one teacher's store per call
(``--teacher mpnet``: ``teachers.mpnet.store``, with what the job asks mpnet for).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import sys
from collections import deque
from typing import Callable, Iterator

import torch

from kdserve.errors import one_line

Run = Callable[[dict], "concurrent.futures.Future[dict]"]  # a batch's inputs -> Future of its targets


def requests(cfg, info, epochs: int | None = None) -> Iterator[dict[str, torch.Tensor] | tuple[dict, dict]]:
    """The teacher inputs of every request the job's workers send, rank after rank, step after step.
    For augmented image data (``replays_views``) each is ``(inputs, {"view.params": (B, 7)})``: the
    views' params, stored beside their targets so that a read-mode job can replay the views."""
    from student_workers.data.build import build_dataset
    from student_workers.data.shard import shard
    from student_workers.data.views import VIEW_PARAMS
    from student_workers.train.batches import batches, replays_views, teacher_inputs
    from student_workers.train.teacher import image_size

    world, size, views = cfg.train.num_workers, image_size(info), replays_views(cfg)
    for rank in range(world):
        steps = cfg.train.steps
        if epochs is not None:
            n = len(shard(build_dataset(cfg.data.dataset, **cfg.data.kwargs), rank, world, even=True))
            steps = epochs * (n // cfg.data.batch_size)
        it = batches(cfg, rank, world, record_views=views)
        for _ in range(steps):
            b = next(it)
            yield (teacher_inputs(b, size), {VIEW_PARAMS: b[VIEW_PARAMS]}) if views else teacher_inputs(b, size)


def in_process_teacher(cfg, threads: int = 1) -> tuple[object, Callable[[object], Run]]:
    """(TeacherInfo, spec -> run) of ``teacher.local`` loaded here; ``run`` calls its engine on a
    thread, so the store's writes overlap the next forward. Targets as a client would decode them."""
    from kdserve import codec
    from teacher_server.engine import Quantized, TeacherEngine, Work
    from teacher_server.service import TeacherService
    from teacher_server.spec import resolve_spec

    engine = TeacherEngine.from_config(cfg.teacher.local)
    service = TeacherService(engine, cfg.teacher.local)
    info = service.describe()
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kdserve-precompute")

    def forward(inputs: dict, spec) -> dict:
        if "texts" in inputs:  # data.teacher_text: tokenized as the served teacher would (teacher_server.texts)
            inputs = {k: torch.from_numpy(v) for k, v in service.texts.tokenize(list(inputs["texts"])).items()}
        (out,), _ = engine.run([Work(inputs, spec)])
        return {k: codec.decode(codec.encode(v.q, v.scales)) if isinstance(v, Quantized) else v for k, v in out.items()}

    def for_spec(spec_pb) -> Run:
        spec = resolve_spec(spec_pb, engine.modules, engine.num_classes)
        return lambda inputs: pool.submit(forward, inputs, spec)

    return info, for_spec


def served_teacher(cfg) -> tuple[object, Callable[[object], Run]]:
    """(TeacherInfo, spec -> run) of the teacher at ``teacher.address``."""
    from student_workers.train.teacher import teacher_client

    from student_workers.train.text_in import TextTeacher

    client = teacher_client(cfg, cfg.teacher.address, f"{cfg.run.name}-precompute")
    teacher = TextTeacher(client)  # a {"texts": [...]} batch goes as raw texts
    return client.describe(), lambda spec: (lambda inputs: teacher.submit(inputs, spec))


class Pending:
    """Rows waiting for a forward, by input shapes (rows stack only with their own kind; texts all together:
    the teacher pads them)."""

    def __init__(self):
        self.groups: dict[tuple, tuple[list[str], list[dict]]] = {}
        self.extras: dict[str, dict[str, torch.Tensor]] = {}  # key -> what is stored beside its targets

    def add(self, key: str, row: dict, extra: dict[str, torch.Tensor] | None = None) -> tuple:
        sig = ("texts",) if "texts" in row else tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(row.items()))
        keys, rows = self.groups.setdefault(sig, ([], []))
        keys.append(key)
        rows.append(row)
        if extra:
            self.extras[key] = extra
        return sig

    def stored_rows(self, keys: list[str], targets: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """A forward's targets split into rows, each with its extras (e.g. its view's params)."""
        from student_workers.train.store import split_rows

        return [{**row, **self.extras.pop(k, {})} for k, row in zip(keys, split_rows(targets, len(keys)))]

    def take(self, sig: tuple) -> tuple[list[str], dict[str, torch.Tensor]]:
        from student_workers.train.text_in import stack_inputs

        keys, rows = self.groups.pop(sig)
        return keys, stack_inputs(rows)

    def __len__(self) -> int:
        return sum(len(k) for k, _ in self.groups.values())


def fill(store, run: Run, spec, fingerprint: str, reqs, batch: int, depth: int = 2, bar=None) -> dict:
    """Compute every row of ``reqs`` the store lacks, ``batch`` rows per forward, ``depth`` forwards
    in flight; put each answer into the store. A request is its inputs (tensors, or texts), or
    ``(inputs, extras)``: ``extras[name][i]`` is stored beside row i's targets. Returns counts
    (samples seen, computed, skipped)."""
    from kdserve.store import spec_repr
    from student_workers.train.text_in import keys_of, row_of

    text, pending, queued = spec_repr(spec), Pending(), set()
    inflight: deque = deque()
    counts = {"samples": 0, "computed": 0, "stored_before": 0}

    def drain(n: int) -> None:
        while len(inflight) > n:
            keys, fut = inflight.popleft()
            store.put(keys, pending.stored_rows(keys, fut.result()))
            counts["computed"] += len(keys)
            if bar is not None:
                bar.update(len(keys))

    def launch(sig: tuple) -> None:
        keys, inputs = pending.take(sig)
        inflight.append((keys, run(inputs)))
        drain(depth)

    for inputs in reqs:
        inputs, extras = inputs if isinstance(inputs, tuple) else (inputs, {})
        keys = keys_of(inputs, text, fingerprint)
        counts["samples"] += len(keys)
        todo = set(store.missing(keys)) - queued
        skipped = 0
        for i, k in enumerate(keys):
            if k not in todo:
                skipped += 1
                continue
            todo.discard(k)  # a key twice in one batch: once
            queued.add(k)
            sig = pending.add(k, row_of(inputs, i), {n: t[i] for n, t in extras.items()})
            if len(pending.groups[sig][0]) >= batch:
                launch(sig)
        counts["stored_before"] += skipped
        if bar is not None and skipped:
            bar.update(skipped)
    for sig in list(pending.groups):
        launch(sig)
    drain(0)
    store.flush()
    return counts


def progress(total: int, quiet: bool = False):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the venv
        return None
    return tqdm(total=total, unit="sample", desc="precompute", disable=quiet, mininterval=1.0)


def precompute(cfg, epochs: int | None = None, batch: int | None = None, shard_mb: float = 64,
               quiet: bool = False, teacher: str | None = None) -> dict:
    """Fill ``cfg.teacher.store`` with the targets of the job ``cfg`` (see the module docstring). A job
    with several teachers fills the store of ``teacher`` (default: ``teacher:``'s), with what the job
    asks that teacher for (``kdjob.several.one_teacher``)."""
    from kdserve.config import ConfigError
    from kdjob.several import one_teacher
    from student_workers.train.check import check_student_side
    from student_workers.train.store import open_job_store

    if teacher is not None or cfg.teachers:
        cfg = one_teacher(cfg, teacher or cfg.teacher_name)
    if not cfg.teacher.store:
        raise ConfigError("teacher.store: precompute fills a target store: name its URI (--set teacher.store=DIR)")
    info, for_spec = served_teacher(cfg) if cfg.teacher.address else in_process_teacher(cfg)
    spec = check_student_side(cfg, info).target_spec(cfg.teacher.target_dtype)
    store = open_job_store(cfg, info, spec, mode="write", shard_bytes=max(1, int(shard_mb * (1 << 20))))
    per_rank = cfg.train.steps if epochs is None else None
    total = per_rank * cfg.train.num_workers * cfg.data.batch_size if per_rank else None
    bar = progress(total, quiet)
    try:
        counts = fill(store, for_spec(spec), spec, info.fingerprint, requests(cfg, info, epochs),
                      batch or info.max_batch_size or 64, bar=bar)
    finally:
        if bar is not None:
            bar.close()
    return {**counts, "keys_in_store": len(store), "store": store.uri, "fingerprint": info.fingerprint}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kdserve-precompute", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the job's YAML (its teacher.store is filled)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. teacher.store=DIR")
    p.add_argument("--epochs", type=int, default=None, help="N whole passes over each rank's shard instead of train.steps")
    p.add_argument("--batch", type=int, default=None, help="samples per forward (default: the teacher's max_batch_size)")
    p.add_argument("--shard-mb", type=float, default=64, help="commit a shard every this many MB (what a kill loses)")
    p.add_argument("--teacher", default=None, help="a job with several teachers: whose store to fill (a name in "
                   "teachers:, or teacher:'s; default teacher:'s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from kdserve.config import ConfigError, load
    from kdserve.store import StoreError
    from student_workers.train.job_config import JobConfig

    args = parse_args(argv)
    try:
        if args.epochs is not None and args.epochs < 1:
            raise ConfigError("--epochs: at least 1")
        cfg = load(JobConfig, args.config, args.set)
        out = precompute(cfg, args.epochs, args.batch, args.shard_mb, args.quiet, args.teacher)
    except (ConfigError, StoreError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the served teacher is not reachable
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"precomputed {out['computed']} targets ({out['stored_before']} of {out['samples']} requested samples were "
          f"stored already or repeated); {out['keys_in_store']} keys in {out['store']} (teacher {out['fingerprint']})")
    return 0


def cli() -> None:
    """Console entry point ``kdserve-precompute``."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
