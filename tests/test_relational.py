"""The relational embedding loss (student_workers/losses/relational.py) as a pure function."""
from __future__ import annotations

import pytest
import torch

from student_workers.losses import relational_kl

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
