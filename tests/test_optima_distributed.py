"""OPTIMA as the training loop runs it (docs/methods.md#optima): the reward's losses are measured on
the full model whatever arm is played, a needed target that is missing is an error, the first
step after an arm switch trains on targets requested for the new arm (prefetch in between), and
data-parallel ranks run one bandit (losses averaged over ranks, rank 0's decision broadcast).

Targets come from a real tiny CoCa teacher engine; the students are real CoCa students."""
from __future__ import annotations

import concurrent.futures
import copy
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

from kdserve.config import build
from kdserve.teacher_config import TeacherConfig
from student_workers.losses.distiller import Distiller
from student_workers.train.job_config import DistillSection
from student_workers.losses import attention_mse_head_mean, feature_loss
from student_workers.optima.arms import all_arms
from student_workers.optima.distributed import broadcast_state, reduce_losses
from student_workers.optima.reward import round_reward
from student_workers.optima.scheduler import OptimaScheduler
from student_workers.client.prefetch import Prefetcher
from student_workers.models.build import build_student
from student_workers.optima.plan import ArmPlan
from teacher_server.engine import TeacherEngine, Work
from teacher_server.service import TeacherService
from teacher_server.spec import resolve_spec

TEACHER = dict(image_size=32, patch_size=8, vision_width=48, vision_layers=4, vision_heads=4, text_width=48,
               text_layers=4, multimodal_layers=4, heads=4, embed_dim=48, num_classes=9, max_text_len=16)
STUDENT = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=2, vision_heads=4, text_width=32,
               text_layers=2, multimodal_layers=2, heads=4, embed_dim=32, num_classes=9, max_text_len=16)
DISTILL = dict(task_weight=1.0, logits_weight=1.0, temperature=1.0, feature_weight=1.0, attention_weight=1.0,
               attention_kind="head_mean")
KEYS = ("kd", "hid", "attn")


@pytest.fixture(scope="module")
def engine():
    return TeacherEngine.from_config(TeacherConfig(model="coca:tiny", pretrained=False, model_kwargs=TEACHER))


@pytest.fixture(scope="module")
def info(engine):
    return TeacherService(engine).describe()


def make(info, seed: int = 0) -> Distiller:
    torch.manual_seed(seed)
    return Distiller(build_student({"kind": "coca", "kwargs": STUDENT}), build(DistillSection, DISTILL), info)


def coca_batch(seed: int, b: int = 4, t: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t, dtype=torch.int64)
    mask[1, 4:] = 0
    return {"pixel_values": torch.rand(b, 3, 32, 32, generator=g),
            "input_ids": torch.randint(1000, 5000, (b, t), generator=g), "attention_mask": mask,
            "labels": torch.randint(0, 9, (b,), generator=g)}


def teacher_view(batch):
    return {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}


def targets_for(engine, spec, batch):
    (out,), _ = engine.run([Work(teacher_view(batch), resolve_spec(spec, engine.modules, engine.num_classes))])
    return out


# -- measurement on the full model ---------------------------------------------------------------


def test_measured_losses_and_reward_do_not_depend_on_the_played_arm(engine, info):
    d = make(info)
    batch = coca_batch(1)
    tg = targets_for(engine, d.target_spec(), batch)
    arms = all_arms(d.modules_list)
    assert len(arms) == 7

    # Independent full-model losses: one forward with every block's attention, summed here.
    with torch.no_grad():
        out = d.student(teacher_view(batch), need_attention=True)
        masks = {"image": None, "text": batch["attention_mask"], "multimodal": batch["attention_mask"]}
        hid = {m: sum(feature_loss(out.hidden[m][s - 1], tg[f"hidden.{m}.{t}"], "mse", mask=masks[m],
                                   projection=d.proj[f"{m}_{s}"]) for s, t in d.pairs[m]) for m in d.modules_list}
        attn = {m: sum(attention_mse_head_mean(out.attentions[m][s - 1], tg[f"attention.{m}.{t}"], mask=masks[m])
                       for s, t in d.pairs[m]) for m in d.modules_list}

    measured, totals = {}, {}
    for arm in arms:
        total, terms = d(teacher_view(batch), tg, batch["labels"], arm, measure=True)
        measured[arm] = {k: float(terms[k]) for k in KEYS}
        totals[arm] = total.detach()
        # every module's losses, the played ones and the others
        for m in d.modules_list:
            assert float(terms[f"hid.{m}"]) == pytest.approx(float(hid[m]), rel=1e-5)
            assert float(terms[f"attn.{m}"]) == pytest.approx(float(attn[m]), rel=1e-5)
        # training still uses only the played arm's layerwise terms
        want = terms["task"] + terms["kd"] + sum(hid[m] + attn[m] for m in arm)
        torch.testing.assert_close(total.detach(), want, rtol=1e-5, atol=1e-6)

    first = measured[arms[0]]
    assert first["hid"] == pytest.approx(float(sum(hid.values())), rel=1e-5)
    assert first["attn"] == pytest.approx(float(sum(attn.values())), rel=1e-5)
    for arm in arms:
        assert measured[arm] == first, arm  # bit for bit, whatever arm was played
    prev = {k: 1.25 * v for k, v in first.items()}
    rewards = {arm: round_reward(prev, measured[arm]) for arm in arms}
    assert len(set(rewards.values())) == 1 and rewards[arms[0]] == pytest.approx(0.2)
    # ... while the arm does change what is trained
    assert len({round(float(t), 6) for t in totals.values()}) == len(arms)


