"""The teacher and the students on their own nodes of a real multi-node Ray cluster, on one machine:
where each actor ran, Serve replicas following the students' demand, and a teacher node lost while
a student trains.

    python -m bench.multinode            # about 8 minutes here
    python -m bench.multinode --quick    # shorter phases (tests/test_multinode.py)

The cluster is ``ray.cluster_utils.Cluster``: a head with no CPUs (GCS, Serve's controller and
proxy, Ray Train's controller), 2 teacher nodes (custom resource ``teacher_node``) and 2 student
nodes (``student_node``), each its own raylet. The packaged MiniLM teacher is deployed with
``serve.resources: {teacher_node: 0.01}`` and autoscaling (1 to 3 replicas); the students' Ray
Train workers ask for ``train.resources_per_worker: {student_node: 0.01}``.

1. placement: a 2-worker distillation; Ray's state API says which node each actor ran on.
2. autoscaling: 1, then 3, then 0 experiments send work (4 closed-loop clients each, against a
   target of 4 ongoing requests per replica); the running replicas are sampled every second.
3. teacher node loss: two distillations train; the node holding the teacher's replica is removed
   (its raylet and every process on it killed); the replica comes back on the other teacher node
   and both jobs must finish with every optimizer step done once (no worker restart, none resumed).
4. student node loss: a distillation trains; a node holding one of its Train workers is removed;
   Ray Train restarts the worker group on the student node that remains, from the last checkpoint.

Prints a summary and writes bench/results/multinode-<date>.json.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
APP = "teacher"
KINDS = ("teacher_node", "student_node")
CLIENTS = 4  # closed-loop clients per experiment, and the replicas' target of ongoing requests
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def start_cluster(object_store_mb: int = 150):
    """Head (0 CPUs) + 2 teacher nodes + 2 student nodes; returns (cluster, {node_id: kind})."""
    import ray
    from ray.cluster_utils import Cluster

    store = object_store_mb << 20
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": store, "include_dashboard": True})
    nodes = {}
    for kind in KINDS:
        for _ in range(2):
            node = cluster.add_node(num_cpus=2, resources={kind: 1}, object_store_memory=store)
            nodes[node.node_id] = kind
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_config=ray.LoggingConfig(log_level="WARNING"))
    nodes[cluster.head_node.node_id] = "head"
    return cluster, nodes


def teacher_config(quick: bool):
    from kdserve.teacher_config import TeacherConfig

    return TeacherConfig(model="minilm", device="cpu", max_batch_size=16, serve={
        "num_cpus": 0.5, "resources": {"teacher_node": 0.01},
        "autoscaling": {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": CLIENTS,
                        "upscale_delay_s": 1, "downscale_delay_s": 5 if quick else 10,
                        "look_back_period_s": 3 if quick else 5}})


def deploy_teacher(cfg) -> int:
    """Serve with one proxy, on the head (every node's proxy would bind the same port here)."""
    from ray import serve

    from kdserve.net import free_port
    from teacher_server.serve_app import deploy, grpc_options

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": free_port()},
                grpc_options=grpc_options(port), logging_config={"log_level": "WARNING"})
    return deploy(cfg, grpc_port=port)


def job_config(tmp: Path, address: str, name: str, steps: int):
    from kdserve.config import build
    from student_workers.train.job_config import JobConfig

    words = [f"the {a} {n} follows a {b} {m}" for a in ("small", "green", "quiet", "warm")
             for n in ("river", "letter", "window") for b in ("bright", "heavy") for m in ("song", "garden")]
    path = tmp / "sentences.txt"
    path.write_text("\n".join(words * 4) + "\n")
    return build(JobConfig, {
        "teacher": {"address": address, "prefetch_depth": 2, "timeout_s": 30, "retry_budget_s": 120},
        "student": {"kind": "hf_text", "name": "bert", "kwargs": TINY_BERT},
        "distill": {"feature_weight": 1.0},
        "data": {"dataset": "text_file", "kwargs": {"path": str(path)}, "batch_size": 8, "max_length": 16,
                 "eval_samples": 16},
        "train": {"steps": steps, "lr": 3e-3, "warmup_steps": 2, "num_workers": 2, "cpus_per_worker": 1,
                  "resources_per_worker": {"student_node": 0.01}, "log_every": 5, "checkpoint_every": 5,
                  "max_failures": 1},
        "run": {"name": name, "storage_path": str(tmp / "runs")},
    })


def actor_nodes(nodes: dict[str, str]) -> dict[str, list[str]]:
    """Actor class -> the kinds of node its actors ran on (alive or not), from Ray's state API."""
    from ray.util.state import list_actors

    where = collections.defaultdict(list)
    for a in list_actors(detail=True, limit=10_000, raise_on_missing_output=False):
        where[a.class_name].append(nodes.get(a.node_id, "?"))
    return {k: sorted(v) for k, v in sorted(where.items())}


