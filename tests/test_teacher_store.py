"""The served teacher's persistent target store (TeacherConfig ``store``, teacher_server/target_store.py):
a plain gRPC teacher writes what it computes back; a restarted teacher on the same store answers
the same request with no forward and the same bytes; another teacher's store is refused at startup."""
from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from kdserve import codec, wire
from kdserve.config import ConfigError
from kdserve.store import Manifest, TargetStore, sample_keys, spec_repr
from kdserve.v1 import teacher_pb2_grpc as pb_grpc
from teacher_server.coalesce import Coalescer
from teacher_server.engine import Quantized, TeacherEngine, Work
from teacher_server.grpc_server import run_server
from teacher_server.metrics import get_metrics
from teacher_server.spec import TargetSpec
from teacher_server.target_store import batch_of, rows_of, spec_dir
from tests.conftest import tiny_vit_config

pytest.importorskip("fsspec")

GEN = torch.Generator().manual_seed(1234)  # building a teacher reseeds torch's global generator


def images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=GEN)


SPECS = {  # float16 hidden + logits, and int8 (rows of q and scales)
    "fp16": wire.target_spec(hidden={"vision": [1, -1]}, logits=True, dtype="float16"),
    "int8": wire.target_spec(hidden={"vision": [2]}, dtype="int8"),
}


def teacher(store_uri: str, seed: int = 0, **store) -> TeacherEngine:
    """A tiny ViT teacher with its model forwards counted in ``engine.forwards`` (not the health
    check's probe, of zeros)."""
    engine = TeacherEngine.from_config(tiny_vit_config(max_batch_size=8, seed=seed,
                                                       store={"uri": store_uri, **store}))
    engine.forwards = 0
    forward = engine.adapter.forward

    def counting(inputs, *a, **k):
        engine.forwards += bool(next(iter(inputs.values())).any())
        return forward(inputs, *a, **k)

    engine.adapter.forward = counting
    return engine


def ask(engine: TeacherEngine, x: torch.Tensor, spec) -> dict[str, torch.Tensor]:
    """One GetTargets through a plain gRPC server on loopback (shut down after: the store flushes)."""
    with run_server(engine, metrics_port=0) as port:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=wire.CHANNEL_OPTIONS) as ch:
            reply = pb_grpc.TeacherServiceStub(ch).GetTargets(wire.build_request({"pixel_values": x}, spec))
    return codec.decode_map(reply.outputs, dequantize=False) | {"scales": {k: v.scales for k, v in reply.outputs.items()}}


def store_events() -> dict[str, float]:
    import prometheus_client

    get_metrics("prometheus")
    return {e: prometheus_client.REGISTRY.get_sample_value("kdserve_teacher_store_events_total", {"event": e}) or 0.0
            for e in ("hit", "miss", "write", "drop", "error")}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_restarted_teacher_answers_from_the_store_with_no_forward_and_the_same_bytes(tmp_path, name):
    x, spec = images(3), SPECS[name]
    before = store_events()
    first = teacher(str(tmp_path / "store"))
    got1 = ask(first, x, spec)
    assert first.forwards == 1
    after = store_events()
    assert after["miss"] - before["miss"] == 3 and after["write"] - before["write"] == 3
    restarted = teacher(str(tmp_path / "store"))  # a new engine and server: nothing in memory
    assert restarted.fingerprint == first.fingerprint
    got2 = ask(restarted, x, spec)
    assert restarted.forwards == 0
    assert store_events()["hit"] - after["hit"] == 3
    assert set(got1) == set(got2)
    for k in got1:
        if k != "scales":
            assert got1[k].dtype == got2[k].dtype and torch.equal(got1[k], got2[k]), k
    assert got1["scales"] == got2["scales"]  # int8's scales, byte for byte


def test_a_job_reads_the_teachers_store_with_its_own_keys(tmp_path):
    """What the teacher wrote is where a job that reads targets looks: <uri>/<spec_dir>/, its manifest
    (fingerprint, spec_repr) and kdserve.store.sample_keys of the inputs as sent."""
    x, spec = images(2), SPECS["fp16"]
    engine = teacher(str(tmp_path / "store"))
    got = ask(engine, x, spec)
    text = spec_repr(spec)
    store = TargetStore.open(f"{tmp_path}/store/{spec_dir(text)}", "read", manifest=Manifest(engine.fingerprint, text))
    rows = store.get(sample_keys({"pixel_values": x}, text, engine.fingerprint))
    for i, row in enumerate(rows):
        assert set(row) == {"hidden.vision.1", "hidden.vision.3", "logits"}
        assert all(torch.equal(row[k], got[k][i]) for k in row)


