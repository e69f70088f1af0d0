"""A CoCa student distilled from the pretrained-parts CoCa teacher (``coca_pretrained:tiny``, random
towers): the CNN image module has no attention, so it gets no attention term (and the check says so
in one line); its pooled stage states are regressed by the student's token mean; the other modules
keep theirs. Checked against a hand-written MSE. Also: the paired seed differences of a comparison
and the two-phase chaining of a student (DistillVLM pre-training -> fine-tuning)."""
from __future__ import annotations

import pytest
import torch

from kdjob.chain import chained
from kdjob.summary import paired
from kdserve.teacher_config import TeacherConfig
from kdserve.v1 import teacher_pb2 as pb
from student_workers.losses.distiller import Distiller
from student_workers.models.base import StudentConfig
from student_workers.models.build import build_student
from student_workers.train.batches import teacher_inputs
from student_workers.train.check import attention_note
from student_workers.train.job_config import DistillSection, JobConfig
from teacher_server.engine import TeacherEngine, Work
from teacher_server.spec import resolve_spec

pytestmark = pytest.mark.unit

STUDENT = StudentConfig(kind="coca", name="tiny", kwargs={"num_classes": 4})


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(2)
    return TeacherEngine.from_config(TeacherConfig(model="coca_pretrained:tiny", pretrained=False,
                                                   model_kwargs={"num_classes": 4}))


def info_of(engine) -> pb.TeacherInfo:
    return pb.TeacherInfo(modules=[pb.ModuleInfo(**m.__dict__) for m in engine.modules], num_classes=4)


def batch(size: int):
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 6, dtype=torch.int64)
    mask[1, 4:] = 0
    return {"pixel_values": torch.rand(2, 3, size, size, generator=g),
            "input_ids": torch.randint(1000, 30522, (2, 6), generator=g), "attention_mask": mask}


def test_no_attention_term_for_the_cnn_module_and_pooled_feature_targets(engine):
    torch.manual_seed(0)
    student = build_student(STUDENT)
    d = Distiller(student, DistillSection(feature_weight=1.0, attention_weight=1.0, attention_kind="head_mean"),
                  info_of(engine))
    assert d.attention_modules == ["text", "multimodal"]
    note = attention_note(d)
    assert "image" in note and "\n" not in note and "text" not in note.split("module(s)")[1].split("(")[0]
    spec = d.target_spec()
    assert {s.module for s in spec.attention} == {"text", "multimodal"}
    assert d.attention_needed() == {m: {1, 2} for m in ("text", "multimodal")}
    inputs = batch(student.image_size[0])
    sent = teacher_inputs(inputs, (64, 64))  # the teacher's resolution
    (targets,), _ = engine.run([Work(sent, resolve_spec(spec, engine.modules, 4))])
    out = student(inputs, need_attention=d.attention_needed())
    total, terms = d.losses(out, targets)
    assert "attn.image" not in terms and {"attn.text", "attn.multimodal", "hid.image"} <= set(terms)
    naive = 0.0
    for s, t in d.pairs["image"]:
        p = d.proj[f"image_{s}"].proj
        pooled = out.hidden["image"][s - 1].mean(dim=1, keepdim=True)  # (2, 1, D_s): every patch + CLS
        naive = naive + ((pooled @ p.weight.T + p.bias - targets[f"hidden.image.{t}"]) ** 2).mean()
    torch.testing.assert_close(terms["hid.image"], naive.detach())
    # the loss-scale measurement swaps in a config with the attention weight at 0: no attention term, no request
    d.cfg = d.cfg.model_copy(update={"attention_weight": 0.0})
    assert not d.target_spec().attention and d.attention_needed() is False
    _, terms = d(inputs, targets)
    assert not any(k.startswith("attn") for k in terms)



def test_per_head_attention_skips_the_cnn_module_instead_of_refusing(engine):
    student = build_student(STUDENT)
    d = Distiller(student, DistillSection(attention_weight=10.0, attention_kind="per_head", nce_weight=10.0,
                                          modules=["multimodal"]), info_of(engine))
    assert d.attention_modules == ["multimodal"] and attention_note(d) is None
    # where both sides have attention, unequal head counts are still refused (text: 4 vs the teacher's 2)
    four = build_student(StudentConfig(kind="coca", name="tiny", kwargs={"num_classes": 4, "heads": 4}))
    with pytest.raises(ValueError, match="module 'text': student 4, teacher 2"):
        Distiller(four, DistillSection(attention_weight=1.0, attention_kind="per_head"), info_of(engine))


