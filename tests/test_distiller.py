"""Distiller: the spec it asks for, the combined loss, its state in checkpoints, resume equivalence.

Targets come from a real (tiny, random-init) BERT teacher engine, the way the server computes them.
"""
from __future__ import annotations

import copy

import pytest
import torch

from kdserve.config import build
from student_workers.losses.distiller import Distiller
from student_workers.train.job_config import DistillSection, JobConfig
from student_workers.losses import attention_mse_head_mean, feature_loss, token_nce
from student_workers.models.build import build_student
from student_workers.optima.factory import make_scheduler
from student_workers.optima.plan import ArmPlan
from kdserve.teacher_config import TeacherConfig
from teacher_server.engine import TeacherEngine, Work
from teacher_server.service import TeacherService
from teacher_server.spec import resolve_spec

pytestmark = pytest.mark.unit

TEACHER = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, vocab_size=100,
               max_position_embeddings=32)
STUDENT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=100,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # two forwards must agree
               max_position_embeddings=32)


@pytest.fixture(scope="module")
def teacher():
    return TeacherEngine.from_config(TeacherConfig(model="hf:bert", pretrained=False, model_kwargs=TEACHER))


@pytest.fixture(scope="module")
def info(teacher):
    return TeacherService(teacher).describe()


def batch(seed: int, b: int = 4, t: int = 7):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.int64)
    mask[0, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def targets_for(teacher, info, spec, inputs):
    (out,), _ = teacher.run([Work(inputs, resolve_spec(spec, teacher.modules, teacher.num_classes))])
    return out


def make(info, seed=0, **distill):
    torch.manual_seed(seed)
    student = build_student({"kind": "hf_text", "name": "bert", "kwargs": STUDENT})
    return Distiller(student, build(DistillSection, distill), info)


def test_spec_asks_only_for_what_the_losses_need(info):
    d = make(info, feature_weight=1.0, attention_weight=1.0, attention_kind="head_mean", nce_weight=1.0)
    spec = d.target_spec()
    assert [(s.module, list(s.layers)) for s in spec.hidden] == [("text", [2, 4])]  # uniform map 1->2, 2->4
    assert [(s.module, list(s.layers)) for s in spec.attention] == [("text", [2, 4])]
    assert spec.attention_reduction == "head_mean"
    # an arm without this module: only the NCE target (last layer) remains
    spec = d.target_spec(arm=())
    assert [(s.module, list(s.layers)) for s in spec.hidden] == [("text", [4])] and not spec.attention
    d2 = make(info, feature_weight=0.0, data2vec_weight=1.0)
    assert d2.target_spec().hidden_reduction == "data2vec"


def test_total_is_the_weighted_sum_of_independent_terms(teacher, info):
    d = make(info, feature_weight=2.0, attention_weight=3.0, attention_kind="head_mean", nce_weight=0.5,
             nce_queue_size=16)
    inputs = batch(1)
    tg = targets_for(teacher, info, d.target_spec(), inputs)
    d.queues["text"].enqueue(torch.randn(10, 32))
    negatives = d.queues["text"].negatives().clone()
    total, terms = d(inputs, tg)
    out = d.student(inputs, need_attention={1, 2})
    mask = inputs["attention_mask"]
    feat = sum(feature_loss(out.hidden[s - 1], tg[f"hidden.text.{t}"], "mse", mask=mask, projection=d.proj[f"text_{s}"])
               for s, t in [(1, 2), (2, 4)])
    attn = sum(attention_mse_head_mean(out.attentions[s - 1], tg[f"attention.text.{t}"], mask=mask)
               for s, t in [(1, 2), (2, 4)])
    nce = token_nce(d.nce_proj["text"](out.hidden[-1]), tg["hidden.text.4"], negatives, tau=0.1, mask=mask)
    torch.testing.assert_close(total, 2.0 * feat + 3.0 * attn + 0.5 * nce, rtol=1e-5, atol=1e-6)
    assert set(terms) >= {"hid.text", "attn.text", "nce.text", "hid", "attn"}
    # NCE enqueued this batch's real teacher tokens (6 + 3x7 = 27 > 16: the queue is full)
    assert len(d.queues["text"]) == 16


def test_gradients_reach_student_and_heads_only(teacher, info):
    d = make(info, feature_weight=1.0, nce_weight=1.0, nce_queue_size=8)
    inputs = batch(2)
    tg = targets_for(teacher, info, d.target_spec(), inputs)
    total, _ = d(inputs, tg)
    total.backward()
    assert all(p.grad is not None for p in d.proj.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    assert not any(t.requires_grad for t in tg.values() if torch.is_tensor(t))


def test_layer_map_past_the_teacher_is_a_config_error(info):
    with pytest.raises(ValueError, match=r"module 'text' \(teacher has 4 blocks\)"):
        make(info, layer_map="explicit", layer_pairs=[(1, 2), (2, 9)])
    with pytest.raises(ValueError, match="head counts"):
        torch.manual_seed(0)
        student = build_student({"kind": "hf_text", "name": "bert", "kwargs": {**STUDENT, "num_attention_heads": 4}})
        Distiller(student, build(DistillSection, {"attention_weight": 1.0, "attention_kind": "per_head"}), info)


def _job(**distill):
    return build(JobConfig, {"distill": distill, "teacher": {"prefetch_depth": 1}})


def _step(d, opt, plan, scheduler, teacher, info, step):
    inputs = batch(100 + step)
    tg = targets_for(teacher, info, d.target_spec("float32", plan.arm_for_next()), inputs)
    arm, measure = plan.step_args(step)
    total, terms = d(inputs, tg, arm=arm, measure=measure)
    opt.zero_grad()
    total.backward()
    opt.step()
    plan.end_step(step, terms)
    return total.item()


def test_resume_continues_exactly_with_queue_and_bandit_state(teacher, info):
    """Save after 5 steps, restore into fresh objects: step 6 equals the uninterrupted run's."""
    job = _job(feature_weight=1.0, attention_weight=1.0, nce_weight=1.0, nce_queue_size=32,
               optima={"enabled": True, "delta": 3, "measure_steps": 1, "warmup_rounds": 1})

    def fresh():
        d = make(info, **job.distill.model_dump())
        opt = torch.optim.AdamW(d.parameters(), lr=1e-2)
        sched = make_scheduler(job, d)
        return d, opt, sched

    d, opt, sched = fresh()
    plan = ArmPlan(sched, 3, 1, 0)
    for step in range(5):
        _step(d, opt, plan, sched, teacher, info, step)
    state = copy.deepcopy({"distiller": d.state_dict(), "optimizer": opt.state_dict(), "optima": sched.state_dict()})
    uninterrupted = _step(d, opt, plan, sched, teacher, info, 5)

    d2, opt2, sched2 = fresh()
    d2.load_state_dict(state["distiller"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["optima"])
    assert torch.equal(d2.queues["text"].queue, state["distiller"]["queues.text.queue"])
    plan2 = ArmPlan(sched2, 3, 1, 5)
    resumed = _step(d2, opt2, plan2, sched2, teacher, info, 5)
    assert resumed == pytest.approx(uninterrupted, rel=1e-5)
    assert sched2.current_arm() == sched.current_arm()


def test_embedding_term_is_cosine_of_mean_pooled_last_blocks(teacher, info):
    """1 - cos(mean over real tokens of W h_s^L, mean over real tokens of h_t^L), averaged over the
    batch, written out per sample."""
    d = make(info, embedding_weight=1.0, feature_weight=0.0)
    spec = d.target_spec()
    assert [(s.module, list(s.layers)) for s in spec.hidden] == [("text", [4])]  # only the last teacher block
    x = batch(3)
    targets = targets_for(teacher, info, spec, x)
    total, terms = d(x, targets)
    out = d.student(x)
    h_s = d.emb_proj["text"](out.hidden[-1]).detach()  # (B, T, 32)
    h_t = targets["hidden.text.4"].float()  # (B, T, 32)
    expected = 0.0
    for b in range(h_s.shape[0]):
        n = int(x["attention_mask"][b].sum())
        s, t = h_s[b, :n].mean(0), h_t[b, :n].mean(0)
        expected += 1.0 - float(s @ t / (s.norm() * t.norm()))
    expected /= h_s.shape[0]
    assert terms["emb.text"].item() == pytest.approx(expected, rel=1e-5)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert d.emb_proj["text"].proj.weight.grad is not None  # 16 -> 32: a learnable projection


def test_relational_embedding_term_is_the_neighbour_kl_of_the_students_own_embedding(teacher, info):
    """embedding_loss relational: no projection (the student's width is never mapped), and the term is
    mean_i KL(p^t_i || p^s_i) over softmax(cos / tau) of the other samples, written out per anchor."""
    import math

    d = make(info, embedding_weight=1.0, feature_weight=0.0, embedding_loss="relational", embedding_tau=0.1)
    assert len(d.emb_proj) == 0
    x = batch(3, b=5)
    targets = targets_for(teacher, info, d.target_spec(), x)
    total, terms = d(x, targets)
    out = d.student(x)
    n = [int(m.sum()) for m in x["attention_mask"]]
    s = [out.hidden[-1][b, :n[b]].mean(0).detach() for b in range(5)]  # (D_s,) each, the student's own
    t = [targets["hidden.text.4"][b, :n[b]].float().mean(0) for b in range(5)]
    cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))  # noqa: E731
    expected = 0.0
    for i in range(5):
        zs = [math.exp(cos(s[i], s[j]) / 0.1) for j in range(5) if j != i]
        zt = [math.exp(cos(t[i], t[j]) / 0.1) for j in range(5) if j != i]
        ps, pt = [z / sum(zs) for z in zs], [z / sum(zt) for z in zt]
        expected += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    expected /= 5
    assert terms["emb.text"].item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())


