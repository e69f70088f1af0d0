"""Pre-train a small CoCa-style teacher on the emoji image-caption pairs (CPU, minutes).

    python -m student_workers.models.train_vlm_teacher --out runs/coca_teacher.pt --steps 800
    python -m student_workers.models.train_vlm_teacher --out runs/coca_wide.pt --kwargs '{"vision_width": 192}'

Loss: category cross-entropy on the image embedding + symmetric contrastive image-text loss +
captioning next-token loss (``kdmodels.coca.coca_loss``). Every ``--eval-every`` steps and
at the end it prints the held-out category accuracy (chance = the majority class share), the
held-out image->text retrieval top-1 among all held-out captions, and the caption next-token
accuracy. The checkpoint ({"config", "state_dict", "meta"}) loads as a teacher
(``TeacherConfig(model="coca:<out>")``) and as a student (``{"kind": "coca", "name": "<out>",
"pretrained": true}``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch
from torch.utils.data import DataLoader

from kdmodels.coca import CoCaModel, build_config, coca_loss, save_checkpoint
from student_workers.data.build import build_dataset
from student_workers.data.emoji import collate_image_text

TOKENIZER = "minilm"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m student_workers.models.train_vlm_teacher", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="checkpoint path to write (e.g. runs/coca_teacher.pt)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default 800: ~4-6 min on 2 CPU cores)")
    p.add_argument("--kwargs", default="{}", help="JSON object of CoCaConfig overrides (defaults: the small teacher)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of the steps (then cosine decay)")
    p.add_argument("--weights", default="{}", help='JSON loss weights, e.g. {"caption": 0.5} (keys cls, contrastive, caption)')
    p.add_argument("--max-length", type=int, default=16, help="caption tokens (<= max_text_len)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", default=None, help="emoji-datasource-google directory (default: $KDSERVE_EMOJI_DIR or the cache)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a busy small machine more threads oversubscribe the "
                        "cores and run slower; 0 keeps torch's default of all cores)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def _json(text: str, flag: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{flag}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{flag}: expected a JSON object, got {text!r}")
    return value


@torch.no_grad()
def evaluate(model: CoCaModel, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Held-out metrics: category accuracy, image->text retrieval top-1 over every held-out
    caption, caption next-token accuracy (real target tokens only)."""
    model.eval()
    correct = n = tok_ok = tok_n = 0
    img, txt = [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], caption_logits=False)
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        n += len(batch["labels"])
        m = batch["attention_mask"][:, 1:].bool()  # real target tokens
        pred = out.caption_head(out.decoded[:, :-1][m]).argmax(-1)
        tok_ok += int((pred == batch["input_ids"][:, 1:][m]).sum())
        tok_n += int(m.sum())
        img.append(torch.nn.functional.normalize(out.image_embed, dim=-1))
        txt.append(torch.nn.functional.normalize(out.text_embed, dim=-1))
    sim = torch.cat(img) @ torch.cat(txt).t()  # (N, N)
    retrieval = float((sim.argmax(-1) == torch.arange(sim.shape[0], device=sim.device)).float().mean())
    model.train()
    return {"accuracy": correct / max(n, 1), "retrieval_top1": retrieval, "token_accuracy": tok_ok / max(tok_n, 1)}


def lr_at(step: int, steps: int, base: float, warmup: float) -> float:
    w = max(1, int(steps * warmup))
    if step < w:
        return base * (step + 1) / w
    return base * 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, steps - w)))


def datasets(args, overrides: dict):
    """(train split, held-out split, CoCaConfig); ValueError for options that do not fit the data."""
    probe = build_config("", overrides)
    train = build_dataset("emoji", split="train", size=probe.image_size, seed=args.seed, root=args.root)
    held = build_dataset("emoji", split="held_out", size=probe.image_size, root=args.root)
    if "num_classes" in overrides and overrides["num_classes"] != train.num_classes:
        raise ValueError(f"--kwargs num_classes={overrides['num_classes']} but the emoji dataset has "
                         f"{train.num_classes} categories")
    cfg = build_config("", {**overrides, "num_classes": train.num_classes})
    if args.max_length > cfg.max_text_len:
        raise ValueError(f"--max-length {args.max_length} > max_text_len {cfg.max_text_len}")
    return train, held, cfg


