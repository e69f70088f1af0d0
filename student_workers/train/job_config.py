"""The distillation job's configuration: one YAML file, five sections, every field documented.

Unknown keys are errors; ``--set section.field=value`` overrides any field; the resolved config is
written next to the run's outputs as ``config.yaml``.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kdserve import placement, registry
from kdserve.config import Strict
from kdserve.teacher_config import TeacherConfig
from student_workers import losses
from student_workers.eval.downstream.config import DownstreamConfig
from student_workers.models.base import StudentConfig

LOSS_MODULES = (losses,)  # imported for the @register lines of the names the distill section accepts


DEFAULT_TEACHER = "teacher"  # the name of `teacher:` when teacher.name is not set


class TeacherSection(Strict):
    """Where targets come from, and how the client talks to it."""

    name: str | None = Field(
        None, description="The name loss terms (distill.teachers keys) and logged terms (`emb.text@<name>`) use for "
        "this teacher, and its Ray Serve application's when the job deploys several: `teacher:` is named `teacher` "
        "unless set; under `teachers:` the key is the name (leave this empty there).")
    address: str | None = Field(
        None,
        description="grpc://host:port[/app] of a running teacher. Empty: the job deploys `local` on Ray "
        "Serve in its own Ray cluster first (the embedded default).",
    )
    local: TeacherConfig = Field(default_factory=TeacherConfig, description="Teacher to deploy when no address.")
    grpc_port: int = Field(9000, description="gRPC port of the locally deployed teacher.")
    host: str = Field("127.0.0.1", description="Interface the locally deployed teacher binds: loopback by "
                      "default (workers on this node only); 0.0.0.0 to serve workers on other nodes.")
    timeout_s: float = Field(60.0, gt=0, description="Deadline of one teacher call.")
    retry_budget_s: float = Field(
        120.0, ge=0, description="How long a step keeps retrying UNAVAILABLE / DEADLINE_EXCEEDED (with backoff) "
        "before the job stops (one line, exit 1; no worker restart waits it out again): long enough to ride "
        "out a teacher restart.")
    auth_token_file: str | None = Field(
        None, description="File holding the teacher's bearer token (else $KDSERVE_AUTH_TOKEN; none: no token). "
        "The embedded teacher (no address) requires it too; with neither it, local.serve.auth_token_file nor "
        "$KDSERVE_AUTH_TOKEN, the job makes a random token for the run.")
    tls_ca_file: str | None = Field(None, description="CA bundle to trust for a grpcs:// teacher (default: system roots).")
    prefetch_depth: int | Literal["auto"] = Field(
        2, description="Teacher requests kept in flight ahead of training (0: none). auto: 1 + ceil(round trip / "
        "step time), measured as it trains, between 2 and prefetch_max_depth; use it when the teacher's "
        "latency is near or above the step time (at depth 2 the teacher then sets the pace).")
    prefetch_max_depth: int = Field(4, ge=2, description="Most requests prefetch_depth: auto keeps in flight.")

    @field_validator("prefetch_depth")
    @classmethod
    def _depth(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 0:
            raise ValueError("prefetch_depth must be >= 0 or 'auto'")
        return v

    def most_in_flight(self) -> int:
        """The deepest the prefetcher goes: what OPTIMA's plan must assume is already requested."""
        return self.prefetch_max_depth if self.prefetch_depth == "auto" else self.prefetch_depth
    direct: bool = Field(
        True, description="Send targets requests straight to the replicas a Ray Serve teacher lists (its "
        "serve.direct_port endpoints), spread over them, instead of through its proxy; false: always the address.")
    target_dtype: Literal["float32", "float16", "bfloat16", "int8"] = Field(
        "float32", description="Wire dtype of the targets (float16/int8 halve/quarter the bytes)."
    )

    store: str | None = Field(
        None, description="URI of a target store (docs/store.md: a local dir, s3://, gs://): targets keyed per "
        "sample, kept past the job. Fill one with kdserve-precompute --config <this job> or store_mode read_through.")
    store_mode: Literal["read", "read_through", "write"] = Field(
        "read_through", description="With `store`: read (every target from the store; no teacher is deployed or "
        "contacted; a missing key stops the job naming it), read_through (a miss goes to the teacher and is written "
        "back), write (every target from the teacher, all written).")
    store_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage_options of the store (s3fs: endpoint_url, key, secret...).")
    store_max_bytes: int | None = Field(
        None, gt=0, description="read_through only: the store's budget; the oldest shards are evicted past it.")

    @model_validator(mode="after")
    def _local_on_serve(self) -> "TeacherSection":
        """The embedded teacher runs on Ray Serve: an option only gRPC or Triton reads is a mistake."""
        if self.address is None and not self.reads_store_only:
            self.local.check_frontend("serve", "teacher.local.")
        return self

    @model_validator(mode="after")
    def _store_fields(self) -> "TeacherSection":
        if self.store is None and (self.store_options or self.store_max_bytes):
            what = "store_options" if self.store_options else "store_max_bytes"
            raise ValueError(f"teacher.{what} is set but teacher.store is not: name the store's URI")
        if self.store_max_bytes is not None and self.store_mode != "read_through":
            raise ValueError(f"teacher.store_max_bytes is the budget of store_mode read_through, not {self.store_mode}")
        return self

    @property
    def reads_store_only(self) -> bool:
        """Every target comes from ``store``: no teacher is deployed, contacted or needed."""
        return self.store is not None and self.store_mode == "read"


