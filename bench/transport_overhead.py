"""P4 overhead: MB/s and requests/s of GetTargets through plain gRPC, Ray Serve and Triton vs a
bare grpc.aio bytes echo (bench/echo.py, in a child process) of replies of the same size.

The synthetic text teacher with no latency makes replies of any size cheaply: one sample, T
tokens and k hidden layers (float32, D = 768) give k * T * 3 KB. Each frontend's reply is sent
once, its ByteSize() sets the echo's reply size, so both move the same bytes. 1 and 4 clients.

Each cell alternates ROUNDS windows of the frontend and of the echo (A B A B A B) and compares
their medians: on a small shared machine the speed of both drifts by tens of percent over a run,
and alternating short windows lets both see the same drift.

Ray Serve's cells (through the proxy, and straight to the replica's own endpoint: teacher_server/direct.py)
run while Ray is up (with P2); plain gRPC's and Triton's after ``ray.shutdown()``:
an idle Ray node (raylet, GCS, Serve controller, proxy, replicas) keeps ~7% of two cores busy, and
its wake-ups would land on the three-process Triton path more than on the two-process echo.
"""
from __future__ import annotations

import asyncio
import math

import torch

from bench.common import Figure, echo_window, geomean, teacher_window

D, MAX_LEN, LAYERS = 768, 1024, 12
MODEL = f"synthetic:input=text,layers={LAYERS},dim={D},heads=12,classes=0,vocab=30522,max_len={MAX_LEN},latency_ms=0"
FRONTENDS = ("plain gRPC", "Ray Serve", "Ray Serve direct", "Triton")
ROUNDS = 3
KEYS = {"plain gRPC": "P4_ratio_grpc", "Ray Serve": "P4_ratio_serve", "Ray Serve direct": "P4_ratio_serve_direct",
        "Triton": "P4_ratio_triton"}
DIRECT = "Ray Serve direct"  # the same Serve app, its replica's own endpoint (listed by Describe) instead of the proxy
CLIENTS = (1, 4)
TRITON_CACHED = "Triton, cached answers"  # bench/triton_cached_model.py: Triton's own path, no kdserve work
ISOLATION = "Ray Serve measured while Ray runs, plain gRPC and Triton after Ray has shut down"


def request_for(size: int):
    """A request whose reply carries about ``size`` bytes of hidden states."""
    from kdserve.wire import build_request, target_spec

    k = max(1, math.ceil(size / (MAX_LEN * D * 4)))
    t = max(1, min(MAX_LEN, round(size / (k * D * 4))))
    ids = torch.randint(0, 30522, (1, t), generator=torch.Generator().manual_seed(t))
    return build_request({"input_ids": ids}, target_spec(hidden={"text": list(range(1, k + 1))}))


def measure(quick: bool, log, addresses: dict[str, str], echo_port: int) -> list[dict]:
    """The P4 cells of each frontend in ``addresses``: one row per (reply size, clients, frontend)."""
    sizes, seconds = _grid(quick)
    rows = []
    for size in sizes:
        req = request_for(size)
        for n in CLIENTS:
            for name, address in addresses.items():
                ws, es, reply = [], [], 0
                for _ in range(ROUNDS):
                    ws.append(asyncio.run(teacher_window(address, req, n, seconds, direct=name == DIRECT)))
                    reply = reply or round(ws[0]["mb_s"] * 1e6 * ws[0]["seconds"] / ws[0]["requests"])  # reply bytes
                    es.append(asyncio.run(echo_window(echo_port, reply, req.ByteSize(), n, seconds)))
                w, e = _median(ws), _median(es)
                rows.append({"frontend": name, "size": size, "clients": n, "reply_bytes": reply,
                             "mb_s": w["mb_s"], "req_s": w["req_s"], "p50_ms": w["p50_ms"],
                             "echo_mb_s": e["mb_s"], "echo_req_s": e["req_s"], "echo_p50_ms": e["p50_ms"],
                             "ratio": w["mb_s"] / e["mb_s"],
                             "rounds_mb_s": [round(x["mb_s"], 1) for x in ws],
                             "rounds_echo_mb_s": [round(x["mb_s"], 1) for x in es]})
                log(f"P4 {name} {size / 1e6:g} MB x{n}: {w['mb_s']:.0f} MB/s vs echo {e['mb_s']:.0f} "
                    f"({w['mb_s'] / e['mb_s']:.2f})")
    return rows


