"""Jobs that read the target store (``teacher.store``): read mode needs no teacher and contacts none,
targets come back bit-exact, a missing key is an error naming it; read_through fills the store so a
second run needs no teacher; ``kdserve-precompute`` fills a job's store and resumes after a SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdserve.config import ConfigError, build, load
from kdserve.store import StoreMismatch, TargetStore, sample_keys, spec_repr
from student_workers.train.job_config import JobConfig

ROOT = Path(__file__).resolve().parents[1]
unit = pytest.mark.unit
TEACHER = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 64}
STUDENT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


def write_sentences(path: Path, n: int) -> Path:
    words = ["river", "teacher", "machine", "garden", "letter", "mountain", "window", "song"]
    path.write_text("\n".join(f"sentence {i} about a {words[i % 8]} and a {words[(i // 8) % 8]}" for i in range(n)) + "\n")
    return path


def job(tmp: Path, store: Path | None = None, mode: str = "read", address: str | None = None, steps: int = 6,
        sentences: int = 200, **train) -> JobConfig:
    teacher = {"address": address, "timeout_s": 5, "retry_budget_s": 1,
               "local": {"model": "hf:bert", "pretrained": False, "model_kwargs": TEACHER, "device": "cpu",
                         "max_batch_size": 16}}
    if store is not None:
        teacher.update(store=str(store), store_mode=mode)
    return build(JobConfig, {
        "teacher": teacher,
        "student": {"kind": "hf_text", "name": "bert", "kwargs": STUDENT},
        "distill": {"feature_weight": 1.0, "layer_map": "uniform"},
        "data": {"dataset": "text_file", "kwargs": {"path": str(write_sentences(tmp / "sentences.txt", sentences))},
                 "batch_size": 8, "max_length": 16, "eval_samples": 0},
        "train": {"steps": steps, "num_workers": 2, "cpus_per_worker": 0.5, "warmup_steps": 1, "log_every": 2,
                  "checkpoint_every": 3, **train},
        "run": {"name": "store-job", "storage_path": str(tmp / "runs")},
    })


@pytest.fixture
def listener():
    """A port that records every connection: the teacher a read-mode job must never contact."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s

    s.close()


def contacted(s: socket.socket) -> bool:
    try:
        conn, _ = s.accept()
    except BlockingIOError:
        return False
    conn.close()
    return True


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """A store filled by precompute (the teacher in process) for the job ``job(tmp, store)``."""
    from kdjob.precompute import precompute

    tmp = tmp_path_factory.mktemp("filled")
    cfg = job(tmp, tmp / "store", "read")
    out = precompute(cfg, quiet=True)
    assert out["computed"] == out["samples"] == 2 * 6 * 8 and out["keys_in_store"] == 96
    return tmp, cfg


class EngineTeacher:
    """The job's teacher in process as a Submitter, counting its calls; targets as a client decodes them."""

    def __init__(self, cfg):
        from kdjob.precompute import in_process_teacher

        self.info, self.for_spec = in_process_teacher(cfg)
        self.calls = 0

    def submit(self, inputs, spec, *args):
        self.calls += 1
        return self.for_spec(spec)(dict(inputs))


def job_batches(cfg, info, n: int = 3):
    from student_workers.train.batches import batches, teacher_inputs

    it = batches(cfg, 0, cfg.train.num_workers)
    return [teacher_inputs(next(it), None) for _ in range(n)]


@unit
def test_config_one_liners(tmp_path):
    from kdjob.teacher import check_job

    with pytest.raises(ConfigError, match=r"teacher.store_max_bytes is set but teacher.store is not"):
        load(JobConfig, str(ROOT / "configs/quickstart.yaml"), ["teacher.store_max_bytes=100"])
    with pytest.raises(ConfigError, match=r"store_max_bytes is the budget of store_mode read_through, not read"):
        load(JobConfig, str(ROOT / "configs/quickstart_store.yaml"), ["teacher.store_max_bytes=100"])
    with pytest.raises(ConfigError, match=r"teacher.store: not with distill.optima.enabled"):
        load(JobConfig, str(ROOT / "configs/quickstart_store.yaml"), ["distill.optima.enabled=true"])
    with pytest.raises(ConfigError, match=r"^teacher.store: no target store at .*nowhere") as e:
        check_job(job(tmp_path, tmp_path / "nowhere", "read"))
    assert "\n" not in str(e.value)


@unit
def test_read_mode_needs_no_teacher_and_contacts_none(filled, listener, monkeypatch):
    from kdjob.teacher import check_job
    from student_workers.train import teacher as worker_teacher
    from student_workers.train.teacher import Targets

    def no_client(*a, **k):
        raise AssertionError("a read-mode job built a teacher client")

    monkeypatch.setattr(worker_teacher, "teacher_client", no_client)
    tmp, cfg = filled
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(
        update={"address": "grpc://127.0.0.1:%d" % listener.getsockname()[1]})})
    info = check_job(cfg)  # the driver's checks: from the manifest
    targets = Targets.open(cfg, cfg.teacher.address)
    assert targets.client is None and targets.info == info and info.fingerprint and info.modules
    assert not contacted(listener)


