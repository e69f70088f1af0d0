"""Layer maps (docs/methods.md#layer-maps) against hand-written examples and a naive ceil formula."""
from __future__ import annotations

import math

import pytest

from kdserve import registry
from student_workers.losses.layer_map import layer_map

pytestmark = pytest.mark.unit


def test_uniform_integer_ratio():
    assert layer_map("uniform", 4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]


def test_uniform_rounds_up_and_last_maps_to_last():
    # r = 8/3: 2.67 -> 3, 5.33 -> 6, 8 -> 8
    assert layer_map("uniform", 3, 8) == [(1, 3), (2, 6), (3, 8)]
    # r = 2.4: 2.4 -> 3, 4.8 -> 5, 7.2 -> 8, 9.6 -> 10, 12 -> 12
    assert layer_map("uniform", 5, 12) == [(1, 3), (2, 5), (3, 8), (4, 10), (5, 12)]


@pytest.mark.parametrize("ls", range(1, 13))
@pytest.mark.parametrize("lt", range(1, 25))
def test_uniform_against_naive_ceil(ls, lt):
    pairs = layer_map("uniform", ls, lt)
    assert pairs == [(k, math.ceil(k * lt / ls - 1e-9)) for k in range(1, ls + 1)]
    assert pairs[-1] == (ls, lt)
    assert all(1 <= t <= lt for _, t in pairs)


def test_same_depth_is_identity():
    assert layer_map("uniform", 6, 6) == [(k, k) for k in range(1, 7)]


def test_last():
    assert layer_map("last", 4, 12) == [(4, 12)]


def test_explicit_valid():
    assert layer_map("explicit", 4, 12, pairs=[[2, 6], (4, 12)]) == [(2, 6), (4, 12)]


@pytest.mark.parametrize(
    "pairs, fragment",
    [
        ([(5, 12)], "(5, 12) is out of range: student layers are 1..4, teacher layers are 1..12"),
        ([(1, 13)], "(1, 13) is out of range"),
        ([(0, 3)], "(0, 3) is out of range"),
        ([(1, 2, 3)], "must be two integers"),
        ([(1.5, 3)], "must be two integers"),
        ([], "empty"),
        (None, "needs pairs"),
    ],
)
def test_explicit_errors(pairs, fragment):
    with pytest.raises(ValueError) as err:
        layer_map("explicit", 4, 12, pairs=pairs)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_all_average_returns_no_pairs():
    assert layer_map("all-average", 4, 12) == []


def test_other_errors():
    with pytest.raises(ValueError, match="unknown layer map 'diagonal'"):
        layer_map("diagonal", 4, 12)
    with pytest.raises(ValueError, match="takes no pairs"):
        layer_map("uniform", 4, 12, pairs=[(1, 1)])
    with pytest.raises(ValueError, match="num_student_layers must be a positive integer"):
        layer_map("uniform", 0, 12)
    with pytest.raises(ValueError, match="num_teacher_layers"):
        layer_map("last", 4, 2.5)


def test_registered():
    assert registry.get("layer_map", "uniform")(4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert registry.get("layer_map", "explicit")(4, 12, [(1, 1)]) == [(1, 1)]
