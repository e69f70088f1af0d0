from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "scales")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    scales: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., scales: _Optional[bytes] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModuleInfo(_message.Message):
    __slots__ = ("name", "num_layers", "hidden_size", "num_heads", "num_tokens", "layer_sizes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LAYER_SIZES_FIELD_NUMBER: _ClassVar[int]
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_tokens: int
    layer_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_heads: _Optional[int] = ..., num_tokens: _Optional[int] = ..., layer_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class InputInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "required", "doc")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    DOC_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    required: bool
    doc: str
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., required: _Optional[bool] = ..., doc: _Optional[str] = ...) -> None: ...

class TeacherInfo(_message.Message):
    __slots__ = ("model_name", "fingerprint", "modules", "inputs", "max_batch_size", "num_classes", "max_request_bytes", "max_reply_bytes", "preprocessing", "replica_endpoints", "caches_targets", "tokenizer")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREPROCESSING_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ENDPOINTS_FIELD_NUMBER: _ClassVar[int]
    CACHES_TARGETS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    fingerprint: str
    modules: _containers.RepeatedCompositeFieldContainer[ModuleInfo]
    inputs: _containers.RepeatedCompositeFieldContainer[InputInfo]
    max_batch_size: int
    num_classes: int
    max_request_bytes: int
    max_reply_bytes: int
    preprocessing: str
    replica_endpoints: _containers.RepeatedScalarFieldContainer[str]
    caches_targets: bool
    tokenizer: TokenizerInfo
    def __init__(self, model_name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., modules: _Optional[_Iterable[_Union[ModuleInfo, _Mapping]]] = ..., inputs: _Optional[_Iterable[_Union[InputInfo, _Mapping]]] = ..., max_batch_size: _Optional[int] = ..., num_classes: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., max_reply_bytes: _Optional[int] = ..., preprocessing: _Optional[str] = ..., replica_endpoints: _Optional[_Iterable[str]] = ..., caches_targets: _Optional[bool] = ..., tokenizer: _Optional[_Union[TokenizerInfo, _Mapping]] = ...) -> None: ...

class TokenizerInfo(_message.Message):
    __slots__ = ("name", "vocab_size", "fingerprint", "max_tokens", "pooling", "max_text_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    vocab_size: int
    fingerprint: str
    max_tokens: int
    pooling: str
    max_text_bytes: int
    def __init__(self, name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., fingerprint: _Optional[str] = ..., max_tokens: _Optional[int] = ..., pooling: _Optional[str] = ..., max_text_bytes: _Optional[int] = ...) -> None: ...

class LayerSelection(_message.Message):
    __slots__ = ("module", "layers")
    MODULE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    module: str
    layers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, module: _Optional[str] = ..., layers: _Optional[_Iterable[int]] = ...) -> None: ...

class TargetSpec(_message.Message):
    __slots__ = ("hidden", "hidden_reduction", "data2vec_eps", "attention", "attention_reduction", "logits", "logits_top_k", "dtype")
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_REDUCTION_FIELD_NUMBER: _ClassVar[int]
    DATA2VEC_EPS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_REDUCTION_FIELD_NUMBER: _ClassVar[int]
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    LOGITS_TOP_K_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    hidden: _containers.RepeatedCompositeFieldContainer[LayerSelection]
    hidden_reduction: str
    data2vec_eps: float
    attention: _containers.RepeatedCompositeFieldContainer[LayerSelection]
    attention_reduction: str
    logits: bool
    logits_top_k: int
    dtype: str
    def __init__(self, hidden: _Optional[_Iterable[_Union[LayerSelection, _Mapping]]] = ..., hidden_reduction: _Optional[str] = ..., data2vec_eps: _Optional[float] = ..., attention: _Optional[_Iterable[_Union[LayerSelection, _Mapping]]] = ..., attention_reduction: _Optional[str] = ..., logits: _Optional[bool] = ..., logits_top_k: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class TargetsRequest(_message.Message):
    __slots__ = ("experiment_id", "inputs", "sample_keys", "spec", "texts", "text_tokenizer")
    class InputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    EXPERIMENT_ID_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_KEYS_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    experiment_id: str
    inputs: _containers.MessageMap[str, Tensor]
    sample_keys: _containers.RepeatedScalarFieldContainer[str]
    spec: TargetSpec
    texts: _containers.RepeatedScalarFieldContainer[bytes]
    text_tokenizer: str
    def __init__(self, experiment_id: _Optional[str] = ..., inputs: _Optional[_Mapping[str, Tensor]] = ..., sample_keys: _Optional[_Iterable[str]] = ..., spec: _Optional[_Union[TargetSpec, _Mapping]] = ..., texts: _Optional[_Iterable[bytes]] = ..., text_tokenizer: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "batch_requests", "batch_samples")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    batch_requests: int
    batch_samples: int
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch_requests: _Optional[int] = ..., batch_samples: _Optional[int] = ...) -> None: ...

class TargetsReply(_message.Message):
    __slots__ = ("outputs", "fingerprint", "timings", "sample_keys", "sample_offset", "num_chunks")
    class OutputsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_KEYS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_OFFSET_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    outputs: _containers.MessageMap[str, Tensor]
    fingerprint: str
    timings: Timings
    sample_keys: _containers.RepeatedScalarFieldContainer[str]
    sample_offset: int
    num_chunks: int
    def __init__(self, outputs: _Optional[_Mapping[str, Tensor]] = ..., fingerprint: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., sample_keys: _Optional[_Iterable[str]] = ..., sample_offset: _Optional[int] = ..., num_chunks: _Optional[int] = ...) -> None: ...
