"""Several teachers for one student, without a cluster: the config's checks (one line naming the
field), one Distiller head per teacher whose terms come from its own teacher's targets (against
the formulas computed here), and the head of a teacher that is sent texts."""
from __future__ import annotations

import numpy.testing  # noqa: F401  (at collection: its first import runs lscpu, which the unit guard refuses)
import pytest
import torch
import torch.nn.functional as F

from kdserve.config import ConfigError, build
from kdserve.v1 import teacher_pb2 as pb
from student_workers.losses.several import MultiDistiller, TextsHead, make_distiller
from student_workers.models.build import build_student
from student_workers.train.job_config import JobConfig

pytestmark = pytest.mark.unit
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
STUDENT = {"kind": "hf_text", "name": "bert", "kwargs": TINY_BERT}


def two(**over) -> dict:
    """A two-teacher job: `a` (teacher:, local) and `b` (teachers:, local)."""
    job = {"teacher": {"name": "a", "grpc_port": 9202}, "teachers": {"b": {}}, "student": STUDENT,
           "distill": {"feature_weight": 1.0, "teachers": {"b": {"embedding_weight": 1.0}}}}
    for path, value in over.items():
        *parents, last = path.split("__")
        d = job
        for p in parents:
            d = d.setdefault(p, {})
        d[last] = value
    return job


def error(job: dict) -> str:
    with pytest.raises(ConfigError) as e:
        build(JobConfig, job)
    assert len(str(e.value).splitlines()) == 1, str(e.value)
    return str(e.value)


def test_one_teacher_is_unchanged():
    cfg = build(JobConfig, {"teacher": {"grpc_port": 9202}, "student": STUDENT})
    assert cfg.teachers == {} and list(cfg.all_teachers()) == ["teacher"]
    assert cfg.distill.feature_weight == 1.0 and cfg.distill.teachers == {}
    assert cfg.distill.terms_of("teacher", "teacher").feature_weight == 1.0


def test_a_further_teachers_terms_default_to_zero_and_name_it():
    cfg = build(JobConfig, two())
    assert list(cfg.all_teachers()) == ["a", "b"] and cfg.teacher_name == "a"
    b = cfg.distill.terms_of("b", "a")
    assert (b.feature_weight, b.embedding_weight, b.task_weight, b.teachers) == (0.0, 1.0, 0.0, {})
    assert cfg.distill.terms_of("a", "a").teachers == {}


@pytest.mark.parametrize("over, field", [
    ({"distill__teachers": {"c": {"embedding_weight": 1.0}}}, "distill.teachers.c: unknown teacher 'c'; the job's "
                                                              "teachers: a (teacher:), b"),
    ({"distill__teachers": {"a": {"embedding_weight": 1.0}, "b": {"embedding_weight": 1.0}}}, "distill.teachers.a:"),
    ({"distill__teachers": {}}, "teachers.b: no loss term uses its targets"),
    ({"distill__teachers": {"b": {"embedding_weight": 0.0}}}, "teachers.b: no loss term uses its targets"),
    ({"distill__feature_weight": 0.0}, "teacher: no loss term uses the targets of 'a'"),
    ({"teachers": {"a": {}}}, "teachers.a: 'a' is already the name of `teacher:`"),
    ({"teachers": {"b c": {}}}, "teachers.b c: 'b c' is not a name"),
    ({"teachers__b__name": "x"}, "teachers.b.name: 'x'; under `teachers:` the key is the name"),
    ({"teachers__b__grpc_port": 9212}, "teachers.b.grpc_port: 9212, but the job's local teachers are applications "
                                       "of one Ray Serve instance, one gRPC proxy on teacher.grpc_port 9202"),
    ({"teachers__b__host": "0.0.0.0"}, "teachers.b.host: '0.0.0.0'"),
    ({"teachers__b__address": "grpc://127.0.0.1:9202/b"}, "teachers.b.address: grpc://127.0.0.1:9202/b is on the "
                                                          "port (9202, and 9203 for HTTP)"),
    ({"distill__optima": {"enabled": True}}, "distill.optima.enabled: not with several teachers"),
])
def test_config_errors_name_the_field(over, field):
    assert field in error(two(**over))


def test_each_teacher_may_have_its_own_store_and_one_read_in_place_is_not_deployed():
    from student_workers.train.several import local_teachers

    cfg = build(JobConfig, two(teachers__b__store="/tmp/s", teachers__b__store_mode="read", teacher__store="/tmp/t"))
    assert cfg.teachers["b"].reads_store_only and not cfg.teacher.reads_store_only
    assert list(local_teachers(cfg)) == ["a"]


def test_a_local_teacher_may_repeat_the_shared_port_and_an_address_may_use_another():
    build(JobConfig, two(teachers__b__grpc_port=9202))
    cfg = build(JobConfig, two(teacher__host="0.0.0.0"))
    assert (cfg.teachers["b"].grpc_port, cfg.teachers["b"].host) == (9202, "0.0.0.0")  # the shared proxy's
    again = JobConfig.model_validate(cfg.model_dump(mode="json"))  # as the workers get it
    assert again.teachers["b"].grpc_port == 9202
    cfg = build(JobConfig, two(teachers__b__address="grpc://127.0.0.1:9212"))
    assert cfg.all_teachers()["b"].address == "grpc://127.0.0.1:9212"