def test_a_training_step_outside_measurement_reports_no_full_model_sums(engine, info):
    """Outside measurement only the arm's modules are computed: their sum is not the full model's,
    so it must not be offered under the reward's keys."""
    d = make(info)
    batch = coca_batch(2)
    tg = targets_for(engine, d.target_spec(arm=("image",)), batch)
    _, terms = d(teacher_view(batch), tg, batch["labels"], ("image",))
    assert {"hid.image", "attn.image", "kd"} <= set(terms)
    assert not {"hid", "attn", "hid.text", "attn.multimodal"} & set(terms)


def test_a_missing_needed_target_is_an_error_naming_it(engine, info):
    d = make(info)
    batch = coca_batch(3)
    tg = targets_for(engine, d.target_spec(arm=("image",)), batch)
    # an arm-only reply cannot serve a measurement step, nor another arm
    with pytest.raises(ValueError, match=r"'hidden\.text\.\d'"):
        d(teacher_view(batch), tg, batch["labels"], ("image",), measure=True)
    with pytest.raises(ValueError, match=r"'hidden\.multimodal\.\d'"):
        d(teacher_view(batch), tg, batch["labels"], ("multimodal",))
    no_attn = {k: v for k, v in tg.items() if not k.startswith("attention.")}
    with pytest.raises(ValueError, match=r"'attention\.image\.\d'"):
        d(teacher_view(batch), no_attn, batch["labels"], ("image",))
    with pytest.raises(ValueError, match="'logits'"):
        d(teacher_view(batch), {k: v for k, v in tg.items() if k != "logits"}, batch["labels"], ("image",))


# -- no prefetch lag -----------------------------------------------------------------------------


class RecordingClient:
    """Stands in for SyncTeacherClient: answers from the engine and records every spec, in order."""

    def __init__(self, engine):
        self.engine, self.specs = engine, []

    def submit(self, inputs, spec, *args):
        self.specs.append(spec)
        f = concurrent.futures.Future()
        f.set_result(targets_for(self.engine, spec, inputs))
        return f


def run_prefetched(engine, info, steps: int, delta: int, measure: int, depth: int | str, plan_depth: int):
    """The worker loop's OPTIMA path (Prefetcher -> ArmPlan -> Distiller -> bandit), on one rank."""
    d = make(info)
    opt = torch.optim.AdamW(d.parameters(), lr=1e-3)
    sched = OptimaScheduler(d.modules_list, reports_per_round=measure, warmup_rounds=1, seed=3, loss_keys=KEYS)
    plan = ArmPlan(sched, delta, measure, 0, depth=plan_depth)
    client = RecordingClient(engine)
    source = (coca_batch(100 + i) for i in range(steps))
    pre = Prefetcher(source, lambda b: (teacher_view(b), d.target_spec("float32", plan.arm_for_next())), client, depth=depth)
    trained = []
    for step in range(steps):
        batch, tg = next(pre)
        arm, is_measured = plan.step_args(step)
        total, terms = d(teacher_view(batch), tg, batch["labels"], arm, measure=is_measured)
        opt.zero_grad()
        total.backward()
        opt.step()
        plan.end_step(step, terms)
        trained.append(arm)
    pre.close()
    return d, client.specs, trained