class OptimaSection(Strict):
    """OPTIMA (docs/methods.md#optima): a bandit picks which modules are distilled layerwise each round."""

    enabled: bool = Field(False, description="Turn the module bandit on.")
    delta: int = Field(20, ge=2, description="Training steps per round (Delta).")
    measure_steps: int = Field(4, ge=1, description="Last steps of a round whose full-model losses score it. "
                               "All modules' targets are requested on those steps and on the first "
                               "prefetch_depth steps of each round (requested before the arm is known).")
    gamma: float = Field(0.9, gt=0, lt=1, description="EMA factor of reward means (half-life ln0.5/ln gamma rounds).")
    warmup_rounds: int = Field(1, ge=0, description="Rounds each arm is played first, in random order.")
    seed: int = Field(0, description="Seed of the Thompson sampling.")
    variance_scale: float = Field(1.0, gt=0, description="Scales the posterior variance 1/(n+1); 1 is the paper's.")


class TermsSection(Strict):
    """The loss terms on one teacher's targets (the fields of `distill:` that name a teacher's targets)."""

    modules: list[str] = Field(default_factory=list, description="Modules to distill (empty: every student module).")
    feature_weight: float = Field(
        1.0, ge=0, description="Weight of feature KD on the mapped layers (docs/methods.md#feature-based-kd).")
    feature_kind: str = Field("mse", description="Feature distance (registry kind feature_distance): mse, l1, cosine.")
    layer_map: str = Field(
        "uniform", description="Which student block regresses which teacher block (docs/methods.md#layer-maps): "
        "uniform, last, explicit, all-average (registry kind layer_map).")
    layer_pairs: list[tuple[int, int]] = Field(
        default_factory=list, description="explicit map: (student block, teacher block), 1-based.")
    data2vec_weight: float = Field(
        0.0, ge=0, description="Weight of the Data2Vec target loss (docs/methods.md#data2vec-targets); the server "
        "reduces the teacher's layers (data2vec_top_k).")
    data2vec_eps: float = Field(1e-5, gt=0, description="eps of the Data2Vec instance/layer norms.")
    data2vec_top_k: int = Field(0, ge=0, description="Data2Vec: average the teacher's top K blocks (Baevski et al. "
                                "2022 average the upper blocks, not all); 0: all of them.")
    logits_weight: float = Field(
        0.0, ge=0, description="Weight of KL(teacher || student) on logits (docs/methods.md#response-based-kd).")
    logits_loss: str = Field(
        "kl", description="kl: T^2 KL (Hinton); soft_ce: CE with temperature (DistillVLM eq. 7); mse: raw logits.")
    temperature: float = Field(2.0, gt=0, description="KD temperature T (the loss carries T^2).")
    logits_top_k: int = Field(0, ge=0, description="Request only the teacher's top-k logits (0: all).")
    task_weight: float = Field(0.0, ge=0, description="Weight of the hard-label task loss (CE on data labels).")
    embedding_weight: float = Field(
        0.0, ge=0, description="Weight of the pooled-embedding loss: masked mean of the last block, student (projected) "
        "vs teacher, what a sentence encoder is used through.")
    embedding_kind: str = Field("cosine", description="Distance of the embedding loss (registry kind feature_distance).")
    embedding_loss: Literal["pointwise", "relational", "listwise"] = Field(
        "pointwise", description="pointwise: embedding_kind between the student's embedding, projected to the teacher's "
        "width, and the teacher's; relational: KL between their in-batch neighbour distributions (no projection; "
        "docs/methods.md#relational-embedding-loss); listwise: the same over each query's answers only (pair "
        "datasets: wordnet_pairs).")
    embedding_tau: float = Field(0.05, gt=0, description="Temperature of the relational embedding loss's similarities.")
    embedding_bank_size: int = Field(0, ge=0, description="Relational loss only: the last K texts' embeddings (student's, "
        "detached, and teacher's) added to every anchor's neighbours (0: the batch alone; methods.md#relational-embedding-loss).")
    embedding_target: Literal["tokens", "pooled"] = Field(
        "tokens", description="What the embedding loss asks the teacher for: tokens (its last block, pooled over the "
        "student's mask: same tokenizer only) or pooled (its own sentence embedding, hidden_reduction mean over its own "
        "tokens: (B, D), T times fewer bytes; what a teacher given raw texts, data.teacher_text, can serve).")
    attention_weight: float = Field(
        0.0, ge=0, description="Weight of attention-map distillation (docs/methods.md#attention-maps).")
    attention_kind: str = Field(
        "head_mean", description="per_head: DistillVLM last-layer MSE; head_mean: OPTIMA per mapped layer.")
    nce_weight: float = Field(
        0.0, ge=0, description="Weight of token-wise NCE on the last layer (docs/methods.md#token-wise-nce).")
    nce_tau: float = Field(0.1, gt=0, description="NCE temperature.")
    nce_queue_size: int = Field(4096, ge=1, description="Teacher embeddings kept as negatives (K).")
    nce_mean_pooled: bool = Field(False, description="One NCE per sample on mean-pooled tokens instead of per token.")

    @model_validator(mode="after")
    def _pooled_alone(self) -> "DistillSection":
        """One request carries one hidden reduction: the teacher's mean leaves no tokens for other terms."""
        token_terms = {"feature_weight": self.feature_weight, "nce_weight": self.nce_weight,
                       "attention_weight": self.attention_weight, "data2vec_weight": self.data2vec_weight}
        on = [k for k, w in token_terms.items() if w > 0]
        if self.embedding_bank_size and self.embedding_loss != "relational":
            raise ValueError(f"distill.embedding_bank_size: a bank of neighbours is for embedding_loss relational, not "
                             f"{self.embedding_loss}")
        if self.embedding_weight > 0 and self.embedding_target == "pooled" and on:
            raise ValueError(f"distill.embedding_target pooled: one request carries one hidden reduction (mean), so "
                             f"{on[0]} must be 0")
        return self

    @field_validator("feature_kind", "embedding_kind", "layer_map", "logits_loss", "attention_kind")
    @classmethod
    def _registered(cls, v: str, info) -> str:
        kind = _REGISTRY_KIND[info.field_name]
        if v not in registry.names(kind):
            raise ValueError(f"unknown {kind} {v!r}; registered: {', '.join(registry.names(kind))}")
        return v

    def token_level(self) -> list[str]:
        """The weighted terms that need one target per student token (not the pooled embedding, not logits)."""
        return [f for f in TOKEN_LEVEL if getattr(self, f) > 0]


