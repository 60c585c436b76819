"""`ServerConfig`: every option of the HTTP server (listening, limits, auth, shutdown, start-up).

Like `EngineConfig`, each field carries its help text; `python -m crosspool_jax.serve`
generates its flags from both (`crosspool_jax.config_flags`). The limits bound the work one
request can cause before it reaches the engine: body size and JSON depth, prompt characters
before tokenizing, `n`, the time a client may take to send its body.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from crosspool_jax.runtime.compiles import DEFAULT_CACHE_DIR

API_KEY_ENV = "CROSSPOOL_API_KEY"
LOG_LEVELS = ("debug", "info", "warning", "error")


def _opt(default, help: str, **metadata):
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass
class ServerConfig:
    """Options of the OpenAI-compatible server (validated; ValueError names the field)."""

    host: str = _opt("127.0.0.1", "Address to listen on.")
    port: int = _opt(8000, "Port to listen on (0-65535; 0 picks a free one).")
    api_key: Optional[str] = _opt(None, f"If set, requests other than /health and /metrics need "
                                  f"'Authorization: Bearer KEY'. A flag's value shows in `ps`: prefer "
                                  f"--api_key_file or the {API_KEY_ENV} environment variable.")
    api_key_file: Optional[str] = _opt(None, "A file whose first line is the API key.")
    max_queue: int = _opt(1024, "Most unfinished sequences (prompts x n) the server holds; beyond it "
                          "new requests get HTTP 429, and a request that alone needs more gets 400.")
    max_n: int = _opt(128, "Largest n (completions per prompt) a request may ask for.")
    max_body_bytes: int = _opt(16 << 20, "Largest request body (suffixes KiB/MiB/GiB).", kind="bytes")
    max_json_depth: int = _opt(64, "Deepest nesting of a request's JSON body.")
    max_prompt_chars: Optional[int] = _opt(None, "Longest prompt text (a completion prompt, or a chat "
                                           "rendered by its template), checked before tokenizing; "
                                           "unset: 32 characters per token of each model's max_model_len.")
    tokenizer_workers: int = _opt(4, "Threads that parse large bodies, render chat templates and "
                                  "tokenize, off the event loop and the engine thread.")
    body_timeout_s: float = _opt(30.0, "Seconds a client may take to send its request body (HTTP 408 after).")
    shutdown_timeout_s: float = _opt(30.0, "On SIGTERM/Ctrl-C, how long in-flight requests may run; "
                                     "then each gets an error (streams: an error event and [DONE]).")
    enable_docs: bool = _opt(False, "Serve the API docs (/docs, /openapi.json), behind the API key if set.")
    warmup: bool = _opt(True, "Before listening, compile every step program a request can need (every "
                        "shape of every model's shape menu, every sampling variant), so that nothing "
                        "compiles while serving.")
    compilation_cache_dir: Optional[str] = _opt(DEFAULT_CACHE_DIR, "JAX persistent compilation cache folder "
                                                "('' turns it off): the warm-up's programs are kept there and "
                                                "read back by the next start.")
    log_level: str = _opt("info", "Log level of the server and of uvicorn.", choices=LOG_LEVELS)

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port must be in [0, 65535], got {self.port}")
        for name in ("max_queue", "max_n", "max_body_bytes", "max_json_depth", "tokenizer_workers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ServerConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.max_prompt_chars is not None and self.max_prompt_chars < 1:
            raise ValueError(f"ServerConfig.max_prompt_chars must be >= 1 or unset, got {self.max_prompt_chars}")
        for name in ("body_timeout_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"ServerConfig.log_level must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.api_key is not None and self.api_key_file is not None:
            raise ValueError("ServerConfig: give api_key or api_key_file, not both")

    def resolved_api_key(self) -> Optional[str]:
        """The key from api_key, else api_key_file, else the CROSSPOOL_API_KEY variable; None: no auth."""
        if self.api_key:
            return self.api_key
        if self.api_key_file:
            try:
                with open(self.api_key_file, encoding="utf-8") as f:
                    key = f.readline().strip()
            except OSError as e:
                raise ValueError(f"ServerConfig.api_key_file: cannot read {self.api_key_file}: {e}") from None
            if not key:
                raise ValueError(f"ServerConfig.api_key_file: {self.api_key_file} is empty")
            return key
        return os.environ.get(API_KEY_ENV) or None

    def prompt_char_limit(self, max_model_len: int) -> int:
        return self.max_prompt_chars if self.max_prompt_chars is not None else 32 * max_model_len
