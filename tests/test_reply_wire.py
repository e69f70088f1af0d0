"""kdserve.reply_wire: hand-built TargetsReply bytes against the messages protobuf builds."""
from __future__ import annotations

import pytest
import torch

from kdserve import codec, wire
from kdserve.reply_wire import WireError, encode_reply, parse_reply, varint
from kdserve.teacher_config import TeacherConfig
from kdserve.v1 import teacher_pb2 as pb
from kdserve.wire import build_request, target_spec
from teacher_server.engine import TeacherEngine
from teacher_server.service import TeacherService

pytestmark = pytest.mark.unit

TEXT = "synthetic:input=text,layers=3,dim=6,heads=3,classes=4,vocab=50,max_len=16,latency_ms=0"
SPECS = [
    dict(hidden={"": [1, 3]}),
    dict(hidden={"": [2]}, dtype="float16"),
    dict(hidden={"": [2]}, dtype="bfloat16"),
    dict(hidden={"": [1, 2]}, dtype="int8"),
    dict(hidden={"": []}, hidden_reduction="data2vec", dtype="int8"),
    dict(attention={"": [-1]}, attention_reduction="head_mean", dtype="float16"),
    dict(hidden={"": [1]}, attention={"": [2]}, logits=True, logits_top_k=2, dtype="float16"),
]


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 2**31, 2**63 - 1])
def test_varint_matches_protobuf(n):
    # Tensor.shape (field 2, packed int64): tag byte 0x12, the length, then the varint
    v = varint(n)
    assert pb.Tensor(shape=[n]).SerializeToString() == b"\x12" + bytes([len(v)]) + v


def test_negative_varint_is_ten_bytes_twos_complement():
    assert pb.Tensor(shape=[-1]).SerializeToString() == b"\x12\x0a" + varint(-1)
    assert len(varint(-1)) == 10


@pytest.fixture(scope="module")
def service():
    return TeacherService(TeacherEngine.from_config(TeacherConfig(model=TEXT, device="cpu", stream_chunk_bytes=200)))


def _answer(service, spec, keys=("a", "b", "c")):
    request = build_request({"input_ids": torch.randint(0, 50, (3, 9), generator=torch.Generator().manual_seed(0))},
                            spec, sample_keys=keys)
    work = service.prepare(request, stream=True)
    (outputs,), stats = service.engine.run([work])
    return request, work, outputs, stats


@pytest.mark.parametrize("kw", SPECS, ids=[str(i) for i in range(len(SPECS))])
def test_encoded_reply_parses_to_the_protobuf_reply(service, kw):
    request, work, outputs, stats = _answer(service, target_spec(**kw))
    built = service.reply(request, work, outputs, stats, 1.5)
    enc = service.reply(request, work, outputs, stats, 1.5, encoded=True)
    parsed = pb.TargetsReply.FromString(enc.data)
    assert parsed == built
    assert len(enc.data) == built.ByteSize()
    assert enc.samples == wire.reply_samples(built) == 3
    assert enc.payload_bytes == wire.reply_bytes(built)
    dec, ref = codec.decode_map(parsed.outputs), codec.decode_map(built.outputs)
    assert dec.keys() == ref.keys()
    for k in ref:
        assert dec[k].dtype == ref[k].dtype and torch.equal(dec[k], ref[k])


def test_encoded_chunks_parse_to_the_protobuf_chunks(service):
    request, work, outputs, stats = _answer(service, target_spec(hidden={"": [1, 2]}, logits=True, dtype="int8"))
    built = list(service.chunks(request, work, outputs, stats, 0.0))
    enc = list(service.chunks(request, work, outputs, stats, 0.0, encoded=True))
    assert len(built) == len(enc) > 1  # stream_chunk_bytes=200 splits 3 samples
    for b, e in zip(built, enc):
        assert pb.TargetsReply.FromString(e.data) == b
        assert e.samples == wire.reply_samples(b) and e.payload_bytes == wire.reply_bytes(b)
    merged = wire.merge_chunks([pb.TargetsReply.FromString(e.data) for e in enc])
    whole = codec.decode_map(service.reply(request, work, outputs, stats, 0.0).outputs)
    assert all(torch.equal(merged[k], whole[k]) for k in whole)


def test_single_output_is_byte_identical_to_protobuf():
    """With one output (no map ordering to differ) the bytes equal protobuf's serialisation."""
    t = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    header = pb.TargetsReply(fingerprint="fp", sample_keys=["x", "y"], sample_offset=2, num_chunks=3,
                             timings=pb.Timings(queue_ms=1.0, batch_samples=2))
    ref = pb.TargetsReply()
    ref.CopyFrom(header)
    codec.encode_into(ref.outputs["hidden..1"], t)
    assert encode_reply(header, [("hidden..1", t, None)]).data == ref.SerializeToString(deterministic=True)