# Terms whose targets line up with the student's tokens: a teacher with another tokenizer serves none.
TOKEN_LEVEL = ("feature_weight", "attention_weight", "nce_weight", "data2vec_weight")


class TeacherTerms(TermsSection):
    """The loss terms on a further teacher's targets: the same fields, every weight 0 unless set."""

    feature_weight: float = Field(0.0, ge=0, description="Weight of feature KD on the mapped layers (0 unless set).")


class DistillSection(TermsSection):
    """The losses: its own term fields use `teacher:`'s targets; `teachers` holds the terms of the others."""

    teachers: dict[str, TeacherTerms] = Field(
        default_factory=dict, description="Loss terms on the targets of the further teachers, by their name in "
        "`teachers:` (e.g. {mpnet: {embedding_weight: 1.0}}); the task term stays in distill itself.")
    optima: OptimaSection = Field(default_factory=OptimaSection)

    def terms_of(self, name: str, default: str) -> "DistillSection":
        """The distill section one teacher's Distiller head gets: its own terms, no task term, no bandit."""
        if name == default:
            return self.model_copy(update={"teachers": {}})
        return DistillSection(**self.teachers[name].model_dump())


# Which registry table each name-valued distill field is looked up in.
_REGISTRY_KIND = {"feature_kind": "feature_distance", "embedding_kind": "feature_distance", "layer_map": "layer_map",
                  "logits_loss": "logits_loss",
                  "attention_kind": "attention_loss"}


