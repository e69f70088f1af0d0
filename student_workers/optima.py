"""OPTIMA: module-wise adaptive distillation driven by a non-stationary Gaussian Thompson sampler.

Reference: Liang et al. 2023, "Module-wise Adaptive Distillation for Multimodality Foundation
Models" (OPTIMA), section 3 (arms, reward eq. 6, EMA update eq. 7, Algorithm 1) and appendix A.7
(EMA half-life); kdserve's specification is methods.md section 7.

How the pieces fit:

* The student (and teacher) are cut into ``M`` modules, e.g. image encoder / text encoder /
  multimodal decoder. An arm is a non-empty subset of modules, so there are ``K = 2^M - 1`` arms
  (:func:`all_arms`). While an arm is played only the layers of its modules receive the layer-wise
  hidden/attention losses (:func:`arm_layers`); the logit KD loss is always on.
* Training is cut into rounds of ``delta`` steps. After each step the trainer reports the losses
  of the FULL model (all mapped layers, not only the played arm's) to
  :meth:`OptimaScheduler.step_end`; scoring every arm on the same full-model losses is what makes
  rewards of different arms comparable (OPTIMA sec. 3, remark after eq. 6).
* At a round's end the round-averaged losses are compared with the previous round's
  (:func:`round_reward`), the played arm's reward distribution is updated and the next arm is
  drawn by Thompson sampling.

Choice for the very first round (the paper leaves it open): a reward needs the previous round's
losses, which do not exist for round 0. Round 0 is therefore a *baseline* round: it plays the arm
with every module (plain layer-wise distillation), yields no reward and only records the loss
baseline. The ``warmup_rounds * K`` warm-up rounds start after it, so every warm-up reward is a
true decrement measured against a preceding round.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

DEFAULT_LOSS_KEYS: tuple[str, ...] = ("kd", "hid", "attn")

# 2^16 - 1 arms is already far beyond what Thompson sampling can explore in a training run; the
# cap only guards against a config that lists layers instead of modules by mistake.
MAX_MODULES = 16

PHASE_BASELINE = "baseline"
PHASE_WARMUP = "warmup"
PHASE_BANDIT = "bandit"


# ----------------------------------------------------------------------------------------------
# Arms
# ----------------------------------------------------------------------------------------------


def _check_modules(modules: Sequence[str]) -> tuple[str, ...]:
    mods = tuple(modules)
    if not mods:
        raise ValueError("OPTIMA needs at least one module")
    if len(mods) > MAX_MODULES:
        raise ValueError(f"{len(mods)} modules give 2^{len(mods)}-1 arms; at most {MAX_MODULES} modules")
    if any(not isinstance(m, str) or not m for m in mods):
        raise ValueError(f"module names must be non-empty strings, got {mods!r}")
    if len(set(mods)) != len(mods):
        raise ValueError(f"module names must be unique, got {mods!r}")
    return mods


def all_arms(modules: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``modules``: the ``2^M - 1`` arms of OPTIMA (sec. 3).

    Deterministic order: by subset size, then lexicographically by position in ``modules``
    (``itertools.combinations`` order). The arm with all modules is therefore always last, and an
    arm index means the same thing on every worker and after a resume.
    """
    mods = _check_modules(modules)
    return [arm for size in range(1, len(mods) + 1) for arm in itertools.combinations(mods, size)]


def arm_label(arm: Sequence[str]) -> str:
    """Human-readable arm name for logs and plots, e.g. ``"img+txt"``."""
    return "+".join(arm)


def arm_layers(
    arm: Sequence[str], layer_maps: Mapping[str, Sequence[tuple[int, int]]]
) -> dict[str, list[tuple[int, int]]]:
    """Layer pairs that receive the hidden/attention losses while ``arm`` is played (OPTIMA eq. 5).

    ``layer_maps`` maps every module to its ``(student_layer, teacher_layer)`` pairs (usually the
    uniform map of methods.md section 6). Only the arm's modules are returned, in the arm's order;
    modules outside the arm are absent, i.e. not distilled layer-wise this round.
    """
    missing = [m for m in arm if m not in layer_maps]
    if missing:
        raise ValueError(f"arm {tuple(arm)!r} names modules without a layer map: {missing!r}")
    return {m: [(int(s), int(t)) for s, t in layer_maps[m]] for m in arm}