def test_relational_bank_grows_by_each_training_batch_and_joins_the_neighbours(teacher, info):
    """embedding_bank_size: a training step enqueues the batch's pooled student and teacher embeddings
    (detached) after computing the loss; the next step's term is relational_kl against those banks; an
    eval-mode forward leaves the bank alone; the bank is in the state dict (checkpoints carry it)."""
    from student_workers.losses import masked_mean_pool, relational_kl

    d = make(info, embedding_weight=1.0, feature_weight=0.0, embedding_loss="relational", embedding_tau=0.1,
             embedding_bank_size=8)
    x1, x2 = batch(3, b=5), batch(4, b=5)
    t1 = targets_for(teacher, info, d.target_spec(), x1)
    t2 = targets_for(teacher, info, d.target_spec(), x2)
    _, terms1 = d(x1, t1)
    assert len(d.emb_banks["text"]) == 5
    # the first step had an empty bank: the batch alone
    pool = lambda out, x: masked_mean_pool(out.hidden[-1], x["attention_mask"]).detach()  # noqa: E731
    tpool = lambda t, x: masked_mean_pool(t["hidden.text.4"].float(), x["attention_mask"])  # noqa: E731
    s1_before = pool(d.student(x1), x1)
    assert terms1["emb.text"].item() == pytest.approx(relational_kl(s1_before, tpool(t1, x1), 0.1).item(), rel=1e-5)
    _, terms2 = d(x2, t2)
    expected = relational_kl(pool(d.student(x2), x2), tpool(t2, x2), 0.1, s1_before, tpool(t1, x1))
    assert terms2["emb.text"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert len(d.emb_banks["text"]) == 8  # 10 texts into 8 slots
    d.eval()
    d(x1, t1)
    assert len(d.emb_banks["text"]) == 8 and int(d.emb_banks["text"].student.ptr) == 2
    assert {"emb_banks.text.student.queue", "emb_banks.text.teacher.queue"} <= set(d.state_dict())


def test_a_bank_is_for_the_relational_loss_only():
    from kdserve.config import ConfigError

    with pytest.raises(ConfigError, match="embedding_bank_size"):
        build(DistillSection, {"embedding_weight": 1.0, "embedding_loss": "listwise", "embedding_bank_size": 16})
