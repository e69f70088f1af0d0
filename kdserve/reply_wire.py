"""A TargetsReply's wire bytes built by hand: each tensor's bytes copied once, into the message.

With the upb runtime, a reply built as a message copies every tensor twice (tensor -> ``bytes``,
``bytes`` -> the message's arena) and once more when gRPC serialises it; ``ByteSize()`` serialises
too. For replies of tens of MB those copies are what the plain gRPC frontend spends its time on
(P4 in ``python -m bench``). Here the small fields (fingerprint, timings, keys, offsets) go
through protobuf, and each ``outputs`` map entry is written with the protobuf wire format around
a zero-copy view of the tensor; one ``b"".join`` makes the message. The bytes parse with
``TargetsReply.FromString`` into a message equal to the one ``TeacherService.reply`` builds
(tests/test_reply_wire.py), so a client cannot tell which path answered.

Wire format used (https://protobuf.dev/programming-guides/encoding/):
  TargetsReply.outputs (map<string, Tensor>, field 1): one length-delimited entry per name,
    entry = key (field 1, string) + value (field 2, Tensor message);
  Tensor: dtype (1, string), shape (2, packed int64 varints), data (3, bytes), scales (4, bytes).
Fields at their default (empty string/bytes/shape) are left out, as protobuf does.
"""
from __future__ import annotations

import functools
from typing import Iterable

import numpy as np
import torch

from kdserve import codec
from kdserve.v1 import teacher_pb2 as pb

_LEN = 2  # wire type of length-delimited fields


def varint(n: int) -> bytes:
    """Base-128 varint of a non-negative int (negative int64 as its 10-byte two's complement)."""
    n &= (1 << 64) - 1
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int) -> bytes:
    return varint(field << 3 | _LEN)


_ENTRY, _MAP_KEY, _MAP_VALUE = _key(1), _key(1), _key(2)
_DTYPE, _SHAPE, _DATA, _SCALES = _key(1), _key(2), _key(3), _key(4)


