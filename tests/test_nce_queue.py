"""Token-wise NCE (DistillVLM eq. 6), the teacher queue and the DistillVLM totals."""
from __future__ import annotations

import io
import math
from collections import deque

import pytest
import torch

from student_workers import losses as L


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _naive_nce_one(s: list[float], t: list[float], queue: list[list[float]], tau: float) -> float:
    pos = math.exp(_cos(s, t) / tau)
    neg = sum(math.exp(_cos(s, q) / tau) for q in queue)
    return -math.log(pos / (pos + neg))


@pytest.mark.unit
def test_token_nce_hand_derived():
    # s == t (cos 1), one orthogonal negative (cos 0), tau = 1: -log(e / (e + 1))
    s = torch.tensor([[[1.0, 0.0]]])
    q = torch.tensor([[0.0, 3.0]])
    assert L.token_nce(s, s * 2, q, tau=1.0).item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)
    # No negatives: the positive alone, loss 0.
    assert L.token_nce(s, s, torch.zeros(0, 2)).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.unit
@pytest.mark.parametrize("with_mask", [False, True])
def test_token_nce_naive(with_mask):
    b_n, t_n, d, k, tau = 2, 3, 4, 5, 0.2
    s = torch.randn(b_n, t_n, d, dtype=torch.float64)
    t = torch.randn(b_n, t_n, d, dtype=torch.float64)
    q = torch.randn(k, d, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]) if with_mask else torch.ones(b_n, t_n, dtype=torch.long)
    terms = [
        _naive_nce_one(s[b, i].tolist(), t[b, i].tolist(), q.tolist(), tau)
        for b in range(b_n)
        for i in range(t_n)
        if mask[b, i]
    ]
    got = L.token_nce(s, t, q, tau=tau, mask=mask if with_mask else None)
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-10)


