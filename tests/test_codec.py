"""Codec: round trips for every dtype, zero-copy decode, int8 error bound, malformed messages."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdserve import codec
from kdserve.targets import quantize_int8
from kdserve.v1 import teacher_pb2 as pb

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.int64])
def test_round_trip_every_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 5, generator=g) * 50).to(dtype)
    msg = codec.encode(x)
    assert msg.dtype == codec.dtype_name(dtype)
    assert list(msg.shape) == [2, 3, 5]
    assert len(msg.data) == x.numel() * x.element_size()
    # through real protobuf serialisation, as on the wire
    back = codec.decode(pb.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == dtype
    assert torch.equal(back, x)


def test_bytes_are_little_endian_row_major():
    x = torch.tensor([[1, 2], [3, 256]], dtype=torch.int32)
    msg = codec.encode(x)
    # written out by hand: 4 little-endian int32 in C order
    assert msg.data == bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0])


def test_non_contiguous_and_scalar():
    x = torch.arange(12, dtype=torch.float32).view(3, 4).t()
    assert torch.equal(codec.decode(codec.encode(x)), x)
    s = torch.tensor(3.5)
    assert codec.decode(codec.encode(s)).item() == 3.5


def test_decode_is_zero_copy():
    """The decoded tensor must point into the received bytes, not into a copy of them."""
    x = torch.randn(4, 8)
    raw = x.numpy().tobytes()
    msg = SimpleNamespace(dtype="float32", shape=[4, 8], data=raw, scales=b"")
    t = codec.decode(msg)
    base = np.frombuffer(raw, dtype=np.uint8).ctypes.data
    assert base <= t.data_ptr() < base + len(raw)
    assert torch.equal(t, x)


def test_int8_error_bound():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 64, generator=g) * torch.linspace(0.01, 100, 7).view(1, 7, 1)
    msg = codec.encode(*quantize_int8(x))
    assert msg.dtype == "int8" and len(msg.scales) == 3 * 7 * 4
    y = codec.decode(pb.Tensor.FromString(msg.SerializeToString()))
    bound = x.abs().amax(dim=-1, keepdim=True) / 254  # half a quantisation step per row
    assert torch.all((y - x).abs() <= bound * (1 + 1e-5) + 1e-12)
    raw = codec.decode(msg, dequantize=False)
    assert raw.dtype == torch.int8 and raw.abs().max() <= 127


def test_int8_zero_row():
    x = torch.zeros(2, 4)
    assert torch.equal(codec.decode(codec.encode(*quantize_int8(x))), x)


@pytest.mark.parametrize("dtype,tol", [("float16", 1e-3), ("bfloat16", 8e-3)])
def test_half_targets_within_tolerance(dtype, tol):
    x = torch.randn(5, 33)
    y = codec.decode(codec.encode(x.to(getattr(torch, dtype)))).float()
    assert torch.allclose(y, x, rtol=tol, atol=tol)


def test_malformed_messages_are_refused():
    with pytest.raises(codec.CodecError, match="needs 24 bytes"):
        codec.decode(pb.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 20))
    with pytest.raises(codec.CodecError, match="unknown dtype"):
        codec.decode(pb.Tensor(dtype="float64", shape=[1], data=b"\0" * 8))
    with pytest.raises(codec.CodecError, match="negative"):
        codec.decode(pb.Tensor(dtype="int8", shape=[-1], data=b""))
    with pytest.raises(codec.CodecError, match="cannot travel"):
        codec.encode(torch.zeros(2, dtype=torch.float64))
