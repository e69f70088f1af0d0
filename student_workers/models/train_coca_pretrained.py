"""Train the CoCa-style teacher from pretrained parts (``kdmodels.coca_pretrained``) on the emoji
TRAIN image-caption pairs: frozen EfficientNet-lite0 and MiniLM towers, trained projections,
multimodal decoder and classifier (CPU, minutes).

    python -m student_workers.models.train_coca_pretrained --config configs/teachers/coca_pretrained.yaml \
        --out runs/coca_pretrained.pt
    python -m student_workers.models.train_coca_pretrained --config configs/teachers/coca_pretrained.yaml \
        --out runs/cp_try.pt --set steps=600 --set model.classify_from=multimodal    # tuning: read val only

The towers run once per split (their outputs are cached, ``cache_dir``); training then touches only
the heads. Loss: classification CE + symmetric InfoNCE + captioning CE (``heads_loss``). The train
split excludes the validation share (``val_fraction``), so ``val`` is clean for tuning; the end
prints val and held-out (test) metrics: category accuracy, image-to-caption recall@1/@5 among all
captions of the split, caption next-token accuracy. The checkpoint loads as a teacher:
``TeacherConfig(model="coca_pretrained:<out>")``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from kdmodels.coca_pretrained import PretrainedCoCa, heads_loss, save_checkpoint
from kdserve.config import ConfigError, Strict, load
from student_workers.models.coca_cache import batch_of, split_features


class TrainConfig(Strict):
    """The recipe (``configs/teachers/coca_pretrained.yaml``)."""

    model: dict[str, Any] = Field(default_factory=dict, description="PretrainedCoCaConfig fields")
    steps: int = Field(500, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    warmup: float = Field(0.05, ge=0, lt=1, description="warm-up fraction of the steps, then cosine decay")
    weights: dict[str, float] = Field(default_factory=dict, description="loss weights: cls, contrastive, caption")
    views: int = Field(1, ge=1, description="views per train image: the clean one + views-1 random-resized crops")
    max_length: int = Field(16, ge=2, description="caption tokens")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of the non-held-out emoji kept for validation")
    eval_every: int = Field(250, ge=1)
    seed: int = 0
    threads: int = Field(1, ge=0, description="torch CPU threads (default 1: on a busy small machine more threads "
                                              "oversubscribe the cores and run slower; 0: torch's default)")
    cache_dir: str | None = Field("runs/cache", description="tower features kept here between runs (null: none)")
    root: str | None = Field(None, description="emoji-datasource-google directory (default: $KDSERVE_EMOJI_DIR or the cache)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m student_workers.models.train_coca_pretrained",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="TrainConfig YAML (default: the defaults)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a field (YAML value)")
    p.add_argument("--out", required=True, help="checkpoint to write (e.g. runs/coca_pretrained.pt)")
    return p.parse_args(argv)


@torch.no_grad()
def evaluate(model: PretrainedCoCa, feats: dict, batch: int = 256) -> dict[str, float]:
    """Category accuracy, image->caption recall@1/@5 among every caption of the split (chance 1/N, 5/N),
    caption next-token accuracy on real tokens."""
    model.eval()
    n = len(feats["labels"])
    correct = tok_ok = tok_n = 0
    img, txt = [], []
    for i in range(0, n, batch):
        b = batch_of(feats, torch.arange(i, min(i + batch, n)))
        tokens, ie = model.image_heads(b["last_stage"])
        decoded, _, _ = model.decode(b["input_ids"], b["attention_mask"], tokens)
        logits = model.classify(ie, decoded, b["attention_mask"])
        correct += int((logits.argmax(-1) == b["labels"]).sum())
        m = b["attention_mask"][:, 1:].bool()
        tok_ok += int((model.caption_head(decoded[:, :-1][m]).argmax(-1) == b["input_ids"][:, 1:][m]).sum())
        tok_n += int(m.sum())
        img.append(F.normalize(ie, dim=-1))
        txt.append(F.normalize(model.text_embedding(b["pooled_text"]), dim=-1))
    sim = torch.cat(img) @ torch.cat(txt).t()  # (N images, N captions)
    rank = (sim > sim.diagonal().unsqueeze(1)).sum(dim=1)  # captions scored above the true one
    model.train()
    return {"accuracy": correct / n, "recall@1": float((rank < 1).float().mean()),
            "recall@5": float((rank < 5).float().mean()), "token_accuracy": tok_ok / max(tok_n, 1), "n": n}


def lr_at(step: int, cfg: TrainConfig) -> float:
    w = max(1, int(cfg.steps * cfg.warmup))
    if step < w:
        return cfg.lr * (step + 1) / w
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, cfg.steps - w)))


def optimizer(model: PretrainedCoCa, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (towers frozen); decay on matrices only."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "pos" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "pos" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr)


def batches(n: int, views: int, size: int, gen: torch.Generator):
    """Endless (rows, views): an epoch is a permutation of the pairs, each drawn in one random view."""
    while True:
        perm = torch.randperm(n, generator=gen)
        view = torch.randint(0, views, (n,), generator=gen)
        for i in range(0, n - size + 1, size):
            yield perm[i:i + size], view[perm[i:i + size]]


def fmt(m: dict) -> str:
    return (f"accuracy {m['accuracy']:.3f}  R@1 {m['recall@1']:.3f}  R@5 {m['recall@5']:.3f} "
            f"(chance {5 / m['n']:.4f})  caption token acc {m['token_accuracy']:.3f}")


def train(model: PretrainedCoCa, cfg: TrainConfig, train_feats: dict, val_feats: dict) -> dict[str, float]:
    """``cfg.steps`` steps on cached features; prints losses and val metrics; returns the last mean losses."""
    opt = optimizer(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(cfg.seed)
    stream = batches(len(train_feats["labels"]), cfg.views, cfg.batch_size, gen)
    t0, running, last = time.perf_counter(), {}, {}
    model.train()
    for step in range(1, cfg.steps + 1):
        idx, view = next(stream)
        b = batch_of(train_feats, idx, view)
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1, cfg)
        loss, terms = heads_loss(model, b["last_stage"], b["pooled_text"], b["input_ids"], b["attention_mask"],
                                 b["labels"], cfg.weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, v in {"loss": loss.detach(), **terms}.items():
            running[k] = running.get(k, 0.0) + float(v)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            k = cfg.eval_every if step % cfg.eval_every == 0 else step % cfg.eval_every
            last, running = {n: v / k for n, v in running.items()}, {}
            print(f"[coca_pretrained] step {step:5d}  " + "  ".join(f"{n} {v:.3f}" for n, v in last.items())
                  + f"  | val {fmt(evaluate(model, val_feats))}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return last


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load(TrainConfig, args.config, args.set)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        t_start = time.perf_counter()
        model = PretrainedCoCa(cfg.model)
        feats = {s: split_features(model, s, cfg.views if s == "train" else 1, cfg.max_length, cfg.val_fraction,
                                   cfg.seed, cfg.root, cfg.cache_dir) for s in ("train", "val", "held_out")}
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"[coca_pretrained] {n_train / 1e6:.2f}M trained parameters (towers frozen); "
          f"pairs: train {len(feats['train']['labels'])}, val {len(feats['val']['labels'])}, "
          f"held-out {len(feats['held_out']['labels'])}", flush=True)
    t0 = time.perf_counter()
    last = train(model, cfg, feats["train"], feats["val"])
    seconds, total = time.perf_counter() - t0, time.perf_counter() - t_start
    metrics = {s: evaluate(model, feats[s]) for s in ("val", "held_out")}
    for s, m in metrics.items():
        print(f"[coca_pretrained] final {s}: {fmt(m)}")
    print(f"[coca_pretrained] heads trained in {seconds:.0f} s; {total:.0f} s in all (towers, cache included)")
    meta = {"dataset": "emoji", "tokenizer": "minilm", "recipe": cfg.model_dump(mode="json"), "final_losses": last,
            "train_seconds": round(seconds, 1), "total_seconds": round(total, 1), "metrics": metrics}
    save_checkpoint(args.out, model.cpu(), meta)
    print(f"[coca_pretrained] wrote {args.out} (serve it: --model coca_pretrained:{args.out})")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
