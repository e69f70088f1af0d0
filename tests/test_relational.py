"""The relational embedding loss (student_workers/losses/relational.py) as a pure function."""
from __future__ import annotations

import pytest
import torch

from student_workers.losses import listwise_kl, relational_kl

pytestmark = pytest.mark.unit


def test_zero_when_the_student_has_the_teachers_geometry_at_another_width():
    """Only cosine similarities meet: a student that is the teacher rotated into more dimensions and
    scaled has the same neighbourhoods, so the loss is 0 with no projection."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(8, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(10, 10, generator=g))  # orthogonal
    s = 3.0 * torch.cat([t, torch.zeros(8, 4)], dim=1) @ q  # (8, 10)
    assert relational_kl(s, t).item() == pytest.approx(0.0, abs=1e-5)
    assert relational_kl(torch.randn(8, 10, generator=g), t).item() > 0.1


def test_two_anchors_by_hand():
    """B = 3 at tau 1: anchor 0's neighbours 1, 2 with teacher cosines (1, 0) and student (0, 1)."""
    import math

    t = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    # anchor 0: teacher (cos 1, 0), student (0, 1); anchor 1: teacher (1, 0), student (0, 0);
    # anchor 2: teacher (0, 0), student (1, 0)
    sm = lambda a, b: (math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b)))  # noqa: E731
    kl = lambda pt, ps: sum(q * math.log(q / p) for p, q in zip(ps, pt))  # noqa: E731
    expected = (kl(sm(1, 0), sm(0, 1)) + kl(sm(1, 0), sm(0, 0)) + kl(sm(0, 0), sm(1, 0))) / 3
    assert relational_kl(s, t, tau=1.0).item() == pytest.approx(expected, rel=1e-6)


def test_the_teacher_gets_no_gradient_and_small_batches_are_refused():
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 7, requires_grad=True)
    relational_kl(s, t).backward()
    assert s.grad is not None and t.grad is None
    with pytest.raises(ValueError, match="needs >= 3"):
        relational_kl(torch.randn(2, 5), torch.randn(2, 7))
    with pytest.raises(ValueError, match="one B"):
        relational_kl(torch.randn(4, 5), torch.randn(3, 7))


def test_listwise_by_a_naive_loop_and_blind_to_query_query_similarities():
    """Each query (even row) against the batch's answers (odd rows), by loops over scalars; moving only the
    queries' similarities among themselves (not to any answer) leaves it unchanged."""
    import math

    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 7, generator=g)
    tau = 0.3

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    def dist(x, i):
        z = [math.exp(cos(x[2 * i], x[2 * j + 1]) / tau) for j in range(3)]
        return [v / sum(z) for v in z]

    expected = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(dist(t, i), dist(s, i))) for i in range(3)) / 3
    assert listwise_kl(s, t, tau=tau).item() == pytest.approx(expected, rel=1e-5)
    # queries q0 = e0, q1 = e1 and answers a0 = a1 = e2: the query-query cosine is 0; e0 + e1 makes it 0.5,
    # the queries' cosines to the answers stay 0, so the listwise loss is unchanged while the relational one moves
    e = torch.eye(3)
    a = torch.stack([e[0], e[2], e[1], e[2]])
    b = torch.stack([e[0], e[2], (e[0] + e[1]), e[2]])
    teacher = torch.randn(4, 3, generator=g)
    assert listwise_kl(a, teacher).item() == pytest.approx(listwise_kl(b, teacher).item(), abs=1e-6)
    assert relational_kl(a, teacher).item() != pytest.approx(relational_kl(b, teacher).item(), abs=1e-3)


def test_listwise_refuses_a_batch_that_is_not_pairs():
    for b in (2, 5):
        with pytest.raises(ValueError, match="not \\(query, answer\\) pairs"):
            listwise_kl(torch.randn(b, 5), torch.randn(b, 7))


def test_a_bank_adds_its_rows_as_neighbours_by_a_naive_loop():
    """With banks, anchor i's neighbours are the other batch rows then the K bank rows: the teacher's
    similarities against the teacher's bank, the student's against the student's, by loops over scalars."""
    import math

    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 7, generator=g)
    sb, tb = torch.randn(3, 5, generator=g), torch.randn(3, 7, generator=g)
    tau = 0.2

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    def dist(x, bank, i):
        z = [math.exp(cos(x[i], x[j]) / tau) for j in range(4) if j != i]
        z += [math.exp(cos(x[i], bank[k]) / tau) for k in range(3)]
        return [v / sum(z) for v in z]

    expected = sum(sum(q * math.log(q / p) for p, q in zip(dist(s, sb, i), dist(t, tb, i))) for i in range(4)) / 4
    assert relational_kl(s, t, tau, sb, tb).item() == pytest.approx(expected, rel=1e-5)
    # an empty bank is the batch alone; the bank gets no gradient
    assert relational_kl(s, t, tau, sb[:0], tb[:0]).item() == pytest.approx(relational_kl(s, t, tau).item(), rel=1e-6)
    sb.requires_grad_(True)
    s.requires_grad_(True)
    relational_kl(s, t, tau, sb, tb).backward()
    assert s.grad is not None and sb.grad is None


def test_a_bank_is_refused_unaligned_or_alone():
    s, t = torch.randn(4, 5), torch.randn(4, 7)
    with pytest.raises(ValueError, match="one K"):
        relational_kl(s, t, 0.1, torch.randn(3, 5), torch.randn(2, 7))
    with pytest.raises(ValueError, match="one K"):
        relational_kl(s, t, 0.1, torch.randn(3, 7), torch.randn(3, 5))  # swapped widths
    with pytest.raises(ValueError, match="or neither"):
        relational_kl(s, t, 0.1, torch.randn(3, 5), None)


def test_neighbour_bank_keeps_the_last_k_texts_row_for_row_and_rides_in_its_state_dict():
    from student_workers.losses import NeighbourBank

    bank = NeighbourBank(2, 3, size=4)
    for start in (0, 3):  # 6 texts into 4 slots: texts 2..5 stay
        ids = torch.arange(start, start + 3, dtype=torch.float32)
        bank.enqueue(ids[:, None].expand(3, 2), -ids[:, None].expand(3, 3))
    assert len(bank) == 4
    assert bank.student.ordered()[:, 0].tolist() == [2, 3, 4, 5]
    assert bank.teacher.ordered()[:, 0].tolist() == [-2, -3, -4, -5]
    s, t = bank.banks()
    assert torch.equal(s[:, 0], -t[:, 0])  # row k of one bank is the text of row k of the other
    other = NeighbourBank(2, 3, size=4)
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.student.ordered(), bank.student.ordered()) and len(other) == 4
    with pytest.raises(ValueError, match="rows"):
        bank.enqueue(torch.zeros(2, 2), torch.zeros(3, 3))
