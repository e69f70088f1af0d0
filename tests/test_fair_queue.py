"""FairQueue: who gets the next batch. Fairness asserted on counts of served work, never on time."""
from __future__ import annotations

import pytest

from teacher_server.fair_queue import FairQueue, weight_of

pytestmark = pytest.mark.unit


def _backlog(q: FairQueue, exp: str, n: int, samples: int = 2, tokens: int = 16) -> None:
    for i in range(n):
        q.enqueue(exp, (exp, i), cost=samples * tokens, samples=samples)


def test_weights_1_to_3_share_served_work_1_to_3():
    q = FairQueue("fair", {"a": 1.0, "b": 3.0})
    for _ in range(200):  # both stay backlogged: refill what was served
        _backlog(q, "a", 8 - q.queue_lengths().get("a", 0))
        _backlog(q, "b", 8 - q.queue_lengths().get("b", 0))
        batch = q.next_batch(max_samples=8)
        assert sum(2 for _ in batch) == 8  # full batches (work-conserving)
    served = q.served_cost()
    assert served["b"] / served["a"] == pytest.approx(3.0, rel=0.10)
    # and at every point the gap stays small, not only on average: re-run and check the running ratio
    q2 = FairQueue("fair", {"a": 1.0, "b": 3.0})
    _backlog(q2, "a", 400)
    _backlog(q2, "b", 400)
    for k in range(1, 101):
        q2.next_batch(8)
        s = q2.served_samples()
        assert abs(s["b"] - 3 * s["a"]) <= 8, (k, s)  # never more than one batch apart


def test_prefix_weights_and_exact_keys():
    w = {"team-*": 3.0, "team-x*": 5.0, "team-xy": 0.5}
    assert weight_of("team-a", w) == 3.0
    assert weight_of("team-x1", w) == 5.0  # longest prefix wins
    assert weight_of("team-xy", w) == 0.5  # exact beats prefix
    assert weight_of("other", w) == 1.0
    assert weight_of("anything", None) == 1.0


def test_light_request_joins_the_next_batch_under_a_flood():
    for policy, expect_light in (("fair", True), ("fifo", False)):
        q = FairQueue(policy)
        _backlog(q, "flood", 40, samples=32)
        for _ in range(5):
            q.next_batch(max_samples=64)
        q.enqueue("light", "L", cost=2 * 16, samples=2)
        batch = q.next_batch(max_samples=64)
        assert ("L" in batch) is expect_light, policy
        if policy == "fifo":  # behind every flood request queued before it
            waits = 1
            while "L" not in q.next_batch(max_samples=64):
                waits += 1
            assert waits == 15  # (40 - 10 - 2) / 2 more full batches, then its own


def test_work_conserving_when_one_experiment_is_alone():
    q = FairQueue("fair", {"a": 1.0, "b": 100.0})
    _backlog(q, "a", 10, samples=4)
    assert q.next_batch(max_samples=16) == [("a", 0), ("a", 1), ("a", 2), ("a", 3)]


def test_idle_time_earns_no_credit():
    q = FairQueue("fair")
    _backlog(q, "a", 2000)
    for _ in range(100):  # b idle while a is served 100 batches
        q.next_batch(max_samples=8)
    _backlog(q, "b", 2000)
    before = q.served_samples()
    for _ in range(50):
        q.next_batch(max_samples=8)
    after = q.served_samples()
    got_a, got_b = after["a"] - before["a"], after["b"] - before["b"]
    assert got_a + got_b == 400
    assert abs(got_a - got_b) <= 8  # equal shares from the moment b arrives, not a b-only burst


def test_per_experiment_order_and_max_samples():
    q = FairQueue("fair")
    q.enqueue("a", 1, cost=3, samples=3)
    q.enqueue("a", 2, cost=2, samples=2)
    q.enqueue("a", 3, cost=2, samples=2)
    q.enqueue("a", 4, cost=5, samples=5)
    out = []
    while len(q):
        out.append(q.next_batch(max_samples=4))
    assert out == [[1], [2, 3], [4]]  # a request over the cap still runs, alone


