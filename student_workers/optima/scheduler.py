"""OPTIMA: module-wise adaptive distillation driven by a non-stationary Gaussian Thompson sampler.

Reference: Liang et al. 2023, "Module-wise Adaptive Distillation for Multimodality Foundation
Models" (OPTIMA), section 3 (arms, reward eq. 6, EMA update eq. 7, Algorithm 1) and appendix A.7
(EMA half-life); kdserve's specification is docs/methods.md#optima.

How the pieces fit:

* The student (and teacher) are cut into ``M`` modules, e.g. image encoder / text encoder /
  multimodal decoder. An arm is a non-empty subset of modules, so there are ``K = 2^M - 1`` arms
  (:func:`all_arms`). While an arm is played only the layers of its modules receive the layer-wise
  hidden/attention losses (:func:`arm_layers`); the logit KD loss is always on.
* Training is cut into rounds. A round closes after ``reports_per_round`` reports: the trainer
  reports the losses of the FULL model (all mapped layers, not only the played arm's) to
  :meth:`OptimaScheduler.step_end` on a round's measured steps only (kdserve's training loop
  measures the last ``distill.optima.measure_steps`` of a round's ``distill.optima.delta`` training
  steps, see :class:`student_workers.optima.plan.ArmPlan`, so ``reports_per_round`` is
  ``measure_steps``; the paper reports every step); scoring every arm on the same full-model losses is what makes
  rewards of different arms comparable (OPTIMA sec. 3, remark after eq. 6).
* At a round's end the round-averaged losses are compared with the previous round's
  (:func:`round_reward`), the played arm's reward distribution is updated and the next arm is
  drawn by Thompson sampling.

Choice for the very first round (the paper leaves it open): a reward needs the previous round's
losses, which do not exist for round 0. Round 0 is therefore a *baseline* round: it plays the arm
with every module (plain layer-wise distillation), yields no reward and only records the loss
baseline. The ``warmup_rounds * K`` warm-up rounds start after it, so every warm-up reward is a
true decrement measured against a preceding round."""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping, Sequence

import torch

from student_workers.optima.arms import all_arms, check_modules
from student_workers.optima.reward import DEFAULT_LOSS_KEYS, RoundAverager, round_reward

PHASE_BASELINE = "baseline"
PHASE_WARMUP = "warmup"
PHASE_BANDIT = "bandit"


