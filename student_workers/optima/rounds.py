"""What OPTIMA leaves in the run dir: one line per round, each rank's bandit state."""
from __future__ import annotations

import json
from pathlib import Path

from student_workers.train.progress import say
from student_workers.train.run_dir import optima_state_path


def log_round(path: Path, record: dict, done_step: int) -> None:
    """One JSON line per OPTIMA round (python -m student_workers.optima.plot reads it)."""
    rec = {**record, "step": done_step}
    with path.open("a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
    say(f"[optima] round {rec['round']} arm {'+'.join(rec['arm'])} reward "
        f"{rec['reward'] if rec['reward'] is None else round(rec['reward'], 4)}")


def round_scalars(writer, record: dict, done_step: int) -> None:
    """The round's reward (none in the baseline round) and arm, as TensorBoard scalars."""
    if record["reward"] is not None:
        writer.add_scalar("optima/reward", record["reward"], done_step)
    writer.add_scalar("optima/arm_index", record["arm_index"], done_step)


def write_optima_state(run_dir: Path, rank: int, scheduler) -> None:
    """``<run_dir>/optima_state_rank<r>.json``: this rank's bandit state at the end of training,
    to check that the ranks ran one bandit."""
    path = optima_state_path(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scheduler.summary(), sort_keys=True))
