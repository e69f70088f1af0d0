"""Student steps/s with a remote teacher, synchronous and with prefetch, against targets in memory.

Run (from the repository root, ~1.5-2.5 min with the defaults on a 2-core machine):

    python -m bench --sweep prefetch-training
    python -m bench --sweep prefetch-training --steps 60 --depths 0,2,4
    python -m bench --sweep prefetch-training --teacher-address grpc://gpu-box:9000     # an existing teacher

One run measures the SAME student step (the one of ``student_workers.train.loop``) on the SAME batches
in every mode, so the ratios isolate what the teacher costs the training loop:

* teacher: the packaged MiniLM (all-MiniLM-L6-v2, 6 layers, D=384) via ``TeacherEngine``, served
  by the plain gRPC frontend (``run_server``, no Ray) in a CHILD PROCESS:
  ``python -m teacher_server --backend grpc --model minilm --host 127.0.0.1 --port P``.
  A child process, not a thread of this one: a teacher forward in a thread would compete with the
  student for this process's GIL and torch thread pool, which a real (remote) teacher never does.
  ``--teacher-address`` uses a running teacher instead (it must serve a text module, e.g. MiniLM).
* student: ``build_student`` hf_text, a random-init BERT (default 3 layers, D=128, 4 heads, FFN 4D:
  the quickstart student), wrapped in ``Distiller`` with feature KD (MSE) on the uniform layer map
  (student 1,2,3 -> teacher 2,4,6), one AdamW step with grad-norm clipping per batch;
* data: WordNet gloss sentences (``build_dataset("wordnet")``, train split, a fixed shuffle),
  tokenized up front by ``collate_text("minilm", 32)`` into batches of --batch (32) sentences,
  so tokenization is in no mode's time;
* targets: ``Distiller.target_spec()`` (hidden states of teacher layers 2, 4, 6, float32),
  fetched with ``SyncTeacherClient`` (the training loop's client).

Modes. --steps timed steps per mode are split over --rounds rounds (default 2); each round runs
every mode in turn (in-memory, then each depth), each with a fresh student (same seed) and
--warmup untimed steps first, which for the prefetch modes also fill the pipeline. A prefetcher's
source holds ``depth`` batches more than are trained, so the pipeline is still full at the last
timed step; those requests are drained (not cancelled) before the next mode starts. Rounds make
a drift in host load hit every mode alike; "rounds min-max" shows how much they differed.

  in-memory     targets fetched once before timing, for the same batches: the loop never waits
                on the teacher. The upper bound on steps/s.
  depth 0       ``Prefetcher(depth=0)``: each step asks the teacher, waits, then trains (X + Y).
  depth K       ``Prefetcher(depth=K)``: the next K requests are in flight while the step trains
                (about max(X, Y) per step when teacher and student do not share hardware).

Columns:
  steps/s        timed steps / their wall time (student forward + losses + backward + AdamW,
                 plus whatever the loop waited for targets)
  ms/step        1000 / steps/s
  wait ms/step   ``Prefetcher.total_wait_s`` over the timed steps / steps: time the loop blocked
                 in ``next(prefetcher)`` for targets (0 in memory)
  rounds min-max steps/s of the slowest and the fastest round
  teacher ms/req client-side latency of one GetTargets (``ClientStats.wait_s`` / requests answered
                 during the timed steps): at depth K a request also queues behind up to K - 1
                 others, and the forward slows when the teacher shares the CPU with the student
  srv ms/req     the teacher's ``Timings.compute_ms``; the plain gRPC server measures it around
                 the engine's lock, so it includes waiting for the other in-flight requests' forwards
  x in-memory    steps/s / in-memory steps/s (1.00 = the teacher costs nothing)
  x sync         steps/s / depth-0 steps/s (the prefetch speedup)

Also printed: X = the teacher's latency per batch with the student idle (from the in-memory
mode's target fetch), Y = the in-memory step time, and what they predict: synchronous
1/(X + Y) steps/s, perfect overlap 1/max(X, Y).

Threads: by default the started teacher and the student split the host's cores (on 2 cores one
torch thread each; --teacher-threads / --student-threads override). Oversubscribed OpenMP pools
(2 + 2 threads on 2 cores) make every parallel region wait for a descheduled thread: a 3-4x slower
student step on this 2-core VM. Every mode, in-memory included, uses the same student threads, so
the ratios compare like with like (the in-memory bound with the teacher's core too would be higher).

On a 2-core machine the teacher and the student share the CPU, so overlap is limited: while a
prefetched request runs, the teacher's forward, the gRPC transfer and the client's decoding (in
this process, on its GIL) take CPU time from the student's step, so prefetch wins less than
max(X, Y) predicts. With a remote (GPU) teacher the two do not compete and prefetch hides the
teacher latency almost entirely whenever X <= Y (wait ms/step ~ 0, x in-memory ~ 1). The numbers
are only as quiet as the machine: other load on the host shows up directly in steps/s.

A JSON with every number is written to --out (default bench/results/prefetch-<timestamp>.json;
bench/results is git-ignored).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))  # `python bench/prefetch_training.py` from anywhere


# --------------------------------------------------------------------------- teacher (child process)


def start_teacher(args) -> tuple[subprocess.Popen, str]:
    """``python -m teacher_server --backend grpc`` on a free loopback port. Returns (process, address)."""
    from kdserve.net import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "teacher_server", "--backend", "grpc", "--model", args.teacher_model,
           "--host", "127.0.0.1", "--port", str(port)]
    for kv in args.teacher_set:
        cmd += ["--set", kv]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if args.teacher_threads:  # torch sizes its intra-op pool from OMP_NUM_THREADS
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.teacher_threads)
    if args.teacher_log:
        with open(RESULTS / f"teacher-{port}.log", "w") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    else:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return proc, f"grpc://127.0.0.1:{port}"


def wait_ready(proc: subprocess.Popen | None, address: str, timeout: float = 120.0):
    """Describe until it answers (the child loads MiniLM first). Returns the TeacherInfo."""
    import grpc

    from kdserve.v1 import teacher_pb2 as pb
    from kdserve.v1 import teacher_pb2_grpc as pb_grpc
    from student_workers.client.transport import make_transport

    transport = make_transport(address)  # host:port, and the Serve application's metadata if any
    if not hasattr(transport, "target"):
        raise ValueError(f"--teacher-address {address!r}: this benchmark speaks gRPC (grpc://host:port[/app])")
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the teacher process exited with {proc.returncode} (rerun with --teacher-log)")
        try:
            with grpc.insecure_channel(transport.target) as ch:
                return pb_grpc.TeacherServiceStub(ch).Describe(pb.DescribeRequest(), timeout=2,
                                                               metadata=transport.metadata)
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"teacher at {address} not answering after {timeout:.0f} s") from None
            time.sleep(0.5)


def stop_teacher(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)  # the server stops with a 2 s grace
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


# --------------------------------------------------------------------------- student side


def make_batches(args, n: int) -> list[dict]:
    """``n`` batches of WordNet sentences, tokenized with the teacher's tokenizer (fixed order)."""
    import torch

    from student_workers.data.build import build_dataset
    from student_workers.data.text import collate_text

    ds = build_dataset("wordnet", split="train")
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(ds), generator=g)[: n * args.batch].tolist()
    collate = collate_text("minilm", args.max_length)
    return [collate([ds[i] for i in order[k * args.batch:(k + 1) * args.batch]]) for k in range(n)]


