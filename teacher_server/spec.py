"""What a request asks for, in plain Python, validated against what the teacher has.

Every frontend (the plain gRPC server, Ray Serve, Triton) turns its wire request into a
``TargetSpec`` here, so the validation rules and their messages exist once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from kdserve.codec import FLOAT_DTYPES, itemsize
from kdserve.v1 import teacher_pb2 as pb

HIDDEN_REDUCTIONS = ("none", "data2vec", "mean")
ATTENTION_REDUCTIONS = ("none", "head_mean")
MAX_DIM = 2**31 - 1  # no tensor the teacher takes has a longer axis
SHOWN_CHARS = 64  # client-supplied text quoted in a message, per piece
MESSAGE_CHARS = 400  # a whole status message
MAX_EXPERIMENT_CHARS = 128  # a longer experiment_id is refused (and never becomes a metric label)


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """A client-supplied value quoted for a message: repr (non-printables escaped), clipped."""
    s = value if isinstance(value, str) else str(value)
    if len(s) <= limit:
        return repr(s)
    return f"{s[:limit]!r}...(+{len(s) - limit} chars)"


def bounded(message: str, limit: int = MESSAGE_CHARS) -> str:
    """One printable line of at most ``limit`` characters (a status message's last guard)."""
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message[: limit + 1])
    return out if len(out) <= limit else out[: limit - 3] + "..."


class SpecError(ValueError):
    """A request the teacher cannot answer as asked: the frontend answers INVALID_ARGUMENT."""


class TooLarge(ValueError):
    """A request or reply over a configured byte limit: RESOURCE_EXHAUSTED."""


@dataclass(frozen=True)
class ModuleInfo:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_tokens: int  # -1 when it follows the input length
    # Width of hidden state l at entry l - 1 when blocks differ in width (CNN stages); () when all are hidden_size.
    layer_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class InputInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]  # -1 marks free dims; dim 0 is the batch
    required: bool = True
    doc: str = ""


@dataclass(frozen=True)
class TargetSpec:
    """Resolved request: layer indices are 1-based and positive, reductions are canonical names."""

    hidden: tuple[tuple[str, tuple[int, ...]], ...] = ()
    hidden_reduction: str = "none"
    data2vec_eps: float = 1e-5
    attention: tuple[tuple[str, tuple[int, ...]], ...] = ()
    attention_reduction: str = "none"
    logits: bool = False
    logits_top_k: int = 0
    dtype: str = "float32"

    def is_empty(self) -> bool:
        return not (self.hidden or self.attention or self.logits)

    def layers_needed(self) -> tuple[dict[str, set[int]], dict[str, set[int]]]:
        """(hidden layers, attention layers) per module that a forward must capture."""
        hid: dict[str, set[int]] = {}
        for module, layers in self.hidden:
            hid.setdefault(module, set()).update(layers)
        att: dict[str, set[int]] = {}
        for module, layers in self.attention:
            att.setdefault(module, set()).update(layers)
        return hid, att


