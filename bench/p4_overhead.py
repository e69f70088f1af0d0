"""P4 overhead: MB/s and requests/s of GetTargets through plain gRPC, Ray Serve and Triton vs a
bare grpc.aio bytes echo (bench_teacher's, in a child process) of replies of the same size.

The synthetic text teacher with no latency makes replies of any size cheaply: one sample, T
tokens and k hidden layers (float32, D = 768) give k * T * 3 KB. Each frontend's reply is sent
once, its ByteSize() sets the echo's reply size, so both move the same bytes. 1 and 4 clients.

Each cell alternates ROUNDS windows of the frontend and of the echo (A B A B A B) and compares
their medians: on a small shared machine the speed of both drifts by tens of percent over a run,
and alternating short windows lets both see the same drift.
"""
from __future__ import annotations

import asyncio
import math

import torch

from bench.common import Figure, echo_window, geomean, teacher_window

D, MAX_LEN, LAYERS = 768, 1024, 12
MODEL = f"synthetic:input=text,layers={LAYERS},dim={D},heads=12,classes=0,vocab=30522,max_len={MAX_LEN},latency_ms=0"
FRONTENDS = ("plain gRPC", "Ray Serve", "Triton")
ROUNDS = 3
KEYS = {"plain gRPC": "P4_ratio_grpc", "Ray Serve": "P4_ratio_serve", "Triton": "P4_ratio_triton"}


def request_for(size: int):
    """A request whose reply carries about ``size`` bytes of hidden states."""
    from kdserve.wire import build_request, target_spec

    k = max(1, math.ceil(size / (MAX_LEN * D * 4)))
    t = max(1, min(MAX_LEN, round(size / (k * D * 4))))
    ids = torch.randint(0, 30522, (1, t), generator=torch.Generator().manual_seed(t))
    return build_request({"input_ids": ids}, target_spec(hidden={"text": list(range(1, k + 1))}))


def run(quick: bool, log, addresses: dict[str, str], echo_port: int, notes: list[str]) -> list[Figure]:
    sizes = [100_000, 1_000_000, 16_000_000] if quick else [100_000, 1_000_000, 4_000_000, 16_000_000]
    seconds = 0.6 if quick else 1.5  # per window; ROUNDS windows per side and cell
    clients = [1, 4]
    rows = []
    for size in sizes:
        req = request_for(size)
        for n in clients:
            for name, address in addresses.items():
                ws, es, reply = [], [], 0
                for _ in range(ROUNDS):
                    ws.append(asyncio.run(teacher_window(address, req, n, seconds)))
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
    figs = []
    for name in FRONTENDS:
        mine = [r for r in rows if r["frontend"] == name]
        if not mine:
            figs.append(Figure(KEYS[name], float("nan"), float("nan"), what=f"{name}: skipped", notes=list(notes)))
            continue
        figs.append(Figure(
            KEYS[name], baseline=geomean([r["echo_mb_s"] for r in mine]), measured=geomean([r["mb_s"] for r in mine]),
            unit="MB/s (geomean)",
            what=(f"MB/s of GetTargets through {name} vs a bare grpc.aio bytes echo of the same reply sizes; geometric "
                  f"mean over replies {', '.join(f'{s / 1e6:g}' for s in sizes)} MB x clients {clients} (rows: each cell, "
                  f"with req/s); each cell the median of {ROUNDS} alternating {seconds:g} s windows per side; "
                  f"synthetic text teacher, latency 0, replies decoded"),
            rows=mine, extra={"min_cell_ratio": min(r["ratio"] for r in mine)},
        ))
    return figs


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