def build_distiller(args, info):
    """A fresh student + distillation heads (same seed every time) and its AdamW."""
    import torch

    from student_workers.losses.distiller import Distiller
    from student_workers.train.job_config import DistillSection
    from student_workers.models.build import build_student

    torch.manual_seed(args.seed)
    student = build_student({
        "kind": "hf_text", "name": "bert",
        "kwargs": {"hidden_size": args.student_hidden, "num_hidden_layers": args.student_layers,
                   "num_attention_heads": args.student_heads, "intermediate_size": 4 * args.student_hidden},
    })
    cfg = DistillSection(feature_weight=1.0, feature_kind="mse", layer_map="uniform")
    distiller = Distiller(student, cfg, info).to(args.device)
    distiller.train()
    opt = torch.optim.AdamW(distiller.parameters(), lr=1e-3, weight_decay=0.01)
    return distiller, opt


def train_step(distiller, opt, batch: dict, targets: dict, device: str) -> float:
    """One step exactly as ``student_workers.train.loop`` takes it (minus the LR schedule and logging)."""
    import torch

    inputs = {k: v.to(device) for k, v in batch.items()}
    total, _terms = distiller(inputs, targets)
    opt.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(distiller.parameters(), 1.0)
    opt.step()
    return float(total.detach())  # a host sync, as the real loop's metric sums are