# ----------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------


def _loss_value(losses: Mapping[str, Any], key: str, what: str) -> float:
    if key not in losses:
        raise ValueError(f"{what} losses lack key {key!r} (have {sorted(losses)!r})")
    return float(losses[key])  # float() also takes 0-d tensors


def _clipped_decrement(prev: float, now: float) -> float:
    """clip((prev - now) / prev, 0, 1): the relative loss decrement of OPTIMA eq. 6.

    Returns 0 when ``prev <= 0`` (a loss that is already zero has nothing left to decrease and the
    ratio is undefined; a negative one would flip the sign) and when either value is not finite
    (a NaN reward would poison the arm's EMA mean for the rest of training).
    """
    if not (math.isfinite(prev) and math.isfinite(now)) or prev <= 0.0:
        return 0.0
    return min(max((prev - now) / prev, 0.0), 1.0)


def round_reward(
    prev: Mapping[str, Any], now: Mapping[str, Any], keys: Sequence[str] = DEFAULT_LOSS_KEYS
) -> float:
    """OPTIMA reward (eq. 6): mean over ``keys`` of the clipped relative decrement of each loss.

    ``r = (1/|keys|) * sum_X clip((X_prev - X_now) / X_prev, 0, 1)``; with the default keys
    ``("kd", "hid", "attn")`` this is the paper's ``1/3`` average over the logit KD loss and the
    full-model hidden-state and attention losses. Normalising by ``X_prev`` keeps losses of
    different scales on equal footing; clipping keeps ``r`` in ``[0, 1]``.

    A key missing from ``prev`` or ``now`` raises ``ValueError`` (a silently smaller average would
    change the reward's meaning). A key whose ``X_prev <= 0`` or whose values are not finite
    contributes 0 but still counts in the denominator.
    """
    keys = tuple(keys)
    if not keys:
        raise ValueError("round_reward needs at least one loss key")
    total = 0.0
    for key in keys:
        total += _clipped_decrement(_loss_value(prev, key, "previous"), _loss_value(now, key, "current"))
    return total / len(keys)