class DataSection(Strict):
    dataset: str = Field("wordnet", description="Registered dataset: wordnet, wordnet_pairs, text_file, sklearn_images, "
                         "image_folder...")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Dataset arguments (e.g. path, size).")
    batch_size: int = Field(32, ge=1, description="Dataset items per worker per step (a wordnet_pairs item is two "
                            "texts, a definition and its headword; with group_size g, 2g texts).")
    max_length: int = Field(32, ge=2, description="Text: tokens per sentence (teacher's tokenizer).")
    tokenizer: str = Field("minilm", description="Text: the TEACHER's tokenizer (minilm, mpnet or a local HF dir); "
                           "with teacher_text or teacher_tokenizer, the student's.")
    teacher_text: bool = Field(
        False, description="Text: send the teacher the raw texts (it tokenizes them with its own tokenizer; for a "
        "teacher whose tokenizer is not the student's). Only sentence-level targets then: distill.embedding_target "
        "pooled (and logits).")
    teacher_tokenizer: str | None = Field(
        None, description="Text: the teacher's tokenizer when its vocabulary is data.tokenizer's under other ids "
        "(mpnet's is MiniLM's, shifted by 4): the teacher is sent the student's tokens in its own ids, so token-level "
        "targets line up; checked on the driver on probe texts and the data's first batch.")
    eval_samples: int = Field(256, ge=0, description="Held-out samples for the final student-vs-teacher comparison.")


class TrainSection(Strict):
    steps: int = Field(300, ge=1, description="Optimizer steps per worker.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (student and distillation heads).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(20, ge=0, description="Linear LR warm-up, then cosine decay.")
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clip (0: off).")
    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel, DDP).")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources per worker, to put the workers on the nodes that offer them (e.g. "
        "{student_node: 0.01}; the teacher's replicas go elsewhere with teacher.local.serve.resources).")
    accelerator_type: str | None = Field(None, description="Only nodes with this accelerator (e.g. A10G, L4).")
    seed: int = Field(0, description="Seed of the student init and data order.")
    log_every: int = Field(20, ge=1, description="Steps between progress lines and TensorBoard points.")
    checkpoint_every: int = Field(100, ge=1, description="Steps between checkpoints (each one a ray.train.report).")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts from the latest checkpoint.")

    def worker_resources(self) -> dict[str, float]:
        """What one worker asks of a node, in the terms of ``ray.nodes()[i]["Resources"]``."""
        return placement.need(self.cpus_per_worker, 1.0 if self.use_gpu else 0.0, self.resources_per_worker,
                              self.accelerator_type)


