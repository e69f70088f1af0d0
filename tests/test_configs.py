"""Every shipped config loads as a JobConfig (unknown keys would fail), and names real things."""
from __future__ import annotations

from pathlib import Path

import pytest

from kdserve import registry
from kdserve.config import load
from student_workers import data, students  # noqa: F401  (registers datasets and students)
from student_workers.job_config import JobConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def test_there_is_a_config_per_method():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "data2vec_vision", "logits_kd", "distillvlm_pretrain", "distillvlm_finetune",
            "optima_coca"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_config_loads_and_names_registered_parts(path):
    cfg = load(JobConfig, path)
    assert cfg.student.kind in registry.names("student")
    assert cfg.data.dataset in registry.names("dataset")
    d = cfg.distill
    assert any((d.feature_weight, d.data2vec_weight, d.logits_weight, d.attention_weight, d.nce_weight))