def teacher_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


@dataclass
class Run:
    """One timed stretch of one mode (one round)."""

    seconds: float
    steps: int
    wait_s: float = 0.0  # Prefetcher wait over the timed steps
    requests: int = 0  # teacher answers that arrived during the timed steps
    request_s: float = 0.0  # their client-side latency, summed
    compute_ms: float = 0.0  # their server-side forward time, summed
    loss: float = float("nan")


@dataclass
class Row:
    mode: str
    depth: int | None
    steps: int
    seconds: float
    steps_s: float
    ms_step: float
    wait_ms_step: float
    teacher_ms_req: float | None
    teacher_compute_ms: float | None
    round_steps_s: list[float]
    final_loss: float
    x_in_memory: float | None = None
    x_sync: float | None = None

    @classmethod
    def of(cls, mode: str, depth: int | None, runs: list[Run]) -> "Row":
        steps, secs = sum(r.steps for r in runs), sum(r.seconds for r in runs)
        reqs = sum(r.requests for r in runs)
        return cls(
            mode, depth, steps, secs, steps / secs, secs / steps * 1e3, sum(r.wait_s for r in runs) / steps * 1e3,
            sum(r.request_s for r in runs) / reqs * 1e3 if reqs else None,
            sum(r.compute_ms for r in runs) / reqs if reqs else None,
            [r.steps / r.seconds for r in runs], runs[-1].loss,
        )


def run_in_memory(args, info, batches: list[dict], targets: list[dict], steps: int) -> Run:
    distiller, opt = build_distiller(args, info)
    for b, t in zip(batches[: args.warmup], targets[: args.warmup]):
        train_step(distiller, opt, b, t, args.device)
    _sync(args.device)
    t0 = time.perf_counter()
    for b, t in zip(batches[args.warmup: args.warmup + steps], targets[args.warmup: args.warmup + steps]):
        loss = train_step(distiller, opt, b, t, args.device)
    _sync(args.device)
    return Run(time.perf_counter() - t0, steps, loss=loss)


def run_remote(args, info, client, spec, batches: list[dict], depth: int, steps: int) -> Run:
    """Warm-up + ``steps`` timed steps through a Prefetcher of ``depth``.

    The source holds ``depth`` batches more than are trained on, so the pipeline stays full up to
    the last timed step (no idle teacher at the end); those last requests are drained, not
    cancelled, so no leftover forward runs into the next mode's timing.
    """
    from student_workers.client.prefetch import Prefetcher

    distiller, opt = build_distiller(args, info)
    n = args.warmup + steps
    source = batches[:n] + batches[:depth]
    st = client.stats
    pre = Prefetcher(source, lambda b: (teacher_inputs(b), spec), client, depth=depth, timeout=120.0,
                     name=client.address)
    with pre:
        for _ in range(args.warmup):
            b, t = next(pre)
            train_step(distiller, opt, b, t, args.device)
        _sync(args.device)
        wait0, req0, lat0, comp0 = pre.total_wait_s, st.requests, st.wait_s, st.teacher_compute_ms
        t0 = time.perf_counter()
        for _ in range(steps):
            b, t = next(pre)
            loss = train_step(distiller, opt, b, t, args.device)
        _sync(args.device)
        run = Run(time.perf_counter() - t0, steps, pre.total_wait_s - wait0, st.requests - req0,
                  st.wait_s - lat0, st.teacher_compute_ms - comp0, loss)
        for _ in pre:  # drain the `depth` extra requests
            pass
    return run


# --------------------------------------------------------------------------- report


