"""Which queued requests form the next forward: fair across experiments, or first come first served.

The fair policy is the Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language
Models" (OSDI 2024), applied to whole requests: every experiment keeps a counter of the work it was
served divided by its weight; the next batch is filled from the backlogged experiment with the
smallest counter, charging it as each request is taken. An experiment that was idle rejoins at
the smallest counter of those still waiting, so idleness earns no credit to burst with later.
Work-conserving: a batch takes whatever fits from any backlogged experiment, so an idle
experiment's share goes to the others.

Pure bookkeeping, no asyncio or torch: ``enqueue`` / ``discard`` / ``next_batch``.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

Policy = Literal["fair", "fifo"]


def weight_of(experiment: str, weights: dict[str, float] | None) -> float:
    """An exact key wins, then the longest matching ``prefix*`` key, else 1.0."""
    if not weights:
        return 1.0
    if experiment in weights:
        return float(weights[experiment])
    best, best_len = 1.0, -1
    for key, w in weights.items():
        if key.endswith("*") and experiment.startswith(key[:-1]) and len(key) > best_len:
            best, best_len = float(w), len(key)
    return best


MAX_KNOWN = 1024  # experiments whose counters are kept; idle ones beyond it are forgotten


@dataclass
class _Entry:
    seq: int
    item: Any
    cost: float
    samples: int


@dataclass
class _Experiment:
    weight: float
    queue: deque = field(default_factory=deque)
    counter: float = 0.0  # virtual work served: sum(cost) / weight
    served_cost: float = 0.0
    served_samples: int = 0
    served_requests: int = 0


class FairQueue:
    """Per-experiment FIFO queues and the policy picking the next batch across them."""

    def __init__(self, policy: Policy = "fair", weights: dict[str, float] | None = None):
        if policy not in ("fair", "fifo"):
            raise ValueError(f"unknown scheduler {policy!r}; use 'fair' or 'fifo'")
        for k, w in (weights or {}).items():
            if not w > 0:
                raise ValueError(f"experiment weight for {k!r} must be > 0, got {w}")
        self.policy = policy
        self.weights = dict(weights or {})
        self._exps: dict[str, _Experiment] = {}
        self._seq = itertools.count()
        self._vtime = 0.0  # smallest counter among the backlogged at the last pick

    # -- filling ---------------------------------------------------------------------------
    def enqueue(self, experiment: str, item: Any, cost: float, samples: int = 1) -> None:
        """Queue ``item`` for ``experiment``; ``cost`` is what serving it is charged (samples x tokens)."""
        e = self._exps.get(experiment)
        if e is None:
            if len(self._exps) >= MAX_KNOWN:
                self._forget_idle()
            e = self._exps[experiment] = _Experiment(weight_of(experiment, self.weights))
        if not e.queue:  # (re)joining: no credit for the time it was idle
            e.counter = max(e.counter, self._min_backlogged_counter(default=self._vtime))
        e.queue.append(_Entry(next(self._seq), item, float(cost), int(samples)))

    def _forget_idle(self) -> None:
        """Drop the state of experiments with nothing queued, oldest first, down to half of
        MAX_KNOWN: a stream of distinct ids (a client minting one per request) must not grow the
        scheduler's memory and per-pick work without bound. A forgotten experiment that comes back
        starts at the current virtual time, as any idle one does (it loses only unserved debt)."""
        idle = [name for name, e in self._exps.items() if not e.queue]
        for name in idle[: max(0, len(self._exps) - MAX_KNOWN // 2)]:
            del self._exps[name]

    def discard(self, drop: Callable[[Any], bool]) -> int:
        """Remove every queued item for which ``drop(item)`` is true (cancelled work); returns how many."""
        n = 0
        for e in self._exps.values():
            keep = deque(x for x in e.queue if not drop(x.item))
            n += len(e.queue) - len(keep)
            e.queue = keep
        return n

    # -- taking ----------------------------------------------------------------------------
    def next_batch(self, max_samples: int) -> list[Any]:
        """Items of the next forward, at most ``max_samples`` samples (always at least one item)."""
        if self.policy == "fifo":
            return self._next_fifo(max_samples)
        return self._next_fair(max_samples)

    def _next_fair(self, max_samples: int) -> list[Any]:
        taken: list[Any] = []
        n = 0
        blocked: set[str] = set()  # experiments whose head no longer fits this batch
        while True:
            cands = [(e.counter, e.queue[0].seq, name) for name, e in self._exps.items()
                     if e.queue and name not in blocked]
            if not cands:
                return taken
            _, _, name = min(cands)
            e = self._exps[name]
            if not taken:
                self._vtime = e.counter
            head = e.queue[0]
            if taken and n + head.samples > max_samples:
                blocked.add(name)  # per-experiment order is kept: its later items wait too
                continue
            e.queue.popleft()
            self._charge(e, head)
            taken.append(head.item)
            n += head.samples

    def _next_fifo(self, max_samples: int) -> list[Any]:
        taken: list[Any] = []
        n = 0
        while True:
            heads = [(e.queue[0].seq, name) for name, e in self._exps.items() if e.queue]
            if not heads:
                return taken
            _, name = min(heads)
            e = self._exps[name]
            head = e.queue[0]
            if taken and n + head.samples > max_samples:
                return taken
            e.queue.popleft()
            self._charge(e, head)
            taken.append(head.item)
            n += head.samples

    def _charge(self, e: _Experiment, x: _Entry) -> None:
        e.counter += x.cost / e.weight
        e.served_cost += x.cost
        e.served_samples += x.samples
        e.served_requests += 1

    def _min_backlogged_counter(self, default: float) -> float:
        cs = [e.counter for e in self._exps.values() if e.queue]
        return min(cs) if cs else default

    # -- looking ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(len(e.queue) for e in self._exps.values())

    def queue_lengths(self) -> dict[str, int]:
        return {name: len(e.queue) for name, e in self._exps.items()}

    def served_samples(self) -> dict[str, int]:
        return {name: e.served_samples for name, e in self._exps.items()}

    def served_cost(self) -> dict[str, float]:
        return {name: e.served_cost for name, e in self._exps.items()}
