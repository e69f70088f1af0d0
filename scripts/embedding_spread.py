"""Do a text student's sentence embeddings still spread? (issue #25, recipe (c))

    python scripts/embedding_spread.py twin=RUN:twin top10=RUN [minilm] ...

For each encoder (``minilm``/``mpnet``: the packaged models; ``name=RUN``: a run's distilled student;
``name=RUN:twin``: that run's initial student, untrained), on 1,000 held-out WordNet definitions (the
reverse-dictionary queries of the downstream suite), the mean pairwise cosine of the mean-pooled
embeddings and the share of their variance on the first principal direction. Near 1 for both: every
sentence maps to about the same vector, which retrieval cannot rank."""
import json
import sys

import numpy as np

from student_workers.data.synsets import read_synsets
from student_workers.data.tokenizer import load_tokenizer
from student_workers.eval.downstream.config import DownstreamConfig
from student_workers.eval.downstream.encoder import TextEncoder, teacher_as_student
from student_workers.eval.downstream.wordnet_tasks import reverse_dictionary
from student_workers.models.from_run import initial_student, load_student
from student_workers.train.run_dir import read_config


def encoder(spec: str):
    if "=" not in spec:
        return spec, TextEncoder(teacher_as_student(spec), load_tokenizer(spec))
    name, path = spec.split("=", 1)
    run, _, which = path.partition(":")
    cfg = read_config(run)
    student = initial_student(cfg) if which == "twin" else load_student(run)[0]
    return name, TextEncoder(student.eval(), load_tokenizer(cfg["data"]["tokenizer"]))


def spread(x: np.ndarray) -> dict:
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(u)
    cos = (u @ u.T).sum() - n  # off-diagonal sum
    centred = x - x.mean(0)
    s = np.linalg.svd(centred, compute_uv=False) ** 2
    return {"mean_pairwise_cosine": float(cos / (n * (n - 1))), "top_pc_variance_share": float(s[0] / s.sum())}


def main() -> None:
    cfg = DownstreamConfig(held_out_fraction=0.05)
    texts = reverse_dictionary(read_synsets(0.05), cfg.num_candidates, cfg.max_queries, cfg.seed).queries
    out = {}
    for spec in sys.argv[1:]:
        name, enc = encoder(spec)
        out[name] = spread(enc.encode(texts))
        print(name, json.dumps(out[name]), flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
