"""``python -m bench``: kdserve's performance figures, each beside its baseline, from ONE run.

    python -m bench --quick                 # ~5 min on a 2-core machine
    python -m bench --only P1,P3            # some figures
    python -m bench --no-serve --no-triton  # plain gRPC only
    python -m bench --sweep NAME [its options]   # one of the wider, standalone measurements below

Figures (every number is a ratio against a baseline measured in the same run):
  P1 prefetch  student steps/s, remote synthetic teacher + Prefetcher vs targets in memory;
               and the curve as the teacher's latency grows past the step time, its lowest
               steps/s over 1 / max(latency, step) (prefetch.py)
  P2 batching  samples/s, 4 clients x batch 8 vs one in-process engine call at batch 32 (batching.py)
  P3 wire      bytes on the wire per sample vs the requested tensors' raw bytes, per reduction/dtype
               (wire_bytes.py)
  P4 overhead  MB/s and req/s through plain gRPC, Ray Serve, Triton vs a bare grpc.aio bytes echo
               (transport_overhead.py; the echo: echo.py)
  P6 scaling   samples/s of 4 Ray Serve replicas vs 4x one, latency-bound synthetic teacher (scaling.py)
  F  fairness  a light experiment's p50 beside a flooding one, fair scheduler vs FIFO (fairness.py)
  C  cache     a second experiment on the same data, target cache on, vs the first; and a repeated
               experiment's forwards over its first run's on 1 and 3 Ray Serve replicas (target_cache.py)
  S3 store     bytes the target store keeps per target vs the raw tensor bytes (store_bytes.py; no Ray)
  S1 store job student steps/s training from the store (mode read, no teacher) vs the same loop without
               KD (store_jobs.py; no Ray)
  S2 precompute  precompute samples/s (keys + teacher in process + store writes) vs the in-process
               engine alone at the same batch (store_jobs.py; no Ray)
Writes bench/results/<date>-<host>.json, .md (printed too) and P1/P4 plots (PNG).

Sweeps (--sweep NAME; the options after NAME are the script's own, --sweep NAME --help lists them):
  prefetch-training  P1 with a real training step (BERT student, MiniLM teacher, WordNet), depths
  triton-vs-serve    one real teacher on Triton and on Ray Serve, alternating windows
  fairness           figure F's script with its own knobs (clients, batches, think time)
  target-cache       figure C's script with its own knobs (batches, cache size)
  gpu-p5             P5 (GPU): samples/s vs a bare torch forward (also python bench/gpu_p5.py)
  embed-speed        a distilled text student's embeddings/s vs its teacher's, alternating windows
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Figure
from kdserve.net import free_port

RESULTS = Path(__file__).resolve().parent / "results"
CACHED_MODEL = "kdserve_cached"
ALL = ("P1", "P2", "P3", "P4", "P6", "F", "C", "S1", "S2", "S3")
SWEEPS = {
    "prefetch-training": "bench.prefetch_training",
    "triton-vs-serve": "bench.triton_vs_serve",
    "fairness": "bench.fairness",
    "target-cache": "bench.target_cache",
    "gpu-p5": "bench.gpu_p5",
    "embed-speed": "bench.embed_speed",
}


def split_sweep(argv: list[str]) -> tuple[list[str], list[str]]:
    """The runner's arguments up to ``--sweep NAME``, and the sweep's own after it."""
    for i, a in enumerate(argv):
        if a == "--sweep":
            return argv[: i + 2], argv[i + 2:]
        if a.startswith("--sweep="):
            return argv[: i + 1], argv[i + 1:]
    return argv, []


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short windows and fewer points (~5 min on 2 cores)")
    p.add_argument("--only", default=",".join(ALL), help="comma-separated figures, e.g. P1,P3")
    p.add_argument("--no-serve", action="store_true", help="skip Ray Serve (P2, P4, P6, C across replicas)")
    p.add_argument("--no-triton", action="store_true", help="skip Triton (P4)")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--sweep", choices=sorted(SWEEPS), default=None,
                   help="run one wider, standalone measurement instead of the figures; the arguments after "
                        "NAME are its own (--sweep NAME --help)")
    return p.parse_args(argv)


class Stack:
    """The servers P2 and P4 share, each started once; failures become notes, not a dead run."""

    def __init__(self, log):
        self.log = log
        self.exit = contextlib.ExitStack()
        self.notes: dict[str, str] = {}
        self.serve: dict[str, str] = {}

    def start_serve(self, apps: dict[str, dict]) -> None:
        os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(2**31 - 1))
        try:
            import ray
            from ray import serve

            from teacher_server.serve_app import build_app, grpc_options

            t0 = time.perf_counter()
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING)
            self.exit.callback(ray.shutdown)
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, grpc_options=grpc_options(port))
            self.exit.callback(serve.shutdown)
            for name, cfg in apps.items():
                serve.run(build_app(cfg), name=name, route_prefix=f"/{name}")
                self.serve[name] = f"grpc://127.0.0.1:{port}/{name}"
            self.log(f"Ray Serve up in {time.perf_counter() - t0:.0f} s")
        except Exception as e:  # noqa: BLE001  (any failure: skip Serve with the reason)
            self.notes["serve"] = f"{type(e).__name__}: {str(e)[:300]}"
            self.log(f"Ray Serve skipped: {self.notes['serve']}")

    def start_triton(self, cfg) -> dict[str, str]:
        """The kdserve teacher on tritonserver, and beside it the same model answering from a cache
        (bench/triton_cached_model.py: Triton's own cost, what bounds P4 for Triton)."""
        try:
            from bench.transport_overhead import TRITON_CACHED
            from kdserve.triton_wire import MODEL_NAME
            from teacher_server.triton.launch import run_tritonserver
            from teacher_server.triton.repository import write_repository

            repo = self.exit.enter_context(tempfile.TemporaryDirectory(prefix="kdserve-bench-"))
            write_repository(cfg, repo, instance_kind="cpu", instances=1)
            cached = write_repository(cfg, repo, CACHED_MODEL, instance_kind="cpu", instances=1)
            shutil.copyfile(Path(__file__).with_name("triton_cached_model.py"), cached / "1" / "model.py")
            server = self.exit.enter_context(run_tritonserver(repo, env={"OMP_NUM_THREADS": "1"}))
            self.log("Triton up")
            return {"Triton": server.address(MODEL_NAME), TRITON_CACHED: server.address(CACHED_MODEL)}
        except Exception as e:  # noqa: BLE001
            self.notes["triton"] = f"{type(e).__name__}: {str(e)[:300]}"
            self.log(f"Triton skipped: {self.notes['triton']}")
            return {}


def fmt(v: float, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.4g}" if abs(v) < 10 else f"{v:.1f}"


def markdown(figs: list[Figure], meta: dict) -> str:
    out = [f"# kdserve benchmark, {meta['date']} on {meta['host']} ({meta['cpus']} CPUs, "
           f"{'quick' if meta['quick'] else 'full'} mode, {meta['seconds']:.0f} s)", "",
           "| figure | baseline | measured | ratio | unit | what |", "|---|---:|---:|---:|---|---|"]
    for f in figs:
        out.append(f"| {f.key} | {fmt(f.baseline)} | {fmt(f.measured)} | **{f.ratio:.3f}** | {f.unit} | {f.what} |")
    for f in figs:
        for n in f.notes:
            out.append(f"\n_{f.key}: {n}_")
    for f in figs:
        if not f.rows:
            continue
        out += ["", f"### {f.key}", ""]
        cols = [c for c in dict.fromkeys(k for r in f.rows for k in r) if c != "step_ms"]
        out.append("| " + " | ".join(cols) + " |")
        out.append("|" + "---|" * len(cols))
        for r in f.rows:
            out.append("| " + " | ".join(fmt(r.get(c)) if isinstance(r.get(c), float) else str(r.get(c, ""))
                                         for c in cols) + " |")
    return "\n".join(out) + "\n"


def p2_p4(args, only: set[str], log, out_dir: Path, stem: str) -> tuple[list[Figure], list[str]]:
    """P2 and P4, sharing their servers: Ray Serve's figures first, with Ray up; Ray goes down before
    the plain gRPC and Triton cells of P4 (the echo, their baseline, runs throughout)."""
    from bench import batching, scaling, target_cache, transport_overhead
    from bench.echo import start_echo_server
    from bench.common import ChildTeacher
    from kdserve.teacher_config import TeacherConfig
    from kdserve.wire import CHANNEL_OPTIONS

    figs: list[Figure] = []
    plots: list[str] = []
    p2_cfg = TeacherConfig(model=batching.MODEL, device="cpu", serve={"num_cpus": 0.5}, max_batch_size=32)
    p4_cfg = TeacherConfig(model=transport_overhead.MODEL, device="cpu", serve={"num_cpus": 0.5})
    p4_rows: list[dict] = []
    with contextlib.ExitStack() as echo:
        echo_port = 0
        if "P4" in only:
            echo_proc, echo_port = start_echo_server(list(CHANNEL_OPTIONS))
            echo.callback(echo_proc.terminate)
        with Stack(log) as stack:  # Ray's figures
            if not args.no_serve:
                apps = {}
                if "P2" in only:
                    apps["p2"] = p2_cfg.model_dump()
                if "P4" in only:
                    apps["p4"] = p4_cfg.model_dump()
                if "P6" in only:
                    apps.update(scaling.app_configs())
                if "C" in only:
                    apps.update(target_cache.replica_app_configs())
                stack.start_serve(apps)
            else:
                stack.notes["serve"] = "--no-serve"
            if "P2" in only:
                figs.append(batching.run(args.quick, log, stack.serve.get("p2"), stack.notes.get("serve", "")))
            if "p6x4" in stack.serve:
                figs.append(scaling.run(args.quick, log, stack.serve))
            if "c3" in stack.serve:
                figs += target_cache.replica_figures(args.quick, log, stack.serve)
            if "p4" in stack.serve:
                p4_rows += transport_overhead.measure(
                    args.quick, log, {"Ray Serve": stack.serve["p4"], transport_overhead.DIRECT: stack.serve["p4"]}, echo_port)
            notes = dict(stack.notes)
        if "P4" in only:
            with Stack(log) as stack:  # Ray is down
                grpc_teacher = ChildTeacher(transport_overhead.MODEL)
                stack.exit.callback(grpc_teacher.stop)
                addresses = {"plain gRPC": grpc_teacher.wait_ready().address}
                if not args.no_triton:
                    # the same teacher, without the Serve section Triton ignores (and refuses)
                    addresses.update(stack.start_triton(p4_cfg.model_copy(update={"serve": type(p4_cfg.serve)()})))
                else:
                    stack.notes["triton"] = "--no-triton"
                notes.update(stack.notes)
                p4_rows += transport_overhead.measure(args.quick, log, addresses, echo_port)
            p4 = transport_overhead.figures(args.quick, p4_rows, [f"{k} skipped: {v}" for k, v in notes.items()])
            figs += p4
            if p4_rows:
                transport_overhead.plot(p4_rows, out_dir / f"{stem}-P4.png")
                plots.append(f"{stem}-P4.png")
    return figs, plots


def main(argv=None) -> int:
    argv, sweep_argv = split_sweep(list(sys.argv[1:] if argv is None else argv))
    args = parse_args(argv)
    if args.sweep:
        result = importlib.import_module(SWEEPS[args.sweep]).main(sweep_argv)
        return result if isinstance(result, int) else 0
    only = {s.strip().upper() for s in args.only.split(",") if s.strip()}
    bad = only - set(ALL)
    if bad:
        print(f"unknown figure(s) {sorted(bad)}; use {','.join(ALL)}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    # This process is every figure's client. With glibc's defaults, reply-sized buffers go back to
    # the OS (munmap, heap trim) and their pages fault in again on the next receipt: the client, not
    # the server, then bounds large replies, by how much depending on what this process ran before
    # (P4's echo at 16 MB x4: 650 MB/s in a P4-only run, 1,300 after the other figures). With the
    # teachers' heap settings the client is the same in every run.
    from teacher_server import malloc

    malloc.tune()
    # SIGTERM (timeout, Ctrl-C in a pod) unwinds like an exception: child servers get stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{dt.date.today():%Y-%m-%d}-{socket.gethostname()}"
    figs: list[Figure] = []
    plots: list[str] = []

    if "P3" in only:
        from bench import wire_bytes

        figs.append(wire_bytes.run(args.quick, log))
    if "S3" in only:
        from bench import store_bytes

        figs.append(store_bytes.figure(args.quick, log))
    if {"S1", "S2"} & only:
        from bench import store_jobs

        figs += store_jobs.figures(args.quick, only, log)
    if "P1" in only:
        from bench import prefetch

        f1 = prefetch.run(args.quick, log)
        figs += f1
        prefetch.plot(f1[0], out_dir / f"{stem}-P1.png")
        plots.append(f"{stem}-P1.png")
    if {"P2", "P4", "P6"} & only or ("C" in only and not args.no_serve):
        f, p = p2_p4(args, only, log, out_dir, stem)
        figs += f
        plots += p

    if "F" in only:
        from bench import fairness

        figs.append(fairness.figure(args.quick, log))
    if "C" in only:
        from bench import target_cache

        figs.append(target_cache.figure(args.quick, log))

    order = {k: i for i, k in enumerate(["P1_prefetch_ratio", "P1_prefetch_curve_min", "P2_batching_ratio", "P3_bytes_ratio",
                                         "P4_ratio_grpc", "P4_ratio_serve", "P4_ratio_serve_direct", "P4_ratio_triton", "P6_scaling_efficiency",
                                         "F_fairness_light_p50", "C_cache_speedup",
                                         "C_cache_repeat_forwards_1_replica", "C_cache_repeat_forwards_3_replicas",
                                         "S1_store_training_ratio", "S2_precompute_ratio", "S3_store_bytes_ratio"])}
    figs.sort(key=lambda f: order.get(f.key, 99))
    import grpc
    import torch

    meta = {"date": f"{dt.datetime.now():%Y-%m-%d %H:%M}", "host": socket.gethostname(), "cpus": os.cpu_count(),
            "quick": args.quick, "seconds": time.perf_counter() - t0, "python": sys.version.split()[0],
            "torch": torch.__version__, "grpc": grpc.__version__, "plots": plots}
    doc = {f.key: f.as_json() for f in figs}
    doc["meta"] = meta
    (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2, default=float))
    md = markdown(figs, meta) + "".join(f"\n![{p}]({p})\n" for p in plots)
    (out_dir / f"{stem}.md").write_text(md)
    print()
    print(md)
    log(f"wrote {out_dir / stem}.json / .md")
    return 0


Stack.__enter__ = lambda self: self  # type: ignore[attr-defined]
Stack.__exit__ = lambda self, *exc: self.exit.close()  # type: ignore[attr-defined]
