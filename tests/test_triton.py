"""The Triton frontend: a real tritonserver (the nvidia-pytriton wheel's) on loopback serving the
tiny ViT, parity with the Ray Serve app of the session, bad input, an unreachable server, and a
short distillation whose targets come from Triton."""
from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import text_format

from kdserve import codec, wire
from kdserve.v1 import teacher_pb2 as pb
from teacher_server.engine import Quantized, TeacherEngine, Work
from teacher_server.spec import resolve_spec
from teacher_server.triton.launch import TritonNotFound, find_tritonserver
from tests import bad_inputs
from kdserve.net import free_port
from tests.conftest import tiny_vit_config

try:
    find_tritonserver()
except TritonNotFound as e:
    pytest.skip(f"no tritonserver binary: {e}", allow_module_level=True)

from student_workers.client.async_client import TeacherClient  # noqa: E402
from student_workers.client.errors import FingerprintMismatch, TeacherError, TeacherUnavailable  # noqa: E402
from student_workers.client.sync_client import SyncTeacherClient  # noqa: E402
from student_workers.client.triton_transport import TritonTransport  # noqa: E402
from teacher_server.triton import INFO_PARAMETER, MODEL_NAME  # noqa: E402
from teacher_server.triton.launch import run_tritonserver  # noqa: E402
from teacher_server.triton.repository import main as generate, write_repository  # noqa: E402

INVALID = grpc.StatusCode.INVALID_ARGUMENT
# Bad input is never retried, so errors come back at once; the budget is for a server that the
# launcher restarts under the test (Triton's Python backend can crash under CPU starvation).
FAST = dict(timeout=30.0, retry_budget_s=120.0, backoff_s=0.2)
# The same teacher as the session's Ray Serve app "teacher" (tests/conftest.serve_teachers):
# same weights, so the same fingerprint, and the same limits.
VIT = tiny_vit_config(triton={"batch_wait_timeout_s": 0.05}, max_batch_size=8, max_request_bytes=1 << 20)


@pytest.fixture(scope="module")
def vit_engine_local():
    return TeacherEngine.from_config(VIT)


@pytest.fixture(scope="module")
def triton(tmp_path_factory, vit_engine_local):
    """tritonserver on a generated repository (~10-20 s to start on 2 cores)."""
    repo = tmp_path_factory.mktemp("model_repository")
    write_repository(VIT, repo, engine=vit_engine_local)
    with run_tritonserver(repo, log_dir=tmp_path_factory.mktemp("triton_log")) as server:  # kept after a failure
        yield server


@pytest.fixture(scope="module")
def address(triton):
    return triton.address(MODEL_NAME)


@pytest.fixture(autouse=True)
def _triton_up(request):
    """A test that uses the module's server starts once it answers: after a crash between tests, the
    launcher's restart (run_tritonserver's supervisor) has finished."""
    if "triton" in request.fixturenames or "address" in request.fixturenames:
        assert request.getfixturevalue("triton").up.wait(300), "tritonserver did not come back within 300 s"


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def local(engine: TeacherEngine, inputs: dict, spec: pb.TargetSpec) -> dict[str, torch.Tensor]:
    (out,), _ = engine.run([Work(inputs, resolve_spec(spec, engine.modules, engine.num_classes))])
    return {k: codec.decode(codec.encode(v.q, v.scales)) if isinstance(v, Quantized) else v for k, v in out.items()}


def assert_targets_close(got: dict, ref: dict, dtype: str) -> None:
    assert set(got) == set(ref)
    for k in ref:
        a, b = got[k], ref[k]
        assert a.shape == b.shape and a.dtype == b.dtype, (k, a.shape, b.shape, a.dtype, b.dtype)
        if not b.is_floating_point():
            assert torch.equal(a, b), k
        elif dtype == "int8":  # at most one quantisation step apart (max|row| / 127)
            step = b.abs().amax(-1, keepdim=True) / 127
            assert ((a - b).abs() <= step * 1.01 + 1e-6).all(), k
        else:
            tol = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=k)


