"""``TritonTransport``: the teacher served by Triton Inference Server, behind the client's ``Transport``.

``TeacherClient("triton://host:8001/kdserve_teacher")`` picks it by the address scheme
(``student_workers.client.make_transport`` imports this module on first use). Retries, deadlines,
the fingerprint check and decoding stay in ``TeacherClient``: this module only maps kdserve's
messages onto Triton's KServe v2 gRPC API (``tritonclient.grpc.aio``), as the server side
(teacher_server/triton) defines it:

* Describe: the model config parameter ``kdserve.teacher_info`` (TeacherInfo as JSON);
* GetTargets: one ``ModelInfer`` with the input tensors, plus ``request`` (one serialized
  TargetsRequest header per sample); the ``targets`` output has one serialized TargetsReply per
  sample, joined here into one reply by concatenating each tensor's bytes;
* StreamTargets: the same call with the request parameter ``kdserve_stream`` (Triton has no
  server streaming; the answer is one message of at most ~2 GiB);
* errors: Triton's ``InferenceServerException`` becomes ``TeacherError`` with the gRPC status
  code (UNAVAILABLE and DEADLINE_EXCEEDED are retried by the client, as with the gRPC transport).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import struct
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import grpc
import numpy as np
from google.protobuf import json_format

try:
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.utils import InferenceServerException
except ImportError as e:  # pragma: no cover - the triton extra is missing
    raise ImportError(
        "triton:// teacher addresses need tritonclient[grpc]: pip install 'kdserve[triton]'"
    ) from e

from kdserve import codec, registry, reply_wire
from kdserve.v1 import teacher_pb2 as pb
from student_workers.client import GRPC_OPTIONS, TeacherError, Transport, parse_address
from kdserve.triton_wire import (
    INFO_PARAMETER,
    MODEL_NAME,
    REQUEST_INPUT,
    RESOURCE_EXHAUSTED_TAG,
    STREAM_PARAMETER,
    TARGETS_OUTPUT,
    TRITON_DTYPES,
)

T = TypeVar("T")
_REQUEST_IDS = itertools.count(1)


def status_code(exc: InferenceServerException) -> grpc.StatusCode:
    """tritonclient's status string ("StatusCode.UNAVAILABLE") -> grpc.StatusCode, with kdserve's
    RESOURCE_EXHAUSTED restored from the message tag (Triton has no such code)."""
    if (exc.message() or "").startswith(RESOURCE_EXHAUSTED_TAG):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    name = (exc.status() or "").rpartition(".")[2]
    return getattr(grpc.StatusCode, name, grpc.StatusCode.UNKNOWN)


def split_bytes_tensor(raw: bytes | memoryview) -> list[memoryview]:
    """Triton's BYTES tensor encoding (a 4-byte little-endian length before each element) -> views."""
    view, out, offset = memoryview(raw), [], 0
    while offset < len(view):
        (n,) = struct.unpack_from("<I", view, offset)
        offset += 4
        out.append(view[offset:offset + n])
        offset += n
    return out


def join_rows(rows: list) -> "reply_wire.WireReply | pb.TargetsReply":
    """Per-sample replies (row i = sample i; TargetsReply or reply_wire.WireReply) -> one reply;
    each tensor's bytes are concatenated along dim 0 (row-major data and per-row int8 scales both
    stack that way): one copy, none for a single row."""
    if not rows:
        raise ValueError("the answer has no rows")
    rows = sorted(rows, key=lambda r: r.sample_offset)
    if [r.sample_offset for r in rows] != list(range(len(rows))) or any(r.num_chunks != len(rows) for r in rows):
        raise ValueError(f"rows are not samples 0..{len(rows) - 1} of one answer")
    first = rows[0]
    if len(rows) == 1:
        return first
    if any(r.fingerprint != first.fingerprint for r in rows):
        raise ValueError("rows of one answer carry different fingerprints")
    header = pb.TargetsReply(fingerprint=first.fingerprint, timings=first.timings, sample_offset=0, num_chunks=1,
                             sample_keys=[k for r in rows for k in r.sample_keys])
    outputs = {}
    for name, t in first.outputs.items():
        parts = [r.outputs.get(name) for r in rows]
        if any(p is None or p.dtype != t.dtype or list(p.shape[1:]) != list(t.shape[1:]) for p in parts):
            raise ValueError(f"output {name!r} differs in dtype or shape between rows")
        outputs[name] = reply_wire.WireTensor(
            dtype=t.dtype,
            shape=(sum(int(p.shape[0]) for p in parts), *(int(d) for d in t.shape[1:])),
            data=b"".join(p.data for p in parts),
            scales=b"".join(p.scales for p in parts),
        )
    return reply_wire.WireReply(b"", header, outputs, size=sum(r.ByteSize() for r in rows))