def test_fifo_is_arrival_order_across_experiments():
    q = FairQueue("fifo")
    for i, exp in enumerate("abacb"):
        q.enqueue(exp, i, cost=1, samples=1)
    assert q.next_batch(max_samples=3) == [0, 1, 2]
    assert q.next_batch(max_samples=3) == [3, 4]


def test_discarded_items_are_never_served():
    q = FairQueue("fair")
    for i in range(6):
        q.enqueue("a" if i % 2 else "b", i, cost=1, samples=1)
    assert q.discard(lambda item: item in (1, 2)) == 2
    served = []
    while len(q):
        served += q.next_batch(max_samples=2)
    assert sorted(served) == [0, 3, 4, 5]


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="> 0"):
        FairQueue("fair", {"a": 0.0})
    with pytest.raises(ValueError, match="scheduler"):
        FairQueue("lottery")  # type: ignore[arg-type]


def test_distinct_ids_do_not_grow_the_scheduler_without_bound():
    """A client minting a new experiment id per request: idle experiments are forgotten past
    MAX_KNOWN, while queued ones (and their order) are kept."""
    from teacher_server.fair_queue import MAX_KNOWN

    q = FairQueue("fair")
    served = []
    for i in range(3 * MAX_KNOWN):
        q.enqueue(f"id-{i}", i, cost=1)
        if i:  # one stays waiting while the next id arrives
            served += q.next_batch(1)
        assert len(q.queue_lengths()) <= MAX_KNOWN
    while len(q):
        served += q.next_batch(1)
    assert sorted(served) == list(range(3 * MAX_KNOWN))  # every queued item served once, none lost


def _replicas_serve(route, rounds: int = 300, replicas: int = 3) -> dict[str, float]:
    """N replicas, each its own FairQueue (weights a:3, b:1), saturated; ``route(exp, i)`` names the
    replica of each new request. Returns the work served per experiment, summed over the replicas."""
    queues = [FairQueue("fair", {"a": 3.0, "b": 1.0}) for _ in range(replicas)]
    used = {exp: {route(exp, j) for j in range(64)} for exp in ("a", "b")}  # the replicas each one reaches
    sent = {"a": 0, "b": 0}
    for _ in range(rounds):
        for exp in ("a", "b"):  # new requests, routed, until every replica it reaches has a backlog of it
            while min(queues[r].queue_lengths().get(exp, 0) for r in used[exp]) < 4:
                queues[route(exp, sent[exp])].enqueue(exp, (exp, sent[exp]), cost=32, samples=2)
                sent[exp] += 1
        for q in queues:
            q.next_batch(max_samples=8)
    total = {"a": 0.0, "b": 0.0}
    for q in queues:
        for exp, cost in q.served_cost().items():
            total[exp] += cost
    return total


def test_weights_hold_across_replicas_when_requests_spread():
    """docs/methods.md, "Serving across replicas": each replica shares its own capacity by weight, so
    experiments whose requests reach every replica (as the client spreads them) get their weighted
    share of the sum: 3:1 here over 3 replicas, as on one."""
    import hashlib

    def by_content(exp: str, i: int) -> int:  # rendezvous-like: a digest of the request picks the replica
        return hashlib.sha256(f"{exp}/{i}".encode()).digest()[0] % 3

    served = _replicas_serve(by_content)
    assert served["a"] / served["b"] == pytest.approx(3.0, rel=0.05)
    served = _replicas_serve(lambda exp, i: i % 3)  # fewest in flight: round robin under equal load
    assert served["a"] / served["b"] == pytest.approx(3.0, rel=0.05)


def test_an_experiment_on_one_replica_of_three_gets_its_share_of_that_one():
    # b reaches replica 0 only: it gets 1/4 of that replica (weights 3:1), a the rest of it and all
    # of the other two: a / b = (3/4 + 1 + 1) / (1/4) = 11
    served = _replicas_serve(lambda exp, i: 0 if exp == "b" else i % 3)
    assert served["a"] / served["b"] == pytest.approx(11.0, rel=0.05)