PARITY_SPECS = [
    ("hidden, all layers", wire.target_spec(hidden={"vision": [1, 2, 3]})),
    ("attention per head", wire.target_spec(attention={"vision": [1, -1]})),
    ("attention head mean", wire.target_spec(attention={"vision": [2]}, attention_reduction="head_mean")),
    ("data2vec, all layers", wire.target_spec(hidden={"vision": []}, hidden_reduction="data2vec")),
    ("data2vec, layers 2-3", wire.target_spec(hidden={"vision": [2, 3]}, hidden_reduction="data2vec")),
    ("logits", wire.target_spec(logits=True)),
    ("logits top-4", wire.target_spec(logits=True, logits_top_k=4)),
    ("hidden float16", wire.target_spec(hidden={"vision": [2]}, dtype="float16")),
    ("everything int8", wire.target_spec(hidden={"vision": [3]}, attention={"vision": [3]}, logits=True, dtype="int8")),
]


# -- the repository ----------------------------------------------------------------------------
@pytest.mark.unit
def test_generator_writes_a_triton_repository(tmp_path):
    from tritonclient.grpc import model_config_pb2

    rc = generate(["--model", "timm:vit_tiny_patch16_224", "--random-init", "--model-kwargs",
                   '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}',
                   "--max-batch-size", "4", "--out", str(tmp_path), "--name", "vit"])
    assert rc == 0
    model = tmp_path / "vit"
    assert (model / "1" / "model.py").is_file() and (model / "kdserve.json").is_file()
    cfg = text_format.Parse((model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (cfg.name, cfg.backend, cfg.max_batch_size) == ("vit", "python", 4)
    assert cfg.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("pixel_values", [3, 32, 32]), ("request", [1])]
    assert [o.name for o in cfg.output] == ["targets"]
    assert '"num_layers": 2' in cfg.parameters[INFO_PARAMETER].string_value


@pytest.mark.unit
def test_addresses():
    t = TritonTransport.from_address("triton://teacher.svc:8001/vit/3")
    assert (t.target, t.model, t.version) == ("teacher.svc:8001", "vit", "3")
    assert TritonTransport.from_address("triton://10.0.0.2:8001").model == MODEL_NAME
    assert isinstance(TeacherClient("triton://h:8001/m").transport, TritonTransport)
    for bad in ("triton://host", "triton://h:8001/a/b/c", "triton://h:8001/m/v1"):
        with pytest.raises(ValueError):
            TritonTransport.from_address(bad)


# -- the server --------------------------------------------------------------------------------
def test_describe_is_the_engines(address, vit_engine_local):
    with SyncTeacherClient(address, **FAST) as c:
        info = c.describe()
    assert info.fingerprint == vit_engine_local.fingerprint
    assert [(m.name, m.num_layers, m.num_tokens) for m in info.modules] == [("vision", 3, 17)]
    assert (info.max_batch_size, info.num_classes, info.max_request_bytes) == (8, 10, 1 << 20)
    assert [(i.name, list(i.shape)) for i in info.inputs] == [("pixel_values", [-1, 3, 32, 32])]


@pytest.mark.cluster
def test_parity_with_ray_serve(serve_teachers, address):
    """The same teacher on Ray Serve and on Triton: the same targets for the same inputs."""
    x = images(4, seed=1)
    keys = [f"s{i}" for i in range(4)]
    with SyncTeacherClient(f"grpc://127.0.0.1:{serve_teachers['port']}/teacher", **FAST) as serve, \
            SyncTeacherClient(address, **FAST) as tri:
        fingerprint = serve.describe().fingerprint
        assert tri.describe().fingerprint == fingerprint
        for name, spec in PARITY_SPECS:
            a = serve.get_targets({"pixel_values": x}, spec, keys)
            b = tri.get_targets({"pixel_values": x}, spec, keys)
            try:
                assert_targets_close(b, a, spec.dtype)
            except AssertionError as e:
                raise AssertionError(f"{name}: {e}") from None
        assert tri.client.expected_fingerprint == fingerprint  # every Triton reply was checked against it
        assert tri.stats.requests == len(PARITY_SPECS)


def test_targets_equal_local_engine_and_stream(address, vit_engine_local):
    x = images(3, seed=2)
    with SyncTeacherClient(address, **FAST) as c:
        for name, spec in PARITY_SPECS:
            got = c.get_targets({"pixel_values": x}, spec, stream=False)
            assert_targets_close(got, local(vit_engine_local, {"pixel_values": x}, spec), spec.dtype)
        spec = PARITY_SPECS[0][1]
        streamed = c.get_targets({"pixel_values": x}, spec, stream=True)
        assert_targets_close(streamed, c.get_targets({"pixel_values": x}, spec, stream=False), "float32")


def test_dynamic_batching_answers_each_spec(address, vit_engine_local):
    """Concurrent requests with different specs share Triton batches (one engine.run) and each
    gets its own targets."""
    jobs = [(images(1 + i % 2, seed=10 + i), PARITY_SPECS[i % len(PARITY_SPECS)][1]) for i in range(8)]

    async def run():
        t = TritonTransport.from_address(address)
        try:
            return await asyncio.gather(*(
                t.get_targets(wire.build_request({"pixel_values": x}, spec, f"exp-{i}"), 30.0)
                for i, (x, spec) in enumerate(jobs)))
        finally:
            await t.close()

    replies = asyncio.run(run())
    for (x, spec), reply in zip(jobs, replies):
        assert_targets_close(codec.decode_map(reply.outputs), local(vit_engine_local, {"pixel_values": x}, spec),
                             spec.dtype)
        assert reply.fingerprint == vit_engine_local.fingerprint
    assert max(r.timings.batch_requests for r in replies) > 1, [r.timings for r in replies]


# Bad input Triton itself refuses from the model config, in Triton's words; the rest get the
# messages of teacher_server.spec / service, as from every kdserve frontend.
TRITON_WORDS = {
    "wrong dtype": "FP16",
    "wrong rank": "unexpected shape",
    "wrong image size": "[1,3,48,48]",
    "batch over max": "<= 8",
}


@pytest.mark.parametrize("name,request_,code,word", bad_inputs.cases(), ids=[c[0] for c in bad_inputs.cases()])
def test_bad_input_gets_a_clear_error_and_server_survives(address, vit_engine_local, name, request_, code, word):
    async def run():
        t = TritonTransport.from_address(address)
        try:
            with pytest.raises(TeacherError) as e:
                await t.get_targets(request_, 30.0)
            info = await t.describe(30.0)
            return e.value, info
        finally:
            await t.close()

    err, info = asyncio.run(run())
    assert not isinstance(err, TeacherUnavailable)
    assert err.code == code, err
    assert TRITON_WORDS.get(name, word) in err.details, err.details
    assert info.fingerprint == vit_engine_local.fingerprint


def test_bad_input_through_the_client_then_good_input(address):
    with SyncTeacherClient(address, **FAST) as c:
        with pytest.raises(TeacherError, match="layer 4 is out of range") as e:
            c.get_targets({"pixel_values": images(1)}, wire.target_spec(hidden={"vision": [4]}))
        assert e.value.code == INVALID and c.stats.retries == 0
        with pytest.raises(TeacherError, match="unknown reduction 'pca'") as e:
            c.get_targets({"pixel_values": images(1)}, wire.target_spec(hidden={"vision": [1]}, hidden_reduction="pca"))
        # an answer, not a deadline: INVALID_ARGUMENT straight away, never DEADLINE_EXCEEDED nor a retry
        assert e.value.code == INVALID and not isinstance(e.value, TeacherUnavailable) and c.stats.retries == 0
        out = c.get_targets({"pixel_values": images(2)}, wire.target_spec(logits=True))
        assert out["logits"].shape == (2, 10)


def test_unreachable_triton_is_unavailable_in_bounded_time(client_clock):
    """Bounded by the count of attempts (max_retries), each with its deadline: no wall time measured."""
    c = TeacherClient(f"triton://127.0.0.1:{free_port()}/{MODEL_NAME}", timeout=2.0, max_retries=2, backoff_s=0.05)

    async def run():
        try:
            await c.get_targets({"pixel_values": images(1)}, wire.target_spec(logits=True))
        finally:
            await c.close()

    with pytest.raises(TeacherUnavailable, match="teacher unreachable at triton:") as e:
        asyncio.run(run())
    assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    # three attempts (max_retries=2), two backoffs of at most 0.05 and 0.1 s between them, then it gave up
    assert e.value.attempts == 3 and c.stats.retries == 2 and len(client_clock.sleeps) == 2
    assert client_clock.sleeps[0] <= 0.05 and client_clock.sleeps[1] <= 0.1


def test_deadline_and_fingerprint_checks_apply_to_triton(address, vit_engine_local):
    x, spec = {"pixel_values": images(2)}, wire.target_spec(hidden={"vision": [1, 2, 3]})
    with SyncTeacherClient(address, timeout=0.001, max_retries=1, backoff_s=0.01) as c:
        with pytest.raises(TeacherUnavailable) as e:  # no forward answers within 1 ms
            c.get_targets(x, spec, stream=False)
        assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and c.stats.retries == 1
    with SyncTeacherClient(address, expected_fingerprint="0" * 32, **FAST) as c:
        with pytest.raises(FingerprintMismatch) as e:
            c.get_targets(x, spec, stream=False)
        assert e.value.got == vit_engine_local.fingerprint


# -- a student learning from Triton ------------------------------------------------------------
def test_short_distillation_against_triton(address):
    """The training loop's pieces (student, Distiller, Prefetcher, SyncTeacherClient) with targets
    from Triton: feature + logit KD on a fixed set of images; the loss falls."""
    from student_workers.losses.distiller import Distiller
    from student_workers.train.job_config import DistillSection
    from student_workers.client.prefetch import Prefetcher
    from student_workers.models.build import build_student

    torch.manual_seed(0)
    data = [images(8, seed=100 + i) for i in range(4)]
    steps = 30
    with SyncTeacherClient(address, experiment_id="triton-distill", **FAST) as client:
        info = client.describe()
        student = build_student({"kind": "timm_vit", "name": "vit_tiny_patch16_224", "kwargs": {
            "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 10}})
        distiller = Distiller(student, DistillSection(feature_weight=1.0, logits_weight=1.0), info)
        spec = distiller.target_spec("float16")
        opt = torch.optim.AdamW(distiller.parameters(), lr=3e-3)
        batches = ({"pixel_values": data[i % len(data)]} for i in range(steps))
        losses = []
        with Prefetcher(batches, lambda b: (b, spec), client, depth=2, timeout=60) as pre:
            for batch, targets in pre:
                total, terms = distiller(batch, targets)
                opt.zero_grad(set_to_none=True)
                total.backward()
                opt.step()
                losses.append(float(total.detach()))
        assert client.stats.requests == steps and client.stats.bytes_received > 0
    assert len(losses) == steps
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, losses


@pytest.mark.unit
def test_infer_response_is_read_without_protobuf_copies_and_matches_it():
    from tritonclient.grpc import service_pb2 as tpb

    from kdserve.reply_wire import split_field
    from student_workers.client.triton_transport import _RAW_OUTPUT_CONTENTS, frame_bytes, split_bytes_tensor

    rows = [b"first", b"", b"x" * 300]
    resp = tpb.ModelInferResponse(model_name=MODEL_NAME, id="exp-1-7", raw_output_contents=[b"\x01\x02", frame_bytes(rows)])
    resp.outputs.add(name="other", datatype="UINT8", shape=[1, 2])
    resp.outputs.add(name="targets", datatype="UINT8", shape=[1, 4 * 3 + 305])
    rest, raw = split_field(resp.SerializeToString(), _RAW_OUTPUT_CONTENTS)
    assert [bytes(r) for r in raw] == list(resp.raw_output_contents)
    header = tpb.ModelInferResponse.FromString(rest)
    assert header.id == "exp-1-7" and [o.name for o in header.outputs] == ["other", "targets"]
    assert not header.raw_output_contents
    assert [bytes(v) for v in split_bytes_tensor(raw[1])] == rows


@pytest.mark.unit
def test_tritonserver_gets_the_teacher_malloc_settings_unless_the_caller_sets_them():
    from pathlib import Path

    from teacher_server import malloc
    from teacher_server.triton.launch import server_env

    env = server_env(Path("/nonexistent/pytriton/tritonserver"), base={"PATH": "/usr/bin"})
    assert {k: env[k] for k in malloc.ENV} == malloc.ENV
    env = server_env(Path("/nonexistent/pytriton/tritonserver"), base={"MALLOC_TRIM_THRESHOLD_": "0"})
    assert env["MALLOC_TRIM_THRESHOLD_"] == "0"  # the operator's choice wins


def test_unparseable_request_rows_and_nonfinite_targets_are_invalid_argument(address):
    """As far as Triton lets the model decide: a `request` row that is not a TargetsRequest gets
    INVALID_ARGUMENT with our fixed line (no parser text), and so do 1e30 inputs whose targets
    overflow, naming the output; the server answers a good request after."""
    from student_workers.client.triton_transport import frame_bytes

    async def run():
        t = TritonTransport.from_address(address)
        try:
            good = wire.build_request({"pixel_values": images(2)}, wire.target_spec(logits=True), "raw")
            msg = t._infer_request(good, "raw-1", stream=False)
            msg.raw_input_contents[-1] = frame_bytes([b"\x0a\x02\xff\xfe", b"\xff" * 7])  # invalid UTF-8, junk
            with pytest.raises(TeacherError) as bad_row:
                await t._call("ModelInfer", msg, None, 30.0)
            huge = wire.build_request({"pixel_values": torch.full((2, 3, 32, 32), 1e30)},
                                      wire.target_spec(hidden={"vision": [-1]}), "huge")
            with pytest.raises(TeacherError) as nonfinite:
                await t.get_targets(huge, 30.0)
            return bad_row.value, nonfinite.value, await t.get_targets(good, 30.0)
        finally:
            await t.close()

    bad_row, nonfinite, ok = asyncio.run(run())
    assert bad_row.code == INVALID and "request[0] is not a serialized kdserve.v1.TargetsRequest (4 bytes)" in bad_row.details
    assert "Error" not in bad_row.details and "class" not in bad_row.details
    assert nonfinite.code == INVALID and "output 'hidden.vision.3' holds NaN or Inf" in nonfinite.details
    assert ok.outputs


def test_the_server_log_is_kept_where_asked(triton):
    """``log_dir``: tritonserver's log outlives the server (a failed run can be read afterwards)."""
    assert triton.log_path.parent.name.startswith("triton_log") and triton.log_path.name == "tritonserver.log"
    assert triton.log_path.stat().st_size > 0


def test_a_lost_stub_or_server_is_restarted_and_the_client_rides_it_out(tmp_path, vit_engine_local):
    """Triton 2.51 never restarts a dead Python stub (its model answers INTERNAL 'not healthy' while the
    server says it is ready), and the backend can abort the whole server under CPU starvation. The
    launcher starts the server again on the same ports (again, if a restart is not ready in time); the
    client's retries carry a request across. Its retry budget covers restarts at any load."""
    import signal

    write_repository(VIT, tmp_path / "repo", engine=vit_engine_local)
    x, spec = {"pixel_values": images(2, seed=9)}, pb.TargetSpec(logits=True)
    ref = local(vit_engine_local, x, spec)["logits"]
    with run_tritonserver(tmp_path / "repo", log_dir=tmp_path, restarts=4) as server:
        port = server.grpc_port
        client = SyncTeacherClient(server.address(MODEL_NAME), timeout=30.0, retry_budget_s=900.0)
        try:
            assert torch.allclose(client.get_targets(x, spec)["logits"], ref, atol=1e-5)
            stubs = server.stubs()
            assert len(stubs) == 1
            regions = shm_regions(server)
            assert regions  # the backend's regions carry this server's own prefix
            stubs[0].send_signal(signal.SIGKILL)
            assert torch.allclose(client.get_targets(x, spec)["logits"], ref, atol=1e-5)
            assert server.up.wait(300)  # the supervisor saw it ready (its poll may trail the request)
            first = server.restarts
            assert first >= 1 and server.grpc_port == port and server.stubs()[0].pid != stubs[0].pid
            aborted, orphans = server.process, server.stubs()
            aborted.send_signal(signal.SIGABRT)  # as the backend's lock_exception aborts it
            aborted.wait(timeout=60)
            assert torch.allclose(client.get_targets(x, spec)["logits"], ref, atol=1e-5)
            assert server.restarts > first and server.grpc_port == port
            assert not any(p.is_running() and p.status() != "zombie" for p in orphans)  # the old stubs went too
            assert not regions & shm_regions(server)  # the killed servers' regions were unlinked
        finally:
            client.close()
        assert not server.stopped.is_set()
    assert server.stopped.is_set() and server.process.poll() is not None
    assert not shm_regions(server)  # nothing left in /dev/shm (RAM) once it is stopped


def shm_regions(server) -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(server.shm_prefix + "*")}
