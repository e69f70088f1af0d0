"""``TritonTransport``: the teacher served by Triton Inference Server, behind the client's ``Transport``.

``TeacherClient("triton://host:8001/kdserve_teacher")`` picks it by the address scheme
(``student_workers.client.transport.make_transport`` imports this module on first use). Retries, deadlines,
the fingerprint check and decoding stay in ``TeacherClient``: this module only maps kdserve's
messages onto Triton's KServe v2 gRPC API, as the server side (teacher_server/triton) defines it:

* Describe: the model config parameter ``kdserve.teacher_info`` (TeacherInfo as JSON);
* GetTargets: one ``ModelInfer`` with the input tensors, plus ``request`` (one serialized
  TargetsRequest header per sample); the ``targets`` output has one serialized TargetsReply per
  sample, joined here into one reply by concatenating each tensor's bytes;
* StreamTargets: the same call with the request parameter ``kdserve_stream`` (Triton has no
  server streaming; the answer is one message of at most ~2 GiB);
* errors: gRPC statuses become ``TeacherError`` with the same code (UNAVAILABLE and
  DEADLINE_EXCEEDED are retried by the client, as with the gRPC transport).

The calls go through grpc.aio with Triton's own generated messages (``tritonclient.grpc.service_pb2``),
not ``tritonclient.grpc.aio``'s client: its ``ModelInfer`` parses the whole response with protobuf
(a copy of every output) and each read of ``raw_output_contents`` copies it again. Here the
response arrives as bytes and the outputs are read as views of them (``reply_wire.split_field``),
as the kdserve gRPC transport reads its replies (``bench`` P4 measures both).
"""
from __future__ import annotations

import asyncio
import itertools
import os
import struct
from typing import Any, Iterable

import grpc
from google.protobuf import json_format

try:
    from tritonclient.grpc import service_pb2 as tpb
except ImportError as e:  # pragma: no cover - the triton extra is missing
    raise ImportError(
        "triton:// teacher addresses need tritonclient[grpc]: pip install 'kdserve[triton]'"
    ) from e

from kdserve import codec, registry, reply_wire
from kdserve.triton_wire import (
    INFO_PARAMETER,
    MODEL_NAME,
    REQUEST_INPUT,
    RESOURCE_EXHAUSTED_TAG,
    STREAM_PARAMETER,
    TARGETS_OUTPUT,
    TRITON_DTYPES,
)
from kdserve.v1 import teacher_pb2 as pb
from student_workers.client.errors import TeacherError
from student_workers.client.grpc_transport import GRPC_OPTIONS
from student_workers.client.transport import Transport, parse_address

_REQUEST_IDS = itertools.count(1)


_SERVICE = "/inference.GRPCInferenceService"
_RAW_OUTPUT_CONTENTS = tpb.ModelInferResponse.DESCRIPTOR.fields_by_name["raw_output_contents"].number


def status_code(code: grpc.StatusCode, details: str) -> grpc.StatusCode:
    """Triton's status for a call, with kdserve's RESOURCE_EXHAUSTED restored from the message tag
    (Triton has no such code for per-request errors), and a dead Python stub as UNAVAILABLE: Triton
    answers INTERNAL "Stub process '...' is not healthy." until the server is restarted (kdserve's
    launcher does it; Kubernetes would), and a restarting server answers NOT_FOUND "... has no
    available versions" until its model has loaded: the client retries both within its budget, like
    a server that is down."""
    details = details or ""
    if details.startswith(RESOURCE_EXHAUSTED_TAG):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if code == grpc.StatusCode.INTERNAL and details.startswith("Stub process") and "is not healthy" in details:
        return grpc.StatusCode.UNAVAILABLE
    if code == grpc.StatusCode.NOT_FOUND and details.endswith("has no available versions"):
        return grpc.StatusCode.UNAVAILABLE  # a (re)starting server: listening, its model still loading
    return code


