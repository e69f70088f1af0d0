"""The teacher service's configuration (a job's ``teacher.local``, a Serve app's args, the CLI's YAML).

It lives in the shared package because a job describes the teacher it deploys; what a field
MEANS (which model kinds exist, which names load) is checked by the teacher side
(``teacher_server.validate``), on the driver, before any cluster starts."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from kdserve import placement
from kdserve.config import Strict


FRONTENDS = ("grpc", "serve", "triton")
_NAMES = {"grpc": "the plain gRPC server", "serve": "Ray Serve", "triton": "Triton"}


class SharingOptions(Strict):
    """How the gRPC and Ray Serve frontends' batcher (teacher_server.coalesce) shares one teacher
    between experiments. Triton batches with its own dynamic batcher and uses none of these."""

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
    cache_bytes: int = Field(
        0, ge=0,
        description="Bytes of computed targets the teacher keeps (LRU) and reuses for identical requests "
        "(same input bytes, spec and fingerprint) from any experiment; 0 turns the cache off.",
    )
    inline_forward_ms: float = Field(
        1.0, ge=0,
        description="A forward predicted (from the last one, scaled by samples x tokens) to take less than this "
        "runs on the server's event loop instead of a worker thread: handing it to a thread and back costs "
        "more CPU than such a forward (a synthetic teacher, tiny requests). Longer forwards always go to a "
        "thread so the loop keeps taking requests. 0: always a thread.",
    )

    @field_validator("experiment_weights")
    @classmethod
    def _positive_weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if not w > 0}
        if bad:
            raise ValueError(f"experiment weights must be > 0, got {bad}")
        return v


class StoreOptions(Strict):
    """A persistent target store (kdserve/store, docs/store.md "The served teacher's store") behind
    the batcher's in-memory cache: the gRPC and Serve frontends answer a request whose every sample
    it holds without a forward, and write what they compute back, so replicas and restarts share it.
    Each target spec gets its own store under ``<uri>/<spec-hash>/``; ``<uri>/manifest.json`` names
    the teacher, and a store made by another teacher is refused at startup."""

    uri: str = Field(
        "", description="Where the store lives: a local directory, file://, s3://bucket/prefix, gs://...; '' (default): "
        "no store.")
    options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options (s3fs: endpoint_url, key, secret, ...).")
    write: bool = Field(
        True, description="Write computed targets back (a background thread) and create the store when missing; "
        "false: only read a store another teacher or job filled (it must exist).")
    max_bytes: int | None = Field(
        64 << 30, ge=1,
        description="Budget of EACH target spec's store (written teachers only): past it the oldest shards go. "
        "All specs together hold at most max_bytes x max_specs. null: no budget.")
    max_specs: int = Field(
        16, ge=1, description="Most target specs with an open store at once; requests of further specs skip the store.")
    shard_bytes: int = Field(64 << 20, ge=1, description="Written rows are flushed as one shard once this much is buffered.")
    flush_s: float = Field(
        30.0, gt=0, description="... or once the oldest buffered row is this old (and always at shutdown).")
    refresh_s: float = Field(
        10.0, gt=0, description="How often the teacher re-lists each store to see shards other replicas or jobs "
        "committed (one LIST per spec store).")
    cache_bytes: int = Field(
        64 << 20, ge=0, description="In-memory LRU of whole shards, per spec store (kdserve.store's cache_bytes).")
    queue_bytes: int = Field(
        256 << 20, ge=1, description="Most computed target bytes waiting for the writer thread; past it, "
        "rows are not written (counted as dropped) rather than hold the teacher's memory.")


class GrpcOptions(Strict):
    """The plain gRPC server only (``python -m teacher_server --backend grpc``, run_server)."""

    stream_stall_timeout_s: float = Field(
        60.0, gt=0,
        description="A StreamTargets client that reads no chunk for this long is cancelled, freeing its "
        "handler and the computed targets it holds.",
    )
    metrics_port: int = Field(0, ge=0, description="Serve Prometheus metrics on this port (0: none).")


class ServeAutoscaling(Strict):
    """Replicas that follow demand: Ray Serve's autoscaling_config, in the terms a teacher needs.
    Serve adds a replica when the ongoing requests per replica stay above the target for
    ``upscale_delay_s`` and removes one when they stay below it for ``downscale_delay_s``; on
    KubeRay with ``enableInTreeAutoscaling`` the cluster adds the nodes those replicas need."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0: none while no student sends work).")
    max_replicas: int = Field(4, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        16.0, gt=0,
        description="Requests in flight per replica that Serve aims for. A student keeps prefetch_depth requests "
        "per worker in flight, and the batcher fills a forward from them: well below max_ongoing_requests.",
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="Load above the target for this long adds replicas.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Load below the target for this long removes replicas.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window the load is averaged over (Serve's default).")

    @field_validator("max_replicas")
    @classmethod
    def _max_over_min(cls, v: int, info: ValidationInfo) -> int:
        low = info.data.get("min_replicas")
        if low is not None and v < low:
            raise ValueError(f"{v} is under min_replicas ({low})")
        return v


