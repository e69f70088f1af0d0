"""OPTIMA's arms: non-empty subsets of the student's modules, and the layers an arm distills."""
from __future__ import annotations

import itertools
from typing import Mapping, Sequence

# 2^16 - 1 arms is already far beyond what Thompson sampling can explore in a training run; the
# cap only guards against a config that lists layers instead of modules by mistake.
MAX_MODULES = 16


def check_modules(modules: Sequence[str]) -> tuple[str, ...]:
    mods = tuple(modules)
    if not mods:
        raise ValueError("OPTIMA needs at least one module")
    if len(mods) > MAX_MODULES:
        raise ValueError(f"{len(mods)} modules give 2^{len(mods)}-1 arms; at most {MAX_MODULES} modules")
    if any(not isinstance(m, str) or not m for m in mods):
        raise ValueError(f"module names must be non-empty strings, got {mods!r}")
    if len(set(mods)) != len(mods):
        raise ValueError(f"module names must be unique, got {mods!r}")
    return mods


def all_arms(modules: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``modules``: the ``2^M - 1`` arms of OPTIMA (sec. 3).

    Deterministic order: by subset size, then lexicographically by position in ``modules``
    (``itertools.combinations`` order). The arm with all modules is therefore always last, and an
    arm index means the same thing on every worker and after a resume.
    """
    mods = check_modules(modules)
    return [arm for size in range(1, len(mods) + 1) for arm in itertools.combinations(mods, size)]


def arm_layers(
    arm: Sequence[str], layer_maps: Mapping[str, Sequence[tuple[int, int]]]
) -> dict[str, list[tuple[int, int]]]:
    """Layer pairs that receive the hidden/attention losses while ``arm`` is played (OPTIMA eq. 5).

    ``layer_maps`` maps every module to its ``(student_layer, teacher_layer)`` pairs (usually the
    uniform map of docs/methods.md#layer-maps). Only the arm's modules are returned, in the arm's order;
    modules outside the arm are absent, i.e. not distilled layer-wise this round.
    """
    missing = [m for m in arm if m not in layer_maps]
    if missing:
        raise ValueError(f"arm {tuple(arm)!r} names modules without a layer map: {missing!r}")
    return {m: [(int(s), int(t)) for s, t in layer_maps[m]] for m in arm}