def test_an_arm_switch_trains_its_first_step_on_the_new_arms_targets(engine, info):
    delta, measure, depth, steps = 4, 1, 2, 28  # 7 rounds: the baseline, then 6 warm-up arms
    d, specs, trained = run_prefetched(engine, info, steps, delta, measure, depth, plan_depth=depth)
    full = d.target_spec()
    switches = 0
    for step, arm in enumerate(trained):
        spec = specs[step]  # the request made for this step (the prefetcher submits in order)
        if step % delta < depth or step % delta >= delta - measure:
            assert spec == full, step  # arm not drawn yet when requested, or a measurement step
        else:
            assert spec == d.target_spec(arm=arm), step  # exactly the played arm, nothing more
        if step and step % delta == 0 and not set(arm) <= set(trained[step - 1]):
            switches += 1
            requested = {s.module for s in spec.hidden} | {s.module for s in spec.attention}
            assert set(arm) <= requested
    # the lag this guards against needs a switch to an arm with a module the old arm lacked
    assert switches >= 2
    assert len(set(trained)) >= 5


def test_an_auto_depth_prefetcher_trains_under_a_plan_of_its_max_depth(engine, info):
    """``prefetch_depth: auto`` (the job's most_in_flight(): max_depth for the plan): whatever depth the
    prefetcher picks, at most max_depth, no step trains on targets requested for another arm."""
    from student_workers.train.job_config import TeacherSection

    plan_depth = TeacherSection(prefetch_depth="auto").most_in_flight()
    d, specs, trained = run_prefetched(engine, info, 28, 7, 1, depth="auto", plan_depth=plan_depth)
    assert len(trained) == 28 and len(specs) == 28


def test_a_plan_that_ignores_the_prefetch_depth_is_caught(engine, info):
    """The old behaviour (the first steps of a round requested with the previous arm) must fail loudly."""
    with pytest.raises(RuntimeError, match="requested for arm"):
        run_prefetched(engine, info, 28, 4, 1, depth=2, plan_depth=0)


# -- one bandit per job --------------------------------------------------------------------------


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, rounds: int, delta: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Different seeds per rank: only rank 0's choices may count (broadcast_state).
        sched = OptimaScheduler(["a", "b"], reports_per_round=delta, warmup_rounds=1, seed=11 + rank, loss_keys=KEYS)
        broadcast_state(sched)
        for step in range(rounds * delta):
            local = local_losses(rank, step)
            rec = sched.step_end(reduce_losses(local, KEYS))
            if rec is not None:
                broadcast_state(sched)
        torch.save(sched.summary(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def local_losses(rank: int, step: int) -> dict[str, float]:
    """Each rank's shard gives other losses; rank 1's fall faster than rank 0's."""
    decay = 0.97 if rank == 0 else 0.90
    return {"kd": 2.0 * decay**step + rank, "hid": 1.0 * decay ** (step // 2), "attn": 0.5 + 0.1 * rank * (step % 3)}


def test_ranks_share_one_bandit_fed_the_mean_of_their_losses():
    world, rounds, delta = 2, 9, 3
    with tempfile.TemporaryDirectory() as out:
        init = os.path.join(out, "init")
        mp.start_processes(_rank_main, args=(world, init, out, rounds, delta), nprocs=world, join=True,
                           start_method="spawn")
        states = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world)]
    assert states[0] == states[1]
    # The same bandit, alone, fed the rank-mean losses by hand (rank 0's seed decides).
    alone = OptimaScheduler(["a", "b"], reports_per_round=delta, warmup_rounds=1, seed=11, loss_keys=KEYS)
    for step in range(rounds * delta):
        per_rank = [local_losses(r, step) for r in range(world)]
        alone.step_end({k: sum(l[k] for l in per_rank) / world for k in KEYS})
    want = alone.summary()
    assert states[0]["counts"] == want["counts"] and sum(want["counts"]) == rounds - 1
    assert [h["arm_index"] for h in states[0]["history"]] == [h["arm_index"] for h in want["history"]]
    assert states[0]["means"] == pytest.approx(want["means"], rel=1e-12)
    assert states[0]["rng_sha256"] == want["rng_sha256"]


def test_summary_roundtrips_through_state_dict():
    a = OptimaScheduler(["a", "b", "c"], reports_per_round=2, warmup_rounds=1, seed=5, loss_keys=KEYS)
    for step in range(21):
        a.step_end({"kd": 1.0 / (step + 1), "hid": 2.0 - 0.05 * step, "attn": 0.3 + 0.01 * (step % 4)})
    b = OptimaScheduler(["a", "b", "c"], reports_per_round=2, warmup_rounds=1, seed=99, loss_keys=KEYS)
    assert b.summary() != a.summary()
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.summary() == a.summary()