@unit
def test_read_mode_is_bit_exact_and_names_a_missing_key(filled):
    from kdjob.precompute import in_process_teacher
    from student_workers.client.prefetch import Prefetcher
    from student_workers.train.check import check_student_side
    from student_workers.train.store import StoreKeyMissing, StoreSubmitter

    tmp, cfg = filled
    info, for_spec = in_process_teacher(cfg)
    spec = check_student_side(cfg, info).target_spec()
    store = TargetStore.open(cfg.teacher.store, "read")
    sub = StoreSubmitter(store, info.fingerprint, mode="read")
    batches = job_batches(cfg, info)
    with Prefetcher(batches, lambda b: (b, spec), sub, depth=2) as pre:
        for b, got in pre:  # the teacher at the job's own batch: the same bits
            want = for_spec(spec)(b).result()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert sub.hits == 3 * 8 and sub.misses == 0
    other = {"input_ids": batches[0]["input_ids"].flip(1), "attention_mask": batches[0]["attention_mask"]}
    key = sample_keys(other, spec_repr(spec), info.fingerprint)[0]
    with pytest.raises(StoreKeyMissing, match=f"no targets for sample key {key} \\(8 of this batch's 8 missing\\)"):
        sub.submit(other, spec).result()
    sub.close()


@unit
def test_read_through_fills_then_a_second_run_needs_no_teacher(tmp_path):
    from student_workers.train.check import check_student_side
    from student_workers.train.store import StoreSubmitter, open_job_store

    cfg = job(tmp_path, tmp_path / "store", "read_through")
    teacher = EngineTeacher(cfg)
    spec = check_student_side(cfg, teacher.info).target_spec()
    batches = job_batches(cfg, teacher.info, 4)
    sub = StoreSubmitter(open_job_store(cfg, teacher.info, spec), teacher.info.fingerprint, teacher, "read_through")
    first = [sub.submit(b, spec).result() for b in batches[:2]]
    mixed = {k: torch.cat([v[:4], batches[2][k][:4]]) for k, v in batches[1].items()}  # half stored, half new
    first.append(sub.submit(mixed, spec).result())
    sub.close()  # flushes
    assert teacher.calls == 3 and sub.hits == 4 and sub.misses == 20
    again = StoreSubmitter(TargetStore.open(cfg.teacher.store, "read"), teacher.info.fingerprint, mode="read")
    for b, want in zip([*batches[:2], mixed], first):
        got = again.submit(b, spec).result()
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert again.misses == 0
    # the store belongs to its teacher: another one is refused in one line
    other = job(tmp_path, tmp_path / "store", "read_through")
    other.teacher.local = other.teacher.local.model_copy(update={"seed": 7})  # other random weights
    with pytest.raises(StoreMismatch, match="the teacher differs"):
        open_job_store(other, EngineTeacher(other).info, spec)


def committed(store: Path) -> list[Path]:
    """The index files that commit shards (a writer's ``.tmp-*`` file is not one: killed before its
    rename, it holds a whole index the store never lists)."""
    return list((store / "index").glob("[!.]*.json"))


def index_keys(store: Path) -> list[str]:
    return [k for f in committed(store) for k in json.loads(f.read_text())["entries"]]


def test_precompute_resumes_after_sigkill(tmp_path):
    from kdjob.precompute import requests

    cfg = job(tmp_path, tmp_path / "store", "read", steps=40, sentences=1000)
    (tmp_path / "job.yaml").write_text(json.dumps(cfg.model_dump(mode="json")))
    args = [sys.executable, "-c", SLOW_PRECOMPUTE, "--config", str(tmp_path / "job.yaml"), "--shard-mb", "0.05",
            "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(committed(tmp_path / "store")) < 2 and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(set(index_keys(tmp_path / "store")))
    done = subprocess.run(args[:2] + ["from kdjob.precompute import cli; cli()"] + args[3:], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"precomputed {640 - partial} targets" in done.stdout
    store = TargetStore.open(str(tmp_path / "store"), "read")
    info = json.loads((tmp_path / "store" / "manifest.json").read_text())
    from student_workers.train.store import info_from_manifest
    from kdserve.store import Manifest

    m = Manifest.from_json((tmp_path / "store" / "manifest.json").read_bytes(), "m")
    wanted = [k for r in requests(cfg, info_from_manifest(m, "m")) for k in sample_keys(r, info["spec"], info["fingerprint"])]
    assert 0 < partial < len(wanted) == len(set(wanted)) == 640
    assert not store.missing(wanted)
    keys = index_keys(tmp_path / "store")
    assert sorted(keys) == sorted(wanted)  # every key once


# precompute with a pause after each committed shard: slow enough to be killed mid-run
SLOW_PRECOMPUTE = """
import sys, time
from kdserve.store import store as s
flush = s.TargetStore.flush
def slow(self, shard=None):
    name = flush(self, shard)
    time.sleep(0.3)
    return name
s.TargetStore.flush = slow
from kdjob.precompute import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.cluster
def test_a_ray_train_job_in_read_mode_trains_with_no_teacher(filled, listener, ray_cluster):
    """The real worker loop (2 Ray Train workers): every target from the store; the configured
    teacher address (a port that records connections) is never contacted, none is deployed."""
    from kdjob.distill import job_teacher
    from kdjob.fit import fit

    tmp, cfg = filled
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(
        update={"address": "grpc://127.0.0.1:%d" % listener.getsockname()[1]})})
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    address, info = job_teacher(cfg, run_dir)
    assert address == cfg.teacher.store
    result = fit(cfg, address, run_dir)
    assert result.error is None and result.metrics["step"] == 6
    assert not contacted(listener)
