"""A Ray Train worker dies mid-run: the worker group restarts from the last checkpoint
(FailureConfig, train.max_failures=1) and trains through with the NCE queues and the OPTIMA
bandit exactly as checkpointed, on every rank.

Two workers, the tiny CoCa teacher on the session's Serve proxy, NCE (small queue) and OPTIMA.
Rank 1 crashes (os._exit) before step 13 on the first attempt (a fault drill, see
student_workers/train/faults.py); the last checkpoint is step 10. The first attempt is the uninterrupted
run up to step 13, so its step-10 checkpoint is what an uninterrupted run holds at the resume step.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdserve.config import build
from student_workers.train.run_dir import DRILL_FILE, FIRED_FILE, RESTORED_DIR
from student_workers.train.job_config import JobConfig
from tests import test_optima_e2e
from tests.test_optima_e2e import STUDENT

pytestmark = pytest.mark.cluster
coca_address = test_optima_e2e.coca_address  # the module fixture serving the CoCa app, shared
STEPS, EVERY, FAIL_RANK, FAIL_STEP, QUEUE, BATCH, MAX_LEN = 20, 10, 1, 13, 96, 4, 12
# Most teacher tokens one rank enqueues per step: 16 patches + CLS per image, <= MAX_LEN per caption.
STEP_TOKENS = {"image": BATCH * 17, "text": BATCH * MAX_LEN, "multimodal": BATCH * MAX_LEN}
MODULES = ("image", "text", "multimodal")


def _job(tmp_path: Path, address: str) -> JobConfig:
    return build(JobConfig, {
        "teacher": {"address": address, "prefetch_depth": 2},
        "student": {"kind": "coca", "kwargs": STUDENT},
        "distill": {"task_weight": 1.0, "logits_weight": 1.0, "feature_weight": 1.0, "nce_weight": 0.5,
                    "nce_queue_size": QUEUE,
                    "optima": {"enabled": True, "delta": 5, "measure_steps": 2, "warmup_rounds": 1}},
        "data": {"dataset": "emoji", "kwargs": {"size": 32}, "batch_size": BATCH, "max_length": MAX_LEN},
        "train": {"steps": STEPS, "lr": 2e-3, "warmup_steps": 2, "num_workers": 2, "cpus_per_worker": 0.5,
                  "log_every": EVERY, "checkpoint_every": EVERY, "max_failures": 1},
        "run": {"name": "worker-failure", "storage_path": str(tmp_path / "runs")},
    })


def _checkpoint_at(run_dir: Path, step: int) -> Path:
    found = [p.parent for p in run_dir.glob("checkpoint_*/state.pt")
             if torch.load(p, map_location="cpu", weights_only=False)["step"] == step]
    assert len(found) == 1, (step, sorted(run_dir.glob("checkpoint_*")))
    return found[0]


def _queues(distiller_state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The NCE queue buffers of a Distiller state_dict, by module."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in distiller_state.items():
        if k.startswith("queues."):
            _, m, buf = k.split(".")
            out.setdefault(m, {})[buf] = v
    return out


def _bandit_summary(path: Path) -> dict:
    from student_workers.optima.scheduler import OptimaScheduler

    sched = OptimaScheduler(list(MODULES), reports_per_round=2, loss_keys=("kd", "hid"))
    sched.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
    return sched.summary()


def _assert_same_queues(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b) == set(MODULES), what
    for m in MODULES:
        for buf in ("queue", "ptr", "filled"):
            assert torch.equal(a[m][buf], b[m][buf]), f"{what}: {m}.{buf}"


def test_worker_crash_resumes_queues_and_bandit_from_checkpoint(tmp_path, coca_address):
    from kdjob.fit import fit

    cfg = _job(tmp_path, coca_address)
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    run_dir.mkdir(parents=True)
    (run_dir / DRILL_FILE).write_text(f"{FAIL_RANK}:{FAIL_STEP}")

    result = fit(cfg, coca_address, run_dir)

    assert result.error is None, result.error
    assert (run_dir / FIRED_FILE).is_file()  # the drill really killed a worker
    assert result.metrics["step"] == STEPS and result.metrics["resumed_from"] == EVERY

    # What each rank of the retry restored: one record per rank (the first attempt had nothing to restore).
    restored = run_dir / RESTORED_DIR
    records = [torch.load(restored / f"attempt0_rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert sorted(p.name for p in restored.glob("attempt*")) == ["attempt0_rank0.pt", "attempt0_rank1.pt"]
    ckpt = _checkpoint_at(run_dir, EVERY)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    saved_queues = _queues(state["distiller"])
    for m in MODULES:  # the checkpoint holds real negatives: the queue was filled before step 10
        assert int(saved_queues[m]["filled"]) > 0 and saved_queues[m]["queue"].abs().sum() > 0, m
    assert int(saved_queues["image"]["filled"]) == QUEUE  # 10 steps x 68 image tokens > 96
    for r, rec in enumerate(records):
        assert rec["step"] == EVERY
        _assert_same_queues(rec["queues"], saved_queues, f"rank {r} restored vs checkpoint")
        assert rec["optima"] == _bandit_summary(ckpt / f"optima_rank{r}.pt"), f"rank {r} bandit"
    assert records[0]["optima"] == records[1]["optima"]
    assert [h["round"] for h in records[0]["optima"]["history"]] == [0, 1]  # steps 0-9: rounds of 5

    # After the run: one bandit on both ranks that went on from the checkpoint's.
    finals = [json.loads((run_dir / f"optima_state_rank{r}.json").read_text()) for r in (0, 1)]
    assert finals[0] == finals[1]
    assert finals[0]["history"][:2] == records[0]["optima"]["history"]
    assert [h["round"] for h in finals[0]["history"]] == [0, 1, 2, 3]
    last = _checkpoint_at(run_dir, STEPS)
    for r in (0, 1):
        assert _bandit_summary(last / f"optima_rank{r}.pt") == finals[0]
    # Rounds logged once each: the crash came before round 2 closed (step 15), so no duplicates.
    rounds = [json.loads(l)["round"] for l in (run_dir / "optima.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]

    # The NCE queues after the run: rank 0's are the final checkpoint's. DDP broadcasts the
    # buffers from rank 0 before every forward, so every rank starts each step with rank 0's
    # queues; rank 1 differs from rank 0 only in the slots its own last enqueue wrote.
    ends = [torch.load(restored / f"final0_rank{r}.pt", weights_only=False) for r in (0, 1)]
    _assert_same_queues(ends[0]["queues"], _queues(torch.load(last / "state.pt", weights_only=False)["distiller"]),
                        "rank 0 final vs last checkpoint")
    for m in MODULES:
        a, b = ends[0]["queues"][m], ends[1]["queues"][m]
        assert int(a["filled"]) == int(b["filled"]) == QUEUE, m
        differ = set((a["queue"] != b["queue"]).any(dim=1).nonzero().flatten().tolist())
        print(f"\n{m}: ptr {int(a['ptr'])}/{int(b['ptr'])}, rows differing between the ranks: {len(differ)}/{QUEUE}")
        # Both ranks' last writes start at the common pointer and end at their own: the differing
        # rows lie in the longer of the two windows, one step's tokens at most. Queues that each
        # rank filled from its own shard would differ everywhere.
        windows = [{(int(q["ptr"]) - 1 - j) % QUEUE for j in range(STEP_TOKENS[m])} for q in (a, b)]
        assert any(differ <= w for w in windows), (m, sorted(differ))
