"""Tensor <-> ``kdserve.v1.Tensor`` (raw little-endian row-major bytes, KServe v2 style).

Copies are what a big reply costs (P4 in ``python -m bench``), so they are counted here. With
the upb protobuf runtime a ``bytes`` field is copied on every assignment AND on every read
(``msg.data`` builds a new ``bytes``), and nested messages are copied when passed to a parent's
constructor. So: ``encode_into`` fills a message already inside the reply (tensor -> bytes, bytes
-> field: two copies, both unavoidable with upb); ``to_numpy`` reads ``data`` once and wraps it
with ``numpy.frombuffer`` (no further copy); ``nbytes`` derives the size from the shape instead
of reading ``data``. The only other copy on decode is the optional dequantisation of int8, or the
move to a device. Decoded tensors share memory with the read bytes: treat them as read-only.
"""
from __future__ import annotations

import math
import sys
import warnings
from typing import Mapping

import numpy as np
import torch

from kdserve.targets import dequantize_int8
from kdserve.v1 import teacher_pb2 as pb

# Decoded tensors share the received (immutable) bytes, and torch warns that such an array is not
# writable. Targets are read-only by contract, and copying to silence it would double the cost of
# decoding: that one warning is filtered (once, here: a catch_warnings() per tensor costs more than
# the decode and is not thread-safe).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

# bfloat16 has no numpy dtype: it travels as its uint16 bit pattern and is re-viewed in torch.
_NUMPY = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
}
_TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
}
_NAME = {v: k for k, v in _TORCH.items()}
DTYPES = tuple(_NUMPY)
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "int8")

assert sys.byteorder == "little", "kdserve's codec assumes a little-endian host"


class CodecError(ValueError):
    """A Tensor message that cannot be decoded (unknown dtype, data length != shape)."""


def dtype_name(t: torch.dtype) -> str:
    if t not in _NAME:
        raise CodecError(f"dtype {t} cannot travel; use one of {', '.join(DTYPES)}")
    return _NAME[t]


def encode(t: torch.Tensor, scales: torch.Tensor | None = None) -> pb.Tensor:
    """torch tensor -> Tensor message. ``scales``: per-row float32 scales of a quantised int8."""
    return encode_into(pb.Tensor(), t, scales)


def encode_into(msg: pb.Tensor, t: torch.Tensor, scales: torch.Tensor | None = None) -> pb.Tensor:
    """Fill ``msg`` (e.g. ``reply.outputs[name]``, created in place) from ``t``; returns ``msg``.

    Writing into the parent's field avoids the copy ``Reply(outputs={name: encode(t)})`` makes.
    """
    t = t.detach()
    name = dtype_name(t.dtype)
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.uint16) if hasattr(torch, "uint16") else t.view(torch.int16)
    msg.dtype = name
    msg.shape[:] = list(t.shape)
    msg.data = t.numpy().tobytes()
    if scales is not None:
        msg.scales = scales.detach().float().cpu().contiguous().numpy().tobytes()
    return msg


def itemsize(dtype: str) -> int:
    """Bytes per element of a wire dtype name (bfloat16: 2, int8: 1)."""
    if dtype not in _NUMPY:
        raise CodecError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return _NUMPY[dtype].itemsize


def nbytes(msg: pb.Tensor) -> int:
    """Payload bytes (data + scales) from the shape and dtype: reading ``msg.data`` would copy it.

    Equals ``len(msg.data) + len(msg.scales)`` for every message ``to_numpy`` accepts; for one with
    an unknown dtype it falls back to reading the field.
    """
    dt = _NUMPY.get(msg.dtype)
    if dt is None:
        return len(msg.data) + len(msg.scales)
    return math.prod(int(d) for d in msg.shape) * dt.itemsize + len(msg.scales)


def to_numpy(msg: pb.Tensor) -> np.ndarray:
    """Zero-copy view of the message's bytes (bfloat16 comes back as its uint16 bits)."""
    if msg.dtype not in _NUMPY:
        raise CodecError(f"unknown dtype {msg.dtype!r}; expected one of {', '.join(DTYPES)}")
    dt = _NUMPY[msg.dtype]
    shape = tuple(int(d) for d in msg.shape)
    if any(d < 0 for d in shape):
        raise CodecError(f"negative dimension in shape {list(shape)}")
    expected = math.prod(shape) * dt.itemsize
    data = msg.data  # one read: each read of a bytes field is a copy
    if len(data) != expected:
        raise CodecError(
            f"shape {list(shape)} of {msg.dtype} needs {expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=dt).reshape(shape)


def decode(msg: pb.Tensor, dequantize: bool = True) -> torch.Tensor:
    """Tensor message -> torch tensor sharing the message's memory.

    int8 with scales is dequantised to float32 when ``dequantize`` (the one copy).
    """
    arr = to_numpy(msg)
    t = torch.from_numpy(arr)  # shares the bytes (the not-writable warning is filtered above)
    if msg.dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    if msg.scales and dequantize:
        scales = np.frombuffer(msg.scales, dtype="<f4")
        rows = math.prod(arr.shape[:-1]) if arr.ndim else 1
        if scales.size != rows:
            raise CodecError(f"int8 tensor of shape {list(arr.shape)} needs {rows} scales, got {scales.size}")
        s = torch.from_numpy(scales).reshape(arr.shape[:-1])
        return dequantize_int8(t, s)
    return t


def decode_map(msgs: Mapping[str, pb.Tensor], dequantize: bool = True) -> dict[str, torch.Tensor]:
    return {k: decode(v, dequantize) for k, v in msgs.items()}
