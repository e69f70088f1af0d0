"""Prometheus metrics of the teacher, per experiment.

Inside Ray Serve they go through ``ray.serve.metrics`` (scraped from Ray's metrics endpoint,
with the deployment and replica tags Serve adds); elsewhere through ``prometheus_client``.
samples/s and MB/s are ``rate()`` of the counters.
"""
from __future__ import annotations

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

        else:
            import prometheus_client as m

            def counter(name, doc, tags):
                return _PromAdapter(m.Counter(name, doc, list(tags)))

            def hist(name, doc, buckets, tags):
                return _PromAdapter(m.Histogram(name, doc, list(tags), buckets=buckets))

        exp = ("experiment",)
        self.requests = counter("kdserve_teacher_requests", "Target requests answered.", exp)
        self.samples = counter("kdserve_teacher_samples", "Samples answered.", exp)
        self.bytes_out = counter("kdserve_teacher_reply_bytes", "Target bytes sent.", exp)
        self.errors = counter("kdserve_teacher_errors", "Requests refused, by gRPC status.", ("experiment", "code"))
        self.queue_ms = hist("kdserve_teacher_queue_wait_ms", "Wait for a batch to start.", _BUCKETS_MS, exp)
        self.compute_ms = hist("kdserve_teacher_compute_ms", "Forward + reductions per batch.", _BUCKETS_MS, ())
        self.batch_samples = hist("kdserve_teacher_batch_samples", "Samples per server batch.", _BUCKETS_BATCH, ())
        self.batch_requests = hist("kdserve_teacher_batch_requests", "Requests per server batch.", _BUCKETS_BATCH, ())

    def answered(self, experiment: str, samples: int, nbytes: int, queue_ms: float) -> None:
        tags = {"experiment": experiment or "default"}
        self.requests.inc(1, tags=tags)
        if samples > 0:  # ray's counters refuse 0
            self.samples.inc(samples, tags=tags)
        if nbytes > 0:
            self.bytes_out.inc(nbytes, tags=tags)
        self.queue_ms.observe(queue_ms, tags=tags)

    def batch(self, requests: int, samples: int, compute_ms: float) -> None:
        self.compute_ms.observe(compute_ms)
        self.batch_samples.observe(samples)
        self.batch_requests.observe(requests)

    def refused(self, experiment: str, code: str) -> None:
        self.errors.inc(1, tags={"experiment": experiment or "default", "code": code})


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

    def _m(self, tags):
        return self.metric.labels(**tags) if tags else self.metric

    def inc(self, value=1, tags=None):
        self._m(tags).inc(value)

    def observe(self, value, tags=None):
        self._m(tags).observe(value)
