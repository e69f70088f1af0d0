"""Tests of the OPTIMA scheduler (Liang et al. 2023; docs/methods.md#optima)."""
from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from student_workers.optima.arms import all_arms, arm_layers
from student_workers.optima.reward import round_reward, RoundAverager
from student_workers.optima.scheduler import OptimaScheduler
from student_workers.optima.rounds import log_round

REPO = Path(__file__).resolve().parents[1]
MODULES = ["img", "txt", "multi"]


# -- arms ----------------------------------------------------------------------------------------


@pytest.mark.unit
def test_all_arms_three_modules():
    arms = all_arms(MODULES)
    assert len(arms) == 7 == 2**3 - 1
    assert arms == [
        ("img",), ("txt",), ("multi",),
        ("img", "txt"), ("img", "multi"), ("txt", "multi"),
        ("img", "txt", "multi"),
    ]
    assert all_arms(MODULES) == arms  # deterministic


@pytest.mark.unit
@pytest.mark.parametrize("m", [1, 2, 4, 5])
def test_all_arms_count(m):
    arms = all_arms([f"m{i}" for i in range(m)])
    assert len(arms) == 2**m - 1 == len(set(arms))


@pytest.mark.unit
def test_all_arms_rejects_bad_modules():
    with pytest.raises(ValueError):
        all_arms([])
    with pytest.raises(ValueError):
        all_arms(["a", "a"])


@pytest.mark.unit
def test_arm_layers_only_arm_modules():
    maps = {"img": [(1, 2), (2, 4)], "txt": [(1, 3)], "multi": [(1, 1)]}
    assert arm_layers(("img", "multi"), maps) == {"img": [(1, 2), (2, 4)], "multi": [(1, 1)]}
    with pytest.raises(ValueError):
        arm_layers(("audio",), maps)


# -- reward --------------------------------------------------------------------------------------


@pytest.mark.unit
def test_round_reward_hand_computed():
    prev = {"kd": 2.0, "hid": 1.0, "attn": 0.5}
    now = {"kd": 1.5, "hid": 1.2, "attn": 0.1}
    # kd: (2.0-1.5)/2.0 = 0.25; hid rose -> clipped to 0; attn: (0.5-0.1)/0.5 = 0.8
    assert round_reward(prev, now) == pytest.approx((0.25 + 0.0 + 0.8) / 3)
    assert round_reward(prev, now) == pytest.approx(0.35)


@pytest.mark.unit
def test_round_reward_clipping():
    prev = {"kd": 1.0, "hid": 1.0, "attn": 1.0}
    # A negative "now" gives a ratio of 3 -> clipped to 1; a tripled loss gives -2 -> clipped to 0.
    assert round_reward(prev, {"kd": -2.0, "hid": 0.0, "attn": 3.0}) == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert round_reward(prev, {"kd": 5.0, "hid": 5.0, "attn": 5.0}) == 0.0


@pytest.mark.unit
def test_round_reward_edge_cases():
    now = {"kd": 0.5, "hid": 0.5, "attn": 0.5}
    # prev <= 0 contributes 0 but still counts in the 1/3.
    assert round_reward({"kd": 0.0, "hid": -1.0, "attn": 1.0}, now) == pytest.approx(0.5 / 3)
    # Non-finite values contribute 0.
    assert round_reward({"kd": math.nan, "hid": 1.0, "attn": 1.0}, now) == pytest.approx(1.0 / 3)
    with pytest.raises(ValueError):
        round_reward({"kd": 1.0, "hid": 1.0}, now)
    with pytest.raises(ValueError):
        round_reward(now, {"kd": 1.0, "attn": 1.0})
    # Custom key set: mean over the given keys only; tensors are accepted.
    assert round_reward({"kd": torch.tensor(4.0)}, {"kd": torch.tensor(3.0)}, keys=("kd",)) == pytest.approx(0.25)