def optimizer(model: CoCaModel, args) -> torch.optim.Optimizer:
    """AdamW, with weight decay on matrices only (not on positions, tokens, norms and biases)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos" not in n and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos" not in n and "token" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)


def train_step(model: CoCaModel, opt, batch: dict, weights: dict, device) -> tuple[torch.Tensor, dict]:
    batch = {k: v.to(device) for k, v in batch.items()}
    # caption_logits=False: the LM head scores real target tokens only (same loss, less work)
    out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], caption_logits=False)
    loss, terms = coca_loss(out, batch["input_ids"], batch["labels"], batch["attention_mask"], weights)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss, terms


def train(model: CoCaModel, opt, train_set, train_loader, held_loader, args, weights: dict, device) -> dict:
    """``args.steps`` steps over as many epochs as they take; returns the last logged mean losses."""
    t0 = time.perf_counter()
    step, epoch, running, last = 0, 0, {}, {}
    while step < args.steps:
        train_set.set_epoch(epoch)
        for batch in itertools.islice(train_loader, args.steps - step):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
            loss, terms = train_step(model, opt, batch, weights, device)
            step += 1
            for k, v in {"loss": loss.detach(), **terms}.items():
                running[k] = running.get(k, 0.0) + float(v)
            if step % args.log_every == 0 or step == args.steps:
                k = args.log_every if step % args.log_every == 0 else step % args.log_every
                last, running = {name: v / k for name, v in running.items()}, {}
                print(f"[coca] step {step:5d}  " + "  ".join(f"{n} {v:.3f}" for n, v in last.items())
                      + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
            if step % args.eval_every == 0 and step < args.steps:
                m = evaluate(model, held_loader, device)
                print(f"[coca] step {step:5d}  held-out accuracy {m['accuracy']:.3f}  retrieval@1 "
                      f"{m['retrieval_top1']:.3f}  caption token acc {m['token_accuracy']:.3f}", flush=True)
        epoch += 1
    return last


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    overrides = _json(args.kwargs, "--kwargs")
    weights = _json(args.weights, "--weights")
    try:
        train_set, held, cfg = datasets(args, overrides)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = CoCaModel(cfg).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    collate = collate_image_text(TOKENIZER, args.max_length)
    gen = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                              generator=gen)
    held_loader = DataLoader(held, batch_size=256, shuffle=False, collate_fn=collate)
    opt = optimizer(model, args)
    majority = max(held.labels.count(c) for c in range(held.num_classes)) / len(held)
    print(f"[coca] {n_params / 1e6:.2f}M params, config {json.dumps(cfg.model_dump(mode='json'))}")
    print(f"[coca] emoji: {len(train_set)} train / {len(held)} held-out, {train_set.num_classes} categories "
          f"(held-out chance: majority class {majority:.3f}, uniform {1 / train_set.num_classes:.3f})")
    t0 = time.perf_counter()
    last = train(model, opt, train_set, train_loader, held_loader, args, weights, device)
    seconds = time.perf_counter() - t0
    metrics = evaluate(model, held_loader, device)
    print(f"[coca] final held-out accuracy {metrics['accuracy']:.3f} (chance {majority:.3f})  retrieval@1 "
          f"{metrics['retrieval_top1']:.3f} (chance {1 / len(held):.4f})  caption token acc "
          f"{metrics['token_accuracy']:.3f}  in {seconds:.0f} s")
    meta = {
        "dataset": "emoji", "classes": train_set.classes, "tokenizer": TOKENIZER, "max_length": args.max_length,
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "weights": weights,
        "train_seconds": round(seconds, 1), "final_losses": last, "held_out": metrics, "held_out_majority": majority,
    }
    save_checkpoint(args.out, model.cpu(), meta)
    print(f"[coca] wrote {args.out} (load with TeacherConfig(model='coca:{args.out}'))")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