def frame_bytes(rows: Iterable[bytes]) -> bytes:
    """Triton's BYTES tensor encoding: a 4-byte little-endian length before each element."""
    return b"".join(struct.pack("<I", len(r)) + r for r in rows)


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
        # Triton allows ~2 GiB messages; grpcio's own 4 MiB default must not apply: the options
        # raise both directions and give each channel its own subchannel pool.
        self.channel_args = list(channel_args)
        self._channel: grpc.aio.Channel | None = None
        self._rpcs: dict[str, Any] = {}  # method -> multi-callable of self._channel
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
    def _channel_here(self) -> grpc.aio.Channel:
        """The channel of this loop and process, created on first use (never shared across them)."""
        loop = asyncio.get_running_loop()
        if self._channel is None or self._loop is not loop or self._pid != os.getpid():
            self._channel = grpc.aio.insecure_channel(self.target, options=self.channel_args)
            self._rpcs = {}
            self._loop, self._pid = loop, os.getpid()
        return self._channel

    def _reconnect(self, failed: grpc.aio.Channel) -> None:
        """Drop the channel whose call answered UNAVAILABLE; the next call dials afresh."""
        if self._channel is not failed:
            return
        self._channel, self._rpcs = None, {}
        task = asyncio.ensure_future(failed.close(grace=1.0))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _call(self, method: str, request, deserializer, timeout: float):
        """One unary call of Triton's service; a failed one raises TeacherError with its status."""
        channel = self._channel_here()
        rpc = self._rpcs.get(method)
        if rpc is None:  # one multi-callable per channel and method (each method has one deserializer)
            rpc = self._rpcs[method] = channel.unary_unary(
                f"{_SERVICE}/{method}", request_serializer=type(request).SerializeToString,
                response_deserializer=deserializer)
        try:
            return await rpc(request, timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self._reconnect(channel)
            details = e.details() or ""
            code = status_code(e.code(), details)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                details = details.removeprefix(RESOURCE_EXHAUSTED_TAG)
            raise TeacherError(code, details, self.address) from None

    # -- the protocol ----------------------------------------------------------------------
    async def describe(self, timeout: float) -> pb.TeacherInfo:
        resp = await self._call("ModelConfig", tpb.ModelConfigRequest(name=self.model, version=self.version),
                                tpb.ModelConfigResponse.FromString, timeout)
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

    def _infer_request(self, request: pb.TargetsRequest, request_id: str, stream: bool,
                       keys_out: list | None = None) -> "tpb.ModelInferRequest":
        """The request's tensors as Triton inputs, plus one ``request`` header row per sample; raw
        texts travel in the rows (text i in row i, with ``text_tokenizer``), as Triton batches rows.

        Rows without keys of the caller's get ``<request id>/<i>``: the answer's rows echo them, so
        an answer computed from another request's rows is caught (``keys_out`` receives the keys sent)."""
        msg = tpb.ModelInferRequest(model_name=self.model, model_version=self.version, id=request_id)
        batch = None
        try:
            for name, t in request.inputs.items():
                if t.dtype == "bfloat16" or t.dtype not in TRITON_DTYPES:  # numpy (the backend's) has no bfloat16
                    raise codec.CodecError(f"inputs[{name!r}]: {t.dtype or 'untyped'} inputs cannot be sent to Triton")
                arr = codec.to_numpy(t)  # checks dtype and length; zero-copy view of the bytes
                msg.inputs.add(name=name, datatype=TRITON_DTYPES[t.dtype], shape=list(arr.shape))
                msg.raw_input_contents.append(t.data)
                if batch is None:
                    batch = int(arr.shape[0]) if arr.ndim else 1
        except codec.CodecError as e:
            raise TeacherError(grpc.StatusCode.INVALID_ARGUMENT, str(e), self.address) from None
        if batch == 0:  # no row could carry the spec; the server's own words
            raise TeacherError(grpc.StatusCode.INVALID_ARGUMENT, "inputs: batch is empty (dim 0 is 0)", self.address)
        texts = list(request.texts)
        batch = (len(texts) or 1) if batch is None else batch
        keys = list(request.sample_keys) or [f"{request_id}/{i}" for i in range(batch)]
        if keys_out is not None and len(keys) == batch:
            keys_out.extend(keys)
        rows = []
        for i in range(batch):
            # one key per row; a wrong count goes whole into row 0 so the server refuses it as
            # every kdserve frontend does ("sample_keys: 1 keys for 2 samples")
            row_keys = [keys[i]] if len(keys) == batch else (keys if i == 0 else [])
            row_texts = [texts[i]] if len(texts) == batch else (texts if i == 0 else [])  # likewise
            rows.append(pb.TargetsRequest(
                experiment_id=request.experiment_id, spec=request.spec, sample_keys=row_keys,
                texts=row_texts, text_tokenizer=request.text_tokenizer,
            ).SerializeToString())
        msg.inputs.add(name=REQUEST_INPUT, datatype="BYTES", shape=[batch, 1])
        msg.raw_input_contents.append(frame_bytes(rows))
        msg.outputs.add(name=TARGETS_OUTPUT)
        if stream:
            msg.parameters[STREAM_PARAMETER].bool_param = True
        return msg

    async def _infer(self, request: pb.TargetsRequest, timeout: float, stream: bool) -> pb.TargetsReply:
        # Triton echoes the id (and names it in its error messages and logs): the answer must be ours.
        request_id = f"{request.experiment_id or 'kdserve'}-{os.getpid()}-{next(_REQUEST_IDS)}"
        sent: list[str] = []
        data = await self._call("ModelInfer", self._infer_request(request, request_id, stream, sent), None, timeout)
        try:
            rest, raw = reply_wire.split_field(data, _RAW_OUTPUT_CONTENTS)
            response = tpb.ModelInferResponse.FromString(rest)  # everything but the outputs' bytes
        except Exception as e:  # WireError, protobuf DecodeError
            raise TeacherError(grpc.StatusCode.DATA_LOSS, f"malformed ModelInfer response: {e}", self.address) from None
        if response.id != request_id:
            raise TeacherError(
                grpc.StatusCode.DATA_LOSS, f"answer to request {response.id!r} received for {request_id!r}", self.address
            )
        try:
            idx = [o.name for o in response.outputs].index(TARGETS_OUTPUT)
            rows = [reply_wire.parse_reply(v) for v in split_bytes_tensor(raw[idx])]  # views of ``data``
            reply = join_rows(rows)
        except Exception as e:  # ValueError, IndexError, protobuf DecodeError
            raise TeacherError(
                grpc.StatusCode.DATA_LOSS, f"malformed {TARGETS_OUTPUT!r} output: {e}", self.address
            ) from None
        return self._own(reply, request, sent)

    def _own(self, reply, request: pb.TargetsRequest, sent: list[str]):
        """The reply, once its rows echo the keys this request sent (a Python backend stub restarted
        under load was seen answering a request with an earlier request's rows: right id, wrong
        targets); the keys made up for the call are removed again."""
        if sent and list(reply.sample_keys) != sent:
            raise TeacherError(grpc.StatusCode.DATA_LOSS, "the answer's rows belong to another request (sample keys "
                               f"{list(reply.sample_keys)[:2]}... for {sent[:2]}...)", self.address)
        if sent and not request.sample_keys:
            header = reply.header if isinstance(reply, reply_wire.WireReply) else reply
            del header.sample_keys[:]
        return reply

    async def get_targets(self, request: pb.TargetsRequest, timeout: float) -> pb.TargetsReply:
        return await self._infer(request, timeout, stream=False)

    async def stream_targets(self, request: pb.TargetsRequest, timeout: float) -> list[pb.TargetsReply]:
        return [await self._infer(request, timeout, stream=True)]

    async def close(self) -> None:
        channel, self._channel, self._rpcs = self._channel, None, {}
        if channel is not None and self._loop is asyncio.get_running_loop() and self._pid == os.getpid():
            await channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


__all__ = ["TritonTransport", "frame_bytes", "join_rows", "split_bytes_tensor", "status_code"]