@pytest.mark.unit
def test_round_averager():
    avg = RoundAverager()
    for kd in (1.0, 2.0, 6.0):
        avg.add({"kd": kd, "hid": 2 * kd, "attn": torch.tensor(kd), "extra": 99.0})
    assert len(avg) == 3
    assert avg.mean() == pytest.approx({"kd": 3.0, "hid": 6.0, "attn": 3.0})
    avg.reset()
    with pytest.raises(ValueError):
        avg.mean()
    with pytest.raises(ValueError):
        avg.add({"kd": 1.0})


# -- bandit ------------------------------------------------------------------------------------


def _play_nonstationary(seed: int, rounds: int = 400, arm_a: int = 6, arm_b: int = 1) -> list[int]:
    """7 Gaussian arms; arm_a best in the first half, arm_b best in the second (roles swap)."""
    sched = OptimaScheduler(MODULES, gamma=0.9, warmup_rounds=1, seed=seed)
    noise = torch.Generator().manual_seed(10_000 + seed)
    half = rounds // 2
    picks = []
    for t in range(rounds):
        idx = sched.select()
        best, worst = (arm_a, arm_b) if t < half else (arm_b, arm_a)
        mean = 0.8 if idx == best else 0.2 if idx == worst else 0.35
        sched.update(idx, mean + 0.05 * float(torch.randn((), generator=noise)))
        picks.append(idx)
    return picks


@pytest.mark.unit
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nonstationary_bandit_tracks_best_arm(seed):
    rounds, arm_a, arm_b = 400, 6, 1
    picks = _play_nonstationary(seed, rounds, arm_a, arm_b)
    half = rounds // 2
    # Judge the last 60% of each half, leaving the sampler time to notice the switch.
    first = picks[int(0.4 * half) : half]
    second = picks[half + int(0.4 * half) :]
    assert max(range(7), key=first.count) == arm_a
    assert max(range(7), key=second.count) == arm_b
    assert first.count(arm_a) / len(first) > 0.4
    assert second.count(arm_b) / len(second) > 0.5


@pytest.mark.unit
def test_update_rules():
    sched = OptimaScheduler(MODULES, gamma=0.8, warmup_rounds=2, seed=3)
    rewards = {}
    for i in range(14):  # warm-up: mean of the R0 rewards, n = R0
        idx = sched.select()
        r = 0.01 * i
        rewards.setdefault(idx, []).append(r)
        rec = sched.update(idx, r)
        assert rec["phase"] == "warmup" and rec["round"] == i
    assert not sched.in_warmup
    for k in range(7):
        assert sched.mu[k].item() == pytest.approx(sum(rewards[k]) / 2)
        assert sched.counts[k].item() == 2
    idx = sched.select()
    old = sched.mu[idx].item()
    rec = sched.update(idx, 1.0)  # EMA of eq. 7
    assert rec["phase"] == "bandit"
    assert sched.mu[idx].item() == pytest.approx(0.8 * old + 0.2 * 1.0)
    assert sched.counts[idx].item() == 3
    assert sched.half_life == pytest.approx(math.log(0.5) / math.log(0.8))


@pytest.mark.unit
def test_warmup_rejects_unscheduled_arm():
    sched = OptimaScheduler(MODULES, warmup_rounds=1, seed=0)
    idx = sched.select()
    with pytest.raises(ValueError):
        sched.update((idx + 1) % 7, 0.5)


# -- training-loop API ----------------------------------------------------------------------


def _losses(step: int, arm: tuple[str, ...]) -> dict[str, float]:
    """Deterministic fake full-model losses that fall faster when more modules are distilled."""
    decay = 1.0 - 0.002 * len(arm) - 0.001 * ("multi" in arm)
    base = decay**step
    return {"kd": 2.0 * base, "hid": 1.0 * base + 0.01 * (step % 3), "attn": 0.5 * base}


def _train(sched: OptimaScheduler, steps: int, start: int = 0) -> list[dict]:
    records = []
    for step in range(start, start + steps):
        rec = sched.step_end(_losses(step, sched.current_arm()))
        if rec is not None:
            records.append(rec)
    return records


