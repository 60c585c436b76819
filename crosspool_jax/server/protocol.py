"""OpenAI request shapes: the bodies of `/v1/completions`, `/v1/chat/completions`,
`/tokenize` and `/detokenize` as pydantic models, their parsing into plain dataclasses, and
`ApiError`, the one error type the routes raise.

Validation is strict, like OpenAI's and vLLM's: a field of the wrong type (no "10" for an
integer, no 1 for a boolean) or a field that is not part of the request is a 400 naming the
field; OpenAI and vLLM fields that this engine cannot honour (`suffix`, `response_format`
other than text, tools, `echo` in chat, `prompt_logprobs` in a stream, ...) are a 400 naming the field as soon as they are set to anything but their neutral value.
`logit_bias` takes OpenAI's {"token id": bias} (biases clamped to [-100, 100], as vLLM does);
completions' `echo` with `logprobs` returns the prompt tokens' logprobs first (as OpenAI). Sampling values are checked by
`SamplingParams` itself (its ValueError message is passed through, naming the field).
Bounds that depend on the model (prompt length, token ids, `max_tokens` against the context)
are checked by the app once the prompt is tokenized.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Literal, Optional, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from crosspool_jax.sampling_params import INT32_MAX, SamplingParams

Prompt = Union[str, list[int]]
MAX_STOP_STRINGS = 64

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 408: "invalid_request_error", 429: "rate_limit_exceeded",
                499: "client_closed_request", 500: "internal_server_error",
                503: "service_unavailable"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message,
                          "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code or str(self.status)}}


# ----------------------------------------------------------------------------- body models
def check_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode (no lone surrogates), else ValueError naming `what`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode text ({e.reason} at position {e.start})") from None
    return text


def _token_ids(value, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ValueError(f"{what} must be a list of integer token ids")
    if any(not 0 <= t <= INT32_MAX for t in value):
        raise ValueError(f"{what}: token ids must be in [0, {INT32_MAX}]")
    return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat (OpenAI's and vLLM's sampling extensions)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    n: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: Optional[bool] = None
    skip_special_tokens: Optional[bool] = None
    include_stop_str_in_output: Optional[bool] = None
    truncate_prompt_tokens: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    return_token_ids: Optional[bool] = None
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None
    prompt_logprobs: Optional[int] = None
    allowed_token_ids: Optional[list[int]] = None
    bad_words: Optional[list[str]] = None
    # fields accepted by name so that setting them is refused with a clear message
    response_format: Optional[dict[str, Any]] = None
    best_of: Optional[int] = None

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        if not v:
            raise ValueError("the 'model' field is required")
        return check_text(v, "model")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        for s in stops:
            check_text(s, "stop")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v):
        return None if v is None else _token_ids(v, "stop_token_ids")

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if v is None:
            return None
        out = {}
        for key, bias in v.items():
            if not re.fullmatch(r"[0-9]{1,10}", key) or int(key) > INT32_MAX:
                raise ValueError(f"logit_bias: keys must be token ids (decimal integers in [0, {INT32_MAX}]), "
                                 f"got {key[:20]!r}")
            out[int(key)] = min(100.0, max(-100.0, bias))
        return out


class CompletionBody(_SamplingFields):
    """`POST /v1/completions`."""

    prompt: Any = Field(default=None, validate_default=True)
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: Optional[bool] = False
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        message = ("prompt must be a string, a list of token ids, or a non-empty list of strings "
                   "or of token-id lists")
        if v is None:
            raise ValueError("the 'prompt' field is required")
        if isinstance(v, str):
            prompts = [v]
        elif isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            prompts = [v]
        elif isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
            prompts = list(v)
        else:
            raise ValueError(message)
        for i, p in enumerate(prompts):
            where = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            if isinstance(p, str):
                check_text(p, where)
            else:
                _token_ids(p, where)
            if len(p) == 0:
                raise ValueError(f"{where} must not be empty")
        return prompts


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; fields beyond role/content (name, tool_calls, ...) reach the template."""

    model_config = ConfigDict(strict=True, extra="allow")
    role: str
    content: Union[str, list[TextPart], None] = None

    def as_dict(self, index: int) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        check_text(self.role, f"messages[{index}].role")
        check_text(content or "", f"messages[{index}].content")
        return {**(self.model_extra or {}), "role": self.role, "content": content or ""}


