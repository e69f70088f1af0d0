"""Weight-space interpolation between a text run's initial student (its no-KD twin) and the distilled one,
``theta(alpha) = theta_0 + alpha (theta_1 - theta_0)`` (WiSE-FT, Wortsman et al., CVPR 2022, eq. 1), each
alpha scored by the downstream suite (finetune_steps 0) on the split given: tune alpha on validation only.

    python scripts/interpolate.py runs/mpnet_to_minilm validation 0,0.5,0.75,1 runs/interpolate.json

alpha 0 is the twin's row and alpha 1 the distilled row, each computed in the same run as the others."""
import copy
import json
import sys

from student_workers.data.tokenizer import load_tokenizer
from student_workers.eval.downstream.config import DownstreamConfig
from student_workers.eval.downstream.report import evaluate_models, format_table, held_out_fraction
from student_workers.models.from_run import initial_student, load_student
from student_workers.train.run_dir import read_config


def interpolated(init, distilled, alpha: float):
    """A copy of ``init`` at ``alpha`` of the way to ``distilled`` (integer buffers from ``distilled``)."""
    sd0, sd1 = init.state_dict(), distilled.state_dict()
    model = copy.deepcopy(init)
    model.load_state_dict({k: sd0[k] + alpha * (sd1[k] - sd0[k]) if sd0[k].is_floating_point() else sd1[k]
                           for k in sd0})
    return model.eval()


def main(run: str, split: str, alphas: str, out: str) -> None:
    cfg = read_config(run)
    distilled, _ = load_student(run)
    init = initial_student(cfg).eval()
    models = {f"alpha={a}": interpolated(init, distilled, float(a)) for a in alphas.split(",")}
    tokenizer = load_tokenizer(cfg.get("data", {}).get("tokenizer", "minilm"))
    downstream = DownstreamConfig(**{**(cfg.get("evaluate") or {}), "finetune_steps": 0, "split": split,
                                     "speed_samples": 64})
    rows, _ = evaluate_models(models, tokenizer, downstream, held_out_fraction(cfg, downstream))
    print(format_table(rows))
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[2] not in ("validation", "test"):
        sys.exit("usage: python scripts/interpolate.py RUN_DIR validation|test ALPHA[,ALPHA...] OUT.json")
    try:
        main(*sys.argv[1:5])
    except (FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"error: {str(e).splitlines()[0]}")
