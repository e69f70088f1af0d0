"""The teacher service's configuration (a job's ``teacher.local``, a Serve app's args, the CLI's YAML).

It lives in the shared package because a job describes the teacher it deploys; what a field
MEANS (which model kinds exist, which names load) is checked by the teacher side
(``teacher_server.validate``), on the driver, before any cluster starts."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from kdserve.config import Strict


class TeacherConfig(Strict):
    model: str = Field(
        "minilm",
        description="<kind>:<name>. timm:<timm name> (ViT, DeiT, BEiT v2...), hf:<hub name, local dir, "
        "or model type when pretrained=false>, minilm (the packaged all-MiniLM-L6-v2).",
    )
    pretrained: bool = Field(True, description="Load trained weights; false builds a random-init model.")
    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra constructor arguments: timm.create_model kwargs, or HF config overrides.",
    )
    hf_task: Literal["", "image-classification", "sequence-classification"] = Field(
        "", description="HF head to load: '' (bare encoder, no logits) or a classification head."
    )
    seed: int = Field(0, description="Seed for random-init weights (so every replica builds the same teacher).")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:N.")
    amp: Literal["none", "bf16", "fp16"] = Field("bf16", description="Autocast dtype on CUDA; ignored on CPU.")
    max_batch_size: int = Field(64, ge=1, description="Most samples per request and per forward.")
    batch_wait_timeout_s: float = Field(
        0.0, ge=0,
        description="Triton's max_queue_delay: how long a lone request waits for company. 0 (default) batches "
        "what queued while the previous forward ran, as the gRPC and Serve frontends' Coalescer does.",
    )
    max_request_bytes: int = Field(256 << 20, ge=1, description="Larger requests get RESOURCE_EXHAUSTED.")
    max_reply_bytes: int = Field(
        1 << 30, ge=1, description="Larger GetTargets replies get RESOURCE_EXHAUSTED (use StreamTargets)."
    )
    stream_chunk_bytes: int = Field(32 << 20, ge=1, description="Target size of one StreamTargets chunk.")
    stream_stall_timeout_s: float = Field(
        60.0, gt=0,
        description="Plain gRPC server: a StreamTargets client that reads no chunk for this long is cancelled, "
        "freeing its handler and the computed targets it holds.",
    )
    num_replicas: int = Field(1, ge=1, description="Ray Serve replicas of the teacher.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share a GPU).")
    max_ongoing_requests: int = Field(
        64, ge=1, description="Concurrent requests per replica; bounds the batches @serve.batch can form."
    )
    scheduler: Literal["fair", "fifo"] = Field(
        "fair",
        description="How the batcher picks the next forward across experiments: fair (virtual token counter, "
        "Sheng et al. OSDI 2024: each experiment charged samples x tokens served, divided by its weight) "
        "or fifo (arrival order, for comparison).",
    )
    experiment_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Fair-share weight per experiment id, or per id prefix written 'prefix*' (longest prefix "
        "wins; an exact id beats any prefix). Unlisted experiments weigh 1.0. Weight 3 gets 3x the work of 1.",
    )
    cache_bytes: int = Field(
        0, ge=0,
        description="Bytes of computed targets the teacher keeps (LRU) and reuses for identical requests "
        "(same input bytes, spec and fingerprint) from any experiment; 0 turns the cache off.",
    )
    max_requests_per_experiment: int = Field(
        32, ge=0,
        description="Most requests one experiment may have waiting or computing at once; more get "
        "RESOURCE_EXHAUSTED at once (lower the student's prefetch depth or client count). Keeps one "
        "experiment from holding every handler and queue slot of a shared teacher. 0: no cap.",
    )
    max_queued_bytes_per_experiment: int = Field(
        1 << 30, ge=0,
        description="Most request bytes (decoded inputs) one experiment may have waiting or computing at "
        "once; more get RESOURCE_EXHAUSTED. 0: no cap.",
    )
    inline_forward_ms: float = Field(
        1.0, ge=0,
        description="A forward predicted (from the last one, scaled by samples x tokens) to take less than this "
        "runs on the server's event loop instead of a worker thread: handing it to a thread and back costs "
        "more CPU than such a forward (a synthetic teacher, tiny requests). Longer forwards always go to a "
        "thread so the loop keeps taking requests. 0: always a thread.",
    )
    auth_token_file: str | None = Field(
        None,
        description="Ray Serve only: file holding the shared bearer token every call must carry "
        "(a k8s Secret mount); unset: $KDSERVE_AUTH_TOKEN in the replica, else no auth.",
    )
    metrics_port: int = Field(
        0, ge=0, description="Plain gRPC server only: serve Prometheus metrics on this port (0: none)."
    )

    @field_validator("experiment_weights")
    @classmethod
    def _positive_weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if not w > 0}
        if bad:
            raise ValueError(f"experiment weights must be > 0, got {bad}")
        return v

    @field_validator("model")
    @classmethod
    def _kind_name(cls, v: str) -> str:
        if not v.partition(":")[0]:
            raise ValueError(f"{v!r} is not <kind>:<name> (e.g. timm:vit_base_patch16_224, hf:bert-base-uncased, minilm)")
        return v
