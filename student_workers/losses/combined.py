"""Weighted sum of named loss terms, every term logged (as big_vision's trainers log each loss)."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Sequence

import torch

LossFn = Callable[..., torch.Tensor]


def _params(fn: LossFn) -> tuple[frozenset[str] | None, frozenset[str]]:
    """(accepted keyword names or None for "takes **kwargs", required keyword names)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature: hand them everything
        return None, frozenset()
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        accepted = None
    else:
        keywordable = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        accepted = frozenset(p.name for p in params if p.kind in keywordable)
    required = frozenset(
        p.name
        for p in params
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    return accepted, required


class CombinedLoss:
    """total = sum_i w_i * L_i over named terms; returns the total and every unweighted term.

    terms: (name, weight, fn) triples. Each fn is called with the keyword arguments of
    ``__call__`` that it names in its signature (all of them if it takes ``**kwargs``), so
    registered losses can be used directly or through ``functools.partial`` to fix
    hyper-parameters. A term with weight 0 is still computed and logged: OPTIMA's reward, for
    one, reads losses of modules that the current arm does not train.

    The logged terms are detached 0-dim tensors, not floats: calling .item() every step would
    synchronise with the GPU; the logger converts them when it writes.
    """

    def __init__(self, terms: Sequence[tuple[str, float, LossFn]]) -> None:
        if not terms:
            raise ValueError("CombinedLoss needs at least one (name, weight, fn) term")
        names = [name for name, _, _ in terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate loss term names: {', '.join(duplicates)}")
        self.weights: dict[str, float] = {name: float(w) for name, w, _ in terms}
        self._fns: dict[str, LossFn] = {name: fn for name, _, fn in terms}
        self._params = {name: _params(fn) for name, _, fn in terms}

    def set_weight(self, name: str, weight: float) -> None:
        if name not in self.weights:
            raise KeyError(f"no loss term {name!r}; terms are {', '.join(self.weights)}")
        self.weights[name] = float(weight)

    def _kwargs_for(self, name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        accepted, required = self._params[name]
        missing = sorted(required - kwargs.keys())
        if missing:
            raise TypeError(f"loss term {name!r} needs argument(s) {', '.join(missing)}")
        return kwargs if accepted is None else {k: v for k, v in kwargs.items() if k in accepted}

    def __call__(self, **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total: torch.Tensor | None = None
        logged: dict[str, torch.Tensor] = {}
        for name, fn in self._fns.items():
            value = fn(**self._kwargs_for(name, kwargs))
            logged[name] = value.detach()
            weighted = self.weights[name] * value
            total = weighted if total is None else total + weighted
        assert total is not None  # __init__ rejects an empty term list
        return total, logged
