"""Hostile request BYTES, as an operator's fuzzer sends them on a plain channel (no generated stub):
random bytes, truncated and mutated valid messages, wrong wire types, invalid UTF-8 in string
fields, lengths running past the end, deep nesting. Most do not parse as a TargetsRequest; the
rest parse into odd requests. Used by tests/test_fuzz*.py and bench/hostile.py.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator

import grpc

from kdserve.v1 import teacher_pb2 as pb

SERVICE = "/kdserve.v1.TeacherService/"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    """One protobuf field: tag, then ``payload`` (already a varint, fixed or length+bytes)."""
    return _varint(number << 3 | wire_type) + payload


def _ld(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def random_bytes(rng: random.Random, valid: bytes) -> bytes:
    return rng.randbytes(rng.choice([0, 1, 2, 7, 64, 1000, 4096]))


def truncated(rng: random.Random, valid: bytes) -> bytes:
    return valid[: rng.randrange(1, len(valid))]


def mutated(rng: random.Random, valid: bytes) -> bytes:
    b = bytearray(valid)
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(b)


def wrong_wire_type(rng: random.Random, valid: bytes) -> bytes:
    """A known field number with another wire type: varint for a string or message, fixed64 for a map."""
    number = rng.choice([1, 2, 3, 4])
    kind = rng.choice([0, 1, 5])
    payload = {0: _varint(rng.randrange(2**40)), 1: rng.randbytes(8), 5: rng.randbytes(4)}[kind]
    return valid + _field(number, kind, payload)


def bad_utf8(rng: random.Random, valid: bytes) -> bytes:
    """Invalid UTF-8 in a string field: experiment_id, a sample key, an input's name, a module name."""
    junk = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"ok\xfe\xfe", b"\xf8\x88\x80\x80\x80"])
    where = rng.choice(["experiment", "key", "input", "module", "dtype"])
    if where == "experiment":
        return valid + _ld(1, junk)
    if where == "key":
        return valid + _ld(3, junk)
    if where == "input":  # a map entry whose key is not UTF-8
        return valid + _ld(2, _ld(1, junk) + _ld(2, _ld(1, b"float32")))
    if where == "module":  # spec.hidden[0].module
        return valid + _ld(4, _ld(1, _ld(1, junk)))
    return valid + _ld(2, _ld(1, b"pixel_values") + _ld(2, _ld(1, junk)))


def overrun(rng: random.Random, valid: bytes) -> bytes:
    """A length prefix past the end of the message, or an unterminated varint."""
    if rng.random() < 0.5:
        return valid + _varint(2 << 3 | 2) + _varint(rng.choice([10, 2**20, 2**31, 2**63]))
    return valid + b"\x08" + b"\xff" * rng.randint(1, 12)


def deep_nesting(rng: random.Random, valid: bytes) -> bytes:
    """Unknown length-delimited fields nested a few hundred deep (parsers cap recursion)."""
    inner = b""
    for _ in range(rng.choice([50, 200, 1000])):
        inner = _ld(rng.choice([9, 15, 4]), inner)
    return valid + inner


def unknown_fields(rng: random.Random, valid: bytes) -> bytes:
    """Fields the schema does not know: parse fine, must be ignored."""
    return valid + _field(rng.randint(20, 500), 0, _varint(rng.randrange(2**20))) + _ld(rng.randint(20, 500), b"xyz")


MUTATORS: list[Callable[[random.Random, bytes], bytes]] = [
    random_bytes, truncated, mutated, wrong_wire_type, bad_utf8, overrun, deep_nesting, unknown_fields,
]


def raw_cases(seed: int, n: int, valid: list[bytes]) -> Iterator[tuple[str, str, bytes]]:
    """``n`` (method, mutator name, request bytes); ``valid``: serialized good TargetsRequests to
    start from. One in eight goes to Describe, one in four of the rest to StreamTargets."""
    rng = random.Random(seed)
    for i in range(n):
        mutate = MUTATORS[i % len(MUTATORS)]
        data = mutate(rng, rng.choice(valid))
        method = "Describe" if i % 8 == 7 else ("StreamTargets" if i % 4 == 3 else "GetTargets")
        yield method, mutate.__name__, data


def call_raw(channel: grpc.Channel, method: str, data: bytes, metadata=(), timeout: float = 60.0) -> tuple[grpc.StatusCode, str]:
    """Send ``data`` as the request of ``method`` without any serializer; (status, details)."""
    path = SERVICE + method
    try:
        if method == "StreamTargets":
            for _ in channel.unary_stream(path)(data, timeout=timeout, metadata=metadata):
                pass
        else:
            channel.unary_unary(path)(data, timeout=timeout, metadata=metadata)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def parses(data: bytes) -> bool:
    """Whether ``data`` is a valid TargetsRequest (what the server's parser will say)."""
    try:
        pb.TargetsRequest.FromString(data)
        return True
    except Exception:
        return False
