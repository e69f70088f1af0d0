"""The job's teacher, seen from a worker: the client from ``cfg.teacher``, the driver's token,
the teacher's image size, and ``NoTeacher`` for runs that need no targets."""
from __future__ import annotations

from student_workers.client.sync_client import SyncTeacherClient
from student_workers.train.job_config import JobConfig


def teacher_client(cfg: JobConfig, address: str, experiment_id: str, section=None, **kwargs) -> SyncTeacherClient:
    """The job's client of a teacher: deadlines, retry budget, token and TLS from its section
    (``section``, one of ``cfg.all_teachers()``; default ``cfg.teacher``)."""
    t = section or cfg.teacher
    opts = dict(experiment_id=experiment_id, timeout=t.timeout_s, retry_budget_s=t.retry_budget_s,
                auth_token_file=t.auth_token_file, tls_ca_file=t.tls_ca_file, direct=t.direct)
    return SyncTeacherClient(address, **{**opts, **kwargs})


def job_token(cfg: JobConfig, ref, section=None) -> dict:
    """The driver's token (``ray.put`` by kdjob.fit.fit; the config holds only the reference), as
    ``teacher_client`` keyword arguments. The teacher's ``auth_token_file``, when set, still wins."""
    if ref is None or (section or cfg.teacher).auth_token_file:
        return {}
    import ray

    return {"auth_token": ray.get(ref)}


def image_size(info) -> tuple[int, int] | None:
    for i in info.inputs:
        if i.name == "pixel_values":
            return int(i.shape[2]), int(i.shape[3])
    return None


class NoTeacher:
    """Stands in for the client when the losses need no targets (the no-KD baseline)."""

    def submit(self, inputs, spec, *args):
        import concurrent.futures

        f = concurrent.futures.Future()
        f.set_result({})
        return f


class Targets:
    """Where a worker's targets come from: the teacher's client, ``teacher.store``, or both.

    In store mode ``read`` no client is built: the teacher's Describe comes from the store's manifest.
    Build with ``Targets.open``, then ``source(...)`` gives the Prefetcher its ``Submitter``.
    """

    def __init__(self, cfg: JobConfig, info, client: SyncTeacherClient | None, name: str, section=None):
        self.cfg, self.info, self.client, self.name = cfg, info, client, name
        self.t = section or cfg.teacher  # this teacher's section (its address, prefetch, store)
        self.submitter = None  # StoreSubmitter when the job has a store
        self.views = None  # the store whose views the job trains on (read mode, augmented images)
        self.texts = False  # sent the raw texts (set by JobTeachers: its tokenizer is not data.tokenizer's)

    @classmethod
    def open(cls, cfg: JobConfig, address: str | None, auth_ref=None, section=None) -> "Targets":
        t = section or cfg.teacher
        if t.reads_store_only:
            from student_workers.train.store import info_from_manifest, read_manifest

            return cls(cfg, info_from_manifest(read_manifest(cfg, t), t.store), None, t.store, section)
        client = teacher_client(cfg, address, cfg.run.name, section, **job_token(cfg, auth_ref, section))
        return cls(cfg, client.describe(), client, address, section)

    def source(self, spec, needs_teacher: bool):
        """The Prefetcher's ``Submitter`` for requests of ``spec`` (the job's one spec with a store)."""
        if not needs_teacher:
            return NoTeacher()
        client = self.client
        if client is not None and (self.texts or self.cfg.data.teacher_text):
            from student_workers.train.text_in import TextTeacher

            client = TextTeacher(client)
        if self.t.store is None:
            return client
        from student_workers.train.batches import replays_views
        from student_workers.train.store import StoreSubmitter, open_job_store

        t = self.t
        store = open_job_store(self.cfg, self.info, spec, section=t)
        if t.store_mode == "read" and replays_views(self.cfg):  # the batches carry their targets
            from student_workers.train.stored_views import BatchTargets, check_views

            check_views(store, self.cfg.data.dataset)
            self.views = store
            return BatchTargets()
        self.submitter = StoreSubmitter(store, self.info.fingerprint, client, t.store_mode,
                                        threads=max(1, t.prefetch_depth), name=t.store)
        return self.submitter

    @property
    def timeout_s(self) -> float:
        """The longest the loop waits for one batch's targets."""
        call = self.client.client.max_call_s() if self.client is not None else self.t.timeout_s
        return call + 10

    def flush(self) -> None:
        """Commit what the store buffered (each rank its own content-named shards)."""
        if self.submitter is not None:
            self.submitter.flush()

    def close(self) -> None:
        try:
            if self.submitter is not None:
                self.submitter.close()
        finally:
            if self.client is not None:
                self.client.close()