class ChatBody(_SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    add_generation_prompt: bool = True
    echo: Optional[bool] = False
    tools: Optional[list] = None
    tool_choice: Any = None
    functions: Optional[list] = None
    function_call: Any = None
    parallel_tool_calls: Optional[bool] = None


class TokenizeBody(BaseModel):
    """`POST /tokenize` (vLLM): a prompt, or chat messages rendered by the template."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: str
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeBody(BaseModel):
    """`POST /detokenize` (vLLM)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    model: str
    tokens: list[int]

    @field_validator("tokens")
    @classmethod
    def _tokens(cls, v):
        return _token_ids(v, "tokens")


# ----------------------------------------------------------------------------- parsed forms
@dataclasses.dataclass
class CompletionRequest:
    """A parsed `/v1/completions` body: one engine request per prompt, `params.n` choices each."""

    model: str
    prompts: list[Prompt]
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: Optional[int]
    return_token_ids: bool = False  # extension (as in vLLM): each choice also lists its token ids
    echo: bool = False
    continuous_usage: bool = False
    prompt_logprobs: Optional[int] = None   # as asked (echo with logprobs also makes the engine compute them)


@dataclasses.dataclass
class ChatRequest:
    """A parsed `/v1/chat/completions` body (messages still to be rendered by the template)."""

    model: str
    messages: list[dict]
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    return_token_ids: bool = False
    add_generation_prompt: bool = True
    continuous_usage: bool = False
    prompt_logprobs: Optional[int] = None


def parse_json_body(raw: bytes, *, max_depth: int = 64) -> dict:
    """The request body as a JSON object nested at most `max_depth` deep, or a 400."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, f"request body is nested more than {max_depth} levels deep") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    if _depth(body) > max_depth:
        raise ApiError(400, f"request body is nested more than {max_depth} levels deep")
    return body


def _depth(value) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            stack += [(v, depth + 1) for v in node.values() if isinstance(v, (dict, list))]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node if isinstance(v, (dict, list))]
    return deepest


def validate_body(model: type[BaseModel], body: dict) -> BaseModel:
    """`model.model_validate(body)`, its first error as a 400 naming the field."""
    try:
        return model.model_validate(body)
    except pydantic.ValidationError as e:
        raise _api_error(e, model) from None


def _api_error(e: pydantic.ValidationError, model: type[BaseModel]) -> ApiError:
    err = e.errors(include_url=False)[0]
    loc = [str(part) for part in err["loc"]]
    param = loc[0] if loc else None
    field = _where(loc)
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"unknown field {field!r}: it is not a parameter of this endpoint "
                             f"(check its spelling)", param=param)
    if err["type"] == "missing":
        return ApiError(400, f"the {field!r} field is required", param=param)
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return ApiError(400, msg if field in msg else f"{field}: {msg}", param=param)


def _where(loc: list[str]) -> str:
    """('messages', '0', 'role') -> 'messages[0].role', union member tags dropped."""
    out = ""
    for part in loc:
        if _is_type_tag(part):
            continue
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _is_type_tag(part: str) -> bool:
    """pydantic names the member of a union it tried in the error location ('str', 'list[int]')."""
    return "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none")


def parse_completion_request(body: dict) -> CompletionRequest:
    req: CompletionBody = validate_body(CompletionBody, body)
    if req.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    _refuse_unsupported(req)
    prompt_logprobs = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, req.logprobs)
    params = _sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs, prompt_logprobs=prompt_logprobs)
    stream, include_usage = _stream(req)
    return CompletionRequest(req.model, req.prompt, params, stream, include_usage, req.logprobs,
                             bool(req.return_token_ids), bool(req.echo), _continuous_usage(req), req.prompt_logprobs)


def parse_chat_request(body: dict) -> ChatRequest:
    req: ChatBody = validate_body(ChatBody, body)
    if req.echo:
        raise ApiError(400, "echo is not supported", param="echo")
    for unsupported in ("tools", "functions"):
        if getattr(req, unsupported):
            raise ApiError(400, f"{unsupported} are not supported", param=unsupported)
    for unsupported in ("tool_choice", "function_call"):
        if getattr(req, unsupported) not in (None, "none"):
            raise ApiError(400, f"{unsupported} is not supported", param=unsupported)
    _refuse_unsupported(req)
    logprobs = bool(req.logprobs)
    top_logprobs = req.top_logprobs or 0
    if top_logprobs and not logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = _sampling_params(req, max_tokens=max_tokens, logprobs=top_logprobs if logprobs else None,
                              prompt_logprobs=req.prompt_logprobs)
    stream, include_usage = _stream(req)
    messages = message_dicts(req.messages)
    return ChatRequest(req.model, messages, params, stream, include_usage, logprobs, top_logprobs,
                       bool(req.return_token_ids), req.add_generation_prompt, _continuous_usage(req),
                       req.prompt_logprobs)


def _continuous_usage(req: _SamplingFields) -> bool:
    return bool(req.stream and req.stream_options is not None and req.stream_options.continuous_usage_stats)


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Chat messages as the template takes them (text parts joined), or a 400."""
    try:
        return [m.as_dict(i) for i, m in enumerate(messages)]
    except ValueError as e:
        raise ApiError(400, str(e), param="messages") from None


def _refuse_unsupported(req: _SamplingFields) -> None:
    if req.prompt_logprobs is not None and req.stream:
        raise ApiError(400, "prompt_logprobs is not available with stream: true (as in vLLM)",
                       param="prompt_logprobs")
    fmt = req.response_format
    if fmt is not None and fmt.get("type", "text") != "text":
        raise ApiError(400, f"response_format {fmt.get('type')!r} is not supported (only 'text': "
                            "this engine has no constrained decoding)", param="response_format")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise ApiError(400, "best_of other than n is not supported", param="best_of")


def _stream(req: _SamplingFields) -> tuple[bool, bool]:
    stream = bool(req.stream)
    if req.stream_options is None:
        return stream, False
    if not stream:
        raise ApiError(400, "stream_options is only allowed with stream: true",
                       param="stream_options")
    return stream, req.stream_options.include_usage


_SAMPLING_KEYS = ("n", "temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty",
                  "frequency_penalty", "repetition_penalty", "min_tokens", "stop",
                  "stop_token_ids", "ignore_eos", "skip_special_tokens",
                  "include_stop_str_in_output", "truncate_prompt_tokens", "logit_bias",
                  "allowed_token_ids", "bad_words")


def _sampling_params(req: _SamplingFields, *, max_tokens: Optional[int], logprobs: Optional[int],
                     prompt_logprobs: Optional[int]) -> SamplingParams:
    kwargs = {"max_tokens": max_tokens, "logprobs": logprobs, "prompt_logprobs": prompt_logprobs}
    for key in _SAMPLING_KEYS:
        value = getattr(req, key)
        if value is not None:
            kwargs[key] = value
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        match = re.match(r"SamplingParams\.(\w+):", str(e))
        raise ApiError(400, str(e), param=match.group(1) if match else None) from None
