"""The kdserve teacher as a Triton Python-backend model.

``python -m teacher_server.triton`` copies this file to ``<repository>/<name>/1/model.py``; it runs
inside Triton's Python backend stub, which imports ``triton_python_backend_utils`` and ignores
PYTHONPATH. ``initialize`` therefore puts the paths named in ``<name>/kdserve.json`` on sys.path
(plus ``$KDSERVE_PROJECT_PATH``) before importing kdserve, then builds the SAME ``TeacherEngine``
and ``TeacherService`` as the Ray Serve and gRPC frontends: this file decodes and encodes, it
computes no target itself.

``execute`` gets every request of a Triton dynamic batch (several clients, possibly different
specs) and answers them with ONE ``engine.run``; bad requests get their own error response and
never fail the others. The tensor/spec mapping is documented in teacher_server/triton/__init__.py.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

# Names shared with teacher_server.triton (not importable before sys.path is set up).
SIDECAR = "kdserve.json"
REQUEST_INPUT = "request"
TARGETS_OUTPUT = "targets"
STREAM_PARAMETER = "kdserve_stream"
RESOURCE_EXHAUSTED_TAG = "RESOURCE_EXHAUSTED: "


def _add_paths(paths) -> None:
    for p in reversed([p for p in paths if p and Path(p).is_dir()]):
        if p not in sys.path:
            sys.path.insert(0, p)


def frame(rows) -> np.ndarray:
    """reply_wire.EncodedReply rows -> (1, N) uint8: each row's 4-byte little-endian length, then its
    bytes (the layout of a Triton BYTES tensor). Written straight from each row's parts: a BYTES
    output would make pb_utils join the rows and numpy copy them twice more."""
    out = np.empty(sum(4 + r.nbytes for r in rows), np.uint8)
    i = 0
    for r in rows:
        out[i:i + 4] = np.frombuffer(r.nbytes.to_bytes(4, "little"), np.uint8)
        i += 4
        for p in r.parts:
            p = np.frombuffer(p, np.uint8)
            out[i:i + p.size] = p
            i += p.size
    return out.reshape(1, -1)


class TritonPythonModel:
    def initialize(self, args):
        model_dir = Path(args["model_repository"])
        sidecar = json.loads((model_dir / SIDECAR).read_text())
        _add_paths([os.environ.get("KDSERVE_PROJECT_PATH", ""), *sidecar.get("sys_path", [])])

        import grpc

        from kdserve.v1 import teacher_pb2
        from kdserve.teacher_config import TeacherConfig
        from teacher_server import malloc
        from teacher_server.engine import TeacherEngine
        from teacher_server.service import TeacherService, status_of
        from teacher_server.spec import SpecError

        self.pb, self.SpecError, self.status_of = teacher_pb2, SpecError, status_of
        self.INVALID, self.EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED

        cfg = TeacherConfig(**sidecar["teacher"])
        if args.get("model_instance_kind") == "GPU" and cfg.device in ("auto", "cuda"):
            cfg = cfg.model_copy(update={"device": f"cuda:{args['model_instance_device_id']}"})
        self.engine = TeacherEngine.from_config(cfg)
        if self.engine.fingerprint != sidecar["fingerprint"]:
            raise RuntimeError(
                f"teacher {cfg.model} loaded with fingerprint {self.engine.fingerprint}, but this repository "
                f"({model_dir}) was generated for {sidecar['fingerprint']}: the weights or preprocessing "
                "changed since; regenerate it with python -m teacher_server.triton"
            )
        malloc.start_trimmer()  # the stub's thresholds come from malloc.ENV; freed memory goes back when idle
        # One chunk per sample: row i of the `targets` output is sample i's TargetsReply.
        self.service = TeacherService(self.engine, cfg.model_copy(update={"stream_chunk_bytes": 1}))

    # -- requests -> Work ------------------------------------------------------------------
    def _decode(self, request):
        """A Triton request -> (header: kdserve.v1.TargetsRequest without tensors, its inputs as
        numpy arrays, stream flag). The arrays go to ``TeacherService.prepare_arrays`` as they are:
        no TargetsRequest is built around their bytes only to be parsed back."""
        pb = self.pb
        arrays = {t.name(): t.as_numpy() for t in request.inputs()}  # views of Triton's shared memory
        rows = arrays.pop(REQUEST_INPUT, None)
        if rows is None:
            raise self.SpecError(
                f"input {REQUEST_INPUT!r} is missing: send one serialized kdserve.v1.TargetsRequest "
                "(spec, experiment_id, that sample's key; no tensors) per sample"
            )
        rows = rows.reshape(-1)
        if not len(rows):
            raise self.SpecError("inputs: batch is empty (dim 0 is 0)")
        headers = []
        for j, row in enumerate(rows):
            try:
                headers.append(pb.TargetsRequest.FromString(bytes(row)))
            except Exception:  # protobuf's DecodeError: its text is the parser's, not the client's business
                raise self.SpecError(f"{REQUEST_INPUT}[{j}] is not a serialized kdserve.v1.TargetsRequest "
                                     f"({len(row)} bytes)") from None
        head = headers[0]
        for j, h in enumerate(headers):
            if h.inputs:
                raise self.SpecError(
                    f"{REQUEST_INPUT}[{j}] carries tensors: send them as Triton inputs, not inside the request row"
                )
            if j and (h.spec != head.spec or h.experiment_id != head.experiment_id
                      or h.text_tokenizer != head.text_tokenizer):
                raise self.SpecError(
                    f"{REQUEST_INPUT}[{j}]: spec, experiment_id or text_tokenizer differs from row 0; one request "
                    "carries one spec (send samples with different specs as separate requests)"
                )
        if len(headers) > 1:  # raw texts, one per row (or all in row 0), are the request's texts in order
            head = pb.TargetsRequest(
                experiment_id=head.experiment_id,
                spec=head.spec,
                sample_keys=[k for h in headers for k in h.sample_keys],
                texts=[t for h in headers for t in h.texts],
                text_tokenizer=head.text_tokenizer,
            )
        params = request.parameters()
        stream = params not in ("", "{}") and bool(json.loads(params).get(STREAM_PARAMETER, False))
        return head, arrays, stream

    def _error(self, exc: BaseException):
        code, msg = self.status_of(exc)  # the message every kdserve frontend gives
        if code == self.EXHAUSTED:
            err = pb_utils.TritonError(RESOURCE_EXHAUSTED_TAG + msg, pb_utils.TritonError.INVALID_ARG)
        elif code == self.INVALID:
            err = pb_utils.TritonError(msg, pb_utils.TritonError.INVALID_ARG)
        else:
            err = pb_utils.TritonError(msg, pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(output_tensors=[], error=err)

    # -- one Triton batch -> one engine.run --------------------------------------------------
    def execute(self, requests):
        t0 = time.perf_counter()
        responses = [None] * len(requests)
        accepted = []  # (index, TargetsRequest, Work)
        for i, request in enumerate(requests):
            try:
                head, arrays, stream = self._decode(request)
                work = self.service.prepare_arrays(head, arrays, stream=stream)
                self.service.reserve(work)  # released below, once this batch's responses are built
                accepted.append((i, head, work))
            except Exception as e:  # this request's error; the others go on
                responses[i] = self._error(e)
        try:
            self._answer(accepted, responses, t0)
        finally:
            for _, _, work in accepted:
                self.service.release(work)
        return responses

    def _answer(self, accepted, responses, t0) -> None:
        """One engine.run over the accepted requests; fills ``responses`` at their indices."""
        if not accepted:
            return
        start = time.perf_counter()
        # queue_ms covers only the time in this model before the forward (decoding the batch);
        # Triton's own queue time is in its statistics (/v2/models/<name>/stats).
        queue_ms = (start - t0) * 1e3
        try:
            results, stats = self.engine.run([w for _, _, w in accepted])
        except Exception as e:
            for i, _, _ in accepted:
                responses[i] = self._error(e)
        else:
            for (i, msg, work), outputs in zip(accepted, results):
                try:
                    self.service.check_outputs(outputs)
                    # one row per sample, each built as wire bytes (kdserve.reply_wire), framed
                    # into one UINT8 array: each tensor's bytes copied once. A lone sample's
                    # row is the whole reply (no slicing of its outputs).
                    if work.samples == 1:
                        rows = [self.service.reply(msg, work, outputs, stats, queue_ms, encoded=True)]
                    else:
                        rows = self.service.chunks(msg, work, outputs, stats, queue_ms, encoded=True)
                    out = pb_utils.Tensor(TARGETS_OUTPUT, frame(list(rows)))
                    responses[i] = pb_utils.InferenceResponse(output_tensors=[out])
                except Exception as e:
                    responses[i] = self._error(e)

    def finalize(self):
        self.engine = self.service = None
