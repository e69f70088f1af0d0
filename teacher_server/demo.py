"""``python -m teacher_server.demo``: start a local teacher on Ray Serve and show what it serves.

Starts a local Ray cluster, deploys the packaged MiniLM teacher (or ``--model``) with gRPC
ingress, sends real English sentences (WordNet glosses when installed) over real gRPC, and prints
the targets' shapes, bytes per sample for each reduction, and the server's timings. Serve's gRPC
proxy listens on every interface, so the demo's teacher requires a random token only it knows.
"""
from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
from pathlib import Path

SENTENCES = [
    "a domesticated carnivorous mammal that typically has a long snout",
    "the natural satellite of the earth, visible by reflected sunlight",
    "a large body of salt water partly enclosed by land",
    "an instrument for measuring temperature",
]


def _sentences(n: int) -> list[str]:
    path = Path("/usr/share/wordnet/data.noun")
    if not path.is_file():
        return (SENTENCES * n)[:n]
    out = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if "|" in line and not line.startswith(" "):
                out.append(line.split("|", 1)[1].split(";")[0].strip())
                if len(out) == n:
                    break
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m teacher_server.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--samples", type=int, default=8)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import grpc
    import ray
    import transformers
    from ray import serve

    from kdserve import auth, codec, wire
    from kdserve.v1 import teacher_pb2 as pb
    from kdserve.v1 import teacher_pb2_grpc as pb_grpc
    from kdserve.packaged import minilm_dir
    from kdserve.teacher_config import TeacherConfig
    from teacher_server.serve_app import deploy

    t0 = time.time()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        token = secrets.token_urlsafe(32)
        deploy(TeacherConfig(model="minilm", num_cpus=1), grpc_port=args.port, http_port=args.port + 1,
               auth_token=token)
        print(f"[{time.time() - t0:5.1f}s] teacher up on grpc://127.0.0.1:{args.port} (bearer token required)")
        stub = pb_grpc.TeacherServiceStub(grpc.insecure_channel(f"127.0.0.1:{args.port}", options=wire.CHANNEL_OPTIONS))
        md = auth.metadata(token)
        info = stub.Describe(pb.DescribeRequest(), metadata=md)
        m = info.modules[0]
        print(f"model {info.model_name}  fingerprint {info.fingerprint}")
        print(f"module {m.name}: {m.num_layers} blocks, hidden {m.hidden_size}, {m.num_heads} heads")
        tok = transformers.AutoTokenizer.from_pretrained(minilm_dir())
        sents = _sentences(args.samples)
        enc = tok(sents, padding=True, truncation=True, max_length=64, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        print(f"{len(sents)} sentences, e.g. {sents[0]!r}, {inputs['input_ids'].shape[1]} tokens")
        specs = {
            "all hidden states, float32": wire.target_spec(hidden={m.name: range(1, m.num_layers + 1)}),
            "all hidden states, int8": wire.target_spec(hidden={m.name: range(1, m.num_layers + 1)}, dtype="int8"),
            "Data2Vec target": wire.target_spec(hidden={m.name: []}, hidden_reduction="data2vec"),
            "last-layer attention, per head": wire.target_spec(attention={m.name: [-1]}),
            "last-layer attention, head mean": wire.target_spec(attention={m.name: [-1]}, attention_reduction="head_mean"),
        }
        print(f"{'targets':34s} {'outputs':48s} {'bytes/sample':>12s} {'server ms':>9s}")
        for name, spec in specs.items():
            reply = stub.GetTargets(wire.build_request(inputs, spec, experiment_id="demo"), metadata=md)
            shapes = ", ".join(f"{k}{tuple(codec.decode(v).shape)}" for k, v in list(reply.outputs.items())[:1])
            more = f" +{len(reply.outputs) - 1}" if len(reply.outputs) > 1 else ""
            per = sum(codec.nbytes(v) for v in reply.outputs.values()) // len(sents)
            print(f"{name:34s} {shapes + more:48s} {per:12,d} {reply.timings.compute_ms:9.1f}")
        print(f"[{time.time() - t0:5.1f}s] done")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
