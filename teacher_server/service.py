"""Wire <-> engine: TargetsRequest -> Work, engine outputs -> TargetsReply (one or many chunks).

Shared by the plain gRPC server and the Ray Serve deployment, so both validate identically and
answer with the same status codes:
  SpecError, CodecError -> INVALID_ARGUMENT; TooLarge -> RESOURCE_EXHAUSTED; anything else -> INTERNAL.
Messages are one printable line of bounded length; client-supplied text in them is clipped.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import torch

from kdserve import codec, limits, reply_wire
from kdserve.store.keys import spec_repr  # no fsspec: the store itself is an extra
from kdserve.targets import is_finite
from kdserve.teacher_config import TeacherConfig
from kdserve.v1 import teacher_pb2 as pb
from kdserve.wire import batch_size
from teacher_server import malloc
from teacher_server.engine import BatchStats, Quantized, TeacherEngine, Work
from teacher_server.spec import (
    MAX_EXPERIMENT_CHARS,
    SpecError,
    TargetSpec,
    TooLarge,
    bounded,
    resolve_spec,
    shown,
    validate_inputs,
)
from teacher_server.texts import TextInputs, tokenized_inputs

log = logging.getLogger("kdserve.teacher")
MAX_CACHED_SPECS = 256


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and a bounded, single-line message for a failed request (never a traceback).

    INTERNAL is for the teacher's own faults only: every input a client can send is caught by a
    SpecError first (tests/test_fuzz.py holds that line).
    """
    if isinstance(exc, (SpecError, codec.CodecError)):
        return grpc.StatusCode.INVALID_ARGUMENT, bounded(str(exc))
    if isinstance(exc, TooLarge):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, bounded(str(exc))
    log.exception("teacher failed on a request")
    return grpc.StatusCode.INTERNAL, bounded(f"teacher error: {type(exc).__name__}: {exc}")


def experiment_label(experiment_id: str) -> str:
    """A metric tag for ``experiment_id``: the id when valid, else "invalid" (bounded tag values)."""
    try:
        return check_experiment_id(experiment_id) or "default"
    except SpecError:
        return "invalid"


def check_experiment_id(experiment_id: str) -> str:
    """Any printable Unicode up to MAX_EXPERIMENT_CHARS characters; raises SpecError otherwise."""
    if len(experiment_id) > MAX_EXPERIMENT_CHARS:
        raise SpecError(
            f"experiment_id of {len(experiment_id)} characters is over {MAX_EXPERIMENT_CHARS}: {shown(experiment_id)}"
        )
    if not experiment_id.isprintable():
        raise SpecError(f"experiment_id {shown(experiment_id)} holds non-printable characters")
    return experiment_id


def check_finite(inputs: dict[str, torch.Tensor]) -> None:
    """NaN or Inf in an input would come back as NaN targets: refuse them instead."""
    for name, t in inputs.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise SpecError(f"inputs[{name!r}]: {bad} of {t.numel()} values are NaN or infinite")


def captured_bytes(spec: TargetSpec, modules, num_classes: int, batch: int, seq: int) -> int:
    """Bytes of what the forward captures for ``spec`` before reductions and the wire dtype: every
    selected layer's float32 hidden states (B, T, D) and attention maps (B, H, T, T), and the
    logits (B, C). ``seq`` sizes modules without a fixed token count (text)."""
    mods = {m.name: m for m in modules}
    total = 0
    for module, layers in spec.hidden:
        m = mods[module]
        total += len(layers) * batch * (m.num_tokens if m.num_tokens > 0 else seq) * m.hidden_size * 4
    for module, layers in spec.attention:
        m = mods[module]
        t = m.num_tokens if m.num_tokens > 0 else seq
        total += len(layers) * batch * m.num_heads * t * t * 4
    if spec.logits:
        total += batch * num_classes * 4
    return total


def check_outputs(outputs: dict) -> None:
    """Targets with NaN or Inf never leave the teacher: SpecError naming the first such output.

    One reduction pass per tensor (kdserve.targets.is_finite), a fraction of the cost of encoding
    it; an int8 target is checked through its scales (a non-finite value makes its row's scale so).
    """
    for name, v in outputs.items():
        if not is_finite(v.scales if isinstance(v, Quantized) else v):
            raise SpecError(
                f"output {name!r} holds NaN or Inf: these inputs drive the teacher out of its numeric range "
                "(check their scale and preprocessing), or the target dtype is too narrow for the values"
            )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class _ArrayInput:
    """A numpy array read as ``validate_inputs`` reads a pb.Tensor: dtype name, shape, data length."""

    __slots__ = ("data", "dtype", "scales", "shape")

    def __init__(self, a: np.ndarray):
        self.dtype = a.dtype.name  # numpy's names of kdserve's dtypes are kdserve's (bfloat16 has none)
        self.shape = a.shape
        # only its length is read; an object array (Triton BYTES) fails the dtype check first
        self.data = b"" if a.dtype.hasobject else np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        self.scales = b""