def print_table(rows: list[Row]) -> None:
    head = (f"{'mode':<18}{'steps/s':>9}{'rounds min-max':>16}{'ms/step':>9}{'wait ms/step':>14}"
            f"{'teacher ms/req':>16}{'srv ms/req':>12}{'x in-memory':>13}{'x sync':>8}")
    print(head)
    print("-" * len(head))
    opt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
    for r in rows:
        spread = f"{min(r.round_steps_s):.2f}-{max(r.round_steps_s):.2f}"
        print(f"{r.mode:<18}{r.steps_s:>9.2f}{spread:>16}{r.ms_step:>9.1f}{r.wait_ms_step:>14.1f}"
              f"{opt(r.teacher_ms_req, '16.1f'):>16}{opt(r.teacher_compute_ms, '12.1f'):>12}"
              f"{opt(r.x_in_memory, '13.3f'):>13}{opt(r.x_sync, '8.3f'):>8}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each mode's timed steps (per round)")
    p.add_argument("--rounds", type=int, default=2,
                   help="split --steps over this many rounds of every mode in turn (spreads drifting host load)")
    p.add_argument("--batch", type=int, default=32, help="sentences per batch")
    p.add_argument("--max-length", type=int, default=32, help="tokens per sentence (collate_text max_length)")
    p.add_argument("--depths", default="0,2", help="comma-separated prefetch depths (0 = synchronous)")
    p.add_argument("--student-layers", type=int, default=3, help="hf_text student: num_hidden_layers")
    p.add_argument("--student-hidden", type=int, default=128, help="hf_text student: hidden_size (FFN = 4x)")
    p.add_argument("--student-heads", type=int, default=4, help="hf_text student: num_attention_heads")
    p.add_argument("--student-threads", type=int, default=None,
                   help="torch threads of the student (default: half the host's cores; all of them with --teacher-address)")
    p.add_argument("--device", default="cpu", help="student device (cpu, cuda)")
    p.add_argument("--teacher-address", default=None, help="use this running teacher (grpc://host:port[/app])")
    p.add_argument("--teacher-model", default="minilm", help="--model of the started teacher")
    p.add_argument("--teacher-threads", type=int, default=None,
                   help="torch (OMP) threads of the started teacher (default: the cores the student does not use)")
    p.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE",
                   help="--set passed to the started teacher (e.g. device=cpu)")
    p.add_argument("--teacher-log", action="store_true", help="keep the started teacher's log in bench/results/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="auto", help="JSON path (default bench/results/prefetch-<timestamp>.json; 'none': skip)")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch < 1 or not 1 <= args.rounds <= args.steps:
        p.error("--steps >= 1, --warmup >= 0, --batch >= 1, 1 <= --rounds <= --steps")
    # Split the cores between teacher and student: oversubscribed OpenMP pools (2 + 2 threads on 2
    # cores) make every parallel region wait for a descheduled thread, a 3-4x slower step here.
    cpus = os.cpu_count() or 1
    if args.student_threads is None:
        args.student_threads = cpus if args.teacher_address else max(1, cpus // 2)
    if args.teacher_threads is None:
        args.teacher_threads = max(1, cpus - args.student_threads)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    depths = [int(d) for d in args.depths.split(",") if d.strip()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    setup: dict[str, float] = {}

    proc = None
    if args.teacher_address:
        address = args.teacher_address
    else:
        proc, address = start_teacher(args)  # loads MiniLM while this process imports torch & co.
    try:
        import torch

        if args.student_threads:
            torch.set_num_threads(args.student_threads)
        from student_workers.client.sync_client import SyncTeacherClient

        t = time.perf_counter()
        per_round = [args.steps // args.rounds + (i < args.steps % args.rounds) for i in range(args.rounds)]
        batches = make_batches(args, args.warmup + max(per_round))  # every round trains on the same batches
        setup["batches"] = time.perf_counter() - t

        t = time.perf_counter()
        info = wait_ready(proc, address)
        setup["teacher_ready"] = time.perf_counter() - t_start

        client = SyncTeacherClient(address, experiment_id="bench-prefetch", timeout=60.0)
        try:
            distiller, _ = build_distiller(args, info)
            spec = distiller.target_spec()
            # (student block, teacher block) pairs; Distiller keeps them per module (or as one list)
            pairs = distiller.pairs
            pairs = [tuple(x) for x in (next(iter(pairs.values())) if isinstance(pairs, dict) else pairs)]
            del distiller

            # Teacher alone (student idle): X, and the targets of the in-memory mode.
            client.get_targets(teacher_inputs(batches[0]), spec)  # connect + warm the teacher
            r0, w0 = client.stats.requests, client.stats.wait_s
            t = time.perf_counter()
            targets = [client.get_targets(teacher_inputs(b), spec) for b in batches]
            setup["precompute_targets"] = time.perf_counter() - t
            x_ms = (client.stats.wait_s - w0) / (client.stats.requests - r0) * 1e3
            reply_mb = client.stats.bytes_received / client.stats.requests / 1e6
            compute_ms = client.stats.teacher_compute_ms / client.stats.requests

            t = time.perf_counter()
            runs: dict[int | None, list[Run]] = {None: [], **{d: [] for d in depths}}
            for steps in per_round:  # every mode once per round, so drifting host load hits all of them
                runs[None].append(run_in_memory(args, info, batches, targets, steps))
                for d in depths:
                    runs[d].append(run_remote(args, info, client, spec, batches, d, steps))
            setup["modes"] = time.perf_counter() - t
            del targets
            rows = [Row.of("in-memory" if d is None else f"remote, depth {d}", d, r) for d, r in runs.items()]
        finally:
            client.close()
    finally:
        t = time.perf_counter()
        stop_teacher(proc)
        setup["shutdown"] = time.perf_counter() - t
    setup["total"] = time.perf_counter() - t_start

    base = rows[0].steps_s
    sync = next((r.steps_s for r in rows if r.depth == 0), None)
    for r in rows:
        r.x_in_memory = r.steps_s / base
        r.x_sync = r.steps_s / sync if sync and r.depth is not None else None
    y_ms = rows[0].ms_step

    m = info.modules[0]
    tokens = float(sum(int(b["attention_mask"].shape[1]) for b in batches)) / len(batches)
    print()
    print(f"teacher {info.model_name} at {address}{' (started: plain gRPC child process)' if proc else ''}: "
          f"{m.num_layers} layers, D={m.hidden_size}; targets hidden layers {sorted({tl for _, tl in pairs})} float32, "
          f"{reply_mb:.2f} MB/reply")
    print(f"student hf_text BERT {args.student_layers} layers, D={args.student_hidden}, {args.student_heads} heads, "
          f"map {pairs}; batch {args.batch} WordNet sentences, mean {tokens:.1f} tokens; device {args.device}; "
          f"{os.cpu_count()} host CPUs, torch threads: student {torch.get_num_threads()}"
          + (f", teacher {args.teacher_threads}" if proc else ""))
    print(f"\nStudent steps/s: {args.steps} timed steps per mode, in {args.rounds} round(s) of every mode in turn, "
          f"each after {args.warmup} warm-up steps\n")
    print_table(rows)
    print(f"\nX teacher alone {x_ms:.1f} ms/batch (server compute {compute_ms:.1f} ms), Y in-memory step {y_ms:.1f} ms: "
          f"predicted sync {1e3 / (x_ms + y_ms):.2f} steps/s, perfect overlap {1e3 / max(x_ms, y_ms):.2f} steps/s")
    print("setup/teardown s: " + ", ".join(f"{k} {v:.1f}" for k, v in setup.items()))

    if args.out != "none":
        out = Path(args.out) if args.out != "auto" else RESULTS / f"prefetch-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        import grpc

        doc: dict[str, Any] = dict(
            args=vars(args),
            teacher=dict(address=address, started=proc is not None, model=info.model_name,
                         fingerprint=info.fingerprint, layers=m.num_layers, hidden=m.hidden_size),
            targets=dict(layer_pairs=pairs, reply_mb=reply_mb),
            host=dict(cpus=os.cpu_count(), python=sys.version.split()[0], torch=torch.__version__,
                      grpc=grpc.__version__, student_threads=torch.get_num_threads()),
            teacher_alone_ms=x_ms, teacher_compute_ms=compute_ms, in_memory_step_ms=y_ms,
            predicted=dict(sync_steps_s=1e3 / (x_ms + y_ms), overlap_steps_s=1e3 / max(x_ms, y_ms)),
            setup_s=setup,
            rows=[asdict(r) for r in rows],
        )
        out.write_text(json.dumps(doc, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