def info(hidden: int, layers: int = 2, tokenizer: str = "") -> pb.TeacherInfo:
    i = pb.TeacherInfo(model_name=f"t{hidden}", fingerprint=f"fp{hidden}",
                       modules=[pb.ModuleInfo(name="text", num_layers=layers, hidden_size=hidden, num_heads=2)])
    if tokenizer:
        i.tokenizer.CopyFrom(pb.TokenizerInfo(name="other", fingerprint=tokenizer))
    return i


def pool(x, mask):
    m = mask.float().unsqueeze(-1)
    return (x * m).sum(1) / m.sum(1)


def test_each_head_uses_its_own_teachers_targets():
    torch.manual_seed(0)
    cfg = build(JobConfig, two(distill__embedding_weight=0.5, distill__task_weight=0.0,
                               distill__teachers={"b": {"embedding_weight": 2.0}}))
    d = make_distiller(build_student(cfg.student), cfg, {"a": info(32), "b": info(48, tokenizer="f" * 32)},
                       {"a": False, "b": True})
    assert isinstance(d, MultiDistiller) and isinstance(d.heads["b"], TextsHead)
    assert not any(k.startswith("heads.") and ".student." in k for k in d.state_dict())  # one student copy
    spec_a, spec_b = d.heads["a"].target_spec(), d.heads["b"].target_spec()
    assert [(s.module, list(s.layers)) for s in spec_a.hidden] == [("text", [1, 2])] and spec_a.hidden_reduction == "none"
    assert [(s.module, list(s.layers)) for s in spec_b.hidden] == [("text", [2])] and spec_b.hidden_reduction == "mean"
    ids = torch.randint(5, 1000, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.int64)
    mask[1, 5:] = 0
    ta = {f"hidden.text.{l}": torch.randn(3, 7, 32) for l in (1, 2)}
    tb = {"pooled.text.2": torch.randn(3, 48)}
    d.eval()  # no dropout: the same student forward twice
    total, terms = d({"input_ids": ids, "attention_mask": mask}, {"a": ta, "b": tb})
    assert set(terms) == {"hid.text@a", "emb.text@a", "emb.text@b", "hid@a"}

    hs = d.student.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
    real = mask.bool()
    hid = sum(((hs[l] - ta[f"hidden.text.{l + 1}"]) ** 2).mean(-1)[real].mean() for l in (0, 1))
    emb_a = (1 - F.cosine_similarity(pool(hs[1], mask), pool(ta["hidden.text.2"], mask), dim=-1)).mean()
    w = d.heads["b"].emb_proj["text"].proj
    emb_b = (1 - F.cosine_similarity(pool(hs[1], mask) @ w.weight.T + w.bias, tb["pooled.text.2"], dim=-1)).mean()
    for key, want in (("hid.text@a", hid), ("emb.text@a", emb_a), ("emb.text@b", emb_b)):
        torch.testing.assert_close(terms[key], want.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(total, hid + 0.5 * emb_a + 2.0 * emb_b, rtol=1e-4, atol=1e-5)
    total.backward()
    assert w.weight.grad is not None and d.heads["a"].cfg.feature_weight == 1.0


def test_a_missing_teachers_targets_name_the_key():
    cfg = build(JobConfig, two())
    d = make_distiller(build_student(cfg.student), cfg, {"a": info(32), "b": info(32)}, {"a": False, "b": False})
    ids = torch.randint(5, 1000, (2, 5))
    with pytest.raises(ValueError, match="hidden.text.2"):
        d({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
          {"a": {f"hidden.text.{l}": torch.randn(2, 5, 32) for l in (1, 2)}, "b": {}})


def test_a_texts_teacher_refuses_token_level_terms_naming_the_field():
    cfg = build(JobConfig, two(distill__teachers={"b": {"embedding_weight": 1.0, "attention_weight": 1.0}}))
    with pytest.raises(ValueError, match=r"^distill\.teachers\.b\.attention_weight: the teacher is sent texts"):
        make_distiller(build_student(cfg.student), cfg, {"a": info(32), "b": info(48, tokenizer="f" * 32)},
                       {"a": False, "b": True})


def test_cannot_serve_names_the_term_and_the_tokenizer():
    from student_workers.train.several import cannot_serve, sends_texts

    cfg = build(JobConfig, two(distill__teachers={"b": {"embedding_weight": 1.0, "nce_weight": 1.0}}))
    other = info(48, tokenizer="f" * 32)
    assert sends_texts(other, "0" * 32) and not sends_texts(other, "f" * 32) and not sends_texts(info(32), "0" * 32)
    assert not sends_texts(other, None)  # not a text student: no texts to send
    line = cannot_serve(cfg, "b", other, texts=True)
    assert line.startswith("distill.teachers.b.nce_weight: teacher 'b' tokenizes with its own tokenizer (other, fff")
    assert cannot_serve(cfg, "a", info(32), texts=False) is None


def test_the_drivers_student_check_builds_a_head_per_teacher():
    """distill_job's check before any cluster (kdjob.several.check_several -> check_student_side) on a
    two-teacher job: it used to read a single Distiller's config from the MultiDistiller and die with a
    traceback (configs/two_teachers.yaml could not start)."""
    from student_workers.train.check import attention_note, check_student_side

    cfg = build(JobConfig, two(data={"dataset": "text_file", "kwargs": {"path": __file__}},
                               distill__attention_weight=1.0))
    d = check_student_side(cfg, info(32), infos={"a": info(32), "b": info(48, tokenizer="f" * 32)},
                           texts={"a": False, "b": True})
    assert isinstance(d, MultiDistiller) and set(d.heads) == {"a", "b"}
    assert attention_note(d) is None  # a's attention term is there; b (sent texts) has none to give