@pytest.mark.unit
def test_token_nce_mean_pooled_naive():
    s = torch.randn(2, 4, 3, dtype=torch.float64)
    t = torch.randn(2, 4, 3, dtype=torch.float64)
    q = torch.randn(6, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    terms = []
    for b in range(2):
        n = int(mask[b].sum())
        sp = [sum(s[b, i, c].item() for i in range(n)) / n for c in range(3)]
        tp = [sum(t[b, i, c].item() for i in range(n)) / n for c in range(3)]
        terms.append(_naive_nce_one(sp, tp, q.tolist(), 0.5))
    got = L.token_nce(s, t, q, tau=0.5, mask=mask, mean_pooled=True)
    assert got.item() == pytest.approx(sum(terms) / 2, rel=1e-10)


@pytest.mark.unit
def test_token_nce_is_scale_invariant_and_validates():
    s, t, q = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(5, 4)
    assert torch.allclose(L.token_nce(s, t, q), L.token_nce(3 * s, 0.5 * t, 7 * q))
    with pytest.raises(ValueError, match="queue must be"):
        L.token_nce(s, t, torch.randn(5, 3))
    with pytest.raises(ValueError, match="tau"):
        L.token_nce(s, t, q, tau=0.0)


@pytest.mark.unit
def test_projection_then_nce_trains_phi_only_on_student_side():
    phi = L.Projection(3, 4)
    hs = torch.randn(2, 5, 3, requires_grad=True)
    ht = torch.randn(2, 5, 4, requires_grad=True)
    queue = L.TeacherQueue(dim=4, size=8)
    queue.enqueue(torch.randn(6, 4))
    L.token_nce(phi(hs), ht, queue.negatives(), tau=0.1).backward()
    assert hs.grad is not None and phi.proj.weight.grad is not None and ht.grad is None


# ---------------------------------------------------------------- TeacherQueue


@pytest.mark.unit
def test_queue_fifo_against_deque():
    k, d = 5, 2
    queue = L.TeacherQueue(dim=d, size=k)
    ref: deque[tuple[float, ...]] = deque(maxlen=k)  # the oldest falls off the left
    counter = 0
    for n in (2, 2, 3, 1, 4, 5, 7, 0, 1):
        batch = torch.tensor([[float(counter + i), -float(counter + i)] for i in range(n)]).reshape(n, d)
        counter += n
        queue.enqueue(batch)
        ref.extend(tuple(row) for row in batch.tolist())
        assert len(queue) == len(ref)
        assert [tuple(r) for r in queue.ordered().tolist()] == list(ref)
        assert sorted(tuple(r) for r in queue.negatives().tolist()) == sorted(ref)


@pytest.mark.unit
def test_queue_negatives_only_filled_part():
    queue = L.TeacherQueue(dim=3, size=10)
    assert queue.negatives().shape == (0, 3)
    queue.enqueue(torch.ones(4, 3))
    assert queue.negatives().shape == (4, 3) and len(queue) == 4


@pytest.mark.unit
def test_queue_enqueue_larger_than_k_keeps_newest():
    queue = L.TeacherQueue(dim=1, size=4)
    queue.enqueue(torch.tensor([[9.0]]))
    queue.enqueue(torch.arange(10.0).reshape(10, 1))
    assert queue.ordered().flatten().tolist() == [6.0, 7.0, 8.0, 9.0]
    queue.enqueue(torch.tensor([[10.0]]))
    assert queue.ordered().flatten().tolist() == [7.0, 8.0, 9.0, 10.0]


@pytest.mark.unit
def test_queue_mask_tokens_and_detach():
    queue = L.TeacherQueue(dim=2, size=8)
    emb = torch.arange(12.0).reshape(2, 3, 2).requires_grad_(True)  # (B, T, D)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]])
    queue.enqueue(emb, mask=mask)
    assert queue.ordered().tolist() == [[0.0, 1.0], [4.0, 5.0], [6.0, 7.0], [8.0, 9.0]]
    assert not queue.queue.requires_grad
    with pytest.raises(ValueError, match="holds dim 2"):
        queue.enqueue(torch.zeros(3, 5))


@pytest.mark.unit
def test_queue_state_dict_round_trip():
    queue = L.TeacherQueue(dim=3, size=6)
    for _ in range(3):
        queue.enqueue(torch.randn(4, 3))  # wrapped: ptr != 0
    buf = io.BytesIO()
    torch.save(queue.state_dict(), buf)
    assert set(queue.state_dict()) == {"queue", "ptr", "filled"}

    restored = L.TeacherQueue(dim=3, size=6)
    buf.seek(0)
    restored.load_state_dict(torch.load(buf))
    assert torch.equal(restored.negatives(), queue.negatives())
    assert torch.equal(restored.ordered(), queue.ordered())
    # Resumed and uninterrupted runs keep evolving identically.
    nxt = torch.randn(2, 3)
    queue.enqueue(nxt)
    restored.enqueue(nxt)
    assert torch.equal(restored.ordered(), queue.ordered())
    s, t = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    assert torch.equal(L.token_nce(s, t, restored.negatives()), L.token_nce(s, t, queue.negatives()))


@pytest.mark.unit
def test_queue_is_carried_by_a_parent_module():
    parent = torch.nn.Module()
    parent.nce_queue = L.TeacherQueue(dim=2, size=3)
    parent.nce_queue.enqueue(torch.ones(2, 2))
    assert {"nce_queue.queue", "nce_queue.ptr", "nce_queue.filled"} <= set(parent.state_dict())



def _gather_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    from student_workers.losses import TeacherQueue, gather_rows

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        q = TeacherQueue(3, size=8)
        for step in range(3):  # rank r sends r + 1 + step rows, valued 100 * rank + 10 * step + i
            rows = torch.tensor([[100.0 * rank + 10 * step + i] * 3 for i in range(rank + 1 + step)])
            q.enqueue(gather_rows(rows))
        torch.save(q.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_enqueue_every_ranks_rows_in_rank_order(tmp_path):
    """Two gloo processes with different row counts end with the same queue, equal to one queue fed
    rank 0's rows then rank 1's at every step."""
    import os

    import torch.multiprocessing as mp

    mp.start_processes(_gather_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    states = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    alone = L.TeacherQueue(3, size=8)
    for step in range(3):
        alone.enqueue(torch.tensor([[100.0 * r + 10 * step + i] * 3 for r in range(2) for i in range(r + 1 + step)]))
    assert torch.equal(states[0]["queue"], alone.queue) and int(states[0]["ptr"]) == int(alone.ptr)


@pytest.mark.unit
def test_gather_rows_without_a_process_group_is_the_identity():
    x = torch.randn(5, 4)
    assert L.gather_rows(x) is x
