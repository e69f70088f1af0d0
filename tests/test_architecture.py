"""The layering README's ARCHITECTURE section promises, read from the code's own imports.

kdserve/ (the wire) and kdmodels/ (shared model code) sit at the bottom; teacher_server/ and
student_workers/ import them and never each other; kdjob/ (the driver side of a job) composes both
sides, and only it, the scripts at the root (distill_job.py, compare_vlm.py) and bench/ may import
both sides. Neither script is imported by anything. No module imports another that (directly or
not) imports it back. Every import counts, function-level ones included. student_workers/ is kept
in subpackages by concept, with small modules and functions.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kdserve", "kdmodels", "teacher_server", "student_workers", "kdjob")
SCRIPTS = ("distill_job", "compare_vlm")
# layer -> the project layers it may import (itself included)
ALLOWED = {
    "kdserve": {"kdserve"},
    "kdmodels": {"kdserve", "kdmodels"},
    "teacher_server": {"kdserve", "kdmodels", "teacher_server"},
    "student_workers": {"kdserve", "kdmodels", "student_workers"},
    "kdjob": {"kdserve", "kdmodels", "teacher_server", "student_workers", "kdjob"},
    "distill_job": {"kdserve", "kdmodels", "teacher_server", "student_workers", "kdjob", "distill_job"},
    "compare_vlm": {"kdserve", "kdmodels", "teacher_server", "student_workers", "kdjob", "compare_vlm"},
    "bench": {"kdserve", "kdmodels", "teacher_server", "student_workers", "kdjob", "bench"},
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
    assert "student_workers.losses.several" in g["student_workers.train.loop"]
    assert "student_workers.optima.plan" in g["student_workers.train.loop"]
    assert "student_workers.client.async_client" in g["student_workers.client.sync_client"]
    assert "teacher_server.serve_app" in g["kdjob.teacher"]
    assert "kdjob.fit" in g["distill_job"] and "kdjob.compare" in g["compare_vlm"]


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


# -- student_workers: subpackages by concept, small modules and functions -----------------------------
SUBPACKAGES = {"client", "data", "eval", "losses", "models", "optima", "train"}
FLAT_ALLOWED = {"__init__.py"}  # all that may stay at student_workers/'s top
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60


def test_student_workers_is_in_subpackages():
    top = ROOT / "student_workers"
    packages = {p.name for p in top.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == SUBPACKAGES
    flat = {p.name for p in top.iterdir() if p.is_file() and p.suffix == ".py"}
    assert flat <= FLAT_ALLOWED, f"modules left flat in student_workers/: {sorted(flat - FLAT_ALLOWED)}"


def test_student_workers_modules_and_functions_are_small():
    long_modules, long_functions = [], []
    for p in sorted((ROOT / "student_workers").rglob("*.py")):
        text = p.read_text()
        name = p.relative_to(ROOT)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{name} ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text, str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append(f"{name}:{node.name} ({n} lines)")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: " + "; ".join(long_modules)
    assert not long_functions, f"functions over {MAX_FUNCTION_LINES} lines: " + "; ".join(long_functions)


def test_no_private_name_crosses_modules():
    """``from x import _name`` between project modules: what two modules share is public."""
    mods = project_modules()
    bad = []
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in mods:
                bad += [f"{name}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "; ".join(bad)