def figures(quick: bool, rows: list[dict], notes: list[str]) -> list[Figure]:
    """One figure per frontend (a skipped frontend's is NaN, with the notes saying why)."""
    sizes, seconds = _grid(quick)
    figs = []
    for name in FRONTENDS:
        mine = [r for r in rows if r["frontend"] == name]
        if not mine:
            figs.append(Figure(KEYS[name], float("nan"), float("nan"), what=f"{name}: skipped", notes=list(notes)))
            continue
        fig = Figure(
            KEYS[name], baseline=geomean([r["echo_mb_s"] for r in mine]), measured=geomean([r["mb_s"] for r in mine]),
            unit="MB/s (geomean)",
            what=(f"MB/s of GetTargets through {name} vs a bare grpc.aio bytes echo of the same reply sizes; geometric "
                  f"mean over replies {', '.join(f'{s / 1e6:g}' for s in sizes)} MB x clients {list(CLIENTS)} (rows: "
                  f"each cell, with req/s); each cell the median of {ROUNDS} alternating {seconds:g} s windows per "
                  f"side; synthetic text teacher, latency 0, replies decoded; {ISOLATION}"),
            rows=mine, extra={"min_cell_ratio": min(r["ratio"] for r in mine)},
        )
        bound = [r for r in rows if r["frontend"] == TRITON_CACHED]
        if name == "Triton" and bound:
            _triton_bound(fig, bound)
        figs.append(fig)
    return figs


def _triton_bound(fig: Figure, bound: list[dict]) -> None:
    """Beside Triton's figure: the same Triton answering from a cache (its own cost per request),
    against the same echo, and what kdserve's work in the stub leaves of it."""
    own = geomean([r["mb_s"] for r in bound]) / geomean([r["echo_mb_s"] for r in bound])
    fig.rows = fig.rows + bound
    fig.extra.update({"triton_cached_ratio": own, "kdserve_share_of_triton": fig.ratio / own})
    fig.notes.append(
        f"what bounds it: the same tritonserver answering each request from a cache (no kdserve work per "
        f"request; bench/triton_cached_model.py) moves {own:.2f}x the echo's MB/s; kdserve's work in the "
        f"Python stub keeps {fig.ratio / own:.2f} of that"
    )


def _grid(quick: bool) -> tuple[list[int], float]:
    """Reply sizes and the seconds of one window."""
    sizes = [100_000, 1_000_000, 16_000_000] if quick else [100_000, 1_000_000, 4_000_000, 16_000_000]
    return sizes, (0.6 if quick else 1.5)


def _median(windows: list[dict]) -> dict:
    """The window with the median MB/s (an odd count: one of them, with its own req/s and p50)."""
    return sorted(windows, key=lambda w: w["mb_s"])[len(windows) // 2]


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, n in zip(axes, (1, 4)):
        cell = [r for r in rows if r["clients"] == n]
        fronts = sorted({r["frontend"] for r in cell})
        for f in fronts:
            rs = [r for r in cell if r["frontend"] == f]
            ax.plot([r["size"] / 1e6 for r in rs], [r["mb_s"] for r in rs], "o-", label=f)
        echo = {}
        for r in cell:
            echo.setdefault(r["size"], []).append(r["echo_mb_s"])
        ax.plot([s / 1e6 for s in echo], [sum(v) / len(v) for v in echo.values()], "k--", label="bare grpc.aio echo")
        ax.set_xscale("log")
        ax.set_xlabel("reply MB")
        ax.set_title(f"P4: {n} client(s)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("MB/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