class TeacherService:
    """The protocol's semantics over one engine; frontends add transport and batching."""

    def __init__(self, engine: TeacherEngine, cfg: TeacherConfig | None = None):
        self.engine = engine
        self.cfg = cfg or engine.cfg
        self._info: pb.TeacherInfo | None = None
        # serialized spec -> (resolved (frozen) TargetSpec, its kdserve.store.spec_repr)
        self._specs: dict[bytes, tuple[TargetSpec, str]] = {}
        # (serialized spec, batch, tokens, stream) -> (reply bytes, held bytes)
        self._estimates: dict[tuple[bytes, int, int, bool], tuple[int, int]] = {}
        self.held = 0  # bytes reserved by requests in flight (``reserve``)
        self._memory_lock = threading.Lock()  # Triton's instances may share a service across threads
        self._texts: TextInputs | None | bool = False  # the texts path, made on first use (None: no tokenizer)

    @property
    def texts(self) -> TextInputs | None:
        """The teacher's texts path (its tokenizer), or None when it takes no raw text."""
        if self._texts is False:
            self._texts = TextInputs.of(getattr(self.engine, "adapter", None))
        return self._texts

    def describe(self) -> pb.TeacherInfo:
        """The Describe answer (built once: the engine and its config do not change)."""
        if self._info is None:
            self._info = self._build_info()
        return self._info

    def _build_info(self) -> pb.TeacherInfo:
        e = self.engine
        return pb.TeacherInfo(
            model_name=e.model_name,
            fingerprint=e.fingerprint,
            modules=[pb.ModuleInfo(**m.__dict__) for m in e.modules],
            inputs=[
                pb.InputInfo(name=i.name, dtype=i.dtype, shape=list(i.shape), required=i.required, doc=i.doc)
                for i in e.inputs
            ],
            max_batch_size=self.cfg.max_batch_size,
            num_classes=e.num_classes,
            max_request_bytes=self.cfg.max_request_bytes,
            max_reply_bytes=self.cfg.max_reply_bytes,
            preprocessing=json.dumps(e.adapter.preprocessing, sort_keys=True),
            caches_targets=self.cfg.sharing.cache_bytes > 0,
            tokenizer=self.texts.info() if self.texts else None,
        )

    def prepare(self, request: pb.TargetsRequest, stream: bool = False) -> Work:
        """Validate and decode a request; raises SpecError / CodecError / TooLarge. ``stream``: a
        flow-controlled stream, which holds one chunk of its reply at a time."""
        return self._admit(request, request.inputs, request.ByteSize(), stream,
                           lambda: {k: codec.decode(v) for k, v in request.inputs.items()})

    def prepare_arrays(self, header: pb.TargetsRequest, arrays: dict[str, np.ndarray], stream: bool = False) -> Work:
        """``prepare`` for a header without tensors plus its inputs as numpy arrays (Triton's
        inputs, views of its shared memory): the same checks and errors, with no protobuf round
        trip. Each array is copied once (the Work outlives the caller's buffers)."""
        wire = {name: _ArrayInput(a) for name, a in arrays.items()}
        size = header.ByteSize() + sum(a.nbytes for a in arrays.values())
        return self._admit(header, wire, size, stream,
                           lambda: {name: torch.from_numpy(np.array(a)) for name, a in arrays.items()})

    def _admit(self, request: pb.TargetsRequest, wire_inputs, size: int, stream: bool,
               decode: Callable[[], dict[str, torch.Tensor]]) -> Work:
        """The checks of every request, cheapest first: size, experiment, inputs' names, dtypes and
        shapes (``wire_inputs``: name -> pb.Tensor-like), spec; then ``decode()`` and value checks."""
        malloc.note_activity()
        if size > self.cfg.max_request_bytes:
            raise TooLarge(
                f"request of {_mb(size)} is over the teacher's max_request_bytes ({_mb(self.cfg.max_request_bytes)}); "
                "send fewer samples per request"
            )
        check_experiment_id(request.experiment_id)
        key = request.spec.SerializeToString(deterministic=True)
        if request.texts:  # from here on, a text request is the token request its tokenizer makes
            wire_inputs, decode = self._tokenized(request, wire_inputs, key)
        batch = validate_inputs(wire_inputs, self.engine.inputs, self.cfg.max_batch_size)
        if request.sample_keys and len(request.sample_keys) != batch:
            raise SpecError(f"sample_keys: {len(request.sample_keys)} keys for {batch} samples")
        spec, spec_text = self._resolve(request.spec, key)
        ids = wire_inputs.get("input_ids")
        seq = int(ids.shape[1]) if ids is not None and len(ids.shape) > 1 else 0
        reply, held = self._sizes(key, spec, request.spec, batch, seq, stream)
        if not stream and reply > self.cfg.max_reply_bytes:
            raise TooLarge(
                f"reply would be {_mb(reply)}, over max_reply_bytes ({_mb(self.cfg.max_reply_bytes)}): "
                "use StreamTargets, fewer samples or layers, a reduction (data2vec, head_mean) or dtype float16/int8"
            )
        if held > self.cfg.max_request_memory_bytes:
            raise TooLarge(
                f"request would hold {_mb(held)} on the teacher (targets as computed, float32 before reductions, "
                f"plus the {'stream chunk' if stream else 'reply'}), over max_request_memory_bytes "
                f"({_mb(self.cfg.max_request_memory_bytes)}): send fewer samples or layers per request"
            )
        inputs = decode()
        check_finite(inputs)
        work = Work(inputs, spec, held_bytes=held, spec_text=spec_text)
        self.engine.check(work)
        return work

    def _tokenized(self, request: pb.TargetsRequest, wire_inputs, key: bytes):
        """(wire inputs, decode) of ``request.texts`` as the teacher tokenizes them (teacher_server.texts)."""
        arrays = tokenized_inputs(self.texts, request, wire_inputs, lambda: self._resolve(request.spec, key)[0],
                                  self.cfg.max_batch_size, self.engine.inputs)
        return ({k: _ArrayInput(a) for k, a in arrays.items()},
                lambda: {k: torch.from_numpy(a) for k, a in arrays.items()})

    def reserve(self, work: Work) -> None:
        """Count ``work.held_bytes`` against ``max_memory_bytes`` until ``release(work)``; raises
        TooLarge (RESOURCE_EXHAUSTED) when the requests in flight already hold too much. Frontends
        hold it from admission until the last byte of the reply is handed over (streams included)."""
        with self._memory_lock:
            if self.held + work.held_bytes > self.cfg.max_memory_bytes:
                raise TooLarge(
                    f"the teacher holds {_mb(self.held)} for requests in flight; {_mb(work.held_bytes)} more is over "
                    f"its max_memory_bytes ({_mb(self.cfg.max_memory_bytes)}): retry later, or ask for less per request"
                )
            self.held += work.held_bytes
            work.reserved = work.held_bytes

    def release(self, work: Work | None) -> None:
        """Undo ``reserve`` (idempotent; None and unreserved work are no-ops)."""
        if work is None or not work.reserved:
            return
        with self._memory_lock:
            self.held -= work.reserved
            work.reserved = 0
        malloc.note_activity()  # its buffers were just freed: the trimmer waits for quiet after this

    def _resolve(self, msg: pb.TargetSpec, key: bytes) -> tuple[TargetSpec, str]:
        """``resolve_spec`` and ``spec_repr`` once per distinct spec (``key``: its deterministic
        serialisation): an experiment sends the same spec every step."""
        known = self._specs.get(key)
        if known is None:
            known = (resolve_spec(msg, self.engine.modules, self.engine.num_classes), spec_repr(msg))  # SpecError
            if len(self._specs) >= MAX_CACHED_SPECS:
                self._specs.clear()  # many distinct specs: start over rather than grow
            self._specs[key] = known
        return known

    def _sizes(self, key: bytes, spec: TargetSpec, msg: pb.TargetSpec, batch: int, seq: int,
               stream: bool) -> tuple[int, int]:
        """(reply bytes, bytes the request holds on the teacher) for ``batch`` samples of ``seq``
        tokens, from shapes alone; once per (spec, batch, tokens, stream): the same shapes come
        every step. ``stream``: a flow-controlled stream, which holds one chunk of its reply."""
        shape = (key, batch, seq, stream)
        sizes = self._estimates.get(shape)
        if sizes is None:
            reply = limits.estimate_reply_bytes(self.describe(), batch, seq, msg)
            sent = min(reply, self.cfg.stream_chunk_bytes) if stream else reply
            sizes = (reply, captured_bytes(spec, self.engine.modules, self.engine.num_classes, batch, seq) + sent)
            if len(self._estimates) >= 4 * MAX_CACHED_SPECS:
                self._estimates.clear()  # bounded, like the spec cache
            self._estimates[shape] = sizes
        return sizes

    check_outputs = staticmethod(check_outputs)

    def estimate_reply_bytes(self, spec: pb.TargetSpec, inputs: dict[str, torch.Tensor]) -> int:
        """Exact size of the outputs' data, known before any compute (kdserve.limits: the client's formula)."""
        ids = inputs.get("input_ids")
        seq = int(ids.shape[1]) if ids is not None and ids.dim() > 1 else 0
        return limits.estimate_reply_bytes(self.describe(), batch_size(inputs), seq, spec)

    def _encode_into(self, reply: pb.TargetsReply, outputs: dict, sl: slice | None = None) -> pb.TargetsReply:
        """Encode straight into ``reply.outputs``: a Tensor built apart and handed to the reply's
        constructor would be copied once more (upb copies sub-messages)."""
        for name, v in outputs.items():
            if isinstance(v, Quantized):
                q, s = (v.q, v.scales) if sl is None else (v.q[sl], v.scales[sl])
                codec.encode_into(reply.outputs[name], q, s)
            else:
                codec.encode_into(reply.outputs[name], v if sl is None else v[sl])
        return reply

    def _timings(self, stats: BatchStats, queue_ms: float) -> pb.Timings:
        return pb.Timings(
            queue_ms=queue_ms,
            compute_ms=stats.compute_ms,
            batch_requests=stats.requests,
            batch_samples=stats.samples,
        )

    def _finish(self, header: pb.TargetsReply, outputs: dict, sl: slice | None, encoded: bool):
        """``header`` plus the outputs: a message, or its wire bytes built with one copy per tensor
        (kdserve.reply_wire: what the plain gRPC server sends, without protobuf's copies)."""
        if not encoded:
            return self._encode_into(header, outputs, sl)
        return reply_wire.encode_reply(header, _parts(outputs, sl))

    def reply(
        self, request: pb.TargetsRequest, work: Work, outputs: dict, stats: BatchStats, queue_ms: float,
        encoded: bool = False,
    ) -> "pb.TargetsReply | reply_wire.EncodedReply":
        """The GetTargets answer; ``encoded``: as a reply_wire.EncodedReply (bytes, parse-equal)."""
        header = pb.TargetsReply(
            fingerprint=self.engine.fingerprint,
            timings=self._timings(stats, queue_ms),
            sample_keys=list(request.sample_keys),
            sample_offset=0,
            num_chunks=1,
        )
        return self._finish(header, outputs, None, encoded)

    def chunks(
        self, request: pb.TargetsRequest, work: Work, outputs: dict, stats: BatchStats, queue_ms: float,
        encoded: bool = False,
    ) -> "Iterator[pb.TargetsReply | reply_wire.EncodedReply]":
        """Split along the batch into chunks of about ``stream_chunk_bytes`` (at least one sample);
        ``encoded``: as reply_wire.EncodedReply, like ``reply``."""
        b = batch_size(work.inputs)
        per_sample = max(1, payload_nbytes(outputs) // b)
        step = max(1, self.cfg.stream_chunk_bytes // per_sample)
        starts = list(range(0, b, step))
        keys = list(request.sample_keys)
        for start in starts:
            sl = slice(start, min(b, start + step))
            chunk = pb.TargetsReply(
                fingerprint=self.engine.fingerprint,
                timings=self._timings(stats, queue_ms),
                sample_keys=keys[sl],
                sample_offset=start,
                num_chunks=len(starts),
            )
            yield self._finish(chunk, outputs, sl, encoded)


def _parts(outputs: dict, sl: slice | None):
    """(name, tensor, scales or None) of each output, sliced along the batch (views, no copy)."""
    for name, v in outputs.items():
        if isinstance(v, Quantized):
            yield name, (v.q if sl is None else v.q[sl]), (v.scales if sl is None else v.scales[sl])
        else:
            yield name, (v if sl is None else v[sl]), None


def payload_nbytes(outputs: dict) -> int:
    """Tensor bytes (int8 scales included) that ``outputs`` put on the wire."""
    return sum(_nbytes(v) for v in outputs.values())


def _nbytes(v) -> int:
    if isinstance(v, Quantized):
        return v.q.numel() + 4 * v.scales.numel()
    return v.numel() * v.element_size()


__all__ = ["TeacherService", "captured_bytes", "check_outputs", "payload_nbytes", "status_of"]