def _view(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array (no copy when already on the CPU and contiguous)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: its bits travel as uint16
        t = t.view(torch.int16)
    return t.numpy().reshape(-1).view(np.uint8)


def _bytes_field(parts: list, key: bytes, buf) -> int:
    """Append ``key, len, buf`` unless ``buf`` is empty; returns the bytes appended."""
    n = len(buf)
    if not n:
        return 0
    head = key + varint(n)
    parts += (head, buf)
    return len(head) + n


@functools.lru_cache(maxsize=64)
def _dtype_field(dtype: torch.dtype) -> bytes:
    """The ``dtype`` field of a Tensor message (the same few bytes for every tensor of a dtype)."""
    name = codec.dtype_name(dtype).encode()
    return _DTYPE + varint(len(name)) + name


@functools.lru_cache(maxsize=1024)
def _map_key(name: str) -> bytes:
    """An ``outputs`` entry's key field (output names repeat on every reply)."""
    key = name.encode()
    return _MAP_KEY + varint(len(key)) + key


def tensor_parts(t: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[list, int]:
    """A ``Tensor`` message as buffers to join (the data one is a view of ``t``) and its length."""
    dtype = _dtype_field(t.dtype)
    parts: list = [dtype]
    n = len(dtype)
    n += _bytes_field(parts, _SHAPE, b"".join([varint(int(d)) for d in t.shape]))
    n += _bytes_field(parts, _DATA, _view(t))
    if scales is not None:
        n += _bytes_field(parts, _SCALES, _view(scales.detach().float()))
    return parts, n


def entry_parts(name: str, t: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[list, int]:
    """One ``outputs`` map entry (field 1 of TargetsReply) as buffers to join, and its length."""
    value, vlen = tensor_parts(t, scales)
    key = _map_key(name)
    vhead = _MAP_VALUE + varint(vlen)
    ilen = len(key) + len(vhead) + vlen
    head = _ENTRY + varint(ilen)
    return [head, key, vhead, *value], len(head) + ilen


class EncodedReply:
    """A serialised TargetsReply with what metrics count, read without parsing it.

    ``parts``: the buffers whose concatenation is the message (tensor data as views); ``data``
    joins them once, on first use (what gRPC sends); ``nbytes`` is the message's length.
    """

    __slots__ = ("parts", "samples", "payload_bytes", "nbytes")

    def __init__(self, parts: list, samples: int, payload_bytes: int):
        self.parts = parts
        self.samples = samples  # dim 0 of the outputs
        self.payload_bytes = payload_bytes  # tensor data + int8 scales: kdserve.wire.reply_bytes of the parsed message
        self.nbytes = sum(memoryview(p).nbytes for p in parts)

    @property
    def data(self) -> bytes:
        if len(self.parts) != 1 or not isinstance(self.parts[0], bytes):
            self.parts = [b"".join(self.parts)]
        return self.parts[0]


def encode_reply(
    header: pb.TargetsReply, outputs: Iterable[tuple[str, torch.Tensor, torch.Tensor | None]]
) -> EncodedReply:
    """``header`` (every field but ``outputs``) plus ``outputs`` as (name, tensor, scales or None)."""
    parts: list = []
    samples = payload = 0
    for name, t, scales in outputs:
        p, _ = entry_parts(name, t, scales)
        parts += p
        samples = samples or (int(t.shape[0]) if t.dim() else 0)
        payload += t.numel() * t.element_size() + (4 * scales.numel() if scales is not None else 0)
    parts.append(header.SerializeToString())  # fields 2.. after field 1, protobuf's own order
    return EncodedReply(parts, samples, payload)


def identity(reply: EncodedReply) -> bytes:
    """gRPC response serializer for an EncodedReply: the bytes are the message already."""
    return reply.data


# -- reading: the client's side ------------------------------------------------------------------
class WireTensor:
    """A ``Tensor`` of a parsed reply whose ``data``/``scales`` are views of the received bytes.

    Duck-types the message for ``kdserve.codec`` (``to_numpy``, ``decode``, ``nbytes``): decoding
    reads the tensor where gRPC put it, where ``TargetsReply.FromString`` and each read of
    ``msg.data`` would have copied it twice.
    """

    __slots__ = ("dtype", "shape", "data", "scales")

    def __init__(self, dtype: str = "", shape: tuple = (), data=b"", scales=b""):
        self.dtype, self.shape, self.data, self.scales = dtype, shape, data, scales

    def to_message(self) -> pb.Tensor:
        return pb.Tensor(dtype=self.dtype, shape=self.shape, data=bytes(self.data), scales=bytes(self.scales))


class WireReply:
    """A TargetsReply read from its wire bytes: ``outputs`` holds WireTensors (views of ``data``),
    every other field comes from a small TargetsReply parsed by protobuf (``header``)."""

    def __init__(self, data: bytes, header: pb.TargetsReply, outputs: dict[str, WireTensor], size: int | None = None):
        self.data, self.header, self.outputs = data, header, outputs
        self._size = len(data) if size is None else size

    def __getattr__(self, name: str):  # fingerprint, timings, sample_keys, sample_offset, num_chunks
        if name == "header":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.header, name)

    def ByteSize(self) -> int:  # noqa: N802  (the message's method name)
        """Bytes received (for a reply joined from rows: the rows' sum)."""
        return self._size

    def to_message(self) -> pb.TargetsReply:
        """The protobuf message (copies every tensor: for tests and tools, not the hot path)."""
        msg = pb.TargetsReply()
        msg.CopyFrom(self.header)
        for name, t in self.outputs.items():
            msg.outputs[name].CopyFrom(t.to_message())
        return msg


class WireError(ValueError):
    """Bytes that are not a well-formed TargetsReply."""


def _read_varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= end or shift > 63:
            raise WireError("truncated or overlong varint")
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i
        shift += 7


def _fields(buf: memoryview, i: int, end: int):
    """(field number, wire type, value or (start, stop) of a length-delimited one, start of the field)."""
    while i < end:
        start = i
        key, i = _read_varint(buf, i, end)
        field, kind = key >> 3, key & 7
        if kind == 0:
            value, i = _read_varint(buf, i, end)
        elif kind == 2:
            n, i = _read_varint(buf, i, end)
            if i + n > end:
                raise WireError(f"field {field}: {n} bytes announced, {end - i} left")
            value, i = (i, i + n), i + n
        elif kind in (1, 5):
            i += 8 if kind == 1 else 4
            if i > end:
                raise WireError(f"field {field}: truncated fixed-width value")
            value = None
        else:
            raise WireError(f"field {field}: unsupported wire type {kind}")
        yield field, kind, value, start, i


def _signed(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


def _tensor(buf: memoryview, i: int, end: int) -> WireTensor:
    t = WireTensor()
    shape: list[int] = []
    for field, kind, value, _, _ in _fields(buf, i, end):
        if field == 1 and kind == 2:
            t.dtype = str(buf[value[0]:value[1]], "utf-8")
        elif field == 2 and kind == 2:  # packed
            j, stop = value
            while j < stop:
                d, j = _read_varint(buf, j, stop)
                shape.append(_signed(d))
        elif field == 2 and kind == 0:  # unpacked: parsers must accept both
            shape.append(_signed(value))
        elif field == 3 and kind == 2:
            t.data = buf[value[0]:value[1]]
        elif field == 4 and kind == 2:
            t.scales = buf[value[0]:value[1]]
    t.shape = tuple(shape)
    return t


def parse_reply(data: bytes) -> WireReply:
    """TargetsReply wire bytes -> WireReply, without copying the tensors; raises WireError.

    Later occurrences of a map key win, as in protobuf's parser.
    """
    try:
        return _parse(data)
    except UnicodeDecodeError as e:
        raise WireError(f"a string field is not UTF-8: {e}") from None


def _parse(data: bytes) -> WireReply:
    buf = memoryview(data)
    outputs: dict[str, WireTensor] = {}
    rest: list[memoryview] = []
    for field, kind, value, start, stop in _fields(buf, 0, len(buf)):
        if field == 1 and kind == 2:
            key, tensor = "", WireTensor()
            for f, k, v, _, _ in _fields(buf, *value):
                if f == 1 and k == 2:
                    key = str(buf[v[0]:v[1]], "utf-8")
                elif f == 2 and k == 2:
                    tensor = _tensor(buf, *v)
            outputs[key] = tensor
        else:
            rest.append(buf[start:stop])
    try:
        header = pb.TargetsReply.FromString(b"".join(rest))
    except Exception as e:  # noqa: BLE001  (protobuf's DecodeError)
        raise WireError(f"reply fields: {e}") from None
    return WireReply(data, header, outputs)


def split_field(data: bytes, field: int) -> tuple[bytes, list[memoryview]]:
    """A message's wire bytes -> (the bytes of every other field, views of each occurrence of the
    length-delimited ``field``): for any message whose one big bytes field should not be copied
    (e.g. Triton's ``ModelInferResponse.raw_output_contents``). Raises WireError."""
    buf = memoryview(data)
    rest: list[memoryview] = []
    found: list[memoryview] = []
    for f, kind, value, start, stop in _fields(buf, 0, len(buf)):
        if f == field and kind == 2:
            found.append(buf[value[0]:value[1]])
        else:
            rest.append(buf[start:stop])
    return b"".join(rest), found


__all__ = ["EncodedReply", "WireError", "WireReply", "WireTensor", "encode_reply", "entry_parts", "identity",
           "parse_reply", "split_field", "tensor_parts", "varint"]
