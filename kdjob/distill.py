"""One distillation job from its config: the run dir, the cluster, the teacher, the fit, the export
of the student, and the student against the teacher before and after (what ``distill_job.py`` runs)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from kdjob.cluster import check_worker_placement, start_ray
from kdjob.evaluate import evaluate
from kdjob.fit import TeacherGone, final_metrics, final_state, fit, training_failure
from kdjob.teacher import describe, teacher_address
from kdserve.errors import one_line


def run_job(cfg, ray_address: str | None = None, skip_eval: bool = False) -> int:
    """The job's exit code (0, or 1 when training failed). Raises ``TeacherGone`` when a worker found
    the teacher gone or changed: the caller says it once Ray is down."""
    from kdserve.config import dump
    from student_workers.models.export import export_run
    from student_workers.train.run_dir import config_path

    t0 = time.time()
    run_dir = Path(cfg.run.storage_path).resolve() / cfg.run.name
    run_dir.mkdir(parents=True, exist_ok=True)
    dump(cfg, config_path(run_dir))
    start_ray(cfg, ray_address)
    check_worker_placement(cfg)  # the teacher's is checked as it is deployed
    addresses = None
    if cfg.teachers:
        from kdjob.several import several_teachers

        address, info, addresses = several_teachers(cfg, run_dir)
    else:
        address, info = job_teacher(cfg, run_dir)
    text = cfg.student.kind == "hf_text"
    if cfg.teacher.reads_store_only and not text and not skip_eval:
        print("no student-vs-teacher comparison in store mode read (no teacher to compare with)", flush=True)
        skip_eval = True
    before = None if skip_eval or text else evaluate(cfg, address, info)
    try:
        result = fit(cfg, address, run_dir, addresses=addresses)
        error = result.error
    except TeacherGone:
        raise
    except Exception as e:  # Ray Train V2 raises TrainingFailedError from fit()
        error = e
    if error:
        print(f"error: training failed: {training_failure(error)}", file=sys.stderr)
        return 1
    state, m = final_state(result), final_metrics(result)
    print(f"=== {cfg.run.name}: {state['step']} steps in {time.time() - t0:.0f}s ({cfg.train.num_workers} workers); "
          f"last loss {m.get('loss')}, {m.get('samples_per_s', 0):.0f} samples/s ===")
    try:
        export = f"the student for its own ecosystem: {export_run(run_dir)}"
    except (TypeError, ValueError) as e:  # the checkpoint still holds the student
        export = f"no ecosystem export ({one_line(e)})"
    print(f"checkpoint: {result.checkpoint.path}; {export}")
    if skip_eval:
        return 0
    if text:
        downstream(cfg, run_dir)
    else:
        before_after(before, evaluate(cfg, address, info, state["distiller"]))
    return 0


def job_teacher(cfg, run_dir: Path):
    """(address the workers get, TeacherInfo): the teacher's, deployed first when embedded; in store
    mode read, the store and its manifest's Describe (no teacher deployed, none contacted)."""
    if cfg.teacher.reads_store_only:
        from kdjob.targets import store_info

        info = store_info(cfg)
        print(f"targets from store {cfg.teacher.store} (mode read, no teacher): teacher {info.model_name} "
              f"(fingerprint {info.fingerprint}); run dir {run_dir}", flush=True)
        return cfg.teacher.store, info
    address = teacher_address(cfg)
    info = describe(address, cfg)
    print(f"teacher {info.model_name} at {address} (fingerprint {info.fingerprint}); run dir {run_dir}", flush=True)
    return address, info


def downstream(cfg, run_dir: Path) -> None:
    """A text student on WordNet synsets held out from distillation, printed as a table."""
    from student_workers.eval.downstream.report import evaluate_run, format_table
    from student_workers.train.run_dir import eval_path

    t1 = time.time()
    rows = evaluate_run(run_dir, cfg.evaluate)
    print(f"downstream on WordNet synsets held out from distillation ({time.time() - t1:.0f}s; "
          f"{eval_path(run_dir)}):")
    print(format_table(rows))


def before_after(before: dict, after: dict) -> None:
    for k in after:
        if k != "samples":
            print(f"held-out {k} (student vs teacher, {after['samples']} samples): "
                  f"{before[k]:.3f} before -> {after[k]:.3f} after distillation")
