"""OpenAI request shapes: parsing and validation of `/v1/completions` and `/v1/chat/completions`
bodies into plain dataclasses, and `ApiError`, the one error type the routes raise.

Parsing is hand-written (no pydantic models) so that every rejection is a 400 in OpenAI's
error shape naming the bad parameter, and so that sampling values are checked by
`SamplingParams` itself (its ValueError message is passed through).
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Optional, Union

from crosspool_jax.sampling_params import SamplingParams

Prompt = Union[str, list[int]]

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 429: "rate_limit_exceeded", 499: "client_closed_request",
                500: "internal_server_error", 503: "service_unavailable"}


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


def parse_json_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_completion_request(body: dict) -> CompletionRequest:
    model = _model(body)
    prompts = _prompts(body.get("prompt"))
    if body.get("echo"):
        raise ApiError(400, "echo is not supported", param="echo")
    if body.get("suffix"):
        raise ApiError(400, "suffix is not supported", param="suffix")
    best_of = _opt_int(body, "best_of")
    if best_of is not None and best_of != _opt_int(body, "n", 1):
        raise ApiError(400, "best_of other than n is not supported", param="best_of")
    logprobs = _opt_int(body, "logprobs")
    max_tokens = _opt_int(body, "max_tokens", 16)
    params = _sampling_params(body, max_tokens=max_tokens, logprobs=logprobs)
    stream, include_usage = _stream(body)
    return CompletionRequest(model, prompts, params, stream, include_usage, logprobs,
                             _opt_bool(body, "return_token_ids"))


def parse_chat_request(body: dict) -> ChatRequest:
    model = _model(body)
    messages = _messages(body.get("messages"))
    for unsupported in ("tools", "functions"):
        if body.get(unsupported):
            raise ApiError(400, f"{unsupported} are not supported", param=unsupported)
    logprobs = body.get("logprobs", False)
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise ApiError(400, f"logprobs must be a boolean, got {logprobs!r}", param="logprobs")
    top_logprobs = _opt_int(body, "top_logprobs", 0)
    if top_logprobs and not logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    max_tokens = _opt_int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens")
    params = _sampling_params(body, max_tokens=max_tokens,
                              logprobs=top_logprobs if logprobs else None)
    stream, include_usage = _stream(body)
    return ChatRequest(model, messages, params, stream, include_usage, logprobs, top_logprobs,
                       _opt_bool(body, "return_token_ids"))


# ------------------------------------------------------------------------------ fields
def _model(body: dict) -> str:
    model = body.get("model")
    if model is None or model == "":
        raise ApiError(400, "the 'model' field is required", param="model")
    if not isinstance(model, str):
        raise ApiError(400, f"model must be a string, got {model!r}", param="model")
    return model


def _is_token_list(x) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _prompts(prompt) -> list[Prompt]:
    """A string, a list of token ids, or a non-empty list of either."""
    if prompt is None:
        raise ApiError(400, "the 'prompt' field is required", param="prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and _is_token_list(prompt):
        prompts = [list(prompt)]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (_is_token_list(p)) for p in prompt):
        prompts = [p if isinstance(p, str) else list(p) for p in prompt]
    else:
        raise ApiError(400, "prompt must be a string, a list of token ids, or a non-empty list "
                            "of strings or of token-id lists", param="prompt")
    for p in prompts:
        if len(p) == 0:
            raise ApiError(400, "prompt must not be empty", param="prompt")
        if isinstance(p, list) and any(t < 0 for t in p):
            raise ApiError(400, "prompt token ids must be non-negative", param="prompt")
    return prompts


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'",
                           param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                        part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of parts",
                           param="messages")
        out.append({**{k: v for k, v in m.items() if k != "content"}, "content": content})
    return out


def _stream(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be a boolean, got {stream!r}", param="stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    if not stream:
        raise ApiError(400, "stream_options is only allowed with stream: true",
                       param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "stream_options.include_usage must be a boolean",
                       param="stream_options")
    return stream, include_usage


def _opt_int(body: dict, key: str, default: Optional[int] = None) -> Optional[int]:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"{key} must be an integer, got {value!r}", param=key)
    return value


def _opt_bool(body: dict, key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be a boolean, got {value!r}", param=key)
    return value


def _opt_float(body: dict, key: str) -> Optional[float]:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ApiError(400, f"{key} must be a number, got {value!r}", param=key)
    return float(value)


def _sampling_params(body: dict, *, max_tokens: Optional[int],
                     logprobs: Optional[int]) -> SamplingParams:
    kwargs = {"max_tokens": max_tokens, "logprobs": logprobs}
    for key in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty"):
        value = _opt_float(body, key)
        if value is not None:
            kwargs[key] = value
    for key in ("n", "top_k", "seed", "min_tokens"):
        value = _opt_int(body, key)
        if value is not None:
            kwargs[key] = value
    for key in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
        if body.get(key) is not None:
            kwargs[key] = _opt_bool(body, key)
    stop = body.get("stop")
    if stop is not None:
        if not (isinstance(stop, str) or (isinstance(stop, list)
                                           and all(isinstance(s, str) for s in stop))):
            raise ApiError(400, "stop must be a string or a list of strings", param="stop")
        kwargs["stop"] = stop
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not _is_token_list(stop_ids):
            raise ApiError(400, "stop_token_ids must be a list of integers",
                           param="stop_token_ids")
        kwargs["stop_token_ids"] = stop_ids
    if body.get("logit_bias"):
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    try:
        return SamplingParams(**kwargs)
    except ValueError as e:
        match = re.match(r"SamplingParams\.(\w+):", str(e))
        raise ApiError(400, str(e), param=match.group(1) if match else None) from None