@registry.register("transport", "triton")
class TritonTransport(Transport):
    """kdserve over Triton's gRPC API: ``triton://host:port/<model>[/<version>]``."""

    def __init__(self, target: str, model: str = MODEL_NAME, version: str = "", address: str | None = None,
                 channel_args: Iterable[tuple[str, Any]] = GRPC_OPTIONS):
        self.target = target
        self.model = model
        self.version = version
        self.address = address or f"triton://{target}/{model}" + (f"/{version}" if version else "")
        # Triton and tritonclient allow ~2 GiB messages; grpcio's own 4 MiB default must not apply:
        # the options raise both directions and give each channel its own subchannel pool.
        self.channel_args = list(channel_args)
        self._client: triton_aio.InferenceServerClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0
        self._closing: set[asyncio.Task] = set()

    @classmethod
    def from_address(cls, address: str, **kwargs: Any) -> "TritonTransport":
        parts, rest = parse_address(address, "triton", "triton://host:8001[/model]")
        path = [p for p in parts.path.split("/") if p]
        if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
            raise ValueError(f"teacher address {address!r}: the path is /<model> or /<model>/<version>")
        model = path[0] if path else MODEL_NAME
        version = path[1] if len(path) == 2 else ""
        return cls(parts.netloc, model, version, address=f"triton://{rest}", **kwargs)

    # -- connection ------------------------------------------------------------------------
    def _client_here(self) -> triton_aio.InferenceServerClient:
        """The client of this loop and process, created on first use (never shared across them)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop or self._pid != os.getpid():
            self._client = triton_aio.InferenceServerClient(self.target, channel_args=self.channel_args)
            self._loop, self._pid = loop, os.getpid()
        return self._client

    def _reconnect(self, failed: triton_aio.InferenceServerClient) -> None:
        """Drop the client whose call answered UNAVAILABLE; the next call dials afresh."""
        if self._client is not failed:
            return
        self._client = None
        task = asyncio.ensure_future(failed._channel.close(grace=1.0))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _call(self, fn: Callable[[triton_aio.InferenceServerClient], Awaitable[T]]) -> T:
        client = self._client_here()
        try:
            return await fn(client)
        except InferenceServerException as e:
            code = status_code(e)
            if code == grpc.StatusCode.UNAVAILABLE:
                self._reconnect(client)
            details = e.message() or str(e)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                details = details.removeprefix(RESOURCE_EXHAUSTED_TAG)
            raise TeacherError(code, details, self.address) from None

    # -- the protocol ----------------------------------------------------------------------
    async def describe(self, timeout: float) -> pb.TeacherInfo:
        resp = await self._call(lambda c: c.get_model_config(self.model, self.version, client_timeout=timeout))
        param = resp.config.parameters.get(INFO_PARAMETER)
        if param is None or not param.string_value:
            raise TeacherError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"Triton model {self.model!r} is not a kdserve teacher (its config has no {INFO_PARAMETER!r} "
                "parameter); write its repository with python -m teacher_server.triton",
                self.address,
            )
        try:
            return json_format.Parse(param.string_value, pb.TeacherInfo())
        except json_format.ParseError as e:
            raise TeacherError(grpc.StatusCode.DATA_LOSS, f"bad {INFO_PARAMETER} parameter: {e}", self.address) from None

    def _inputs(self, request: pb.TargetsRequest) -> list[InferInput]:
        """The request's tensors as Triton inputs, plus one ``request`` header row per sample."""
        inputs = []
        batch = None
        try:
            for name, t in request.inputs.items():
                if t.dtype == "bfloat16":
                    raise codec.CodecError(f"inputs[{name!r}]: bfloat16 inputs cannot be sent to Triton")
                arr = codec.to_numpy(t)  # checks dtype and length; zero-copy view of the bytes
                inp = InferInput(name, list(arr.shape), TRITON_DTYPES[t.dtype])
                inp.set_data_from_numpy(arr)
                inputs.append(inp)
                if batch is None:
                    batch = int(arr.shape[0]) if arr.ndim else 1
        except (codec.CodecError, InferenceServerException) as e:
            msg = e.message() if isinstance(e, InferenceServerException) else str(e)
            raise TeacherError(grpc.StatusCode.INVALID_ARGUMENT, msg, self.address) from None
        if batch == 0:  # no row could carry the spec; the server's own words
            raise TeacherError(grpc.StatusCode.INVALID_ARGUMENT, "inputs: batch is empty (dim 0 is 0)", self.address)
        batch = 1 if batch is None else batch
        keys = list(request.sample_keys)
        rows = np.empty((batch, 1), dtype=np.object_)
        for i in range(batch):
            # one key per row; a wrong count goes whole into row 0 so the server refuses it as
            # every kdserve frontend does ("sample_keys: 1 keys for 2 samples")
            row_keys = [keys[i]] if len(keys) == batch else (keys if i == 0 else [])
            rows[i, 0] = pb.TargetsRequest(
                experiment_id=request.experiment_id, spec=request.spec, sample_keys=row_keys
            ).SerializeToString()
        header = InferInput(REQUEST_INPUT, [batch, 1], "BYTES")
        header.set_data_from_numpy(rows)
        return [*inputs, header]

    async def _infer(self, request: pb.TargetsRequest, timeout: float, stream: bool) -> pb.TargetsReply:
        inputs = self._inputs(request)
        # Triton echoes the id (and names it in its error messages and logs): the answer must be ours.
        request_id = f"{request.experiment_id or 'kdserve'}-{os.getpid()}-{next(_REQUEST_IDS)}"
        result = await self._call(lambda c: c.infer(
            self.model, inputs, self.version, outputs=[InferRequestedOutput(TARGETS_OUTPUT)], request_id=request_id,
            client_timeout=timeout, parameters={STREAM_PARAMETER: True} if stream else None,
        ))
        response = result.get_response()
        if response.id != request_id:
            raise TeacherError(
                grpc.StatusCode.DATA_LOSS, f"answer to request {response.id!r} received for {request_id!r}", self.address
            )
        try:
            idx = [o.name for o in response.outputs].index(TARGETS_OUTPUT)
            # read once (each read of a bytes field copies); rows are parsed as views of it
            raw = response.raw_output_contents[idx]
            rows = [reply_wire.parse_reply(v) for v in split_bytes_tensor(raw)]
            return join_rows(rows)
        except Exception as e:  # ValueError, IndexError, protobuf DecodeError
            raise TeacherError(
                grpc.StatusCode.DATA_LOSS, f"malformed {TARGETS_OUTPUT!r} output: {e}", self.address
            ) from None

    async def get_targets(self, request: pb.TargetsRequest, timeout: float) -> pb.TargetsReply:
        return await self._infer(request, timeout, stream=False)

    async def stream_targets(self, request: pb.TargetsRequest, timeout: float) -> list[pb.TargetsReply]:
        return [await self._infer(request, timeout, stream=True)]

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and self._loop is asyncio.get_running_loop() and self._pid == os.getpid():
            await client.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


__all__ = ["TritonTransport", "join_rows", "split_bytes_tensor", "status_code"]
