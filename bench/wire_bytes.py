"""P3 wire: bytes on the wire per sample (``TargetsReply.ByteSize()`` of the reply a real gRPC
server sent) vs the raw bytes of the requested tensors, computed here from the shapes alone
(elements x item size, + one float32 scale per row for int8), per reduction and dtype; and vs
the naive payload (hidden states of every layer, float32)."""
from __future__ import annotations

import torch

from bench.common import Figure

ITEM = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


def cases(L: int):
    every = list(range(1, L + 1))
    out = []
    for dt in ("float32", "float16", "bfloat16", "int8"):
        out.append((f"hidden all {L} layers", dict(hidden={"vision": every}, dtype=dt)))
    for dt in ("float32", "float16", "int8"):
        out.append(("hidden last layer", dict(hidden={"vision": [-1]}, dtype=dt)))
    for dt in ("float32", "float16", "int8"):
        out.append(("data2vec", dict(hidden={"vision": []}, hidden_reduction="data2vec", dtype=dt)))
    for dt in ("float32", "float16"):
        out.append(("attention last, per head", dict(attention={"vision": [-1]}, dtype=dt)))
        out.append(("attention all, head_mean", dict(attention={"vision": every}, attention_reduction="head_mean", dtype=dt)))
    out.append(("logits", dict(logits=True)))
    out.append(("logits top-10", dict(logits=True, logits_top_k=10)))
    return out


def raw_bytes(name: str, kw: dict, b: int, L: int, T: int, D: int, H: int, C: int) -> int:
    """The requested tensors' bytes from their shapes (independent of the server's estimate)."""
    dt = kw.get("dtype", "float32")
    item, scale = ITEM[dt], (4 if dt == "int8" else 0)
    total = 0
    if "hidden" in kw:
        n = 1 if kw.get("hidden_reduction") == "data2vec" else len(kw["hidden"]["vision"])
        total += n * (b * T * D * item + b * T * scale)
    if "attention" in kw:
        n, h = len(kw["attention"]["vision"]), (1 if kw.get("attention_reduction") == "head_mean" else H)
        total += n * (b * h * T * T * item + b * h * T * scale)
    if kw.get("logits"):
        k = kw.get("logits_top_k") or C
        total += b * k * item + b * k * scale + (b * k * 8 if kw.get("logits_top_k") else 0)
    return total


def run(quick: bool, log) -> Figure:
    import grpc

    from kdserve.v1 import teacher_pb2_grpc as pb_grpc
    from kdserve.wire import CHANNEL_OPTIONS, build_request, target_spec
    from kdserve.teacher_config import TeacherConfig
    from teacher_server.engine import TeacherEngine
    from teacher_server.grpc_server import run_server

    L, T, D, H, C, b = 12, 197, 768, 12, 1000, 32  # the batch students send
    model = f"synthetic:layers={L},tokens={T},dim={D},heads={H},classes={C},latency_ms=0"
    engine = TeacherEngine.from_config(TeacherConfig(model=model, device="cpu"))
    x = {"pixel_values": torch.rand(b, 3, 224, 224)}
    naive = raw_bytes("naive", dict(hidden={"vision": list(range(1, L + 1))}), b, L, T, D, H, C) / b
    rows = []
    with run_server(engine) as port, grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        for name, kw in cases(L):
            reply = stub.GetTargets(build_request(x, target_spec(**kw)))
            wire = reply.ByteSize() / b
            raw = raw_bytes(name, kw, b, L, T, D, H, C) / b
            rows.append({"spec": name, "dtype": kw.get("dtype", "float32"), "wire_B_per_sample": wire,
                         "raw_B_per_sample": raw, "ratio": wire / raw, "x_naive_f32": wire / naive})
    worst = max(rows, key=lambda r: r["ratio"])
    log(f"P3 worst wire/raw {worst['ratio']:.4f} ({worst['spec']} {worst['dtype']})")
    return Figure(
        "P3_bytes_ratio", baseline=worst["raw_B_per_sample"], measured=worst["wire_B_per_sample"], unit="B/sample",
        what=(f"wire bytes per sample (TargetsReply.ByteSize() over gRPC, batch {b}) vs raw bytes of the requested "
              f"tensors; the WORST case over {len(rows)} reductions x dtypes ({worst['spec']}, {worst['dtype']}); "
              f"synthetic ViT-B (L={L}, T={T}, D={D}, H={H}, C={C}); naive all-layer f32 = {naive:,.0f} B/sample"),
        rows=rows, extra={"naive_f32_B_per_sample": naive},
    )
