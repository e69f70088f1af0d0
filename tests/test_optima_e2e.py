"""OPTIMA end to end: tiny CoCa-style teacher on the real Ray Serve gRPC proxy, a smaller CoCa
student on Ray Train over the emoji image-caption pairs; rounds logged, bandit state checkpointed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdserve.config import build
from student_workers.job_config import JobConfig

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
        from student_workers.data_emoji import emoji_dir

        emoji_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cfg = TeacherConfig(model="coca:tiny", pretrained=False, model_kwargs=TEACHER, num_cpus=0.5)
    serve.run(build_app(cfg.model_dump()), name="coca", route_prefix="/coca")
    yield f"grpc://127.0.0.1:{serve_teachers['port']}/coca"
    serve.delete("coca")


def test_optima_distillation_over_serve(tmp_path, coca_address):
    import distill_job

    cfg = build(JobConfig, {
        "teacher": {"address": coca_address, "prefetch_depth": 2},
        "student": {"kind": "coca", "kwargs": STUDENT},
        "distill": {"task_weight": 1.0, "logits_weight": 1.0, "temperature": 1.0, "feature_weight": 1.0,
                    "attention_weight": 1.0, "attention_kind": "head_mean",
                    "optima": {"enabled": True, "delta": 5, "measure_steps": 2, "warmup_rounds": 1}},
        "data": {"dataset": "emoji", "kwargs": {"size": 32}, "batch_size": 8, "max_length": 12},
        "train": {"steps": 45, "lr": 2e-3, "warmup_steps": 2, "num_workers": 2, "cpus_per_worker": 0.5,
                  "log_every": 15, "checkpoint_every": 45},
        "run": {"name": "optima", "storage_path": str(tmp_path / "runs")},
    })
    run_dir = Path(cfg.run.storage_path) / cfg.run.name
    result = distill_job.fit(cfg, coca_address, run_dir)
    assert result.error is None and result.metrics["step"] == 45

    rounds = [json.loads(l) for l in (run_dir / "optima.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(9))  # 45 steps / delta 5
    assert rounds[0]["reward"] is None  # the baseline round sets the reference losses
    arms = [tuple(r["arm"]) for r in rounds[1:8]]
    assert len(set(arms)) == 7  # warm-up: each of the 2^3 - 1 arms once
    assert all(0.0 <= r["reward"] <= 1.0 for r in rounds[1:])

    state = torch.load(Path(result.checkpoint.path) / "state.pt", weights_only=False)
    optima = state["optima"]
    assert int(optima["counts"].sum()) == 8  # warm-up plays + one Thompson round
    assert "_extra_state" in optima and optima["_extra_state"]["history"]