@pytest.mark.unit
def test_warmup_each_arm_r0_times_after_baseline():
    r0, delta = 3, 4
    sched = OptimaScheduler(MODULES, reports_per_round=delta, warmup_rounds=r0, seed=5)
    assert sched.current_arm() == ("img", "txt", "multi")  # baseline round plays the full arm
    records = _train(sched, delta * (1 + 7 * r0 + 5))
    assert [r["round"] for r in records] == list(range(len(records)))
    base, warm, after = records[0], records[1 : 1 + 7 * r0], records[1 + 7 * r0 :]
    assert base["phase"] == "baseline" and base["reward"] is None and base["arm_index"] == 6
    assert all(r["phase"] == "warmup" for r in warm)
    assert sorted(r["arm_index"] for r in warm) == sorted(list(range(7)) * r0)
    assert all(r["phase"] == "bandit" for r in after)
    assert sched.counts.tolist() == [r0 + sum(r["arm_index"] == k for r in after) for k in range(7)]
    # Each record's reward is eq. 6 on the round-averaged losses of this and the previous round.
    for prev, cur in zip(records, records[1:]):
        assert cur["reward"] == pytest.approx(round_reward(prev["losses"], cur["losses"]))


@pytest.mark.unit
def test_step_end_round_boundaries():
    sched = OptimaScheduler(MODULES, reports_per_round=5, seed=0)
    out = [sched.step_end({"kd": 1.0, "hid": 1.0, "attn": 1.0}) for _ in range(10)]
    assert [i for i, o in enumerate(out) if o is not None] == [4, 9]
    assert out[4]["losses"] == pytest.approx({"kd": 1.0, "hid": 1.0, "attn": 1.0})
    assert out[9]["reward"] == 0.0  # no decrease
    with pytest.raises(ValueError):
        sched.step_end({"kd": 1.0, "hid": 1.0})


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.unit
def test_state_dict_roundtrip_bandit():
    ref = OptimaScheduler(MODULES, gamma=0.85, warmup_rounds=1, seed=11)
    run = OptimaScheduler(MODULES, gamma=0.85, warmup_rounds=1, seed=11)
    noise = [0.1 * ((7 * i) % 10) for i in range(60)]
    for i in range(25):
        for s in (ref, run):
            s.update(s.select(), noise[i])
    # A fresh scheduler with another seed: identical continuation proves the RNG state came back.
    resumed = OptimaScheduler(MODULES, gamma=0.85, warmup_rounds=1, seed=999)
    resumed.load_state_dict(_roundtrip(run.state_dict()))
    del run
    for i in range(25, 60):
        a, b = ref.select(), resumed.select()
        assert a == b
        ra, rb = ref.update(a, noise[i]), resumed.update(b, noise[i])
        assert ra == rb
    assert torch.equal(ref.mu, resumed.mu) and torch.equal(ref.counts, resumed.counts)
    assert ref.history == resumed.history


@pytest.mark.unit
def test_state_dict_roundtrip_mid_round():
    delta = 6
    ref = OptimaScheduler(MODULES, reports_per_round=delta, seed=2)
    run = OptimaScheduler(MODULES, reports_per_round=delta, seed=2)
    cut = delta * 12 + 3  # inside a round: the partial loss sums must be restored as well
    ref_records = _train(ref, cut)
    run_records = _train(run, cut)
    resumed = OptimaScheduler(MODULES, reports_per_round=delta, seed=123)
    resumed.load_state_dict(_roundtrip(run.state_dict()))
    assert resumed.current_arm() == run.current_arm()
    ref_records += _train(ref, delta * 30, start=cut)
    run_records += _train(resumed, delta * 30, start=cut)
    assert ref_records == run_records
    assert ref.history == resumed.history
    assert torch.equal(ref.mu, resumed.mu) and torch.equal(ref.counts, resumed.counts)


@pytest.mark.unit
def test_load_rejects_other_modules():
    sched = OptimaScheduler(MODULES, seed=0)
    other = OptimaScheduler(["a", "b", "c"], seed=0)
    with pytest.raises(ValueError):
        other.load_state_dict(sched.state_dict())


