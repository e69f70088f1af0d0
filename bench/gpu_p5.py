"""P5 (GPU): teacher samples/s vs a bare torch forward of the same model and batch.

    python bench/gpu_p5.py                                  # ViT-B/16 random init, batch 64, cuda
    python bench/gpu_p5.py --model minilm --batch 64 --seq-len 128
    python bench/gpu_p5.py --device cpu --model timm:vit_tiny_patch16_224 \
        --model-kwargs '{"depth": 2, "img_size": 32, "patch_size": 8, "embed_dim": 32, "num_heads": 2}' \
        --batch 4 --seconds 1                               # CPU smoke test

Three rows, same model, batch, device and autocast dtype, each --seconds of back-to-back calls:
  bare forward   ``adapter.model(x)`` under inference_mode + autocast: what the GPU can do
  engine.run     ``TeacherEngine.run`` of one request: hooks, reductions, cast, copy to host
  plain gRPC     the same request through ``run_server`` + ``SyncTeacherClient`` on loopback
                 (encode, wire, decode), --clients concurrent clients of --batch each
Ratios are samples/s over the bare forward's. The spec is --spec (default: Data2Vec float16).
CUDA work is synchronised before every clock read. A JSON goes to --out.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPECS = {
    "data2vec": dict(hidden_reduction="data2vec", dtype="float16"),
    "hidden": dict(dtype="float16"),
    "logits": dict(logits=True),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="timm:vit_base_patch16_224")
    p.add_argument("--model-kwargs", default="{}")
    p.add_argument("--pretrained", action="store_true")
    p.add_argument("--device", default="cuda")
    p.add_argument("--amp", default="bf16", choices=["none", "bf16", "fp16"])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sample of text teachers")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--spec", choices=sorted(SPECS), default="data2vec")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def make_inputs(engine, batch: int, seq_len: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    out = {}
    for i in engine.inputs:
        if not i.required:
            continue
        shape = [batch] + [seq_len if d < 0 else d for d in i.shape[1:]]
        out[i.name] = torch.rand(shape, generator=g) if i.dtype.startswith("float") else \
            torch.randint(1000, 2000, shape, generator=g)
    return out


def timed(fn, seconds: float, sync) -> float:
    """Calls per second of ``fn`` over ``seconds`` (after 2 warm-up calls)."""
    fn(), fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync()
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from kdserve import wire
    from student_workers.client.sync_client import SyncTeacherClient
    from kdserve.teacher_config import TeacherConfig
    from teacher_server.engine import TeacherEngine, Work
    from teacher_server.grpc_server import run_server
    from teacher_server.spec import resolve_spec

    cfg = TeacherConfig(model=args.model, pretrained=args.pretrained, model_kwargs=json.loads(args.model_kwargs),
                        device=args.device, amp=args.amp, max_batch_size=max(64, args.batch))
    engine = TeacherEngine.from_config(cfg)
    dev = engine.device
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    m = engine.modules[0]
    kw = dict(SPECS[args.spec])
    if kw.get("logits") and not engine.num_classes:
        raise SystemExit("--spec logits needs a teacher with a head")
    if not kw.get("logits"):
        kw["hidden"] = {m.name: list(range(1, m.num_layers + 1))}
    spec_msg = wire.target_spec(**kw)
    spec = resolve_spec(spec_msg, engine.modules, engine.num_classes)
    x = make_inputs(engine, args.batch, args.seq_len)
    x_dev = {k: v.to(dev) for k, v in x.items()}
    adapter = engine.adapter

    def bare():
        with torch.inference_mode(), torch.autocast(dev.type, dtype=engine.amp_dtype or torch.bfloat16,
                                                     enabled=engine.amp_dtype is not None):
            if hasattr(adapter, "mean") and "pixel_values" in x_dev:  # the adapter normalizes too
                adapter.model((x_dev["pixel_values"] - adapter.mean) / adapter.std)
            else:
                adapter.model(**x_dev)

    rows = {}
    rows["bare forward"] = timed(bare, args.seconds, sync) * args.batch
    rows["engine.run"] = timed(lambda: engine.run([Work(x, spec)]), args.seconds, sync) * args.batch
    with run_server(engine, workers=max(4, args.clients)) as port:
        clients = [SyncTeacherClient(f"grpc://127.0.0.1:{port}", timeout=120) for _ in range(args.clients)]
        pool = concurrent.futures.ThreadPoolExecutor(args.clients)

        def through_grpc():
            list(pool.map(lambda c: c.get_targets(x, spec_msg), clients))

        rows[f"plain gRPC, {args.clients} clients"] = timed(through_grpc, args.seconds, sync) * args.batch * args.clients
        for c in clients:
            c.close()
        pool.shutdown()
    base = rows["bare forward"]
    print(f"\nP5: {engine.model_name} on {dev} (amp {args.amp}), batch {args.batch}, spec {args.spec}\n")
    print(f"{'path':<28}{'samples/s':>12}{'x bare':>9}")
    for k, v in rows.items():
        print(f"{k:<28}{v:>12.1f}{v / base:>9.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "samples_s": rows,
                                              "ratio": {k: v / base for k, v in rows.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
