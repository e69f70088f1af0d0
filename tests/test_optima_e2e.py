"""OPTIMA end to end: tiny CoCa-style teacher on the real Ray Serve gRPC proxy, a smaller CoCa
student on Ray Train (2 workers) over the emoji image-caption pairs: rounds logged, one bandit per job
across the ranks, its state checkpointed by every rank and resumed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdserve.config import build
from student_workers.train.job_config import JobConfig

pytestmark = pytest.mark.cluster

TEACHER = dict(image_size=32, patch_size=8, vision_width=48, vision_layers=4, vision_heads=4, text_width=48,
               text_layers=4, multimodal_layers=4, heads=4, embed_dim=48, num_classes=9, max_text_len=16)
STUDENT = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4, text_width=32,
               text_layers=2, multimodal_layers=2, heads=4, embed_dim=32, num_classes=9, max_text_len=16)


@pytest.fixture(scope="module")
def coca_address(serve_teachers):
    from ray import serve

    from kdserve.teacher_config import TeacherConfig
    from teacher_server.serve_app import build_app

    try:
        from student_workers.data.emoji import emoji_dir

        emoji_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cfg = TeacherConfig(model="coca:tiny", pretrained=False, model_kwargs=TEACHER, serve={"num_cpus": 0.5})
    serve.run(build_app(cfg.model_dump()), name="coca", route_prefix="/coca")
    yield f"grpc://127.0.0.1:{serve_teachers['port']}/coca"
    serve.delete("coca")


def _job(tmp_path, address, steps: int):
    return build(JobConfig, {
        "teacher": {"address": address, "prefetch_depth": 2},
        "student": {"kind": "coca", "kwargs": STUDENT},
        "distill": {"task_weight": 1.0, "logits_weight": 1.0, "temperature": 1.0, "feature_weight": 1.0,
                    "attention_weight": 1.0, "attention_kind": "head_mean",
                    "optima": {"enabled": True, "delta": 5, "measure_steps": 2, "warmup_rounds": 1}},
        "data": {"dataset": "emoji", "kwargs": {"size": 32}, "batch_size": 8, "max_length": 12},
        "train": {"steps": steps, "lr": 2e-3, "warmup_steps": 2, "num_workers": 2, "cpus_per_worker": 0.5,
                  "log_every": 15, "checkpoint_every": 25},
        "run": {"name": "optima", "storage_path": str(tmp_path / "runs")},
    })


def _rank_states(run_dir: Path, checkpoint) -> list[dict]:
    """Both ranks' bandit states: the JSON each wrote at its end, and its copy in the checkpoint."""
    from student_workers.optima.scheduler import OptimaScheduler

    states = []
    for r in (0, 1):
        written = json.loads((run_dir / f"optima_state_rank{r}.json").read_text())
        sched = OptimaScheduler(["image", "text", "multimodal"], reports_per_round=2)  # measure_steps: a round's measured steps
        sched.load_state_dict(torch.load(Path(checkpoint.path) / f"optima_rank{r}.pt", weights_only=False))
        assert sched.summary() == written
        states.append(written)
    return states


def test_optima_two_workers_run_one_bandit_and_resume_it(tmp_path, coca_address):
    from kdjob.fit import fit

    # 25 steps = 5 rounds of delta 5, checkpointed at step 25; then the same run resumed to 45.
    cfg = _job(tmp_path, coca_address, 25)
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    first = fit(cfg, coca_address, run_dir)
    assert first.error is None and first.metrics["step"] == 25
    s0, s1 = _rank_states(run_dir, first.checkpoint)
    assert s0 == s1  # one bandit per job: means, counts, arm history, RNG
    assert len(s0["history"]) == 5 and sum(s0["counts"]) == 4 and s0["round_count"] == 0

    second = fit(_job(tmp_path, coca_address, 45), coca_address, run_dir)
    assert second.error is None and second.metrics["step"] == 45 and second.metrics["resumed_from"] == 25
    r0, r1 = _rank_states(run_dir, second.checkpoint)
    assert r0 == r1
    # resumed, not restarted: the first five rounds are the first run's, the bandit went on from them
    assert r0["history"][:5] == s0["history"] and [h["round"] for h in r0["history"]] == list(range(9))
    assert sum(r0["counts"]) == 8  # warm-up plays (7 arms) + one Thompson round

    rounds = [json.loads(l) for l in (run_dir / "optima.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(9))  # 45 steps / delta 5, across both runs
    assert rounds[0]["reward"] is None  # the baseline round sets the reference losses
    arms = [tuple(r["arm"]) for r in rounds[1:8]]
    assert len(set(arms)) == 7  # warm-up: each of the 2^3 - 1 arms once
    assert all(0.0 <= r["reward"] <= 1.0 for r in rounds[1:])
    assert [r["arm_index"] for r in rounds] == [h["arm_index"] for h in r0["history"]]

    state = torch.load(Path(second.checkpoint.path) / "state.pt", weights_only=False)
    optima = state["optima"]
    assert int(optima["counts"].sum()) == 8
    assert "_extra_state" in optima and optima["_extra_state"]["history"]