def placement(tmp: Path, address: str, nodes: dict[str, str]) -> dict:
    from kdjob.fit import fit

    result = fit(job_config(tmp, address, "placement", steps=10), address, tmp / "runs" / "placement")
    where = actor_nodes(nodes)
    replicas = [k for c, ks in where.items() if c.startswith("ServeReplica:") for k in ks]
    workers = [k for c, ks in where.items() if c == "RayTrainWorker" for k in ks]
    return {"where": where, "replica_nodes": replicas, "worker_nodes": workers,
            "ok": result.error is None and set(replicas) == {"teacher_node"} and set(workers) == {"student_node"}}


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


class Sampler(threading.Thread):
    """Running replicas every ``every_s``, with the phase they were seen in."""

    def __init__(self, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.every_s, self.phase, self.trace, self.stop = every_s, "start", [], threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            try:
                self.trace.append((round(time.monotonic() - self.t0, 1), self.phase, running_replicas()))
            except Exception:  # the controller busy or restarting: a gap in the trace, not an error
                pass


def client_loop(port: int, experiment: str, stop: threading.Event, counts: collections.Counter) -> None:
    from kdserve import wire
    from kdserve.v1 import teacher_pb2_grpc as pb_grpc

    ids = torch.randint(1000, 5000, (8, 32))
    req = wire.build_request({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                             wire.target_spec(hidden={"text": [6]}, dtype="float16"), experiment)
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        while not stop.is_set():
            try:
                stub.GetTargets(req, timeout=60, metadata=(("application", APP),))
                counts[experiment] += 1
            except grpc.RpcError as e:
                counts[e.code().name] += 1


def autoscaling(port: int, phase_s: float, clients: int = CLIENTS, settle_s: float = 180.0) -> dict:
    """1, then 3, then 0 experiments, each ``clients`` closed-loop clients, with the target of
    ``clients`` ongoing requests per replica: one experiment can never ask for a second replica
    (its ongoing requests never exceed the target), three ask for three. The one-experiment phase
    lasts ``phase_s``; the others last until the replicas reach what the demand asks (more than
    one, then back to one) or ``settle_s`` passes: how long a replica takes to start is the
    machine's business, what it must do is the autoscaler's."""
    sampler = Sampler()
    sampler.start()
    counts: collections.Counter = collections.Counter()
    running: list[tuple[threading.Thread, threading.Event]] = []

    def until(done, limit_s: float) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit_s and not done():
            time.sleep(1.0)

    def seen(phase: str) -> list[int]:
        return [n for _, q, n in sampler.trace if q == phase]

    for experiments in (1, 3, 0):
        while len(running) > experiments * clients:  # experiments leave
            t, stop = running.pop()
            stop.set()
            t.join()
        while len(running) < experiments * clients:  # experiments arrive
            stop = threading.Event()
            t = threading.Thread(target=client_loop, args=(port, f"exp-{len(running) // clients}", stop, counts),
                                 daemon=True)
            t.start()
            running.append((t, stop))
        phase = sampler.phase = f"{experiments} experiments"
        if experiments == 1:
            time.sleep(phase_s)
        elif experiments == 3:  # up, then a few seconds more to see that it holds
            until(lambda: max(seen(phase), default=0) > 1, settle_s)
            time.sleep(min(phase_s, 5.0))
        else:
            until(lambda: seen(phase)[-3:] == [1, 1, 1], settle_s)
    sampler.stop.set()
    sampler.join()
    peak = {p: max((n for _, q, n in sampler.trace if q == p), default=0) for p in ("1 experiments", "3 experiments")}
    end = [n for _, q, n in sampler.trace if q == "0 experiments"][-3:]
    return {"trace": sampler.trace, "requests": dict(counts), "peak": peak, "end": end,
            "ok": bool(peak["3 experiments"] > peak["1 experiments"] >= 1 and end and max(end) == 1)}


def alive_nodes(class_prefix: str) -> list[str]:
    """Node ids of the live actors whose class name starts with ``class_prefix``."""
    from ray.util.state import list_actors

    return [a.node_id for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000)
            if a.class_name.startswith(class_prefix)]


def replica_node(nodes: dict[str, str]) -> str | None:
    alive = alive_nodes("ServeReplica:")
    return alive[0] if alive else None


def node_loss(tmp: Path, address: str, cluster, nodes: dict[str, str], steps: int, kind: str,
              experiments: int = 1) -> dict:
    """``experiments`` distillations train; once each has a checkpoint, the node of the given kind
    that holds the teacher's replica (``teacher_node``) or a Train worker (``student_node``) is
    removed: its raylet and every process on it killed at once."""
    from kdjob.fit import fit

    name = f"{kind.split('_')[0]}-loss"
    out: dict[int, object] = {}

    def train(i: int) -> None:
        out[i] = fit(job_config(tmp, address, f"{name}-{i}", steps), address, tmp / "runs" / f"{name}-{i}")

    threads = [threading.Thread(target=train, args=(i,)) for i in range(experiments)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 600
    while (not all(list((tmp / "runs" / f"{name}-{i}").glob("checkpoint_*")) for i in range(experiments))
           and all(t.is_alive() for t in threads) and time.monotonic() < deadline):
        time.sleep(0.5)  # every job has a checkpoint: training is under way
    holders = [replica_node(nodes)] if kind == "teacher_node" else alive_nodes("RayTrainWorker")
    victim_id = next(n for n in holders if n and nodes.get(n) == kind)
    victim = next(n for n in cluster.worker_nodes if n.node_id == victim_id)
    cluster.remove_node(victim, allow_graceful=False)
    killed_at = time.monotonic()
    workers_after: set[str] = set()  # where Train workers ran once the node was gone
    while any(t.is_alive() for t in threads):
        try:
            workers_after.update(nodes.get(n, "?") for n in alive_nodes("RayTrainWorker") if n != victim_id)
        except Exception:  # the state API busy while the cluster recovers: try again
            pass
        time.sleep(1.0)
    for t in threads:
        t.join()
    jobs = []
    for i in range(experiments):
        result = out[i]
        m = result.metrics or {}
        jobs.append({"error": None if result.error is None else str(result.error)[:500], "steps": m.get("step"),
                     "resumed_from": m.get("resumed_from")})
    # a lost teacher node must cost no step (the client retries, no worker restarts); a lost student
    # node restarts the worker group from the last checkpoint, on the nodes that remain
    fine = (lambda j: j["resumed_from"] == 0) if kind == "teacher_node" else (lambda j: (j["resumed_from"] or 0) > 0)
    after = replica_node(nodes) if kind == "teacher_node" else None
    return {"killed_node": nodes[victim_id], "jobs": jobs, "replica_after": nodes.get(after) if after else None,
            "workers_after": sorted(workers_after),
            "seconds_after_kill": round(time.monotonic() - killed_at, 1),
            "ok": all(j["error"] is None and j["steps"] == steps and fine(j) for j in jobs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.multinode", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter phases (the test's run)")
    p.add_argument("--json", help="write the report here (default bench/results/multinode-<date>.json)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # short phases want a short load window; Serve would rather it exceeded its deprecated 10 s metrics interval
    warnings.filterwarnings("ignore", message=".*look_back_period_s.*must be greater than.*")
    # Serve's load reports every 10 s by default; the nodes inherit these, so short phases can be seen
    for var in ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"):
        os.environ.setdefault(var, "1")
    import ray

    report: dict = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "quick": args.quick}
    cluster, nodes = start_cluster()
    try:
        with tempfile.TemporaryDirectory(prefix="kdserve-multinode-") as tmp:
            port = deploy_teacher(teacher_config(args.quick))
            address = f"grpc://127.0.0.1:{port}"
            report["placement"] = placement(Path(tmp), address, nodes)
            report["autoscaling"] = autoscaling(port, phase_s=20 if args.quick else 45)
            steps = 30 if args.quick else 60
            report["node_loss"] = node_loss(Path(tmp), address, cluster, nodes, steps, "teacher_node", experiments=2)
            report["student_loss"] = node_loss(Path(tmp), address, cluster, nodes, steps, "student_node")
    finally:
        ray.shutdown()
        cluster.shutdown()
    out = Path(args.json) if args.json else RESULTS / f"multinode-{report['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(summary(report))
    return 0 if all(report[k]["ok"] for k in ("placement", "autoscaling", "node_loss", "student_loss")) else 1


def summary(r: dict) -> str:
    pl, au = r["placement"], r["autoscaling"]
    lines = ["where each actor ran (node kinds):"]
    lines += [f"  {cls:45s} {', '.join(k)}" for cls, k in pl["where"].items()]
    trace = " ".join(f"{t:.0f}s:{n}" for t, _, n in au["trace"])
    lines += [f"replicas while 1, 3, 0 experiments send work: peaks {au['peak']}, last {au['end']}", f"  trace {trace}",
              f"  requests {au['requests']}"]
    for key in ("node_loss", "student_loss"):
        nl = r[key]
        jobs = "; ".join(f"job {i}: steps {j['steps']}, resumed_from {j['resumed_from']}, error {j['error']}"
                         for i, j in enumerate(nl["jobs"]))
        where = (f"replica now on a {nl['replica_after']}" if nl["replica_after"]
                 else f"workers now on {nl['workers_after']}")
        lines.append(f"{nl['killed_node']} killed under training ({nl['seconds_after_kill']} s to the end): {jobs}; {where}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