def test_another_teachers_store_is_refused_at_startup_in_one_line(tmp_path):
    ask(teacher(str(tmp_path / "store")), images(1), SPECS["fp16"])
    other = teacher(str(tmp_path / "store"), seed=1)  # other random weights: another fingerprint
    with pytest.raises(ConfigError) as e:
        with run_server(other, metrics_port=0):
            pass
    msg = str(e.value)
    assert msg.startswith("store.uri: store ") and "\n" not in msg and other.fingerprint in msg
    assert other.forwards == 0


def test_a_read_only_teacher_needs_an_existing_store_and_writes_nothing(tmp_path):
    with pytest.raises(ConfigError, match=r"^store\.uri: no target store at .*"):
        with run_server(teacher(str(tmp_path / "none"), write=False), metrics_port=0):
            pass
    x = images(2)
    ask(teacher(str(tmp_path / "store")), x, SPECS["fp16"])
    reader = teacher(str(tmp_path / "store"), write=False)
    ask(reader, x, SPECS["fp16"])
    assert reader.forwards == 0
    ask(reader, images(2), SPECS["fp16"])  # a miss: forwarded, not written
    assert reader.forwards == 1
    assert len(TargetStore.open(f"{tmp_path}/store/{spec_dir(spec_repr(SPECS['fp16']))}")) == 2


def test_a_partial_hit_forwards_the_whole_request_and_the_cache_stays_in_front(tmp_path):
    engine = teacher(str(tmp_path / "store"))
    coalescer = Coalescer.from_config(engine, engine.cfg.updated("sharing", cache_bytes=1 << 20),
                                      metrics=get_metrics("prometheus"))
    text = spec_repr(SPECS["fp16"])
    spec = TargetSpec(hidden=(("vision", (1, 3)),), logits=True, dtype="float16")
    a, b = images(2), images(1)

    async def serve(x):
        ((_, stats, _),) = await coalescer.submit([Work({"pixel_values": x}, spec, spec_text=text)])
        while coalescer.store.writer.pending:  # written back (put: answered from the store's buffer)
            await asyncio.sleep(0.01)
        return stats.forwards, store_events()["hit"]

    async def main():
        return [await serve(x) for x in (a, torch.cat([a[:1], b]), a, b)]

    (f1, h1), (partial, h2), (cached, h3), (stored, h4) = asyncio.run(main())
    coalescer.close()
    assert (f1, partial, cached, stored) == (1, 1, 0, 0) and engine.forwards == 2
    assert h2 == h1 and h3 == h2  # the partial hit forwarded; a was answered by the cache, before the store
    assert h4 - h3 == 1 and coalescer.cache.hits == 1  # b alone: a row the partial request wrote


def test_rows_of_and_batch_of_are_inverse_for_plain_and_int8_outputs():
    out = {"h": torch.rand(3, 4, 5).half(), "q": Quantized(torch.randint(-127, 127, (3, 4, 5), dtype=torch.int8),
                                                          torch.rand(3, 4))}
    rows = rows_of(out, 3)
    assert set(rows[0]) == {"h", "q", "q@scales"} and rows[1]["h"].shape == (4, 5)
    back = batch_of(rows)
    assert torch.equal(back["h"], out["h"]) and isinstance(back["q"], Quantized)
    assert torch.equal(back["q"].q, out["q"].q) and torch.equal(back["q"].scales, out["q"].scales)


def test_the_store_section_is_off_by_default_and_triton_refuses_it():
    from kdserve.teacher_config import TeacherConfig

    assert TeacherConfig().store.uri == ""
    cfg = TeacherConfig(store={"uri": "/tmp/x"})
    assert cfg.check_frontend("grpc") is cfg and cfg.check_frontend("serve") is cfg
    with pytest.raises(ValueError, match=r"^store\.uri .* Triton"):
        cfg.check_frontend("triton")
