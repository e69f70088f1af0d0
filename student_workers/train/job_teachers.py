"""A worker's teachers: one ``Targets`` (client, fingerprint check) per teacher of the job, each
with its own ``Prefetcher`` over the same batches, and the checkpoint's record of them.

With one teacher everything is as it always was (one Prefetcher, a flat targets dict). With
several, the batches are shared (``itertools.tee``: each prefetcher pulls the same batch objects in
the same order, in the training thread) and a step gets ``{teacher: targets}``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from student_workers.client.prefetch import Prefetcher
from student_workers.train.batches import batches, teacher_inputs
from student_workers.train.job_config import JobConfig
from student_workers.train.stored_views import view_batches
from student_workers.train.several import data_tokenizer_fingerprint, sends_texts, translated_fingerprint, translates
from student_workers.train.teacher import Targets, image_size


@dataclass
class Link:
    """One teacher of the job, from a worker."""

    name: str
    section: Any  # its TeacherSection
    targets: Targets
    texts: bool  # sent the raw texts (its tokenizer is not data.tokenizer)
    translated: bool = False  # sent the student's tokens in its own ids (its tokenizer is data.teacher_tokenizer)


class JobTeachers:
    """The job's teachers (``cfg.all_teachers()``) as one worker talks to them."""

    def __init__(self, cfg: JobConfig, links: dict[str, Link]):
        self.cfg, self.links = cfg, links

    @classmethod
    def open(cls, cfg: JobConfig, address: str, addresses: dict[str, str] | None = None, auth_ref=None) -> "JobTeachers":
        """``address``: the default teacher's; ``addresses``: every teacher's by name (several teachers)."""
        addresses = addresses or {cfg.teacher_name: address}
        data_fp, tr_fp = data_tokenizer_fingerprint(cfg), translated_fingerprint(cfg)
        links = {}
        try:
            for name, section in cfg.all_teachers().items():
                t = Targets.open(cfg, addresses[name], auth_ref, section)
                texts = sends_texts(t.info, data_fp, tr_fp) or (cfg.data.teacher_text and name == cfg.teacher_name)
                links[name] = Link(name, section, t, texts, translates(t.info, data_fp, tr_fp))
        except BaseException:
            for link in links.values():
                link.targets.close()
            raise
        return cls(cfg, links)

    @property
    def several(self) -> bool:
        return len(self.links) > 1

    @property
    def default(self) -> Link:
        return self.links[self.cfg.teacher_name]

    @property
    def info(self):
        """The default teacher's TeacherInfo."""
        return self.default.targets.info

    def infos(self) -> dict:
        return {n: link.targets.info for n, link in self.links.items()}

    def texts(self) -> dict[str, bool]:
        return {n: link.texts for n, link in self.links.items()}

    @property
    def fingerprint(self) -> str:
        """What a checkpoint records and a resume compares: the teacher's, or every teacher's by name."""
        if not self.several:
            return self.info.fingerprint
        return ";".join(f"{n}={link.targets.info.fingerprint}" for n, link in self.links.items())

    @property
    def address(self) -> str:
        if not self.several:
            return self.default.targets.name
        return ", ".join(f"{n}={link.targets.name}" for n, link in self.links.items())

    def prefetcher(self, distiller, plan, rank: int, world: int, start: int):
        """The step's batches with their targets requested ahead, per teacher its own depth."""
        if not self.several:
            return self._one(self.default, None, distiller, plan, rank, world, start)
        keep_texts = any(link.texts for link in self.links.values())
        sources = itertools.tee(batches(self.cfg, rank, world, epoch0=start, keep_texts=keep_texts), len(self.links))
        return Prefetchers({n: self._one(link, src, distiller.heads[n], None, rank, world, start)
                            for (n, link), src in zip(self.links.items(), sources)})

    def _one(self, link: Link, data, distiller, plan, rank: int, world: int, start: int) -> Prefetcher:
        """One teacher's Prefetcher over ``data`` (None: this worker's own batches, or, in store mode
        read on augmented images, the stored views with their targets)."""
        t, size = link.section, image_size(link.targets.info)
        arm = (lambda: plan.arm_for_next()) if plan is not None else (lambda: None)
        spec = lambda: distiller.target_spec(t.target_dtype, None if link.texts else arm())  # noqa: E731
        link.targets.texts = link.texts
        client = link.targets.source(distiller.target_spec(t.target_dtype), distiller.needs_teacher)
        if link.targets.views is not None:  # the batches carry their stored targets
            data = view_batches(self.cfg, link.targets.views, size, rank, world, epoch0=start)
            make = lambda b: (b.pop("targets"), spec())  # noqa: E731
        else:
            if data is None:
                data = batches(self.cfg, rank, world, epoch0=start, keep_texts=link.texts)
            make = lambda b: (teacher_inputs(b, size, texts=link.texts, translated=link.translated), spec())  # noqa: E731
        return Prefetcher(data, make, client, depth=t.prefetch_depth, max_depth=t.prefetch_max_depth,
                          timeout=link.targets.timeout_s, name=link.name if self.several else link.targets.name)

    def flush(self) -> None:
        for link in self.links.values():
            link.targets.flush()

    def close(self) -> None:
        for link in self.links.values():
            link.targets.close()


class Prefetchers:
    """Several teachers' Prefetchers over one stream of batches: ``(batch, {teacher: targets})``."""

    def __init__(self, prefetchers: dict[str, Prefetcher]):
        self.prefetchers = prefetchers

    def __iter__(self) -> "Prefetchers":
        return self

    def __next__(self):
        batch, targets = None, {}
        for name, p in self.prefetchers.items():
            b, targets[name] = next(p)
            if batch is not None and b is not batch:  # tee hands every prefetcher the same objects
                raise RuntimeError(f"teacher {name}'s prefetcher is at another batch than the others")
            batch = b
        return batch, targets

    @property
    def total_wait_s(self) -> float:
        return sum(p.total_wait_s for p in self.prefetchers.values())

    def close(self) -> None:
        for p in self.prefetchers.values():
            p.close()