def _resolve_layers(
    field_name: str, sels, modules: dict[str, ModuleInfo], default_module: str, allow_empty: bool
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    out = []
    for i, sel in enumerate(sels):
        module = sel.module or default_module
        if module not in modules:
            raise SpecError(
                f"{field_name}[{i}].module: unknown module {shown(module)}; the teacher has {sorted(modules)}"
            )
        n = modules[module].num_layers
        layers = list(sel.layers)
        if not layers and not allow_empty:
            raise SpecError(f"{field_name}[{i}].layers is empty: name blocks 1..{n} (or -1 for the last)")
        resolved = []
        for l in layers:
            li = l + n + 1 if l < 0 else l
            if not 1 <= li <= n:
                raise SpecError(
                    f"{field_name}[{i}].layers: layer {l} is out of range for module {shown(module)} "
                    f"with {n} blocks (valid: 1..{n} or -{n}..-1)"
                )
            resolved.append(li)
        if allow_empty and not resolved:
            resolved = list(range(1, n + 1))
        out.append((module, tuple(sorted(set(resolved)))))
    return tuple(out)


def resolve_spec(msg: pb.TargetSpec, modules: list[ModuleInfo], num_classes: int) -> TargetSpec:
    """Validate a wire TargetSpec against the teacher; raise SpecError naming the bad field."""
    by_name = {m.name: m for m in modules}
    default = modules[0].name
    hidden_reduction = msg.hidden_reduction or "none"
    if hidden_reduction not in HIDDEN_REDUCTIONS:
        raise SpecError(
            f"spec.hidden_reduction: unknown reduction {shown(msg.hidden_reduction)}; use one of {HIDDEN_REDUCTIONS}"
        )
    attention_reduction = msg.attention_reduction or "none"
    if attention_reduction not in ATTENTION_REDUCTIONS:
        raise SpecError(
            f"spec.attention_reduction: unknown reduction {shown(msg.attention_reduction)}; "
            f"use one of {ATTENTION_REDUCTIONS}"
        )
    dtype = msg.dtype or "float32"
    if dtype not in FLOAT_DTYPES:
        raise SpecError(f"spec.dtype: unknown output dtype {shown(msg.dtype)}; use one of {FLOAT_DTYPES}")
    if not math.isfinite(msg.data2vec_eps) or msg.data2vec_eps < 0:
        raise SpecError(f"spec.data2vec_eps must be a finite number >= 0, got {msg.data2vec_eps}")
    if msg.logits_top_k < 0:
        raise SpecError(f"spec.logits_top_k must be >= 0, got {msg.logits_top_k}")
    if msg.logits and num_classes == 0:
        raise SpecError("spec.logits: this teacher has no classification head (num_classes = 0)")
    if msg.logits_top_k and not msg.logits:
        raise SpecError("spec.logits_top_k is set but spec.logits is false")
    if msg.logits_top_k > num_classes > 0:
        raise SpecError(f"spec.logits_top_k = {msg.logits_top_k} exceeds the {num_classes} classes")
    spec = TargetSpec(
        hidden=_resolve_layers(
            "spec.hidden", msg.hidden, by_name, default, allow_empty=hidden_reduction == "data2vec"
        ),
        hidden_reduction=hidden_reduction,
        data2vec_eps=float(msg.data2vec_eps) or 1e-5,
        attention=_resolve_layers("spec.attention", msg.attention, by_name, default, allow_empty=False),
        attention_reduction=attention_reduction,
        logits=bool(msg.logits),
        logits_top_k=int(msg.logits_top_k),
        dtype=dtype,
    )
    if spec.is_empty():
        raise SpecError("spec is empty: ask for hidden layers, attention layers or logits")
    for module, _ in spec.attention:
        if by_name[module].num_heads == 0:
            raise SpecError(f"spec.attention: module {shown(module)} has no attention maps (no attention layers); "
                            "ask for its hidden states only")
    if hidden_reduction == "data2vec":
        for module, layers in spec.hidden:
            sizes = by_name[module].layer_sizes
            if sizes and len({sizes[l - 1] for l in layers}) > 1:
                raise SpecError(f"spec.hidden_reduction: data2vec averages layers, but module {shown(module)} "
                                f"has layers of different widths {sorted(set(sizes))}")
    return spec


def validate_inputs(inputs, infos: list[InputInfo], max_batch_size: int) -> int:
    """Check wire inputs (name -> pb.Tensor) against the teacher's declared inputs.

    Checks names, dtypes, ranks, every dim (1..MAX_DIM, fixed ones equal), the byte length
    against the shape (Python ints: no overflow), scales (only on int8, one per row) and a common
    batch size, all before anything is decoded. Returns the batch size.
    """
    by_name = {i.name: i for i in infos}
    if not inputs:
        raise SpecError(f"inputs is empty: send {[i.name for i in infos if i.required]}")
    for name in inputs:
        if name not in by_name:
            raise SpecError(f"inputs: unknown input {shown(name)}; the teacher takes {sorted(by_name)}")
    for info in infos:
        if info.required and info.name not in inputs:
            raise SpecError(f"inputs: missing required input {info.name!r}")
    batch = None
    seq = None
    for name, t in inputs.items():
        info = by_name[name]
        shape = tuple(int(d) for d in t.shape)
        where = f"inputs[{name!r}]"
        if t.dtype != info.dtype:
            raise SpecError(f"{where}: dtype {shown(t.dtype)}, expected {info.dtype!r}")
        if len(shape) != len(info.shape):
            raise SpecError(
                f"{where}: rank {len(shape)} (shape {_dims(shape)}), expected rank "
                f"{len(info.shape)} (shape {list(info.shape)}, -1 = any)"
            )
        if shape[0] == 0:
            raise SpecError(f"{where}: batch is empty (dim 0 is 0)")
        for d, (got, want) in enumerate(zip(shape, info.shape)):
            if want != -1 and got != want:
                raise SpecError(
                    f"{where}: dim {d} is {got}, expected {want} (shape {list(info.shape)}); "
                    "resize on the client to the teacher's input size"
                )
            if not 1 <= got <= MAX_DIM:
                raise SpecError(f"{where}: dim {d} is {got}; every dim must lie in [1, {MAX_DIM}]")
        need = math.prod(shape) * itemsize(info.dtype)  # Python ints: exact for any shape
        if len(t.data) != need:
            raise SpecError(f"{where}: shape {_dims(shape)} of {info.dtype} needs {need} bytes, got {len(t.data)}")
        if t.scales:
            if info.dtype != "int8":
                raise SpecError(f"{where}: scales are only for int8 tensors, this input is {info.dtype}")
            rows = math.prod(shape[:-1])
            if len(t.scales) != 4 * rows:
                raise SpecError(f"{where}: int8 of shape {_dims(shape)} needs {rows} float32 scales, got {len(t.scales)} bytes")
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise SpecError(f"{where}: batch {shape[0]} differs from the other inputs' {batch}")
        if len(shape) == 2 and info.shape[1] == -1:  # token sequences must agree in length
            if seq is None:
                seq = shape[1]
            elif shape[1] != seq:
                raise SpecError(f"{where}: sequence length {shape[1]} differs from {seq}")
    if batch > max_batch_size:
        raise SpecError(f"inputs: batch of {batch} samples is over the teacher's max_batch_size {max_batch_size}; split it")
    return batch


def _dims(shape: tuple[int, ...], limit: int = 8) -> str:
    """A shape for a message; a client may send thousands of dims."""
    if len(shape) <= limit:
        return str(list(shape))
    return str(list(shape[:limit]))[:-1] + f", ...] ({len(shape)} dims)"
