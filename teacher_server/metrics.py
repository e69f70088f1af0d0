"""Prometheus metrics of the teacher, per experiment.

Inside Ray Serve they go through ``ray.serve.metrics`` (scraped from Ray's metrics endpoint,
with the deployment and replica tags Serve adds); elsewhere through ``prometheus_client``.
samples/s and MB/s are ``rate()`` of the counters.

Series stay bounded: experiment ids are sanitized (at most 64 characters of [A-Za-z0-9_.-]) and
only the first ``MAX_EXPERIMENTS`` distinct ids get their own label; later ones share "other"
(a Prometheus series cannot be relabelled once it exists, so "top N" means first N seen).
"""
from __future__ import annotations

import re
import threading

from teacher_server.spec import MAX_EXPERIMENT_CHARS

MAX_EXPERIMENTS = 32
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def sanitize(experiment: str) -> str:
    return _BAD_CHARS.sub("_", experiment or "default")[:64]


class ExperimentLabels:
    """Experiment id -> metric label: sanitized, at most ``cap`` distinct labels, the rest "other"."""

    def __init__(self, cap: int = MAX_EXPERIMENTS):
        self.cap = cap
        self._known: set[str] = set()
        self._seen: dict[str, str] = {}  # raw id -> its label
        self._lock = threading.Lock()

    def __call__(self, experiment: str) -> str:
        if len(experiment) > MAX_EXPERIMENT_CHARS:  # refused anyway; never kept (a client may send megabytes)
            return "invalid"
        label = self._seen.get(experiment)  # every request asks: no regex, no lock for a known id
        if label is not None:
            return label
        label = self._label(experiment)
        if len(self._seen) >= 4 * self.cap:
            self._seen.clear()  # ids beyond the cap keep coming: bounded memory, not a growing map
        self._seen[experiment] = label
        return label

    def _label(self, experiment: str) -> str:
        label = sanitize(experiment)
        with self._lock:
            if label in self._known:
                return label
            if len(self._known) < self.cap:
                self._known.add(label)
                return label
        return "other"

