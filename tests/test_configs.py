"""Every shipped config loads as a JobConfig (unknown keys would fail), and names real things."""
from __future__ import annotations

from pathlib import Path

import pytest

from kdserve import registry
from kdserve.config import load
from student_workers.data.build import DATASET_MODULES
from student_workers.models.build import STUDENT_MODULES
from student_workers.train.job_config import JobConfig

pytestmark = pytest.mark.unit

REGISTERING = (DATASET_MODULES, STUDENT_MODULES)  # importing them registers every dataset and student kind
ROOT = Path(__file__).resolve().parents[1]
# configs/teachers/: recipes that train a teacher (their own config class), not distillation jobs
TEACHER_RECIPES = sorted((ROOT / "configs" / "teachers").rglob("*.yaml"))
CONFIGS = sorted(set((ROOT / "configs").rglob("*.yaml")) - set(TEACHER_RECIPES))


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
    assert any((d.feature_weight, d.data2vec_weight, d.logits_weight, d.attention_weight, d.nce_weight,
                d.embedding_weight))


@pytest.mark.parametrize("path", TEACHER_RECIPES, ids=[p.name for p in TEACHER_RECIPES])
def test_teacher_recipe_loads(path):
    from kdmodels.coca_pretrained import PretrainedCoCaConfig
    from student_workers.models.train_coca_pretrained import TrainConfig

    cfg = load(TrainConfig, path)
    PretrainedCoCaConfig(**cfg.model)  # the model fields are real too