class RoundAverager(torch.nn.Module):
    """Sums per-step losses over one round and returns their mean.

    OPTIMA compares round-averaged losses rather than single-step values because one SGD step's
    loss is too noisy to tell arms apart (sec. 3, eq. 6). The running sums live in buffers so a
    checkpoint taken in the middle of a round resumes the round exactly.
    """

    def __init__(self, keys: Sequence[str] = DEFAULT_LOSS_KEYS) -> None:
        super().__init__()
        self.keys = tuple(keys)
        if not self.keys or len(set(self.keys)) != len(self.keys):
            raise ValueError(f"loss keys must be non-empty and unique, got {self.keys!r}")
        # float64: a round may hold thousands of steps; float32 sums would lose digits.
        self.register_buffer("sums", torch.zeros(len(self.keys), dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def add(self, losses: Mapping[str, Any]) -> None:
        """Add one step's losses; keys outside ``self.keys`` are ignored, missing ones raise."""
        vals = [_loss_value(losses, k, "step") for k in self.keys]
        self.sums += torch.tensor(vals, dtype=torch.float64, device=self.sums.device)
        self.count += 1

    def mean(self) -> dict[str, float]:
        """Mean of each loss over the steps added since the last :meth:`reset`."""
        n = int(self.count)
        if n == 0:
            raise ValueError("RoundAverager.mean() called before any step was added")
        return {k: float(s) / n for k, s in zip(self.keys, self.sums.tolist())}

    def reset(self) -> None:
        self.sums.zero_()
        self.count.zero_()

    def __len__(self) -> int:
        return int(self.count)


# ----------------------------------------------------------------------------------------------
# Scheduler
# ----------------------------------------------------------------------------------------------


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
        delta: training steps per round (default 50; the seed lost the paper's value).
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
        delta: int = 50,
        gamma: float = 0.9,
        warmup_rounds: int = 1,
        seed: int = 0,
        loss_keys: Sequence[str] = DEFAULT_LOSS_KEYS,
        variance_scale: float = 1.0,
    ) -> None:
        super().__init__()
        # Not "self.modules": that would shadow nn.Module.modules().
        self.module_names = _check_modules(modules)
        self.arms = all_arms(self.module_names)
        self.delta = int(delta)
        self.gamma = float(gamma)
        self.warmup_rounds = int(warmup_rounds)
        self.seed = int(seed)
        self.loss_keys = tuple(loss_keys)
        self.variance_scale = float(variance_scale)
        if self.delta < 1:
            raise ValueError(f"delta (steps per round) must be >= 1, got {delta}")
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

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "OptimaScheduler":
        """Build from a job config's ``optima`` section (keys = constructor arguments)."""
        allowed = {"modules", "delta", "gamma", "warmup_rounds", "seed", "loss_keys", "variance_scale"}
        unknown = set(cfg) - allowed
        if unknown:
            raise ValueError(f"unknown OPTIMA config keys {sorted(unknown)!r}; allowed {sorted(allowed)!r}")
        return cls(**dict(cfg))

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

    def current_arm_index(self) -> int:
        return int(self.arm_index)

    def current_arm(self) -> tuple[str, ...]:
        """Modules whose layers are distilled layer-wise in the current round."""
        return self.arms[int(self.arm_index)]

    def current_layers(self, layer_maps: Mapping[str, Sequence[tuple[int, int]]]) -> dict[str, list[tuple[int, int]]]:
        """:func:`arm_layers` of the current arm."""
        return arm_layers(self.current_arm(), layer_maps)

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
        """Call after every training step with the FULL-model losses (``kd``, ``hid``, ``attn``).

        Returns ``None`` inside a round. When the step completes a round of ``delta`` steps it
        scores the round (reward vs the previous round's mean losses; none for the baseline
        round 0), updates the bandit, selects the next arm (read it with :meth:`current_arm`) and
        returns the JSON-serialisable record ``{round, phase, arm, arm_index, reward, means,
        counts, losses}`` for the log.
        """
        self.averager.add(losses)
        if len(self.averager) < self.delta:
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

    def write_history(self, path: str | Path) -> None:
        """Write the history as JSON lines, the input of ``python -m student_workers.plot_optima``."""
        write_jsonl(self._history, path)


# ----------------------------------------------------------------------------------------------
# One bandit per data-parallel job
# ----------------------------------------------------------------------------------------------


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reduce_losses(losses: Mapping[str, Any], keys: Sequence[str]) -> dict[str, float]:
    """Mean of each of ``keys`` over the data-parallel ranks (identity without a process group).

    Each rank sees only its shard of the batch; the job's full-model loss, and so the reward
    every rank folds into its bandit, is the mean over ranks. Collective: every rank must call it
    on the same steps.
    """
    import torch.distributed as dist

    vals = [_loss_value(losses, k, "step") for k in keys]
    if not _distributed():
        return dict(zip(keys, vals))
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def broadcast_state(scheduler: "OptimaScheduler", src: int = 0) -> None:
    """Every rank adopts rank ``src``'s bandit state (means, counts, arm, RNG, history).

    With reduced losses and one seed the ranks already compute the same state; broadcasting makes
    rank ``src`` the one place the arm is decided, so the data-parallel gradients can never mix
    objectives (a float differing in the last bit would otherwise be enough to split the ranks).
    Collective; a no-op without a process group.
    """
    import torch.distributed as dist

    if not _distributed():
        return
    box = [scheduler.state_dict() if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    if dist.get_rank() != src:
        scheduler.load_state_dict(box[0])


def record_to_json(record: Mapping[str, Any]) -> str:
    """One round record as a single JSON line (keys round, arm, arm_index, reward, means, ...)."""
    return json.dumps(dict(record), sort_keys=True)


def write_jsonl(records: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write round records one JSON object per line (the format plot_optima reads)."""
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(record_to_json(rec) + "\n")
