"""Seeded fuzzing of the plain gRPC frontend: malformed TargetsRequests never reach INTERNAL/UNKNOWN.

Each case starts from a valid request for the tiny ViT or MiniLM teacher and applies one to three
random mutations (dtypes, shapes, huge/zero/negative/overflowing dims, wrong byte lengths, scales,
NaN/Inf, unknown modules and layers, reductions, options, ids, keys, huge and non-printable
strings, raw texts that are not UTF-8, blank, long or too many). Every answer must be OK,
INVALID_ARGUMENT or RESOURCE_EXHAUSTED, with a bounded, printable message, and the server must
answer a good request afterwards.
"""
from __future__ import annotations

import collections
import math
import random
import struct

import grpc
import numpy as np
import pytest
import torch

from kdserve import codec, wire
from kdserve.v1 import teacher_pb2 as pb
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.engine import TeacherEngine
from teacher_server.grpc_server import run_server
from teacher_server.spec import MESSAGE_CHARS, bounded, shown
from tests.conftest import minilm_config, tiny_vit_config

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
N_VIT, N_TEXT = 240, 120
WEIRD_STRINGS = ["", "ü", "漢字🚀", "\x00\x01\x7f", "a\nb\tc", "\u202e\u200b", "x" * 5000, "é" * 300, "vision ", "VISION"]
DIMS = [0, 1, 2, 3, 7, 8, 9, 17, 32, 511, 512, 513, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, -1, -(2**63)]


