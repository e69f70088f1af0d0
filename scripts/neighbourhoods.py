"""Whose neighbourhoods does a text encoder share with mpnet, and where? (issue #25, recipe (a))

    python scripts/neighbourhoods.py minilm mpnet_rel_s0=RUN/export ... > out.json

On the reverse-dictionary test set of the downstream suite (DownstreamConfig defaults: 1000 held-out
definitions, 5000 candidate headwords), for each encoder (``minilm``/``mpnet``: the packaged models;
``name=DIR``: a sentence-transformers export of a run), the Spearman correlation of its cosine
similarities with mpnet's over two kinds of pairs: definition-definition (the kind of text distillation
trained on: WordNet glosses) and definition-headword (what retrieval compares: a gloss against a bare
word, a kind of text the training data never had alone), 20,000 random pairs each; and its R@10."""
import json
import sys

import numpy as np
from scipy.stats import spearmanr

from student_workers.data.tokenizer import load_tokenizer
from student_workers.eval.downstream.config import DownstreamConfig
from student_workers.eval.downstream.encoder import TextEncoder, teacher_as_student
from student_workers.data.synsets import read_synsets
from student_workers.eval.downstream.wordnet_tasks import reverse_dictionary


def encoder(spec: str):
    if "=" not in spec:
        enc = TextEncoder(teacher_as_student(spec), load_tokenizer(spec))
        return spec, enc.encode
    from sentence_transformers import SentenceTransformer

    name, path = spec.split("=", 1)
    model = SentenceTransformer(path, device="cpu")
    return name, lambda texts: model.encode(list(texts), batch_size=64, normalize_embeddings=False)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


cfg = DownstreamConfig(held_out_fraction=0.05)  # the test synsets of recipe (a)'s rows
task = reverse_dictionary(read_synsets(cfg.held_out_fraction), cfg.num_candidates, cfg.max_queries, cfg.seed)
rng = np.random.default_rng(0)
dd = rng.integers(0, len(task.queries), size=(20000, 2))
dd = dd[dd[:, 0] != dd[:, 1]]
dw = np.stack([rng.integers(0, len(task.queries), 20000), rng.integers(0, len(task.candidates), 20000)], axis=1)
sims = {}
for spec in ["mpnet", *sys.argv[1:]]:
    name, encode = encoder(spec)
    q, c = unit(encode(task.queries)), unit(encode(task.candidates))
    scores = q @ c.T  # (Q, C)
    rank = (scores > scores[np.arange(len(q)), task.gold][:, None]).sum(1)
    sims[name] = {"dd": (q[dd[:, 0]] * q[dd[:, 1]]).sum(1), "dw": (q[dw[:, 0]] * c[dw[:, 1]]).sum(1),
                  "r10": float((rank < 10).mean())}
    print(name, "R@10", round(sims[name]["r10"], 3), file=sys.stderr, flush=True)
out = {n: {"R@10": s["r10"],
           "spearman_vs_mpnet_def_def": float(spearmanr(s["dd"], sims["mpnet"]["dd"])[0]),
           "spearman_vs_mpnet_def_word": float(spearmanr(s["dw"], sims["mpnet"]["dw"])[0])} for n, s in sims.items()}
print(json.dumps(out, indent=1))
