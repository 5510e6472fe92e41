"""Request bodies of the HTTP API (SGLang native + OpenAI) as strict pydantic models, and their error messages.

Every body is parsed by `parse_body`: malformed JSON, wrong types and unknown fields raise `BadRequest`, which
the servers turn into a 400 whose message names the field and the reason. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class BadRequest(Exception):
    """A client error: answered with `status` (default 400) and `message`; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def error_body(message: str, status: int = 400, param: str | None = None) -> dict:
    """The JSON error body (OpenAI's shape, which also carries SGLang's `error.message`)."""
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}.get(status, "ServerError")
    return {"object": "error", "error": {"message": message, "type": kind, "param": param, "code": status}}


_UNION_LABELS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "function-before"}


def _loc(loc: tuple) -> str:
    """('sampling_params', 'list[str]', 0) -> 'sampling_params[0]' (drops pydantic's union-branch labels)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or part.lower() in _UNION_LABELS or part[:1].isupper():
            continue
        else:
            out += ("." if out else "") + part
    return out


def format_validation_error(err: ValidationError, prefix: str = "") -> BadRequest:
    """One readable message per offending field, e.g. `temperature: Input should be greater than or equal to 0`."""
    seen: dict[str, str] = {}
    for e in err.errors():
        name = _loc(tuple(e["loc"]))
        name = f"{prefix}.{name}" if prefix and name else (prefix or name)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (not accepted by this endpoint)"
        elif e["type"] == "missing":
            msg = "field required"
        seen.setdefault(name or "body", msg)
    first = next(iter(seen))
    text = "; ".join(f"{k}: {v}" for k, v in seen.items())
    return BadRequest(f"invalid request: {text}", param=first)


M = TypeVar("M", bound=BaseModel)


def parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"malformed JSON body: {e}") from None


def validate(model: type[M], obj: Any, prefix: str = "") -> M:
    if not isinstance(obj, dict):
        raise BadRequest(f"{prefix or 'body'}: expected a JSON object, got {type(obj).__name__}", param=prefix or None)
    try:
        return model.model_validate(obj, strict=True)
    except ValidationError as e:
        raise format_validation_error(e, prefix) from None


def parse_body(model: type[M], raw: bytes, allow_empty: bool = False) -> M:
    """Parse and validate a JSON request body (`allow_empty`: an empty body means `{}`)."""
    if allow_empty and not raw.strip():
        return model()
    return validate(model, parse_json(raw))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """Like SGLang: a JSON null for a field with a non-null default takes the default."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if not (v is None and k in fields and fields[k].default is not None)}
        return data


# ----------------------------------------------------------------------------------------------- SGLang native


class SGLSamplingParams(_Strict):
    """SGLang `sampling_params` (field names and defaults of sglang/srt/sampling/sampling_params.py)."""

    max_new_tokens: int | None = Field(None, ge=0)
    min_new_tokens: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = -1
    min_p: float = Field(0.0, ge=0, le=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = Field(1, ge=1)
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    custom_params: dict[str, Any] | None = None
    logit_bias: dict[str, float] | None = None
    sampling_seed: int | None = None
    stream_interval: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> SGLSamplingParams:
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens")
        return self


# Sampling features SGLang has and this engine does not: a non-default value is a 400, never silently ignored.
UNSUPPORTED_SAMPLING = {
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "stop_regex": None,
    "json_schema": None,
    "regex": None,
    "ebnf": None,
    "structural_tag": None,
    "logit_bias": None,
}


class GenerateRequest(_Strict):
    """SGLang `GenerateReqInput` (POST /generate). Known fields this server ignores or rejects are listed too."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    token_ids_logprob: list[int] | list[list[int]] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    return_routed_experts: bool = False
    routed_experts_start_len: int = Field(0, ge=0)
    return_prompt_token_ids: bool = False
    # accepted and ignored (scheduling / caching / metrics hints)
    routing_key: str | None = None
    priority: int | None = None
    extra_key: str | None = None
    cache_salt: str | list[str] | None = None
    log_metrics: bool = True
    no_logs: bool = False
    custom_labels: dict[str, Any] | None = None
    routed_dp_rank: int | None = None
    data_parallel_rank: int | None = None
    return_indexer_topk: bool = False
    return_entropy: bool = False
    return_sampling_mask: bool = False
    # not supported: a non-null / true value is rejected with a 400 naming the field
    input_embeds: Any = None
    image_data: Any = None
    video_data: Any = None
    audio_data: Any = None
    return_hidden_states: Any = None
    session_id: Any = None
    session_params: Any = None
    lora_path: Any = None
    lora_id: Any = None
    custom_logit_processor: Any = None
    bootstrap_host: Any = None
    bootstrap_port: Any = None
    bootstrap_room: Any = None
    max_thinking_tokens: Any = None
    require_reasoning: Any = None


UNSUPPORTED_GENERATE = (
    "input_embeds image_data video_data audio_data return_hidden_states session_id session_params lora_path "
    "lora_id custom_logit_processor bootstrap_host bootstrap_port bootstrap_room max_thinking_tokens "
    "require_reasoning return_indexer_topk return_entropy return_sampling_mask"
).split()


class AbortRequest(_Strict):
    rid: str = ""
    abort_all: bool = False
    abort_message: str | None = None
    finished_reason: Any = None


class PauseRequest(_Strict):
    mode: Literal["abort", "retract", "in_place"] = "abort"


class ContinueRequest(_Strict):
    torch_empty_cache: bool = True


class UpdateWeightsFromDiskRequest(_Strict):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | int | None = None
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0
    flush_cache: bool = True
    manifest: Any = None


class UpdateWeightVersionRequest(_Strict):
    new_version: str | int
    abort_all_requests: bool = True


class MemoryRequest(_Strict):
    tags: list[Literal["weights", "kv_cache", "cuda_graph"]] | None = None


# ----------------------------------------------------------------------------------------------- OpenAI


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _OpenAISampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extras accepted by SGLang / vLLM OpenAI servers
    top_k: int = -1
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    rid: str | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError("top_k must be -1 (disabled) or >= 1")
        return self


class CompletionRequest(_OpenAISampling):
    """POST /v1/completions."""

    max_tokens: int | None = Field(16, ge=1)
    prompt: str | list[str] | list[int] | list[list[int]]
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)


class ChatMessage(BaseModel):
    """One chat message; extra keys (name, tool_calls, ...) are passed through to the chat template."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_OpenAISampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    reasoning_effort: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
