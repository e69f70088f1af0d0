"""One registry for every pluggable piece: losses, teacher adapters, students.

Loud on duplicates (as big_vision's registry): registering a second object under a taken name is
a programming error, not a silent override.
"""
from __future__ import annotations

from typing import Any, Callable

_REGISTRY: dict[str, dict[str, Any]] = {}


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Decorator: ``@register("loss", "kl")`` makes the object available as ``get("loss", "kl")``."""

    def deco(obj: Any) -> Any:
        table = _REGISTRY.setdefault(kind, {})
        if name in table and table[name] is not obj:
            raise KeyError(f"{kind} {name!r} is already registered (by {table[name]!r})")
        table[name] = obj
        return obj

    return deco


def get(kind: str, name: str) -> Any:
    table = _REGISTRY.get(kind, {})
    if name not in table:
        known = ", ".join(sorted(table)) or "none"
        raise KeyError(f"unknown {kind} {name!r}; known: {known}")
    return table[name]


def names(kind: str) -> list[str]:
    return sorted(_REGISTRY.get(kind, {}))
