"""The teacher on NVIDIA Triton Inference Server (Python backend), serving the same targets.

Triton's tensors are named and fixed per model config, while kdserve's ``TargetSpec`` is per
request. The mapping (one wire format across frontends):

Inputs
    The teacher's own inputs with their declared dtypes and sample shapes (``pixel_values``
    FP32 ``[-1, 3, H, W]``; ``input_ids`` / ``attention_mask`` INT64 ``[-1, -1]``), so Triton
    validates dtypes and image sizes itself and ``perf_analyzer`` & co. see a normal model; plus
    ``request`` (BYTES, one element per sample): row i is a serialized ``kdserve.v1.TargetsRequest``
    WITHOUT tensors, holding the ``spec`` and ``experiment_id`` (the same in every row) and sample
    i's key in ``sample_keys`` (or none). One row per sample because Triton gives every input of a
    batching model the request's batch dimension; a request carries one spec, and requests with
    different specs are batched by Triton and answered separately.

Texts
    A teacher with a tokenizer (Describe's ``tokenizer``) takes raw texts instead of its token
    inputs: text i travels in row i's ``texts`` (with ``text_tokenizer`` in every row), the model
    joins the rows' texts in order, and ``TeacherService`` tokenizes and checks them as on every
    frontend. Its token inputs are therefore declared optional; a request with neither is refused
    by the model. More texts than ``max_batch_size`` one per row means more rows than Triton's
    batch limit: Triton refuses that itself, in its words ("batch-size must be <= N"), before
    the model sees it; the model's own line answers a request packing more texts into its rows.

Output
    ``targets`` (UINT8, shape ``[1, N]``): B rows, each a 4-byte little-endian length followed by
    a serialized ``kdserve.v1.TargetsReply`` (the byte layout of a Triton BYTES tensor, written by
    the model in one pass; a BYTES output would cost the Python backend three more copies of
    every reply). Row i holds sample i's outputs (``sample_offset`` = i, ``num_chunks`` = B),
    exactly the chunks ``StreamTargets`` would send with one sample per chunk. A fixed set of named Triton outputs
    cannot carry what a spec chooses per request (which layers, reductions, dtype, int8 scales)
    nor the fingerprint; a serialized reply carries all of it, is produced by the SAME
    ``TeacherService`` code as the gRPC and Ray Serve frontends, and the client turns the rows
    back into one reply by joining each tensor's bytes (still one ``frombuffer`` per tensor).

Describe
    ``TeacherInfo`` (fingerprint included) is the model config parameter ``kdserve.teacher_info``
    (JSON), written by the repository generator, which loads the teacher once to learn its inputs
    and fingerprint. ``model.py`` refuses to load when the weights it loads have another
    fingerprint, so the config cannot describe a different teacher than the one answering, and
    every reply still carries the live fingerprint. A client reads it with Triton's model-config
    call (``GET /v2/models/<name>/config``): no inference queue, no extra model.

Errors
    The messages of ``TeacherService`` / ``teacher_server.spec`` (the same validation code),
    answered as per-request Triton errors: INVALID_ARGUMENT for bad requests; Triton has no
    RESOURCE_EXHAUSTED, so size-limit errors travel as INVALID_ARGUMENT with the message prefixed
    ``RESOURCE_EXHAUSTED:``, and the student transport restores the code
    (``student_workers.client.triton_transport.status_code``).

Streaming
    Triton has no StreamTargets; a request with the Triton request parameter ``kdserve_stream``
    true skips the ``max_reply_bytes`` check (the answer is still one Triton response, bounded by
    Triton's ~2 GiB message limit).

Modules: ``repository`` (generator, ``python -m teacher_server.triton``), ``model`` (the Python
backend model, copied into the repository), ``launch`` (start a local ``tritonserver``).
"""
from kdserve.triton_wire import (  # noqa: F401  (the names the Triton model and repository use)
    INFO_PARAMETER,
    KDSERVE_DTYPES,
    MODEL_NAME,
    REQUEST_INPUT,
    RESOURCE_EXHAUSTED_TAG,
    SIDECAR,
    STREAM_PARAMETER,
    TARGETS_OUTPUT,
    TRITON_DTYPES,
)
