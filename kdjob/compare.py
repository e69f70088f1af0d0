"""A comparison of the variants in one Ray cluster with one teacher deployment for every run
(what ``compare_vlm.py`` runs): results written as they come, OPTIMA plots at the end."""
from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdjob.cluster import start_ray, teardown
from kdjob.fit import TeacherGone, final_metrics, final_state, fit, training_failure
from kdjob.scoring import loss_scales, score
from kdjob.summary import format_paired, format_table, paired, summarize, verdict
from kdjob.teacher import describe, teacher_address


@dataclass
class Comparison:
    """The runs of one comparison and what they scored so far."""

    cfg: Any  # the JobConfig the variants come from
    runs: list  # [(variant, seed, JobConfig)]
    seeds: list[int]
    split: str  # where runs are scored: "held_out" or "val"
    command: str  # the command line, for the results file
    resume: bool = False  # keep existing run dirs
    address: str = ""
    info: Any = None  # the teacher's TeacherInfo
    scales: dict = field(default_factory=dict)
    rows: list = field(default_factory=list)  # [(variant, seed, scores)]
    records: list = field(default_factory=list)
    optima_runs: list = field(default_factory=list)  # [(seed, run dir)]
    t0: float = field(default_factory=time.time)
    then: dict = field(default_factory=dict)  # {(variant, seed): second-phase JobConfig}: scored after it

    @property
    def storage(self) -> Path:
        return Path(self.cfg.run.storage_path).resolve()

    def write(self, plots=(), complete: bool = False) -> tuple[dict, Path]:
        """(summary table, path) after writing every run so far to the JSON file (partial until the end)."""
        table = summarize(self.rows)
        suffix = "" if self.split == "held_out" else f"-{self.cfg.run.name}-{self.split}"  # one file per tuning run
        out = self.storage / f"compare_vlm{suffix}.json"
        out.write_text(json.dumps({
            "command": self.command, "split": self.split, "seeds": self.seeds, "steps": self.cfg.train.steps,
            "wall_s": round(time.time() - self.t0, 1), "teacher": self.info.model_name,
            "loss_scales_at_init": self.scales, "runs": self.records, "summary": table,
            "paired_vs_no_kd": {m: paired(self.rows, m) for m in ("accuracy", "recall@5")},
            "optima_plots": list(plots), "complete": complete}, indent=2))
        return table, out


def compare(c: Comparison, measure_scales: bool = True) -> int:
    """Run every variant against one teacher; 0, or 1 when a run failed (said in one line)."""
    c.storage.mkdir(parents=True, exist_ok=True)
    start_ray(c.cfg, None)
    try:
        c.address = teacher_address(c.cfg)
        c.info = describe(c.address, c.cfg)
        print(f"[compare] teacher {c.info.model_name} at {c.address}; {len(c.runs)} runs: "
              f"{', '.join(r.run.name for _, _, r in c.runs)}", flush=True)
        if measure_scales:
            measure_loss_scales(c)
        for name, seed, run_cfg in c.runs:
            if not run_variant(c, name, seed, run_cfg):
                return 1
        finish(c)
        return 0
    finally:
        teardown()  # the local teacher, Ray, the run's token file; never hides the run's error


def measure_loss_scales(c: Comparison) -> None:
    for name, seed, run_cfg in c.runs:
        if seed == c.seeds[0] and name != "optima":  # optima's terms are layerwise's
            c.scales[name] = loss_scales(run_cfg, c.address, c.info)
            print(f"[compare] loss terms at init ({name}, weighted): "
                  + "  ".join(f"{g} {v['value']:.4f} (grad {v['grad_norm']:.3f})" for g, v in c.scales[name].items()),
                  flush=True)


def fit_one(c: Comparison, name: str, seed: int, run_cfg):
    """(Ray Train result, run dir) of one training run; None (after one error line) when it failed."""
    run_dir = c.storage / run_cfg.run.name
    if run_dir.exists() and not c.resume:
        shutil.rmtree(run_dir)
    try:
        result = fit(run_cfg, c.address, run_dir)
    except TeacherGone as e:  # the run was stopped, not restarted: one line
        print(f"error: {name} seed {seed}: {e}", file=sys.stderr)
        return None
    if result.error:
        print(f"error: {name} seed {seed} failed: {training_failure(result.error)}", file=sys.stderr)
        return None
    return result, run_dir


def run_variant(c: Comparison, name: str, seed: int, run_cfg) -> bool:
    """Train (both phases when ``c.then`` has a second) and score one run; False when it failed."""
    from kdjob.chain import chained

    t1 = time.time()
    done = fit_one(c, name, seed, run_cfg)
    if done is None:
        return False
    result, run_dir = done
    state, phases = final_state(result)["distiller"], [run_cfg.run.name]
    if (name, seed) in c.then:
        run_cfg = chained(c.then[(name, seed)], run_cfg, state, run_dir)
        done = fit_one(c, name, seed, run_cfg)
        if done is None:
            return False
        result, run_dir = done
        state = final_state(result)["distiller"]
        phases.append(run_cfg.run.name)
    scores = score(run_cfg, c.address, c.info, state, c.split)
    c.rows.append((name, seed, scores))
    c.records.append({"variant": name, "seed": seed, "run": run_cfg.run.name, "phases": phases,
                      "seconds": round(time.time() - t1, 1), "scores": scores,
                      "final_train_metrics": final_metrics(result)})
    if name == "optima":
        c.optima_runs.append((seed, run_dir))
    c.write()
    print(f"[compare] {name} seed {seed} ({time.time() - t1:.0f} s): "
          + "  ".join(f"{k} {v:.3f}" for k, v in scores.items() if k != "samples"), flush=True)
    return True


def finish(c: Comparison) -> None:
    wall = time.time() - c.t0
    table, out = c.write(plot_optima_runs(c.optima_runs, c.storage), complete=True)
    first = c.rows[0][2]
    print(f"\n{len(c.seeds)} seeds ({','.join(map(str, c.seeds))}), {c.cfg.train.steps} steps each, "
          f"{first['samples']} {c.split} samples; teacher accuracy {first['teacher_accuracy']:.3f}; "
          f"wall {wall:.0f} s\n{format_table(table, c.split)}\n{verdict(table)}\n{format_paired(paired(c.rows))}")
    for name in dict.fromkeys(r["variant"] for r in c.records):
        got = [r["final_train_metrics"].get("teacher_targets_per_step") for r in c.records if r["variant"] == name]
        vals = [r["final_train_metrics"].get("teacher_values_per_sample") for r in c.records if r["variant"] == name]
        if all(g is not None for g in got + vals):
            print(f"[compare] {name}: teacher targets per step {sum(got) / len(got):.2f} "
                  f"({sum(vals) / len(vals):.0f} values per sample), the last phase's run average")
    print(f"[compare] wrote {out} and the OPTIMA plots optima_seed<seed>.png")


def plot_optima_runs(runs: list[tuple[int, Path]], out_dir: Path) -> list[str]:
    """One arm-frequency + reward-mean figure per OPTIMA seed (student_workers.optima.plot)."""
    from student_workers.optima.plot import plot_records, read_records
    from student_workers.train.run_dir import optima_log

    written = []
    for seed, run_dir in runs:
        log = optima_log(run_dir)
        if not log.is_file():
            continue
        out = out_dir / f"optima_seed{seed}.png"
        plot_records(read_records(log), out, title=f"OPTIMA, seed {seed} ({run_dir.name})")
        written.append(str(out))
    return written