_BUCKETS_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
_BUCKETS_BATCH = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class TeacherMetrics:
    def __init__(self, backend: str = "ray"):
        self.backend = backend
        if backend == "ray":
            from ray.serve import metrics as m

            def counter(name, doc, tags):
                return m.Counter(name, description=doc, tag_keys=tags)

            def hist(name, doc, buckets, tags):
                return m.Histogram(name, description=doc, boundaries=buckets, tag_keys=tags)

            def gauge(name, doc, tags):
                return m.Gauge(name, description=doc, tag_keys=tags)

        else:
            import prometheus_client as m

            def counter(name, doc, tags):
                return _PromAdapter(m.Counter(name, doc, list(tags)))

            def hist(name, doc, buckets, tags):
                return _PromAdapter(m.Histogram(name, doc, list(tags), buckets=buckets))

            def gauge(name, doc, tags):
                return _PromAdapter(m.Gauge(name, doc, list(tags)))

        exp = ("experiment",)
        self.requests = counter("kdserve_teacher_requests", "Target requests answered.", exp)
        self.samples = counter("kdserve_teacher_samples", "Samples answered.", exp)
        self.bytes_out = counter("kdserve_teacher_reply_bytes", "Target bytes sent.", exp)
        self.errors = counter("kdserve_teacher_errors", "Requests refused, by gRPC status.", ("experiment", "code"))
        self.malformed_requests = counter("kdserve_teacher_malformed_requests",
                                          "Requests whose bytes did not parse (also in errors).", ("message",))
        self.queue_ms = hist("kdserve_teacher_queue_wait_ms", "Wait for a batch to start.", _BUCKETS_MS, exp)
        self.compute_ms = hist("kdserve_teacher_compute_ms", "Forward + reductions per batch.", _BUCKETS_MS, ())
        self.batch_samples = hist("kdserve_teacher_batch_samples", "Samples per server batch.", _BUCKETS_BATCH, ())
        self.batch_requests = hist("kdserve_teacher_batch_requests", "Requests per server batch.", _BUCKETS_BATCH, ())
        self.forward_samples = hist("kdserve_teacher_forward_samples", "Samples per model forward.", _BUCKETS_BATCH, ())
        self.padding = hist("kdserve_teacher_padding_fraction", "Padded share of the token slots of a batch.",  # Ray wants boundaries > 0
                            [0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9], ())
        self.served_samples = counter("kdserve_teacher_served_samples",
                                      "Samples sent to a forward, by experiment (what the scheduler shares).", exp)
        self.queue_len = gauge("kdserve_teacher_queue_requests", "Requests waiting for a forward.", exp)
        self.cache_events = counter("kdserve_teacher_cache_events", "Target cache hits, misses, evictions.", ("event",))
        self.cache_size = gauge("kdserve_teacher_cache_bytes", "Bytes held by the target cache.", ())
        self.store_events = counter(
            "kdserve_teacher_store_events", "Target store: samples answered from it (hit) or forwarded after asking it "
            "(miss), rows written back (write) or dropped (drop: write queue full), failed store calls (error).",
            ("event",))
        self.labels = ExperimentLabels()

    def answered(self, experiment: str, samples: int, nbytes: int, queue_ms: float) -> None:
        """Once per request (a stream counts once, with all its samples and bytes)."""
        tags = {"experiment": self.labels(experiment)}
        self.requests.inc(1, tags=tags)
        if samples > 0:  # ray's counters refuse 0
            self.samples.inc(samples, tags=tags)
        if nbytes > 0:
            self.bytes_out.inc(nbytes, tags=tags)
        self.queue_ms.observe(queue_ms, tags=tags)

    def batch(self, requests: int, samples: int, compute_ms: float, stats=None) -> None:
        self.compute_ms.observe(compute_ms)
        self.batch_samples.observe(samples)
        self.batch_requests.observe(requests)
        if stats is not None:
            for n in stats.forward_samples:
                self.forward_samples.observe(n)
            if stats.forwards:
                self.padding.observe(stats.padding_fraction)

    def batch_stats(self, stats) -> None:
        """The Coalescer's ``on_batch``."""
        self.batch(stats.requests, stats.samples, stats.compute_ms, stats)

    def refused(self, experiment: str, code: str) -> None:
        self.errors.inc(1, tags={"experiment": self.labels(experiment), "code": code})

    def malformed(self, kind: str) -> None:
        """A request that did not parse as ``kind`` (a message name): refused INVALID_ARGUMENT."""
        self.malformed_requests.inc(1, tags={"message": kind})
        self.refused("", "INVALID_ARGUMENT")

    # -- the Coalescer's hooks ---------------------------------------------------------------
    def served(self, experiment: str, samples: int) -> None:
        if samples > 0:
            self.served_samples.inc(samples, tags={"experiment": self.labels(experiment)})

    def queued(self, lengths: dict[str, int]) -> None:
        per_label: dict[str, int] = {}
        for exp, n in lengths.items():
            label = self.labels(exp)
            per_label[label] = per_label.get(label, 0) + n
        for label, n in per_label.items():
            self.queue_len.set(n, tags={"experiment": label})

    def cache_event(self, kind: str, n: int = 1) -> None:
        """The TargetCache's ``on_event``: "hit"/"miss"/"eviction" counts, "bytes" its size."""
        if kind == "bytes":
            self.cache_size.set(n)
        elif n > 0:
            self.cache_events.inc(n, tags={"event": kind})

    def store_event(self, kind: str, n: int = 1) -> None:
        """The target store's ``on_event`` (teacher_server.target_store)."""
        if n > 0:
            self.store_events.inc(n, tags={"event": kind})


_SHARED: dict[str, TeacherMetrics] = {}


def get_metrics(backend: str = "ray") -> TeacherMetrics:
    """One set of metrics per process and backend (a name can be registered only once)."""
    if backend not in _SHARED:
        _SHARED[backend] = TeacherMetrics(backend)
    return _SHARED[backend]


class _PromAdapter:
    """ray.serve.metrics' call style (``inc(v, tags=...)``) over a prometheus_client metric."""

    def __init__(self, metric):
        self.metric = metric
        self._children: dict[tuple, object] = {}  # labels() takes a lock and builds a key per call

    def _m(self, tags):
        if not tags:
            return self.metric
        key = tuple(tags.values())
        child = self._children.get(key)
        if child is None:  # bounded: tag values are capped labels (ExperimentLabels) or a few names
            child = self._children[key] = self.metric.labels(**tags)
        return child

    def inc(self, value=1, tags=None):
        self._m(tags).inc(value)

    def observe(self, value, tags=None):
        self._m(tags).observe(value)

    def set(self, value, tags=None):
        self._m(tags).set(value)
