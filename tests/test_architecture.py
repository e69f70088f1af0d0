"""The layering README's ARCHITECTURE section promises, read from the code's own imports.

kdserve/ (the wire) and kdmodels/ (shared model code) sit at the bottom; teacher_server/ and
student_workers/ import them and never each other; only the composing scripts at the root
(distill_job.py, compare_vlm.py) and bench/ may import both sides. No module imports another that
(directly or not) imports it back. Every import counts, function-level ones included.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kdserve", "kdmodels", "teacher_server", "student_workers")
SCRIPTS = ("distill_job", "compare_vlm")
# layer -> the project layers it may import (itself included)
ALLOWED = {
    "kdserve": {"kdserve"},
    "kdmodels": {"kdserve", "kdmodels"},
    "teacher_server": {"kdserve", "kdmodels", "teacher_server"},
    "student_workers": {"kdserve", "kdmodels", "student_workers"},
    "distill_job": {"kdserve", "kdmodels", "teacher_server", "student_workers", "distill_job"},
    "compare_vlm": {"kdserve", "kdmodels", "teacher_server", "student_workers", "distill_job", "compare_vlm"},
    "bench": {"kdserve", "kdmodels", "teacher_server", "student_workers", "bench"},
}


def project_modules() -> dict[str, Path]:
    mods = {}
    for top in (*PACKAGES, "bench"):
        for p in sorted((ROOT / top).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = p
    for s in SCRIPTS:
        mods[s] = ROOT / f"{s}.py"
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Project modules that ``name`` imports, resolved to the deepest existing module."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in mods:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def layer(module: str) -> str:
    return module.split(".")[0]


def graph() -> dict[str, set[str]]:
    mods = project_modules()
    return {m: imports_of(m, p, mods) for m, p in mods.items()}


def test_the_graph_is_read():
    g = graph()
    # a few edges that must be seen, so the checks below cannot pass by reading nothing
    assert "kdserve.codec" in g["teacher_server.service"]
    assert "student_workers.distiller" in g["student_workers.train"]
    assert "teacher_server.serve_app" in g["distill_job"] or any(
        m.startswith("teacher_server") for m in g["distill_job"])


@pytest.mark.parametrize("src", sorted(ALLOWED))
def test_no_forbidden_import(src):
    bad = sorted(f"{m} -> {t}" for m, ts in graph().items() if layer(m) == src
                 for t in ts if layer(t) not in ALLOWED[src])
    assert not bad, f"{src} may import only {sorted(ALLOWED[src])}: " + "; ".join(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles: " + " | ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