class RunSection(Strict):
    name: str = Field("quickstart", description="Run name: also the experiment id the teacher sees.")
    storage_path: str = Field("runs", description="Where checkpoints, TensorBoard and config.yaml go.")
    num_cpus: int | None = Field(None, description="Logical CPUs of a local Ray cluster (None: Ray decides).")


class JobConfig(Strict):
    teacher: TeacherSection = Field(default_factory=TeacherSection, description="The (default) teacher.")
    teachers: dict[str, TeacherSection] = Field(
        default_factory=dict, description="Further teachers of the same student, by name (docs/methods.md#several-"
        "teachers): each its address or local config, fingerprint check, client and prefetch; the job deploys the "
        "local ones as applications of one Ray Serve instance (teacher.grpc_port). distill.teachers.<name> says "
        "which terms use each one's targets.")
    student: StudentConfig = Field(
        default_factory=lambda: StudentConfig(kind="hf_text", name="bert"), description="The student to train."
    )
    distill: DistillSection = Field(default_factory=DistillSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    run: RunSection = Field(default_factory=RunSection)
    evaluate: DownstreamConfig = Field(
        default_factory=DownstreamConfig,
        description="Downstream evaluation at the end of a text run (teacher vs distilled vs no-KD twin vs random "
        "init); the same as python -m student_workers.eval.evaluate --run <run dir>.")

    @model_validator(mode="after")
    def _text_in(self) -> "JobConfig":
        """Raw texts give the teacher its own tokens: no target lines up with the student's tokens."""
        d = self.distill
        if self.data.teacher_tokenizer is not None and self.data.teacher_text:
            raise ValueError("data.teacher_tokenizer: the teacher gets the student's tokens in its ids, not texts; "
                             "set data.teacher_text to false")
        if not self.data.teacher_text:
            return self
        token_level = {"feature_weight": d.feature_weight, "attention_weight": d.attention_weight,
                       "nce_weight": d.nce_weight, "data2vec_weight": d.data2vec_weight}
        on = [k for k, v in token_level.items() if v > 0]
        if on:
            raise ValueError(f"data.teacher_text: distill.{on[0]} > 0 needs token-level targets, which a teacher that "
                             "tokenizes the texts itself cannot align with the student's tokens; set it to 0")
        if d.embedding_weight > 0 and d.embedding_target != "pooled":
            raise ValueError("data.teacher_text: distill.embedding_target must be pooled (the teacher's own sentence "
                             "embedding); tokens would pool the teacher's tokens with the student's mask")
        return self

    @model_validator(mode="after")
    def _listwise_pairs(self) -> "JobConfig":
        """listwise reads a batch as (query, answer) rows side by side: only a pair dataset makes them."""
        if self.distill.embedding_loss == "listwise" and self.data.dataset != "wordnet_pairs" and self.distill.embedding_weight:
            raise ValueError(f"distill.embedding_loss listwise: needs (query, answer) pairs side by side in a batch "
                             f"(data.dataset wordnet_pairs), not data.dataset {self.data.dataset!r}")
        return self

    @model_validator(mode="after")
    def _store_one_spec(self) -> "JobConfig":
        """A store's manifest names one target spec; OPTIMA asks for another one per round."""
        if self.teacher.store is not None and self.distill.optima.enabled:
            raise ValueError("teacher.store: not with distill.optima.enabled (its target spec changes per round; a "
                             "store holds one spec)")
        return self

    @model_validator(mode="after")
    def _several_teachers(self) -> "JobConfig":
        from student_workers.train.several import check_teachers

        check_teachers(self)
        return self

    @property
    def teacher_name(self) -> str:
        return self.teacher.name or DEFAULT_TEACHER

    def all_teachers(self) -> dict[str, TeacherSection]:
        """{name: section}: `teacher:` first, then `teachers:` in their order."""
        return {self.teacher_name: self.teacher, **self.teachers}
