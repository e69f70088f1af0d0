"""Check a TeacherConfig against what is installed, before any cluster starts.

``TeacherConfig`` (kdserve) only knows the shape of its fields. Whether ``timm:vit_tiny_patch16_22``
is a model, whether the kwargs fit its constructor, and which modules and depths the teacher has
(so a job's layer maps can be checked on the driver) needs the model libraries: this module builds
the architecture on PyTorch's ``meta`` device (no weights, no memory, no download) and reports the
first problem as one line naming the field.
"""
from __future__ import annotations

import difflib

import torch

from kdserve.config import ConfigError
from kdserve.teacher_config import TeacherConfig
from kdserve.v1 import teacher_pb2 as pb
from teacher_server.adapters.base import TeacherAdapter
from teacher_server.engine import load_adapter, parse_model

# Kinds whose architecture builds from its name alone; the others load their (small, local) weights.
_META_KINDS = ("timm", "hf")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def _check_name(kind: str, name: str, field: str) -> None:
    if kind == "timm":
        import timm

        if not timm.is_model(name.split(".")[0]):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else " (timm.list_models() lists them)"
            raise ConfigError(f"{field}: unknown timm model {name!r}{hint}")


def build_architecture(cfg: TeacherConfig, field: str = "teacher") -> TeacherAdapter:
    """The teacher's adapter with its real architecture; weights only where they are local and small."""
    try:
        kind, name = parse_model(cfg.model)
    except ValueError as e:
        raise ConfigError(f"{field}.model: {e}") from None
    _check_name(kind, name, f"{field}.model")
    try:
        if kind in _META_KINDS:
            with torch.device("meta"):
                return load_adapter(cfg.model_copy(update={"pretrained": False}))
        return load_adapter(cfg)
    except ConfigError:
        raise
    except Exception as e:  # the library's own words, on one line, pinned to the fields that feed it
        where = "model_kwargs" if cfg.model_kwargs else "model"
        raise ConfigError(f"{field}.{where}: cannot build {cfg.model!r}: {_first_line(e)}") from None


def describe_config(cfg: TeacherConfig, field: str = "teacher") -> pb.TeacherInfo:
    """What ``Describe`` will answer once the teacher runs (modules, depths, inputs, classes),
    computed from the config alone, with the tokenizer of a text teacher that ships one. The
    fingerprint needs the weights and is left empty."""
    from teacher_server.texts import TextInputs

    adapter = build_architecture(cfg, field)
    texts = TextInputs.of(adapter)
    return pb.TeacherInfo(
        tokenizer=texts.info() if texts is not None else None,
        model_name=adapter.model_name,
        modules=[pb.ModuleInfo(**m.__dict__) for m in adapter.modules],
        inputs=[pb.InputInfo(name=i.name, dtype=i.dtype, shape=list(i.shape), required=i.required, doc=i.doc)
                for i in adapter.inputs],
        max_batch_size=cfg.max_batch_size,
        num_classes=adapter.num_classes,
        max_request_bytes=cfg.max_request_bytes,
        max_reply_bytes=cfg.max_reply_bytes,
    )