def _text_inputs(rng: random.Random) -> dict[str, torch.Tensor]:
    b, t = rng.randint(1, 3), rng.randint(2, 12)
    ids = torch.randint(1000, 2000, (b, t), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _valid(rng: random.Random, text: bool) -> pb.TargetsRequest:
    if text:
        inputs = _text_inputs(rng)
        spec = wire.target_spec(hidden={"text": [rng.choice([1, 3, -1])]}, dtype=rng.choice(["float32", "int8"]))
    else:
        inputs = {"pixel_values": torch.rand(rng.randint(1, 3), 3, 32, 32, generator=torch.Generator().manual_seed(rng.randrange(2**31)))}
        spec = wire.target_spec(hidden={"vision": [1, -1]}, attention={"vision": [2]}, logits=rng.random() < 0.5)
    b = next(iter(inputs.values())).shape[0]
    return wire.build_request(inputs, spec, experiment_id="fuzz", sample_keys=[f"k{i}" for i in range(b)])


def _a_tensor(req: pb.TargetsRequest, rng: random.Random) -> pb.Tensor:
    if not req.inputs:
        req.inputs["pixel_values"].dtype = "float32"
    return req.inputs[rng.choice(sorted(req.inputs))]


# -- mutations: each edits the request in place ------------------------------------------------------
def m_dtype(req, rng):
    _a_tensor(req, rng).dtype = rng.choice([*codec.DTYPES, "float64", "int16", "bool", *WEIRD_STRINGS])


def m_dtype_reinterpret(req, rng):
    """The same bytes under another valid dtype (lengths may or may not fit)."""
    t = _a_tensor(req, rng)
    t.dtype = rng.choice(codec.DTYPES)


def m_shape(req, rng):
    t = _a_tensor(req, rng)
    del t.shape[:]
    t.shape.extend(rng.choice(DIMS) for _ in range(rng.randint(0, 6)))


def m_one_dim(req, rng):
    t = _a_tensor(req, rng)
    if t.shape:
        t.shape[rng.randrange(len(t.shape))] = rng.choice(DIMS)


def m_overflow_shape(req, rng):
    """Dims whose int64 product wraps to the data's length (0 or a small number)."""
    t = _a_tensor(req, rng)
    del t.shape[:]
    t.shape.extend(rng.choice([[2**32, 2**32, 3, 32], [2**62, 4, 1, 1], [2**63 - 1, 2, 3, 32], [1, 2**40, 2**24]]))
    if rng.random() < 0.5:
        t.data = b""


def m_many_dims(req, rng):
    t = _a_tensor(req, rng)
    del t.shape[:]
    t.shape.extend([1] * rng.choice([5, 64, 1000]))


def m_data(req, rng):
    t = _a_tensor(req, rng)
    t.data = rng.choice([b"", t.data[:-1], t.data + b"\0", t.data[: len(t.data) // 2], rng.randbytes(rng.randint(0, 64))])


def m_scales(req, rng):
    t = _a_tensor(req, rng)
    rows = min(4096, abs(math.prod(int(d) for d in t.shape[:-1]))) if t.shape else 1
    t.scales = rng.choice([b"\0\0\x80?", b"\0" * 4 * rows, rng.randbytes(3), struct.pack("<f", float("nan")) * rows])


def m_nonfinite(req, rng):
    t = req.inputs.get("pixel_values")
    if t is None or t.dtype != "float32" or len(t.data) < 4:
        return m_shape(req, rng)
    arr = np.frombuffer(t.data, dtype="<f4").copy()
    idx = rng.sample(range(arr.size), k=min(arr.size, rng.randint(1, 5)))
    arr[idx] = rng.choice([np.nan, np.inf, -np.inf])
    t.data = arr.tobytes()


def m_token_values(req, rng):
    t = req.inputs.get("input_ids") or req.inputs.get("attention_mask")
    if t is None or t.dtype != "int64":
        return m_dtype(req, rng)
    arr = np.frombuffer(t.data, dtype="<i8").copy()
    arr[rng.randrange(arr.size)] = rng.choice([-1, 2, 30522, 2**31, -(2**63), 2**63 - 1])
    t.data = arr.tobytes()


def m_extra_input(req, rng):
    name = rng.choice(["token_type_ids", "attention_mask", "pixels", *WEIRD_STRINGS])
    src = _a_tensor(req, rng)
    req.inputs[name].CopyFrom(src)
    if name == "token_type_ids" and src.dtype == "int64":
        arr = np.frombuffer(src.data, dtype="<i8").copy()
        arr[:] = rng.choice([0, 1, 2, 7, -3])
        req.inputs[name].data = arr.tobytes()


def m_drop_input(req, rng):
    if req.inputs:
        del req.inputs[rng.choice(sorted(req.inputs))]


def m_long_sequence(req, rng):
    if "input_ids" not in req.inputs:
        return m_one_dim(req, rng)
    t = rng.choice([513, 600, 2000])
    ids = torch.randint(1000, 2000, (1, t), generator=torch.Generator().manual_seed(t))
    if "attention_mask" in req.inputs:
        del req.inputs["attention_mask"]
    req.inputs["input_ids"].CopyFrom(codec.encode(ids))
    del req.sample_keys[:]


def m_mismatched_mask(req, rng):
    if "attention_mask" not in req.inputs or len(req.inputs["input_ids"].shape) != 2:
        return m_one_dim(req, rng)
    b, t = (min(8, int(d)) for d in req.inputs["input_ids"].shape)
    req.inputs["attention_mask"].CopyFrom(codec.encode(torch.ones(b, t + rng.choice([-1, 1, 5]), dtype=torch.int64)))


def m_module(req, rng):
    sel = rng.choice([req.spec.hidden, req.spec.attention])
    sel.add(module=rng.choice(["audio", "text", "vision", *WEIRD_STRINGS]), layers=[1])


def m_layers(req, rng):
    sel = rng.choice([req.spec.hidden, req.spec.attention])
    if not len(sel):
        sel.add()
    lay = sel[0].layers
    del lay[:]
    lay.extend(rng.choice([[], [0], [4], [-4], [2**31 - 1], [-(2**31)], [1] * 5000, list(range(-3, 4))]))


def m_reduction(req, rng):
    field = rng.choice(["hidden_reduction", "attention_reduction"])
    setattr(req.spec, field, rng.choice(["data2vec", "head_mean", "none", "pca", *WEIRD_STRINGS]))


def m_options(req, rng):
    s = req.spec
    what = rng.randrange(4)
    if what == 0:
        s.hidden_reduction = "data2vec"
        s.data2vec_eps = rng.choice([float("nan"), float("inf"), float("-inf"), -1.0, 1e300, 5e-324, 0.0])
    elif what == 1:
        s.logits = rng.random() < 0.5
        s.logits_top_k = rng.choice([-1, 0, 1, 10, 11, 2**31 - 1])
    elif what == 2:
        s.dtype = rng.choice(["float64", "int8", "bfloat16", "uint8", *WEIRD_STRINGS])
    else:
        req.spec.Clear()


def m_experiment(req, rng):
    req.experiment_id = rng.choice(["Versuch-ü-漢字-🚀", "e" * 129, "x" * 100_000, "\x00run", "ok-run", "tab\there"])


def m_keys(req, rng):
    what = rng.randrange(3)
    if what == 0:
        req.sample_keys.append("extra")
    elif what == 1 and req.sample_keys:
        req.sample_keys[0] = rng.choice(WEIRD_STRINGS)
    else:
        del req.sample_keys[:]
        req.sample_keys.extend(["k" * 300_000] * 4)  # 1.2 MB: over the 1 MiB request limit


WEIRD_TEXTS = [b"", b" \t\n", b"\xff\xfe", b"\xed\xa0\x80", b"\xc3", "漢字🚀".encode(), b"a cat", b"\x00\x01",
               "é".encode() * 300, b"x" * 70_000]


def m_texts(req, rng):
    """Raw texts (issue #25): alone or beside the tensors, some not UTF-8, blank, long or too many,
    with no, another or a junk tokenizer fingerprint."""
    req.texts.extend(rng.choice(WEIRD_TEXTS) for _ in range(rng.choice([1, 2, 3, 9, 100])))
    if rng.random() < 0.6:
        req.inputs.clear()
        del req.sample_keys[:]
    req.text_tokenizer = rng.choice(["", "0" * 32, *WEIRD_STRINGS])
    if rng.random() < 0.5:
        req.spec.hidden_reduction = "mean"


def m_empty(req, rng):
    req.Clear()
    if rng.random() < 0.5:
        req.experiment_id = "only-an-id"


MUTATIONS = [m_dtype, m_dtype_reinterpret, m_shape, m_one_dim, m_overflow_shape, m_many_dims, m_data, m_scales,
             m_nonfinite, m_token_values, m_extra_input, m_drop_input, m_long_sequence, m_mismatched_mask, m_module,
             m_layers, m_reduction, m_options, m_experiment, m_keys, m_empty, m_texts]


def generate(seed: int, n: int, text: bool) -> list[tuple[str, pb.TargetsRequest]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        req = _valid(rng, text)
        muts = rng.sample(MUTATIONS, k=rng.choice([1, 1, 2, 3]))
        for m in muts:
            m(req, rng)
        out.append(("+".join(m.__name__[2:] for m in muts), req))
    return out


@pytest.fixture(scope="module")
def servers():
    limits = dict(max_batch_size=8, max_request_bytes=1 << 20, max_reply_bytes=1 << 20, stream_chunk_bytes=16 << 10)
    vit = TeacherEngine.from_config(tiny_vit_config(**limits))
    text = TeacherEngine.from_config(minilm_config(**limits))
    with run_server(vit, health_interval_s=0) as p1, run_server(text, health_interval_s=0) as p2:
        yield {"vit": (vit, p1), "text": (text, p2)}


def _call(stub, req: pb.TargetsRequest, stream: bool) -> tuple[grpc.StatusCode, str]:
    try:
        if stream:
            list(stub.StreamTargets(req, timeout=60))
        else:
            stub.GetTargets(req, timeout=60)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


@pytest.mark.parametrize("which,n,seed", [("vit", N_VIT, 0), ("text", N_TEXT, 1)])
def test_fuzz_no_internal_and_server_lives(servers, which, n, seed):
    engine, port = servers[which]
    counts: collections.Counter = collections.Counter()
    failures = []
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        cases = generate(seed, n, text=which == "text")
        for i, (name, req) in enumerate(cases):
            code, msg = _call(stub, req, stream=i % 4 == 3)
            counts[code.name] += 1
            if code not in ALLOWED or len(msg) > MESSAGE_CHARS or not msg.isprintable() or "Traceback" in msg:
                failures.append((name, code.name, msg[:300]))
        good = _valid(random.Random(99), text=which == "text")
        reply = stub.GetTargets(good, timeout=60)
        assert reply.fingerprint == engine.fingerprint
    print(f"\nfuzz {which}: {n} requests -> {dict(sorted(counts.items()))}")
    assert not failures, failures[:10]
    assert counts["INVALID_ARGUMENT"] > n // 2  # the generator really produces bad requests
    assert counts["OK"] > 0  # ... and some that mutate into valid ones (eg. a non-ASCII experiment id)


@pytest.mark.parametrize("field,value,word", [
    ("overflow", [2**32, 2**32, 3, 32], "dim"),
    ("zero dim", [1, 3, 0, 32], "dim 2 is 0"),
    ("huge dim", [1, 3, 2**40, 32], "dim 2"),
])
def test_overflowing_and_zero_shapes_invalid(servers, field, value, word):
    _, port = servers["vit"]
    req = _valid(random.Random(0), text=False)
    t = req.inputs["pixel_values"]
    del t.shape[:]
    t.shape.extend(value)
    t.data = b""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        code, msg = _call(pb_grpc.TeacherServiceStub(ch), req, stream=False)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and word in msg


def test_specific_bad_values_invalid(servers):
    """NaN/Inf inputs, NaN eps, scales on float32, token_type_ids out of range: INVALID_ARGUMENT, named."""
    _, vport = servers["vit"]
    _, tport = servers["text"]
    nan_img = torch.rand(1, 3, 32, 32)
    nan_img[0, 1, 2, 3] = float("nan")
    inf_img = torch.rand(1, 3, 32, 32)
    inf_img[0, 0, 0, 0] = float("-inf")
    spec = wire.target_spec(hidden={"vision": [1]})
    scaled = wire.build_request({"pixel_values": torch.rand(1, 3, 32, 32)}, spec)
    scaled.inputs["pixel_values"].scales = b"\0\0\x80?" * 96
    ids = torch.tensor([[101, 2000, 102]])
    cases = [
        (vport, wire.build_request({"pixel_values": nan_img}, spec), "1 of 3072 values are NaN or infinite"),
        (vport, wire.build_request({"pixel_values": inf_img}, spec), "NaN or infinite"),
        (vport, scaled, "scales are only for int8"),
        (tport, wire.build_request({"input_ids": ids}, wire.target_spec(
            hidden={"text": [1]}, hidden_reduction="data2vec", data2vec_eps=float("nan"))), "data2vec_eps"),
        (tport, wire.build_request({"input_ids": ids, "token_type_ids": torch.tensor([[0, 1, 2]])},
                                   wire.target_spec(hidden={"text": [1]})), "token_type_ids"),
        (tport, wire.build_request({"input_ids": torch.randint(1000, 2000, (1, 600))}, wire.target_spec(
            hidden={"text": [1]})), "at most 512"),
    ]
    for port, req, word in cases:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            code, msg = _call(pb_grpc.TeacherServiceStub(ch), req, stream=False)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (word, code, msg)
        assert word in msg


def test_messages_bounded_and_escaped(servers):
    _, port = servers["vit"]
    req = wire.build_request({"pixel_values": torch.rand(1, 3, 32, 32)},
                             wire.target_spec(hidden={"\x00evil\n" + "m" * 10_000: [1]}))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        code, msg = _call(pb_grpc.TeacherServiceStub(ch), req, stream=False)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown module '\\x00evil\\nmmm" in msg and "...(+" in msg
    assert len(msg) <= MESSAGE_CHARS and msg.isprintable()


@pytest.mark.unit
def test_sanitizers():
    assert shown("abc") == "'abc'"
    assert shown("a" * 70) == repr("a" * 64) + "...(+6 chars)"
    assert shown("\x1b[31mred") == "'\\x1b[31mred'"
    assert bounded("ok ü 漢") == "ok ü 漢"
    assert bounded("a\nb\x00") == "a\\nb\\x00"
    long = bounded("y" * 1000)
    assert len(long) == MESSAGE_CHARS and long.endswith("...")


# -- raw bytes on a plain channel: what a generated stub can never send ----------------------------
N_RAW = 240


def check_raw(channel: grpc.Channel, valid: list[bytes], n: int, seed: int, metadata=()) -> collections.Counter:
    """Send ``n`` hostile byte strings; assert every answer is an allowed status with a short,
    printable line that names no exception class. Returns the status counts."""
    from tests.raw_requests import call_raw, parses, raw_cases

    counts: collections.Counter = collections.Counter()
    failures = []
    for method, name, data in raw_cases(seed, n, valid):
        code, msg = call_raw(channel, method, data, metadata)
        counts[code.name] += 1
        bad_parse = method != "Describe" and not parses(data)
        if (code not in ALLOWED or len(msg) > MESSAGE_CHARS or not msg.isprintable() or "Traceback" in msg
                or "class" in msg or "Error" in msg or (bad_parse and code != grpc.StatusCode.INVALID_ARGUMENT)):
            failures.append((method, name, code.name, msg[:200]))
    assert not failures, failures[:10]
    return counts


@pytest.mark.parametrize("which,seed", [("vit", 3), ("text", 4)])
def test_raw_bytes_get_invalid_argument_never_unknown(servers, which, seed):
    engine, port = servers[which]
    rng = random.Random(seed)
    valid = [_valid(rng, text=which == "text").SerializeToString() for _ in range(8)]
    from teacher_server.metrics import get_metrics

    before = _malformed_count(get_metrics("prometheus"))
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
        counts = check_raw(ch, valid, N_RAW, seed)
        reply = pb_grpc.TeacherServiceStub(ch).GetTargets(pb.TargetsRequest.FromString(valid[0]), timeout=60)
        assert reply.fingerprint == engine.fingerprint  # the server answers good requests after
    print(f"\nraw fuzz {which}: {N_RAW} requests -> {dict(sorted(counts.items()))}")
    assert counts["INVALID_ARGUMENT"] > N_RAW // 2
    assert _malformed_count(get_metrics("prometheus")) > before  # counted in the metrics


def _malformed_count(metrics) -> float:
    return sum(s.value for m in metrics.malformed_requests.metric.collect() for s in m.samples
               if s.name.endswith("_total"))


def test_malformed_message_is_fixed_text(servers):
    """The message is ours: the method's message name and the size, nothing of the parser's."""
    from tests.raw_requests import call_raw

    _, port = servers["vit"]
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
        code, msg = call_raw(ch, "GetTargets", b"\x0a\x02\xff\xfe")  # experiment_id: invalid UTF-8
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert msg == "the request is not a valid kdserve.v1.TargetsRequest message (4 bytes)"
        code, msg = call_raw(ch, "Describe", b"\xff")
        assert (code, msg) == (grpc.StatusCode.INVALID_ARGUMENT,
                               "the request is not a valid kdserve.v1.DescribeRequest message (1 bytes)")


def test_nonfinite_targets_refused_naming_the_output(servers):
    """Finite inputs of 1e30 overflow inside the teacher: INVALID_ARGUMENT naming an output, not NaN targets."""
    engine, port = servers["vit"]
    x = torch.full((2, 3, 32, 32), 1e30)
    req = wire.build_request({"pixel_values": x}, wire.target_spec(hidden={"vision": [-1]}, logits=True), "huge")
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
        stub = pb_grpc.TeacherServiceStub(ch)
        for call in (lambda: stub.GetTargets(req, timeout=60), lambda: list(stub.StreamTargets(req, timeout=60))):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "NaN or Inf" in e.value.details() and "output 'hidden.vision.3'" in e.value.details()
        # the same model on the same batch size, sane inputs: answered (the refusal is about values)
        ok = stub.GetTargets(wire.build_request({"pixel_values": torch.rand(2, 3, 32, 32)},
                                                wire.target_spec(hidden={"vision": [-1]}, logits=True), "sane"),
                             timeout=60)
        assert ok.outputs