class ServeOptions(Strict):
    """Ray Serve only (``python -m teacher_server``, a job's embedded teacher, the k8s RayService)."""

    num_replicas: int = Field(1, ge=1, description="Replicas of the teacher deployment (fixed; see autoscaling).")
    autoscaling: ServeAutoscaling | None = Field(
        None, description="Set: replicas follow demand between min_replicas and max_replicas (num_replicas unset).")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share a GPU).")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per replica, to put replicas on the nodes that offer them: e.g. "
        "{teacher_node: 0.01} with `ray start --resources '{\"teacher_node\": 1}'` on the teacher nodes.",
    )
    accelerator_type: str | None = Field(
        None, description="Only nodes with this accelerator (Ray's accelerator_type, e.g. H100, A10G, L4).")
    direct_port: int | None = Field(
        0, ge=0, le=65535,
        description="Each replica also serves TeacherService itself on this port of its node (0: a free port; "
        "null: off), with the same batcher, limits and token; Describe lists the live ones and clients "
        "spread their targets requests over them, skipping the proxy hop (teacher_server/direct.py).")
    direct_host: str = Field(
        "127.0.0.1", description="Interface the replicas' direct endpoints bind: loopback (students on the same "
        "node only) or 0.0.0.0 (the node's IP is advertised; k8s pods, students on other nodes).")
    max_ongoing_requests: int = Field(
        64, ge=1, description="Concurrent requests per replica; bounds the batches the batcher can form."
    )
    proxy_stream_max_bytes: int = Field(
        64 << 20, ge=0,
        description="Largest StreamTargets reply sent through Serve's gRPC proxy (0: no bound). The proxy has "
        "no flow control: the replica's generator runs to its end whatever the client reads, and the chunks "
        "wait in Ray's object store, in the teacher node's memory. Larger streams get RESOURCE_EXHAUSTED and "
        "go to a replica's direct endpoint (HTTP/2 flow control; the kdserve client uses it by default).")
    auth_token_file: str | None = Field(
        None,
        description="File holding the shared bearer token every call must carry (a k8s Secret mount); "
        "unset: $KDSERVE_AUTH_TOKEN in the replica, else no auth.",
    )

    @field_validator("autoscaling")
    @classmethod
    def _one_replica_policy(cls, v: ServeAutoscaling | None, info: ValidationInfo) -> ServeAutoscaling | None:
        if v is not None and info.data.get("num_replicas", 1) != 1:
            raise ValueError("set either num_replicas (a fixed count) or autoscaling, not both")
        return v

    def replica_resources(self) -> dict[str, float]:
        """What one replica asks of a node, in the terms of ``ray.nodes()[i]["Resources"]``."""
        return placement.need(self.num_cpus, self.num_gpus, self.resources, self.accelerator_type)


class TritonOptions(Strict):
    """Triton only (``python -m teacher_server.triton``)."""

    batch_wait_timeout_s: float = Field(
        0.0, ge=0,
        description="Dynamic batching's max_queue_delay: how long a lone request waits for company. 0 (default) "
        "batches what queued while the previous forward ran, as the gRPC and Serve batcher does.",
    )
    instances: int = Field(1, ge=1, description="Model instances per device (instance_group count).")


