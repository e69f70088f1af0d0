"""Layer maps: which student layer learns from which teacher layer (docs/methods.md#layer-maps).

Layers are 1-based block indices: layer k is the output of the k-th transformer block (index 0
of a HuggingFace ``hidden_states`` tuple, the embeddings, is not a layer here). A map is a list
of (student_layer, teacher_layer) pairs.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

from kdserve.registry import register

LayerPairs = list[tuple[int, int]]


def _check_depths(num_student_layers: int, num_teacher_layers: int) -> None:
    for name, n in (("num_student_layers", num_student_layers), ("num_teacher_layers", num_teacher_layers)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")


@register("layer_map", "uniform")
def uniform_map(num_student_layers: int, num_teacher_layers: int) -> LayerPairs:
    """OPTIMA / TinyBERT uniform map: student layer k -> teacher layer ceil(k * r), r = L_t / L_s.

    With an integer ratio this is k * r; otherwise the teacher index is rounded up, and in every
    case the last student layer lands on the last teacher layer (ceil(L_s * r) = L_t).
    Example: L_s = 3, L_t = 8 -> [(1, 3), (2, 6), (3, 8)].
    """
    _check_depths(num_student_layers, num_teacher_layers)
    # Integer ceil division: float ceil(k * L_t / L_s) can land one too high on rounding error.
    return [(k, -(-k * num_teacher_layers // num_student_layers)) for k in range(1, num_student_layers + 1)]


@register("layer_map", "last")
def last_map(num_student_layers: int, num_teacher_layers: int) -> LayerPairs:
    """Last student layer to last teacher layer only (DistillVLM, MiniLM)."""
    _check_depths(num_student_layers, num_teacher_layers)
    return [(num_student_layers, num_teacher_layers)]


@register("layer_map", "explicit")
def explicit_map(
    num_student_layers: int, num_teacher_layers: int, pairs: Iterable[Sequence[int]] | None = None
) -> LayerPairs:
    """Pairs given by the job config, validated against both depths."""
    _check_depths(num_student_layers, num_teacher_layers)
    if pairs is None:
        raise ValueError("layer map 'explicit' needs pairs, e.g. pairs=[[4, 12]] (student layer, teacher layer)")
    out: LayerPairs = []
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair):
            raise ValueError(f"layer pair {pair!r} must be two integers (student layer, teacher layer)")
        s, t = pair
        if not 1 <= s <= num_student_layers or not 1 <= t <= num_teacher_layers:
            raise ValueError(
                f"layer pair {tuple(pair)} is out of range: student layers are 1..{num_student_layers}, "
                f"teacher layers are 1..{num_teacher_layers} (1-based)"
            )
        out.append((s, t))
    if not out:
        raise ValueError("layer map 'explicit' got an empty list of pairs; give at least one (student, teacher) pair")
    return out


@register("layer_map", "all-average")
def all_average_map(num_student_layers: int, num_teacher_layers: int) -> LayerPairs:
    """No pairing: the Data2Vec target averages ALL layers of each model (``data2vec_loss``).

    Returns [] so code iterating over pairs does nothing; the depths are still validated.
    """
    _check_depths(num_student_layers, num_teacher_layers)
    return []


_KINDS: dict[str, Callable[[int, int], LayerPairs]] = {
    "uniform": uniform_map,
    "last": last_map,
    "all-average": all_average_map,
}


def layer_map(
    kind: str,
    num_student_layers: int,
    num_teacher_layers: int,
    pairs: Iterable[Sequence[int]] | None = None,
) -> LayerPairs:
    """1-based (student_layer, teacher_layer) pairs for ``kind``.

    kind: "uniform", "last", "explicit" (needs ``pairs``) or "all-average" (returns []; the
    Data2Vec target of all layers is used instead of pairs).
    """
    if kind == "explicit":
        return explicit_map(num_student_layers, num_teacher_layers, pairs)
    if kind not in _KINDS:
        raise ValueError(f"unknown layer map {kind!r}; choose one of explicit, {', '.join(_KINDS)}")
    if pairs is not None:
        raise ValueError(f"layer map {kind!r} takes no pairs; use kind='explicit' to give them")
    return _KINDS[kind](num_student_layers, num_teacher_layers)