@pytest.mark.parametrize("rows,expect", [
    ([("kd", 0, {"accuracy": 0.6}), ("no-kd", 0, {"accuracy": 0.5}), ("kd", 1, {"accuracy": 0.7}),
      ("no-kd", 1, {"accuracy": 0.5}), ("kd", 2, {"accuracy": 0.5}), ("no-kd", 2, {"accuracy": 0.6})],
     {0: 0.1, 1: 0.2, 2: -0.1}),
])
def test_paired_differences_by_seed(rows, expect):
    p = paired(rows)["kd"]
    d = list(expect.values())
    mean = sum(d) / 3
    se = (sum((x - mean) ** 2 for x in d) / 2) ** 0.5 / 3 ** 0.5
    assert p["diffs"] == pytest.approx(expect) and p["mean"] == pytest.approx(mean) and p["se"] == pytest.approx(se)


def test_second_phase_starts_from_the_first_phases_student(tmp_path):
    torch.manual_seed(3)
    first = JobConfig.model_validate({"teacher": {"address": "127.0.0.1:1"}, "student": STUDENT.model_dump(),
                                      "data": {"dataset": "emoji"}})
    trained = build_student(first.student)
    state = {f"student.{k}": v + 0.5 for k, v in trained.state_dict().items()}  # "trained" weights
    state["proj.image_1.proj.weight"] = torch.zeros(1)  # distillation heads are not the student's
    second = first.model_copy(deep=True)
    c = chained(second, first, state, tmp_path)
    assert c.student.pretrained and c.student.name.endswith("student_coca.pt")
    rebuilt = build_student(c.student)
    for k, v in rebuilt.state_dict().items():
        torch.testing.assert_close(v, state[f"student.{k}"])
    second.student.kwargs = {"num_classes": 4, "heads": 1}
    with pytest.raises(ValueError, match="same student.kwargs"):
        chained(second, first, state, tmp_path)


def test_progress_counts_the_teacher_targets_each_step_used(tmp_path):
    from types import SimpleNamespace

    from student_workers.train.progress import Progress

    cfg = SimpleNamespace(data=SimpleNamespace(batch_size=2), run=SimpleNamespace(name="t"), train=SimpleNamespace(steps=3))
    p = Progress(cfg, rank=1, world=1, start=0, tensorboard_dir=tmp_path)  # rank 1: no writer, no line
    full = {"hidden.text.6": torch.zeros(2, 5, 8), "attention.text.6": torch.zeros(2, 3, 5, 5), "logits": torch.zeros(2, 4)}
    for targets in (full, {"logits": torch.zeros(2, 4)}, {}):  # all modules, logits only, no teacher
        p.add(torch.tensor(1.0), {}, targets)
    p.line(3, 1e-3, 0.0)
    assert p.last["teacher_targets_per_step"] == pytest.approx((3 + 1 + 0) / 3)
    assert p.last["teacher_values_per_sample"] == pytest.approx((5 * 8 + 3 * 5 * 5 + 4 + 4) / 3)


def test_progress_speed_counts_the_rows_the_student_saw(tmp_path, monkeypatch):
    """samples/s counts texts, not dataset items: a batch of one hard group of 16 pairs is 32 texts."""
    from types import SimpleNamespace

    from student_workers.train import progress

    cfg = SimpleNamespace(data=SimpleNamespace(batch_size=1), run=SimpleNamespace(name="t"), train=SimpleNamespace(steps=2))
    clock = iter([0.0, 4.0, 4.0])  # the interval opens at 0 s and closes at 4 s, where the next opens
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    p = progress.Progress(cfg, rank=1, world=2, start=0, tensorboard_dir=tmp_path)
    p.add(torch.tensor(1.0), {}, {}, rows=32)
    p.add(torch.tensor(1.0), {}, {})  # no rows given: data.batch_size
    p.line(2, 1e-3, 0.0)
    assert p.last["samples_per_s"] == pytest.approx((32 + 1) * 2 / 4.0)