class TeacherConfig(Strict):
    """One teacher, whichever frontend serves it. Sections: the model and its engine; what one
    request and all of them may cost (every frontend); ``sharing`` (the gRPC and Serve batcher);
    then one section per frontend, ``grpc``, ``serve`` and ``triton``. A frontend refuses a config
    that sets another frontend's options (``check_frontend``), since it would silently ignore them."""

    # -- the model and its engine --
    model: str = Field(
        "minilm",
        description="<kind>:<name>. timm:<timm name> (ViT, DeiT, BEiT v2...), hf:<hub name, local dir, "
        "or model type when pretrained=false>, minilm (the packaged all-MiniLM-L6-v2), mpnet (all-mpnet-base-v2, the mpnet extra).",
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

    # -- what one request and all of them may cost (every frontend) --
    max_batch_size: int = Field(64, ge=1, description="Most samples per request and per forward.")
    max_request_bytes: int = Field(256 << 20, ge=1, description="Larger requests get RESOURCE_EXHAUSTED.")
    max_reply_bytes: int = Field(
        1 << 30, ge=1, description="Larger GetTargets replies get RESOURCE_EXHAUSTED (use StreamTargets)."
    )
    max_request_memory_bytes: int = Field(
        2 << 30, ge=1,
        description="Most bytes one request (GetTargets or StreamTargets) may make the teacher hold: its targets "
        "as the forward captures them (float32, before reductions and the wire dtype) plus its reply (one chunk "
        "for a stream). Computed from the spec and input shapes before the forward; over it: RESOURCE_EXHAUSTED.",
    )
    max_memory_bytes: int = Field(
        4 << 30, ge=1,
        description="Most bytes all requests in flight may hold together (each counted as for "
        "max_request_memory_bytes, from admission to the last byte of its reply); a request that would pass it "
        "gets RESOURCE_EXHAUSTED. With the model, one forward's activations and the queued inputs (capped per "
        "experiment), this bounds the teacher's memory.",
    )
    stream_chunk_bytes: int = Field(32 << 20, ge=1, description="Target size of one StreamTargets chunk.")

    # -- sharing one teacher, then each frontend's own options --
    sharing: SharingOptions = Field(default_factory=SharingOptions, description="The gRPC and Serve batcher.")
    store: StoreOptions = Field(
        default_factory=StoreOptions, description="A persistent target store behind the gRPC and Serve batcher (off).")
    grpc: GrpcOptions = Field(default_factory=GrpcOptions, description="Plain gRPC server only.")
    serve: ServeOptions = Field(default_factory=ServeOptions, description="Ray Serve only.")
    triton: TritonOptions = Field(default_factory=TritonOptions, description="Triton only.")

    @field_validator("max_memory_bytes")
    @classmethod
    def _request_fits_memory(cls, v: int, info: ValidationInfo) -> int:
        """Named on max_memory_bytes (declared after max_request_memory_bytes), so the error names a field."""
        per_request = info.data.get("max_request_memory_bytes")
        if per_request is not None and per_request > v:
            raise ValueError(f"{v} is under max_request_memory_bytes ({per_request}): no request that large could "
                             "ever be answered; raise this or lower that")
        return v

    @field_validator("model")
    @classmethod
    def _kind_name(cls, v: str) -> str:
        if not v.partition(":")[0]:
            raise ValueError(f"{v!r} is not <kind>:<name> (e.g. timm:vit_base_patch16_224, hf:bert-base-uncased, minilm)")
        return v

    def updated(self, section: str, **fields: Any) -> "TeacherConfig":
        """A copy with ``fields`` of one section (sharing, store, grpc, serve, triton) replaced, validated."""
        part = getattr(self, section)
        return self.model_copy(update={section: type(part).model_validate({**part.model_dump(), **fields})})

    def check_frontend(self, frontend: str, where: str = "") -> "TeacherConfig":
        """This config, once no option that ``frontend`` ignores differs from its default.

        Raises ValueError naming the first such field (prefixed with ``where``, e.g.
        ``teacher.local.``): a setting that does nothing should not look as if it did."""
        if frontend not in FRONTENDS:
            raise ValueError(f"unknown frontend {frontend!r}; one of {', '.join(FRONTENDS)}")
        ignored = [s for s in FRONTENDS if s != frontend] + (["sharing", "store"] if frontend == "triton" else [])
        for section in ignored:
            for name in changed_fields(getattr(self, section)):
                owner = f"an option of {_NAMES.get(section, 'the gRPC and Serve batcher')}"
                raise ValueError(f"{where}{section}.{name} is {owner}, and this teacher runs on {_NAMES[frontend]}, "
                                 "which ignores it; remove it")
        return self


def changed_fields(section: Strict) -> list[str]:
    """Fields of ``section`` whose value differs from the field's default (a config dumped and
    loaded again keeps every key, so "set" means "not the default")."""
    return [name for name, f in type(section).model_fields.items()
            if getattr(section, name) != f.get_default(call_default_factory=True)]
