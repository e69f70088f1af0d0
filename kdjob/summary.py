"""A comparison's scores summarised: mean +- std per variant and metric, as a table and a verdict
against the no-KD baseline."""
from __future__ import annotations

import statistics

METRICS = ("accuracy", "recall@1", "recall@5", "top1_agreement")


def summarize(rows) -> dict[str, dict[str, dict[str, float]]]:
    """rows: [(variant, seed, scores)] -> {variant: {metric: {mean, std, n}}} (std: ddof=1, 0 for one run)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in dict.fromkeys(r[0] for r in rows):
        per = {}
        for m in METRICS:
            xs = [s[m] for v, _, s in rows if v == name and s.get(m) is not None]
            if xs:
                per[m] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                          "n": len(xs)}
        table[name] = per
    return table


def format_table(table, split: str) -> str:
    """Markdown table of mean +- std per variant and metric ('-' where a variant has no value)."""
    head = f"| student ({split}) | " + " | ".join(METRICS) + " |"
    lines = [head, "|" + "---|" * (len(METRICS) + 1)]
    for name, per in table.items():
        cells = [f"{per[m]['mean']:.3f} ± {per[m]['std']:.3f}" if m in per else "-" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(table, metric: str = "accuracy") -> str:
    """Whether a distilled variant beats no-KD on the mean by more than one std (the larger of the two)."""
    if "no-kd" not in table or metric not in table["no-kd"]:
        return "no no-KD baseline"
    base = table["no-kd"][metric]
    lines = []
    for name in (v for v in table if v != "no-kd" and metric in table[v]):
        s = table[name][metric]
        gap = s["mean"] - base["mean"]
        margin = max(s["std"], base["std"])
        lines.append(f"{name} - no-kd {metric}: {gap:+.3f} (1 std = {margin:.3f}): "
                     + ("beats no-KD by > 1 std" if gap > margin else "does NOT beat no-KD by > 1 std"))
    return "\n".join(lines)


def paired(rows, metric: str = "accuracy", baseline: str = "no-kd") -> dict[str, dict]:
    """Per variant, its difference from ``baseline`` on each seed both ran (same init, data order,
    steps): {variant: {"diffs": {seed: d}, "mean": mean d, "se": std(d, ddof=1) / sqrt(n)}}."""
    base = {seed: s[metric] for v, seed, s in rows if v == baseline and s.get(metric) is not None}
    out = {}
    for name in dict.fromkeys(r[0] for r in rows if r[0] != baseline):
        diffs = {seed: s[metric] - base[seed] for v, seed, s in rows
                 if v == name and seed in base and s.get(metric) is not None}
        if diffs:
            d = list(diffs.values())
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0
            out[name] = {"diffs": diffs, "mean": statistics.fmean(d), "se": se}
    return out


def format_paired(table: dict[str, dict], metric: str = "accuracy") -> str:
    """One line per variant: the per-seed differences from no-KD, their mean and its standard error."""
    return "\n".join(
        f"{name} - no-kd {metric}, paired by seed: "
        + ", ".join(f"s{seed} {d:+.3f}" for seed, d in p["diffs"].items())
        + f"; mean {p['mean']:+.3f} ± {p['se']:.3f} (SE)" + (" (> 2 SE)" if p["mean"] > 2 * p["se"] else "")
        for name, p in table.items())
