from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shared")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shared: SharedBytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared: _Optional[_Union[SharedBytes, _Mapping]] = ...) -> None: ...

class SharedBytes(_message.Message):
    __slots__ = ("segment", "nbytes")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    segment: str
    nbytes: int
    def __init__(self, segment: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("memory_total_bytes", "memory_available_bytes", "device_kind", "device_name", "cpu_cores", "gpu_cores", "platform")
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    GPU_CORES_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    memory_total_bytes: int
    memory_available_bytes: int
    device_kind: str
    device_name: str
    cpu_cores: int
    gpu_cores: int
    platform: str
    def __init__(self, memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., device_kind: _Optional[str] = ..., device_name: _Optional[str] = ..., cpu_cores: _Optional[int] = ..., gpu_cores: _Optional[int] = ..., platform: _Optional[str] = ...) -> None: ...

class WorkerLimits(_message.Message):
    __slots__ = ("max_batch", "max_message_bytes", "max_sessions", "kv_budget_tokens", "session_ttl_s")
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    max_batch: int
    max_message_bytes: int
    max_sessions: int
    kv_budget_tokens: int
    session_ttl_s: float
    def __init__(self, max_batch: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_sessions: _Optional[int] = ..., kv_budget_tokens: _Optional[int] = ..., session_ttl_s: _Optional[float] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("name", "version", "protocol_version", "capabilities", "model", "layer_start", "layer_end", "model_num_layers", "weight_bytes", "kv_capacity_tokens", "kv_used_tokens", "sessions_open", "dtype", "hidden_size", "limits", "embedding", "head", "prefixes", "prefix_tokens", "prefix_bytes", "prefix_capacity_bytes", "shared_memory_probe")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    MODEL_NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_USED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_OPEN_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    PREFIXES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_PROBE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    protocol_version: int
    capabilities: Capabilities
    model: str
    layer_start: int
    layer_end: int
    model_num_layers: int
    weight_bytes: int
    kv_capacity_tokens: int
    kv_used_tokens: int
    sessions_open: int
    dtype: str
    hidden_size: int
    limits: WorkerLimits
    embedding: bool
    head: bool
    prefixes: int
    prefix_tokens: int
    prefix_bytes: int
    prefix_capacity_bytes: int
    shared_memory_probe: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., model: _Optional[str] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., model_num_layers: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., kv_capacity_tokens: _Optional[int] = ..., kv_used_tokens: _Optional[int] = ..., sessions_open: _Optional[int] = ..., dtype: _Optional[str] = ..., hidden_size: _Optional[int] = ..., limits: _Optional[_Union[WorkerLimits, _Mapping]] = ..., embedding: _Optional[bool] = ..., head: _Optional[bool] = ..., prefixes: _Optional[int] = ..., prefix_tokens: _Optional[int] = ..., prefix_bytes: _Optional[int] = ..., prefix_capacity_bytes: _Optional[int] = ..., shared_memory_probe: _Optional[str] = ...) -> None: ...

class LoadLayersRequest(_message.Message):
    __slots__ = ("model", "start", "end", "kv_budget_tokens", "session_ttl_s", "embedding", "head", "draft_model", "prefix_cache_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TTL_S_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    DRAFT_MODEL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    start: int
    end: int
    kv_budget_tokens: int
    session_ttl_s: float
    embedding: bool
    head: bool
    draft_model: str
    prefix_cache_bytes: int
    def __init__(self, model: _Optional[str] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., kv_budget_tokens: _Optional[int] = ..., session_ttl_s: _Optional[float] = ..., embedding: _Optional[bool] = ..., head: _Optional[bool] = ..., draft_model: _Optional[str] = ..., prefix_cache_bytes: _Optional[int] = ...) -> None: ...

class LoadLayersResponse(_message.Message):
    __slots__ = ("info", "memory_used_bytes", "reloaded")
    INFO_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RELOADED_FIELD_NUMBER: _ClassVar[int]
    info: InfoResponse
    memory_used_bytes: int
    reloaded: bool
    def __init__(self, info: _Optional[_Union[InfoResponse, _Mapping]] = ..., memory_used_bytes: _Optional[int] = ..., reloaded: _Optional[bool] = ...) -> None: ...

class SamplingSpec(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "repetition_context_size", "presence_penalty", "frequency_penalty", "seed", "logit_bias", "top_logprobs", "full_logprobs", "grammar")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_CONTEXT_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FULL_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    GRAMMAR_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    repetition_context_size: int
    presence_penalty: float
    frequency_penalty: float
    seed: int
    logit_bias: _containers.ScalarMap[int, float]
    top_logprobs: int
    full_logprobs: bool
    grammar: GrammarSpec
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., repetition_context_size: _Optional[int] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., seed: _Optional[int] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., top_logprobs: _Optional[int] = ..., full_logprobs: _Optional[bool] = ..., grammar: _Optional[_Union[GrammarSpec, _Mapping]] = ...) -> None: ...

class GrammarSpec(_message.Message):
    __slots__ = ("kind", "source", "start")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    kind: str
    source: str
    start: int
    def __init__(self, kind: _Optional[str] = ..., source: _Optional[str] = ..., start: _Optional[int] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("session_id", "reserve_tokens", "lease_id", "sampling", "prefix_id", "prefix_length", "history")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PREFIX_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reserve_tokens: int
    lease_id: str
    sampling: SamplingSpec
    prefix_id: str
    prefix_length: int
    history: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session_id: _Optional[str] = ..., reserve_tokens: _Optional[int] = ..., lease_id: _Optional[str] = ..., sampling: _Optional[_Union[SamplingSpec, _Mapping]] = ..., prefix_id: _Optional[str] = ..., prefix_length: _Optional[int] = ..., history: _Optional[_Iterable[int]] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("kv_used_tokens", "kv_capacity_tokens")
    KV_USED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    kv_used_tokens: int
    kv_capacity_tokens: int
    def __init__(self, kv_used_tokens: _Optional[int] = ..., kv_capacity_tokens: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("step_id", "session_ids", "hidden", "offsets", "last_position_only", "token_ids", "sample", "rewind", "verify")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    LAST_POSITION_ONLY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    REWIND_FIELD_NUMBER: _ClassVar[int]
    VERIFY_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    hidden: Tensor
    offsets: _containers.RepeatedScalarFieldContainer[int]
    last_position_only: bool
    token_ids: Tensor
    sample: bool
    rewind: bool
    verify: bool
    def __init__(self, step_id: _Optional[int] = ..., session_ids: _Optional[_Iterable[str]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., offsets: _Optional[_Iterable[int]] = ..., last_position_only: _Optional[bool] = ..., token_ids: _Optional[_Union[Tensor, _Mapping]] = ..., sample: _Optional[bool] = ..., rewind: _Optional[bool] = ..., verify: _Optional[bool] = ...) -> None: ...

class Sampled(_message.Message):
    __slots__ = ("token", "logprob", "top_tokens", "top_logprobs", "logprobs")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    top_tokens: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    logprobs: Tensor
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ..., top_tokens: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ..., logprobs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("step_id", "hidden", "compute_seconds", "sampled", "relay_seconds", "counts", "failure", "stage_compute_seconds", "stage_relay_seconds")
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    RELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    STAGE_COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_RELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step_id: int
    hidden: Tensor
    compute_seconds: float
    sampled: _containers.RepeatedCompositeFieldContainer[Sampled]
    relay_seconds: float
    counts: _containers.RepeatedScalarFieldContainer[int]
    failure: StepFailure
    stage_compute_seconds: _containers.RepeatedScalarFieldContainer[float]
    stage_relay_seconds: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, step_id: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., compute_seconds: _Optional[float] = ..., sampled: _Optional[_Iterable[_Union[Sampled, _Mapping]]] = ..., relay_seconds: _Optional[float] = ..., counts: _Optional[_Iterable[int]] = ..., failure: _Optional[_Union[StepFailure, _Mapping]] = ..., stage_compute_seconds: _Optional[_Iterable[float]] = ..., stage_relay_seconds: _Optional[_Iterable[float]] = ...) -> None: ...

class StepFailure(_message.Message):
    __slots__ = ("code", "kind", "message", "stage")
    CODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    kind: str
    message: str
    stage: int
    def __init__(self, code: _Optional[int] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ..., stage: _Optional[int] = ...) -> None: ...

class DecodeRow(_message.Message):
    __slots__ = ("session_id", "offset", "token", "max_tokens", "stop_tokens", "draft_tokens", "context", "draft_with_model")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DRAFT_WITH_MODEL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    offset: int
    token: int
    max_tokens: int
    stop_tokens: _containers.RepeatedScalarFieldContainer[int]
    draft_tokens: int
    context: _containers.RepeatedScalarFieldContainer[int]
    draft_with_model: bool
    def __init__(self, session_id: _Optional[str] = ..., offset: _Optional[int] = ..., token: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop_tokens: _Optional[_Iterable[int]] = ..., draft_tokens: _Optional[int] = ..., context: _Optional[_Iterable[int]] = ..., draft_with_model: _Optional[bool] = ...) -> None: ...

class DecodeCommand(_message.Message):
    __slots__ = ("add", "drop")
    ADD_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    add: _containers.RepeatedCompositeFieldContainer[DecodeRow]
    drop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, add: _Optional[_Iterable[_Union[DecodeRow, _Mapping]]] = ..., drop: _Optional[_Iterable[str]] = ...) -> None: ...

class DecodeEvent(_message.Message):
    __slots__ = ("session_ids", "sampled", "left", "compute_seconds", "relay_seconds", "counts", "drafted", "stage_compute_seconds")
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    DRAFTED_FIELD_NUMBER: _ClassVar[int]
    STAGE_COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    sampled: _containers.RepeatedCompositeFieldContainer[Sampled]
    left: _containers.RepeatedScalarFieldContainer[str]
    compute_seconds: float
    relay_seconds: float
    counts: _containers.RepeatedScalarFieldContainer[int]
    drafted: _containers.RepeatedScalarFieldContainer[int]
    stage_compute_seconds: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ..., sampled: _Optional[_Iterable[_Union[Sampled, _Mapping]]] = ..., left: _Optional[_Iterable[str]] = ..., compute_seconds: _Optional[float] = ..., relay_seconds: _Optional[float] = ..., counts: _Optional[_Iterable[int]] = ..., drafted: _Optional[_Iterable[int]] = ..., stage_compute_seconds: _Optional[_Iterable[float]] = ...) -> None: ...

class KeepPrefix(_message.Message):
    __slots__ = ("session_id", "prefix_id", "length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PREFIX_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prefix_id: str
    length: int
    def __init__(self, session_id: _Optional[str] = ..., prefix_id: _Optional[str] = ..., length: _Optional[int] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ("session_ids", "keep", "drop_prefixes")
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    DROP_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    keep: _containers.RepeatedCompositeFieldContainer[KeepPrefix]
    drop_prefixes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_ids: _Optional[_Iterable[str]] = ..., keep: _Optional[_Iterable[_Union[KeepPrefix, _Mapping]]] = ..., drop_prefixes: _Optional[_Iterable[str]] = ...) -> None: ...

class EndSessionResponse(_message.Message):
    __slots__ = ("ended", "kept", "kept_whole_only")
    ENDED_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    KEPT_WHOLE_ONLY_FIELD_NUMBER: _ClassVar[int]
    ended: int
    kept: _containers.RepeatedScalarFieldContainer[str]
    kept_whole_only: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ended: _Optional[int] = ..., kept: _Optional[_Iterable[str]] = ..., kept_whole_only: _Optional[_Iterable[str]] = ...) -> None: ...

class TruncateSessionRequest(_message.Message):
    __slots__ = ("session_id", "length")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    length: int
    def __init__(self, session_id: _Optional[str] = ..., length: _Optional[int] = ...) -> None: ...

class TruncateSessionResponse(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class LeaseEvent(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WeightFile(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class HaveWeightsRequest(_message.Message):
    __slots__ = ("model_key", "files")
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    model_key: str
    files: _containers.RepeatedCompositeFieldContainer[WeightFile]
    def __init__(self, model_key: _Optional[str] = ..., files: _Optional[_Iterable[_Union[WeightFile, _Mapping]]] = ...) -> None: ...

class HeldFile(_message.Message):
    __slots__ = ("name", "verified_bytes", "complete")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    name: str
    verified_bytes: int
    complete: bool
    def __init__(self, name: _Optional[str] = ..., verified_bytes: _Optional[int] = ..., complete: _Optional[bool] = ...) -> None: ...

class HaveWeightsResponse(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[HeldFile]
    def __init__(self, files: _Optional[_Iterable[_Union[HeldFile, _Mapping]]] = ...) -> None: ...

class WeightChunk(_message.Message):
    __slots__ = ("model_key", "file", "offset", "data", "sha256")
    MODEL_KEY_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    model_key: str
    file: WeightFile
    offset: int
    data: bytes
    sha256: str
    def __init__(self, model_key: _Optional[str] = ..., file: _Optional[_Union[WeightFile, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class WeightAck(_message.Message):
    __slots__ = ("file", "verified_bytes", "complete", "refused")
    FILE_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    file: str
    verified_bytes: int
    complete: bool
    refused: str
    def __init__(self, file: _Optional[str] = ..., verified_bytes: _Optional[int] = ..., complete: _Optional[bool] = ..., refused: _Optional[str] = ...) -> None: ...