class OptimaScheduler(torch.nn.Module):
    """Chooses which modules to distil each round (OPTIMA, Liang et al. 2023, Algorithm 1).

    Bandit model (sec. 3): arm ``k`` has reward distribution ``N(mu_k, 1 / (n_k + 1))``.

    * Warm-up: each arm is played ``warmup_rounds`` (R0) times in a random order; afterwards
      ``mu_k`` is the mean of its warm-up rewards and ``n_k`` its number of plays.
    * Then every round draws ``theta_k ~ N(mu_k, 1 / (n_k + 1))`` for all arms and plays
      ``argmax_k theta_k`` (first index on ties).
    * The played arm's mean follows an exponential moving average, ``mu <- gamma * mu + (1 -
      gamma) * r`` (eq. 7), and ``n <- n + 1``. The EMA forgets old rewards, which is what lets
      the sampler follow module contributions that drift as the student trains; its half-life is
      ``ln(0.5) / ln(gamma)`` rounds (appendix A.7), about 6.6 rounds for the default 0.9.

    Round 0 is a baseline round (full arm, no reward); see the module docstring.

    Args:
        modules: module names; arms are built by :func:`all_arms`.
        reports_per_round: :meth:`step_end` calls (measured steps) that make one round (default 50).
            Not the round's length in training steps when only some steps are measured.
        gamma: EMA factor in ``[0, 1)`` (default 0.9).
        warmup_rounds: R0, warm-up plays per arm (default 1). With 0 there is no warm-up and an
            arm's first observed reward becomes its mean (the R0 = 0 limit of "mean of the warm-up
            rewards") instead of being averaged with the arbitrary prior mean 0.
        seed: seeds the private CPU ``torch.Generator`` used for the warm-up order and the
            Thompson draws, so arm choices never depend on, or disturb, the global RNG.
        loss_keys: full-model losses averaged by the reward (default ``("kd", "hid", "attn")``).
        variance_scale: kdserve extension, default 1.0 = the paper's ``1 / (n_k + 1)``. Draws use
            ``variance_scale / (n_k + 1)``. The paper's variance is sized for rewards of order
            one (they lie in ``[0, 1]``); when a round's relative loss decrements are only ~0.01 that variance
            swamps the differences between arms and the draws are nearly uniform, so a smaller
            scale (e.g. the squared typical reward) restores exploitation. 0 gives greedy play.

    All state that a resume needs is in :meth:`state_dict`: ``mu``, ``counts``, the warm-up order
    and position, the round index, the current arm, the previous round's mean losses, the partial
    sums of the current round, and (as extra state) the generator state and the per-round history.
    """

    def __init__(
        self,
        modules: Sequence[str],
        reports_per_round: int = 50,
        gamma: float = 0.9,
        warmup_rounds: int = 1,
        seed: int = 0,
        loss_keys: Sequence[str] = DEFAULT_LOSS_KEYS,
        variance_scale: float = 1.0,
    ) -> None:
        super().__init__()
        # Not "self.modules": that would shadow nn.Module.modules().
        self.module_names = check_modules(modules)
        self.arms = all_arms(self.module_names)
        self.reports_per_round = int(reports_per_round)
        self.gamma = float(gamma)
        self.warmup_rounds = int(warmup_rounds)
        self.seed = int(seed)
        self.loss_keys = tuple(loss_keys)
        self.variance_scale = float(variance_scale)
        if self.reports_per_round < 1:
            raise ValueError(f"reports_per_round must be >= 1, got {reports_per_round}")
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        if self.warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be >= 0, got {warmup_rounds}")
        if not (math.isfinite(self.variance_scale) and self.variance_scale >= 0.0):
            raise ValueError(f"variance_scale must be finite and >= 0, got {variance_scale}")

        k = len(self.arms)
        self._gen = torch.Generator(device="cpu")
        self._gen.manual_seed(self.seed)
        # A random permutation of the multiset {0..K-1} x R0: every arm exactly R0 times.
        order = torch.randperm(k * self.warmup_rounds, generator=self._gen) % k
        self.register_buffer("warmup_order", order.to(torch.int64))
        self.register_buffer("warmup_pos", torch.zeros((), dtype=torch.int64))
        self.register_buffer("mu", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(k, dtype=torch.int64))
        self.register_buffer("round_index", torch.zeros((), dtype=torch.int64))
        # Baseline round plays the full arm (last in all_arms order).
        self.register_buffer("arm_index", torch.tensor(k - 1, dtype=torch.int64))
        self.register_buffer("prev_losses", torch.full((len(self.loss_keys),), math.nan, dtype=torch.float64))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))
        self.averager = RoundAverager(self.loss_keys)
        self._history: list[dict[str, Any]] = []

    # -- read-only views ------------------------------------------------------------------------

    @property
    def num_arms(self) -> int:
        return len(self.arms)

    @property
    def half_life(self) -> float:
        """EMA half-life in rounds, ``ln(0.5) / ln(gamma)`` (OPTIMA appendix A.7)."""
        return 0.0 if self.gamma == 0.0 else math.log(0.5) / math.log(self.gamma)

    @property
    def in_warmup(self) -> bool:
        return int(self.warmup_pos) < self.warmup_order.numel()

    @property
    def history(self) -> list[dict[str, Any]]:
        """Copy of the per-round records (the dicts :meth:`step_end`/:meth:`update` returned)."""
        return copy.deepcopy(self._history)

    def current_arm(self) -> tuple[str, ...]:
        """Modules whose layers are distilled layer-wise in the current round."""
        return self.arms[int(self.arm_index)]

    def means(self) -> list[float]:
        return [float(v) for v in self.mu.tolist()]

    # -- bandit core (usable without any losses) ------------------------------------------------

    def select(self) -> int:
        """Choose the arm for the next round, make it current and return its index.

        During warm-up this is the next arm of the shuffled warm-up order (no randomness used,
        and calling it twice gives the same arm). Afterwards it is a Thompson draw, which
        consumes the private generator.
        """
        if self.in_warmup:
            idx = int(self.warmup_order[int(self.warmup_pos)])
        else:
            idx = self._thompson_draw()
        self.arm_index.fill_(idx)
        return idx

    def _thompson_draw(self) -> int:
        # Sample on the CPU with the private generator even if the buffers were moved elsewhere.
        mu = self.mu.detach().to("cpu", torch.float64)
        std = (self.variance_scale / (self.counts.detach().to("cpu", torch.float64) + 1.0)).sqrt()
        theta = mu + std * torch.randn(mu.shape, generator=self._gen, dtype=torch.float64)
        return int(torch.argmax(theta))

    def update(self, arm_index: int, reward: float) -> dict[str, Any]:
        """Fold one round's ``reward`` for ``arm_index`` into the bandit; return the round record.

        Warm-up rounds keep ``mu_k`` the running mean of the arm's rewards; after warm-up the
        played arm's mean is the EMA of eq. 7. ``n_k`` grows by one either way. During warm-up
        the arm must be the one the warm-up order scheduled (otherwise some arm would miss its
        R0 plays).
        """
        idx = int(arm_index)
        r = float(reward)
        if not 0 <= idx < self.num_arms:
            raise ValueError(f"arm index {idx} out of range [0, {self.num_arms})")
        if not math.isfinite(r):
            raise ValueError(f"reward must be finite, got {reward}")
        n_old = int(self.counts[idx])
        if self.in_warmup:
            expected = int(self.warmup_order[int(self.warmup_pos)])
            if idx != expected:
                raise ValueError(f"warm-up round expects arm {expected}, got {idx}")
            phase = PHASE_WARMUP
            new_mu = float(self.mu[idx]) + (r - float(self.mu[idx])) / (n_old + 1)
            self.warmup_pos += 1
        else:
            phase = PHASE_BANDIT
            # n_old == 0 only happens with warmup_rounds == 0: take the first reward as the mean.
            new_mu = r if n_old == 0 else self.gamma * float(self.mu[idx]) + (1.0 - self.gamma) * r
        self.mu[idx] = new_mu
        self.counts[idx] += 1
        return self._close_round(phase, idx, r)

    def _close_round(self, phase: str, idx: int, reward: float | None) -> dict[str, Any]:
        record = {
            "round": int(self.round_index),
            "phase": phase,
            "arm": list(self.arms[idx]),
            "arm_index": idx,
            "reward": reward,
            "means": self.means(),
            "counts": [int(c) for c in self.counts.tolist()],
        }
        self._history.append(record)
        self.round_index += 1
        return copy.deepcopy(record)

    # -- training-loop API ------------------------------------------------------------------------

    def step_end(self, losses: Mapping[str, Any]) -> dict[str, Any] | None:
        """Call after every measured training step with the FULL-model losses (``kd``, ``hid``, ``attn``).

        Returns ``None`` inside a round. When the report completes a round of ``reports_per_round`` it
        scores the round (reward vs the previous round's mean losses; none for the baseline
        round 0), updates the bandit, selects the next arm (read it with :meth:`current_arm`) and
        returns the JSON-serialisable record ``{round, phase, arm, arm_index, reward, means,
        counts, losses}`` for the log.
        """
        self.averager.add(losses)
        if len(self.averager) < self.reports_per_round:
            return None
        now = self.averager.mean()
        self.averager.reset()
        idx = int(self.arm_index)
        if bool(self.has_prev):
            prev = dict(zip(self.loss_keys, self.prev_losses.tolist()))
            record = self.update(idx, round_reward(prev, now, self.loss_keys))
        else:
            record = self._close_round(PHASE_BASELINE, idx, None)
        self.prev_losses.copy_(torch.tensor([now[k] for k in self.loss_keys], dtype=torch.float64))
        self.has_prev.fill_(True)
        record["losses"] = now
        self._history[-1]["losses"] = dict(now)
        self.select()
        return record

    # -- persistence ------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        """Generator state and history travel in ``state_dict()`` under ``_extra_state``.

        Only tensors, lists, dicts, strings and numbers, so ``torch.load(weights_only=True)``
        reads it back.
        """
        return {
            "rng_state": self._gen.get_state(),
            "history": copy.deepcopy(self._history),
            "modules": list(self.module_names),
            "loss_keys": list(self.loss_keys),
        }

    def set_extra_state(self, state: Any) -> None:
        # Arm indices only mean the same arms if the module list is the same, so refuse a
        # checkpoint taken with other modules or loss keys rather than resume silently wrong.
        if list(state["modules"]) != list(self.module_names):
            raise ValueError(f"checkpoint modules {state['modules']!r} != configured {list(self.module_names)!r}")
        if list(state["loss_keys"]) != list(self.loss_keys):
            raise ValueError(f"checkpoint loss keys {state['loss_keys']!r} != configured {list(self.loss_keys)!r}")
        self._gen.set_state(state["rng_state"].to("cpu", torch.uint8))
        self._history = copy.deepcopy(list(state["history"]))

    def summary(self) -> dict[str, Any]:
        """The whole bandit state as plain JSON values (means, counts, arm, round, warm-up
        position, previous and partial round losses, history, a digest of the RNG state): two
        schedulers with equal summaries make the same choices from here on."""
        import hashlib

        rng = self._gen.get_state().numpy().tobytes()
        return {
            "means": self.means(),
            "counts": [int(c) for c in self.counts.tolist()],
            "arm_index": int(self.arm_index),
            "round_index": int(self.round_index),
            "warmup_pos": int(self.warmup_pos),
            "warmup_order": [int(i) for i in self.warmup_order.tolist()],
            "prev_losses": [float(v) if bool(self.has_prev) else None for v in self.prev_losses.tolist()],
            "round_sums": [float(v) for v in self.averager.sums.tolist()],
            "round_count": int(self.averager.count),
            "history": self.history,
            "rng_sha256": hashlib.sha256(rng).hexdigest(),
        }