# -- log and plot ------------------------------------------------------------------------------


def test_plot_cli_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    sched = OptimaScheduler(MODULES, reports_per_round=3, seed=4)
    _train(sched, 3 * 40)
    log = tmp_path / "rounds.jsonl"
    for i, rec in enumerate(sched.history):
        log_round(log, rec, done_step=3 * (i + 1))
    lines = log.read_text().splitlines()
    assert len(lines) == 40
    first = json.loads(lines[0])
    assert {"round", "arm", "arm_index", "reward", "means"} <= set(first)
    assert isinstance(first["arm"], list) and len(first["means"]) == 7
    out = tmp_path / "fig.png"
    env = dict(os.environ, PYTHONPATH=str(REPO), MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, "-m", "student_workers.optima.plot", "--log", str(log), "--out", str(out), "--phases", "4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.unit
def test_plot_labels_unplayed_arms_and_leaves_the_baseline_out_of_the_frequencies():
    from student_workers.optima.plot import arm_frequencies, arm_labels

    # The baseline plays all modules (index 6); warm-up plays 4 then 0 then 4: "txt" (1) never.
    rec = lambda rnd, idx, arm, phase: {"round": rnd, "arm": arm, "arm_index": idx, "phase": phase,
                                         "reward": None if phase == "baseline" else 0.1, "means": [0.0] * 7}
    records = [rec(0, 6, ["img", "txt", "multi"], "baseline"), rec(1, 4, ["img", "multi"], "warmup"),
               rec(2, 0, ["img"], "warmup"), rec(3, 4, ["img", "multi"], "warmup")]
    assert arm_labels(records) == ["img", "txt", "multi", "img+txt", "img+multi", "txt+multi", "img+txt+multi"]
    spans, freq = arm_frequencies(records, phases=1)
    assert spans == [(1, 3)]
    assert freq[0] == pytest.approx([1 / 3, 0, 0, 0, 2 / 3, 0, 0])
    # Without the all-modules arm in the log the labels cannot be known: a placeholder, never a wrong name.
    assert arm_labels(records[1:])[1] == "arm 1"


@pytest.mark.unit
def test_log_round_appends_one_json_line_per_round(tmp_path):
    recs = [{"round": i, "arm": ["img"], "arm_index": 0, "reward": None, "means": [0.0]} for i in range(2)]
    for i, rec in enumerate(recs):
        log_round(tmp_path / "x.jsonl", rec, done_step=5 * (i + 1))
    lines = (tmp_path / "x.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{**rec, "step": 5 * (i + 1)} for i, rec in enumerate(recs)]


@pytest.mark.unit
def test_thompson_draw_matches_formula():
    sched = OptimaScheduler(MODULES, warmup_rounds=1, seed=7)
    for i in range(7):
        sched.update(sched.select(), 0.1 * i)
    for _ in range(20):
        # Replay the generator by hand: theta_k = mu_k + sqrt(1 / (n_k + 1)) * z_k, play argmax.
        gen = torch.Generator().manual_seed(0)
        gen.set_state(sched.get_extra_state()["rng_state"])
        z = torch.randn(7, generator=gen, dtype=torch.float64)
        theta = [sched.mu[k].item() + math.sqrt(1.0 / (sched.counts[k].item() + 1)) * z[k].item() for k in range(7)]
        expected = max(range(7), key=lambda k: theta[k])
        idx = sched.select()
        assert idx == expected
        sched.update(idx, 0.5)


@pytest.mark.unit
def test_variance_scale_zero_is_greedy():
    sched = OptimaScheduler(MODULES, warmup_rounds=1, seed=1, variance_scale=0.0)
    for _ in range(7):
        idx = sched.select()
        sched.update(idx, 0.9 if idx == 4 else 0.1)
    assert all(sched.select() == 4 for _ in range(10))
    with pytest.raises(ValueError):
        OptimaScheduler(MODULES, gamma=1.0)
