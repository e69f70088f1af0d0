"""Write a Triton model repository serving a kdserve teacher.

    python -m teacher_server.triton --model timm:vit_base_patch16_224 --out ./model_repository
    python -m teacher_server.triton --model timm:vit_tiny_patch16_224 --random-init \\
        --model-kwargs '{"img_size": 32, "patch_size": 8, "depth": 3}' --out ./model_repository --serve

writes::

    <out>/<name>/config.pbtxt     python backend, dynamic_batching, the teacher's inputs + ``request``,
                                  output ``targets``, parameter kdserve.teacher_info (TeacherInfo JSON)
    <out>/<name>/kdserve.json     the TeacherConfig, the fingerprint, and paths to put on sys.path
    <out>/<name>/1/model.py       a copy of teacher_server/triton/model.py

The generator loads the teacher once (the config must declare its inputs, and Describe needs its
fingerprint); ``model.py`` checks at load time that it serves the same fingerprint.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from google.protobuf import json_format, text_format

from kdserve.config import ConfigError
from kdserve.teacher_config import TeacherConfig
from teacher_server.triton import (
    INFO_PARAMETER,
    MODEL_NAME,
    REQUEST_INPUT,
    SIDECAR,
    TARGETS_OUTPUT,
    TRITON_DTYPES,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
MODEL_TEMPLATE = Path(__file__).with_name("model.py")
INSTANCE_KINDS = ("auto", "cpu", "gpu", "model")


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:  # pragma: no cover - the triton extra is missing
        raise ImportError(
            "writing a Triton model repository needs tritonclient: pip install 'kdserve[triton]'"
        ) from e
    return model_config_pb2


def resolve_instance_kind(kind: str, cfg: TeacherConfig) -> str:
    """auto: KIND_GPU (one instance per visible GPU) when the teacher runs on CUDA, else KIND_CPU."""
    if kind not in INSTANCE_KINDS:
        raise ValueError(f"instance kind {kind!r}: use one of {INSTANCE_KINDS}")
    if kind != "auto":
        return kind
    if cfg.device.startswith("cuda"):
        return "gpu"
    if cfg.device == "auto":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu"


def model_config(info, cfg: TeacherConfig, name: str = MODEL_NAME, instance_kind: str = "cpu",
                 instances: int | None = None) -> str:
    """config.pbtxt text for a teacher described by ``info`` (a ``kdserve.v1.TeacherInfo``)."""
    mc = _model_config_pb2()
    c = mc.ModelConfig(name=name, backend="python", max_batch_size=cfg.max_batch_size)
    # Triton merges requests of several clients into one execute() call, i.e. one engine.run.
    c.dynamic_batching.max_queue_delay_microseconds = int(round(cfg.triton.batch_wait_timeout_s * 1e6))
    texts = info.HasField("tokenizer")  # raw texts in the request rows replace the token inputs
    for i in info.inputs:
        c.input.add(
            name=i.name,
            data_type=mc.DataType.Value("TYPE_" + TRITON_DTYPES[i.dtype]),
            dims=list(i.shape[1:]),  # dim 0 is the batch: Triton adds it (max_batch_size > 0)
            optional=texts or not i.required,  # the model refuses a request with neither
        )
    c.input.add(name=REQUEST_INPUT, data_type=mc.TYPE_STRING, dims=[1])
    c.output.add(name=TARGETS_OUTPUT, data_type=mc.TYPE_UINT8, dims=[-1])  # framed rows (triton/__init__.py)
    kind = {"cpu": "KIND_CPU", "gpu": "KIND_GPU", "model": "KIND_MODEL"}[instance_kind]
    c.instance_group.add(count=instances or cfg.triton.instances, kind=mc.ModelInstanceGroup.Kind.Value(kind))
    c.parameters[INFO_PARAMETER].string_value = json_format.MessageToJson(
        info, indent=None, sort_keys=True, preserving_proto_field_name=True
    )
    header = (
        f"# kdserve teacher {info.model_name} (fingerprint {info.fingerprint}), written by\n"
        "# python -m teacher_server.triton; see teacher_server/triton/__init__.py for the mapping.\n"
    )
    return header + text_format.MessageToString(c)


def write_repository(
    cfg: TeacherConfig,
    out: str | Path,
    name: str = MODEL_NAME,
    *,
    engine=None,
    instance_kind: str = "auto",
    instances: int | None = None,
    project_path: str | None = None,
) -> Path:
    """Write (or overwrite) ``<out>/<name>/``; returns the model directory.

    ``engine``: an already loaded ``TeacherEngine`` for ``cfg`` (else one is built here).
    ``project_path``: where model.py finds kdserve's packages on the server (default: this
    checkout; ignored there when it does not exist, e.g. inside a container with kdserve installed).
    """
    from teacher_server.engine import TeacherEngine
    from teacher_server.service import TeacherService

    if not name or "/" in name:
        raise ValueError(f"model name {name!r} must be one path component")
    cfg.check_frontend("triton")  # the batcher's sharing options and other frontends' do nothing here
    engine = engine or TeacherEngine.from_config(cfg)
    info = TeacherService(engine, cfg).describe()
    kind = resolve_instance_kind(instance_kind, cfg)
    model_dir = Path(out) / name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(model_config(info, cfg, name, kind, instances))
    sidecar = {
        "teacher": cfg.model_dump(mode="json"),
        "fingerprint": engine.fingerprint,
        "sys_path": [project_path or str(PROJECT_ROOT)],
    }
    (model_dir / SIDECAR).write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(MODEL_TEMPLATE, version_dir / "model.py")
    return model_dir


# -- CLI ---------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m teacher_server.triton",
        description="Write a Triton model repository for a kdserve teacher (and optionally serve it).",
    )
    p.add_argument("--config", help="YAML file of TeacherConfig fields (see kdserve/teacher_config.py)")
    p.add_argument("--model", help="timm:<name>, hf:<name or dir>, minilm or mpnet (default: minilm)")
    p.add_argument("--random-init", action="store_true", help="build the architecture with random weights")
    p.add_argument("--model-kwargs", help='JSON constructor/config overrides, e.g. \'{"depth": 4}\'')
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config field")
    p.add_argument("--max-batch-size", type=int, help="samples per request and per Triton batch")
    p.add_argument("--out", default="model_repository", help="repository directory (default ./model_repository)")
    p.add_argument("--name", default=MODEL_NAME, help=f"Triton model name (default {MODEL_NAME})")
    p.add_argument("--instance-kind", choices=INSTANCE_KINDS, default="auto",
                   help="Triton instance_group kind (auto: gpu when the teacher runs on CUDA)")
    p.add_argument("--instances", type=int, help="instances per device (default: triton.instances)")
    p.add_argument("--project-path", help="path of this checkout as the server sees it (containers)")
    p.add_argument("--serve", action="store_true", help="then run the bundled tritonserver until Ctrl-C")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--host", default="0.0.0.0", help="interface tritonserver binds with --serve")
    p.set_defaults(backend="triton")  # resolve_config checks the options against this frontend
    return p.parse_args(argv)


def main(argv=None) -> int:
    from teacher_server.__main__ import resolve_config

    args = parse_args(argv)
    try:
        if args.max_batch_size is not None:
            args.set = [*args.set, f"max_batch_size={args.max_batch_size}"]
        cfg = resolve_config(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model_dir = write_repository(cfg, args.out, args.name, instance_kind=args.instance_kind,
                                 instances=args.instances, project_path=args.project_path)
    print(f"wrote {model_dir} (config.pbtxt, {SIDECAR}, 1/model.py)")
    if not args.serve:
        print(f"serve it: tritonserver --model-repository={Path(args.out).resolve()}  "
              f"(or add --serve); students use triton://<host>:{args.grpc_port}/{args.name}")
        return 0
    import signal

    from teacher_server.triton.launch import run_tritonserver

    # tritonserver runs in its own session (so a terminal's Ctrl-C reaches only this process):
    # SIGINT and SIGTERM must unwind through run_tritonserver, which stops it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with run_tritonserver(args.out, args.grpc_port, args.http_port, args.metrics_port, host=args.host,
                          log_to_console=True) as server:
        print(f"teacher up on triton://127.0.0.1:{server.grpc_port}/{args.name}  (Ctrl-C stops)", flush=True)
        try:
            server.wait()
        except KeyboardInterrupt:
            pass
    return 0
