"""`Tokenizer`: tokenizer.json through the `tokenizers` library, plus the chat template of
tokenizer_config.json (or chat_template.jinja) rendered with jinja2 the way transformers does
(sandboxed environment, trim_blocks/lstrip_blocks, `raise_exception`, `tojson`,
`strftime_now`, and bos_token/eos_token in the template's namespace)."""
from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Optional

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from crosspool_jax.checkpoints.errors import CheckpointError


class TemplateError(ValueError):
    """Raised by a chat template through `raise_exception(message)`."""


def _raise_exception(message):
    raise TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=64)
def _compile_template(source: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_content(tok) -> Optional[str]:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    """A `tokenizers.Tokenizer` with special tokens and a chat template."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_token: Optional[str] = None,
                 eos_token: Optional[str] = None, chat_template: Optional[str] = None):
        self.tokenizer = tokenizer
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = chat_template
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True, **kwargs) -> str:
        """Render the chat template; ValueError when the folder has none."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json / chat_template.jinja)")
        template = _compile_template(self.chat_template)
        context = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        context.update(kwargs)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)


def _pick_template(template) -> Optional[str]:
    if isinstance(template, list):   # [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return template


def load_tokenizer(path: str) -> Optional[Tokenizer]:
    """The folder's tokenizer, or None when it has no tokenizer.json."""
    tok_path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(tok_path):
        return None
    try:
        tok = tokenizers.Tokenizer.from_file(tok_path)
    except Exception as e:  # tokenizers raises its own Exception type
        raise CheckpointError(f"cannot load {tok_path}: {e}") from e
    cfg = {}
    cfg_path = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot parse {cfg_path}: {e}") from e
    template = _pick_template(cfg.get("chat_template"))
    jinja_path = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(jinja_path):
        with open(jinja_path) as f:
            template = f.read()
    return Tokenizer(tok, bos_token=_token_content(cfg.get("bos_token")),
                     eos_token=_token_content(cfg.get("eos_token")), chat_template=template)