def test_empty_and_scalar_tensors_round_trip():
    header = pb.TargetsReply(fingerprint="f")
    outs = [("empty", torch.zeros(0, 5), None), ("scalar", torch.tensor(3.5), None),
            ("q", torch.tensor([[1, -2], [3, 4]], dtype=torch.int8), torch.tensor([0.5, 2.0]))]
    parsed = pb.TargetsReply.FromString(encode_reply(header, outs).data)
    assert list(parsed.outputs["empty"].shape) == [0, 5] and parsed.outputs["empty"].data == b""
    assert list(parsed.outputs["scalar"].shape) == [] and codec.decode(parsed.outputs["scalar"]).item() == 3.5
    q = codec.decode(parsed.outputs["q"])  # dequantised: int8 * per-row scale
    assert torch.equal(q, torch.tensor([[0.5, -1.0], [6.0, 8.0]]))


# -- parse_reply: the client's zero-copy reading -------------------------------------------------
def _same(wire_reply, message: pb.TargetsReply) -> None:
    """Every field of the parsed reply equals the protobuf message's, tensors decoded alike."""
    assert wire_reply.to_message() == message
    for f in ("fingerprint", "sample_offset", "num_chunks"):
        assert getattr(wire_reply, f) == getattr(message, f)
    assert list(wire_reply.sample_keys) == list(message.sample_keys)
    assert wire_reply.timings == message.timings
    assert wire.reply_bytes(wire_reply) == wire.reply_bytes(message)
    got, ref = codec.decode_map(wire_reply.outputs), codec.decode_map(message.outputs)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].dtype == ref[k].dtype and got[k].shape == ref[k].shape and torch.equal(got[k], ref[k])


@pytest.mark.parametrize("kw", SPECS, ids=[str(i) for i in range(len(SPECS))])
def test_parse_reply_of_protobuf_bytes(service, kw):
    request, work, outputs, stats = _answer(service, target_spec(**kw))
    built = service.reply(request, work, outputs, stats, 2.5)
    _same(parse_reply(built.SerializeToString()), built)  # what Ray Serve's proxy sends
    _same(parse_reply(service.reply(request, work, outputs, stats, 2.5, encoded=True).data), built)


def test_parse_reply_reads_views_of_the_received_bytes():
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    data = encode_reply(pb.TargetsReply(), [("x", t, None)]).data
    x = parse_reply(data).outputs["x"]
    assert isinstance(x.data, memoryview) and x.data.obj is data  # no copy of the tensor
    assert torch.equal(codec.decode(x), t)


def test_parse_reply_accepts_unpacked_shape_and_unknown_fields():
    # Tensor: dtype "int8", shape 2 then 3 unpacked (wire type 0), unknown field 9 (varint 7), data
    tensor = b"\x0a\x04int8" + b"\x10\x02" + b"\x10\x03" + b"\x48\x07" + b"\x1a\x06" + bytes(range(6))
    entry = b"\x0a\x01q" + b"\x12" + bytes([len(tensor)]) + tensor
    data = b"\x0a" + bytes([len(entry)]) + entry + b"\x12\x02fp"
    r = parse_reply(data)
    assert r.fingerprint == "fp" and r.outputs["q"].shape == (2, 3)
    assert torch.equal(codec.decode(r.outputs["q"]), torch.arange(6, dtype=torch.int8).reshape(2, 3))
    ref = pb.TargetsReply.FromString(data)
    ref.DiscardUnknownFields()  # the unknown field is skipped, as a reader ignores it
    assert r.to_message() == ref


@pytest.mark.parametrize("data", [
    b"\x0a\x05abc",  # entry announces 5 bytes, 3 follow
    b"\x0a\x02\x12\x09",  # tensor announces 9 bytes inside a 2-byte entry
    b"\x80",  # truncated varint
    b"\x0b",  # wire type 3 (groups): not in this protocol
    b"\x12\x03\xff\xfe\xfd",  # fingerprint that is not UTF-8
    b"\x0a\x03\x0a\x01\xff",  # output name that is not UTF-8
])
def test_parse_reply_refuses_malformed_bytes(data):
    with pytest.raises(WireError):
        parse_reply(data)


def test_split_field_views_one_field_and_keeps_the_rest():
    from kdserve.reply_wire import split_field

    msg = pb.TargetsRequest(experiment_id="exp", sample_keys=["a", "bc", ""], spec=target_spec(logits=True))
    number = pb.TargetsRequest.DESCRIPTOR.fields_by_name["sample_keys"].number
    rest, found = split_field(msg.SerializeToString(), number)
    assert [bytes(v) for v in found] == [b"a", b"bc", b""]  # every occurrence, in order
    assert all(isinstance(v, memoryview) for v in found)
    expect = pb.TargetsRequest()
    expect.CopyFrom(msg)
    del expect.sample_keys[:]
    assert pb.TargetsRequest.FromString(rest) == expect
    with pytest.raises(WireError):
        split_field(msg.SerializeToString()[:-1], number)  # a length that runs past the end
