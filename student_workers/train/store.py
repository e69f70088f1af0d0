"""A job's target store (``teacher.store``; the format: docs/store.md).

``StoreSubmitter`` is what the ``Prefetcher`` submits to when the job has a store: it answers with the
same ``Future`` of targets as the teacher's client, read from the store ahead of the step loop, and in
``read_through`` / ``write`` mode asks the teacher for what the store lacks (or for everything) and
writes it back. Keys are ``sample_keys`` of the inputs exactly as the teacher gets them and of the
``TargetSpec`` the client sends, under the teacher's fingerprint.

A job in ``read`` mode never contacts a teacher: what it needs of one (modules and depths, inputs and
image size, the fingerprint its checkpoints carry) is the teacher's Describe that the store's manifest
keeps (``Manifest.teacher``), written by whoever filled the store.
"""
from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, Mapping

import torch
from google.protobuf.json_format import MessageToDict, ParseDict

from kdserve.store import Manifest, StoreError, TargetStore, spec_repr
from kdserve.store.location import MANIFEST, Location
from kdserve.v1 import teacher_pb2 as pb
from student_workers.train.text_in import keys_of, on_cpu, take_rows


class StoreKeyMissing(StoreError):
    """A job in read mode asked for a sample the store does not hold."""


def dataset_of(cfg) -> dict:
    """What the manifest records of the data the targets were computed for (never compared)."""
    d, t = cfg.data, cfg.train
    return {"dataset": d.dataset, "kwargs": d.kwargs, "tokenizer": d.tokenizer, "max_length": d.max_length,
            "batch_size": d.batch_size, "seed": t.seed, "num_workers": t.num_workers, "steps": t.steps}


def info_to_manifest(info: pb.TeacherInfo) -> dict:
    """The Describe a read-mode job needs, as JSON (without the replicas of the run that wrote it)."""
    info = pb.TeacherInfo.FromString(info.SerializeToString())
    del info.replica_endpoints[:]
    return MessageToDict(info, preserving_proto_field_name=True)


def info_from_manifest(manifest: Manifest, uri: str) -> pb.TeacherInfo:
    if not manifest.teacher:
        raise StoreError(f"store {uri} does not describe its teacher (no 'teacher' in its manifest): a job cannot read "
                         f"it without a teacher; fill it with kdserve-precompute or a read_through job")
    info = ParseDict(manifest.teacher, pb.TeacherInfo())
    if info.fingerprint != manifest.fingerprint:
        raise StoreError(f"store {uri}: its manifest's teacher {info.fingerprint} is not its fingerprint "
                         f"{manifest.fingerprint}")
    return info


def read_manifest(cfg, section=None) -> Manifest:
    """The manifest of ``teacher.store`` (or of ``section``'s, a teacher of several), ``StoreMissing`` if
    there is none, without listing its shards."""
    from kdserve.store import StoreMissing

    t = section or cfg.teacher
    loc = Location(t.store, t.store_options or None)
    try:
        data = loc.read(loc.path(MANIFEST))
    except FileNotFoundError:
        raise StoreMissing(f"no target store at {t.store} (no {MANIFEST}): fill it first (kdserve-precompute "
                           f"--config <job>, or store_mode read_through)") from None
    return Manifest.from_json(data, f"{t.store}/{MANIFEST}")


def open_job_store(cfg, info: pb.TeacherInfo, spec: pb.TargetSpec, mode: str | None = None, section=None,
                   **kwargs) -> TargetStore:
    """``teacher.store`` (or ``section``'s) opened for that teacher and spec (``StoreMismatch`` for another's)."""
    t = section or cfg.teacher
    mode = mode or t.store_mode
    manifest = Manifest(info.fingerprint, spec_repr(spec), dataset_of(cfg), teacher=info_to_manifest(info))
    return TargetStore.open(t.store, mode, manifest=manifest, storage_options=t.store_options or None,
                            max_bytes=t.store_max_bytes if mode == "read_through" else None, **kwargs)


def split_rows(targets: Mapping[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """A batch's targets (dim 0: the sample) as one dict per sample."""
    return [{name: t[i] for name, t in targets.items()} for i in range(n)]


def stack_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.stack([r[name] for r in rows]) for name in rows[0]} if rows else {}


class StoreSubmitter:
    """A ``Submitter`` answering from ``store``; ``teacher`` (a client's ``submit``) fills misses.

    ``mode``: ``read`` (a miss raises ``StoreKeyMissing`` naming the key), ``read_through`` (misses
    go to the teacher, then into the store), ``write`` (every batch from the teacher, all stored).
    Requests run on ``threads`` threads, so the Prefetcher's ``depth`` reads overlap the step loop.
    """

    def __init__(self, store: TargetStore, fingerprint: str, teacher: Any = None, mode: str = "read",
                 threads: int = 2, name: str | None = None):
        if mode != "read" and teacher is None:
            raise ValueError(f"store mode {mode!r} needs a teacher for what the store lacks")
        self.store, self.fingerprint, self.teacher, self.mode = store, fingerprint, teacher, mode
        self.name = name or store.uri
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, threads), thread_name_prefix="kdserve-store")
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def submit(self, inputs: Mapping[str, torch.Tensor], spec: pb.TargetSpec, *args: Any) -> concurrent.futures.Future:
        """The batch's targets, read (and keyed: ``keys_of``' sha256 per row) on this submitter's
        threads, off the caller's."""
        inputs = on_cpu(inputs)  # tensors, or {"texts": [...]} (data.teacher_text)
        return self._pool.submit(self._targets, inputs, spec)

    def _targets(self, inputs: dict[str, torch.Tensor], spec: pb.TargetSpec) -> dict[str, torch.Tensor]:
        keys = keys_of(inputs, spec_repr(spec), self.fingerprint)
        if self.mode == "write":
            todo = list(range(len(keys)))
        else:  # every key stored: one copy from the shards into the batch's tensors
            got = self.store.get_batch(keys)
            if isinstance(got, dict):
                with self._lock:
                    self.hits += len(keys)
                return got
            todo = got
        with self._lock:
            self.hits += len(keys) - len(todo)
            self.misses += len(todo)
        if self.mode == "read":
            raise StoreKeyMissing(f"target store {self.store.uri} has no targets for sample key {keys[todo[0]]} "
                                  f"({len(todo)} of this batch's {len(keys)} missing): precompute this job's targets "
                                  f"(kdserve-precompute --config <job>) or use teacher.store_mode read_through")
        sub = inputs if len(todo) == len(keys) else take_rows(inputs, todo)
        got = self.teacher.submit(sub, spec).result()
        fresh = split_rows(got, len(todo))
        self.store.put([keys[i] for i in todo], fresh)
        if len(todo) == len(keys):
            return dict(got)  # the teacher's own answer, as the client gave it
        rows = self.store.get(keys)  # the stored part (and the fresh rows, now in the buffer)
        for i, row in zip(todo, fresh):
            rows[i] = row
        return stack_rows(rows)

    def flush(self) -> None:
        if self.mode != "read":
            self.store.flush()

    def line(self) -> str:
        return f"store {self.hits} hits, {self.misses} misses"

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.flush()
