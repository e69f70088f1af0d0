"""Plot an OPTIMA run from its JSON-lines round log.

    python -m student_workers.optima.plot --log optima_rounds.jsonl --out optima.png

Top panel: how often each arm was played in each training phase (stacked bars over equal slices
of the rounds), the view of OPTIMA's arm-frequency figure (Liang et al. 2023, fig. 6). Bottom
panel: the mean ``mu_k`` of every arm's reward distribution after each round, with the observed
rewards as dots, the view of OPTIMA's reward-mean figure (fig. 5, left).

The log is what :meth:`student_workers.optima.scheduler.OptimaScheduler.step_end` returns each round, as
:func:`student_workers.optima.rounds.log_round` writes it to ``<run>/optima.jsonl``: one JSON object per line with at
least ``round``, ``arm`` (list of module names), ``arm_index``, ``reward`` (null for the baseline
round) and ``means`` (list, one per arm).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from student_workers.optima.arms import all_arms
from student_workers.optima.scheduler import PHASE_BASELINE

REQUIRED_KEYS = ("round", "arm", "arm_index", "reward", "means")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Parse the JSON-lines log, sorted by round; blank lines are skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            missing = [k for k in REQUIRED_KEYS if k not in rec]
            if missing:
                raise ValueError(f"{path}:{lineno}: record lacks keys {missing!r}")
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no round records")
    return sorted(records, key=lambda r: int(r["round"]))


def arm_labels(records: Sequence[dict[str, Any]]) -> list[str]:
    """Label of each arm index, including arms the log never played.

    The arms are every non-empty subset of the modules in :func:`all_arms` order, so the arm with
    all modules (the one the baseline round plays) names them all; a log without it falls back to a
    placeholder for unplayed arms.
    """
    num_arms = max(len(records[0]["means"]), 1 + max(int(r["arm_index"]) for r in records))
    widest = max((r["arm"] for r in records), key=len)
    if 2 ** len(widest) - 1 == num_arms:
        return ["+".join(arm) for arm in all_arms(widest)]
    labels = [f"arm {k}" for k in range(num_arms)]
    for r in records:
        labels[int(r["arm_index"])] = "+".join(r["arm"])
    return labels


def arm_frequencies(records: Sequence[dict[str, Any]], phases: int) -> tuple[list[tuple[int, int]], list[list[float]]]:
    """Fraction of rounds each arm was played in ``phases`` equal slices of the log.

    The baseline round is left out: it measures the all-modules student before any arm is chosen,
    so it is not a play of the bandit. Returns ``(spans, freq)``: ``spans[p]`` is the (first, last)
    round of slice ``p`` and ``freq[p][k]`` the fraction of that slice's rounds that played arm ``k``.
    """
    num_arms = len(arm_labels(records))
    records = [r for r in records if r.get("phase") != PHASE_BASELINE] or list(records)
    phases = max(1, min(int(phases), len(records)))
    spans, freq = [], []
    for p in range(phases):
        chunk = records[p * len(records) // phases : (p + 1) * len(records) // phases]
        counts = [0] * num_arms
        for r in chunk:
            counts[int(r["arm_index"])] += 1
        spans.append((int(chunk[0]["round"]), int(chunk[-1]["round"])))
        freq.append([c / len(chunk) for c in counts])
    return spans, freq


def plot_records(records: Sequence[dict[str, Any]], out: str | Path, phases: int = 10, title: str | None = None) -> None:
    """Draw both panels into ``out`` (format from the suffix, e.g. .png)."""
    import matplotlib  # lazy: plotting is optional for training workers

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = arm_labels(records)
    colors = [plt.get_cmap("tab20" if len(labels) > 10 else "tab10")(k % 20) for k in range(len(labels))]
    fig, (ax_f, ax_m) = plt.subplots(2, 1, figsize=(10, 8), constrained_layout=True)

    spans, freq = arm_frequencies(records, phases)
    xs = list(range(len(spans)))
    bottom = [0.0] * len(spans)
    for k, label in enumerate(labels):
        heights = [f[k] for f in freq]
        ax_f.bar(xs, heights, bottom=bottom, color=colors[k], label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax_f.set_xticks(xs, [f"{a}-{b}" for a, b in spans], rotation=45, ha="right", fontsize=8)
    ax_f.set_xlabel("rounds")
    ax_f.set_ylabel("fraction of rounds played")
    ax_f.set_ylim(0, 1)
    ax_f.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    ax_f.set_title("arm frequency per training phase")

    rounds = [int(r["round"]) for r in records]
    for k, label in enumerate(labels):
        ys = [r["means"][k] if k < len(r["means"]) else float("nan") for r in records]
        ax_m.plot(rounds, ys, color=colors[k], label=label, lw=1.5)
        played = [(int(r["round"]), r["reward"]) for r in records if int(r["arm_index"]) == k and r["reward"] is not None]
        if played:
            ax_m.scatter(*zip(*played), color=colors[k], s=8, alpha=0.4)
    ax_m.set_xlabel("round")
    ax_m.set_ylabel("reward mean mu_k (dots: observed rewards)")
    ax_m.set_title("reward-distribution means per arm")
    if title:
        fig.suptitle(title)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot OPTIMA arm frequencies and reward means from a round log.")
    parser.add_argument("--log", required=True, help="JSON-lines file of OPTIMA round records")
    parser.add_argument("--out", required=True, help="output image, e.g. optima.png")
    parser.add_argument("--phases", type=int, default=10, help="number of training phases for the frequency bars")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    plot_records(read_records(args.log), args.out, phases=args.phases, title=args.title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
