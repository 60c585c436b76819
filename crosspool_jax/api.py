"""The Python batch-generation API, shaped like vLLM's: `LLM(...).generate(...)`, `LLM(...).chat(...)`."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional, Sequence, Union

from crosspool_jax.engine.config import EngineConfig
from crosspool_jax.engine.llm_engine import LLMEngine, Prompt
from crosspool_jax.outputs import CompletionOutput, RequestOutput
from crosspool_jax.sampling_params import RequestOutputKind, SamplingParams

_TQDM_MIN_PROMPTS = 8
_OPTIONS = tuple(f.name for f in dataclasses.fields(EngineConfig) if f.name != "models")
Conversation = list[dict]


class LLM:
    """Many models, one engine.

    >>> llm = LLM(model="checkpoints/mixtral-tiny", dtype="float32")          # one model, like vLLM
    >>> llm = LLM(models={"mixtral-tiny": "checkpoints/mixtral-tiny"}, dtype="float32")
    >>> outs = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0.0))

    `models` maps a served name to a checkpoint folder; a single path (positional, or
    `model=`) serves that folder under its folder name. Engine options (`mode`, `kv_devices`,
    `weight_devices`, `kv_pool_bytes`, `weights_pool_bytes`, `max_model_len`, ...) are
    keywords; see `EngineConfig`. An unknown option is a ValueError naming it.
    """

    def __init__(self, models: Union[dict, str, None] = None, dtype: str = "bfloat16", *,
                 model: Optional[str] = None, **options):
        if model is not None:
            if models is not None:
                raise ValueError("LLM: pass either models={name: path} or model=path, not both")
            models = model
        if models is None:
            raise ValueError("LLM: pass model=path or models={name: path}")
        if isinstance(models, (str, bytes)) or hasattr(models, "__fspath__"):
            path = str(models)
            models = {path.rstrip("/").split("/")[-1]: path}
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise ValueError(f"LLM: unknown engine option(s) {unknown}; options: {', '.join(_OPTIONS)}")
        self.engine = LLMEngine.from_options(models, dtype=dtype, **options)
        self._ids = itertools.count()

    @property
    def model_names(self) -> list[str]:
        return self.engine.model_names

    def get_tokenizer(self, model: Optional[str] = None):
        return self.engine.get_tokenizer(self._one_model(model))

    def _one_model(self, model: Optional[str]) -> str:
        if model is not None:
            return model
        names = self.engine.model_names
        if len(names) != 1:
            raise ValueError(f"model is required when several models are served: {names}")
        return names[0]

    def generate(self, prompts: Union[Prompt, Sequence[Prompt]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 model: Union[str, Sequence[str], None] = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order.

        A prompt is a string, a list (or tuple) of token ids, or {"prompt": ...} /
        {"prompt_token_ids": [...]}; `prompts` is one prompt or a list of them. A prompt that
        cannot be served (malformed, too long for its model or for the whole KV pool, or
        failing inside a step) gets a finished RequestOutput with `error` set; the others
        complete. Invalid arguments (no prompts, unknown model, mismatched list lengths) raise
        ValueError before anything runs. If generation is interrupted (an exception, Ctrl-C),
        the call's requests are aborted and their pages freed.
        """
        prompts = _prompt_list(prompts)
        count = len(prompts)
        params = self._broadcast(sampling_params if sampling_params is not None else SamplingParams(),
                                 count, "sampling_params")
        models = self._broadcast(model if model is not None else self._one_model(None), count, "model")
        for name in set(models):
            self.engine.registry.get(name)      # raises ValueError naming unknown models
        for p in params:
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params must be SamplingParams, got {type(p).__name__}")
        results: dict[str, RequestOutput] = {}
        order = [f"gen-{next(self._ids)}" for _ in prompts]
        bar = None
        try:
            for rid, prompt, p, name in zip(order, prompts, params, models):
                try:
                    self.engine.add_request(rid, name, prompt,      # read once finished
                                            dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY))
                except ValueError as e:
                    results[rid] = _failed(rid, name, prompt, p, str(e))
            if use_tqdm and count >= _TQDM_MIN_PROMPTS:
                from tqdm.auto import tqdm
                bar = tqdm(total=count, desc="generate", unit="req", initial=len(results))
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            for rid in order:                   # only left over when interrupted
                if rid not in results:
                    self.engine.abort_request(rid)
        return [results[rid] for rid in order]

    def chat(self, messages: Union[Conversation, Sequence[Conversation]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             model: Optional[str] = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or a list of them, each
        rendered with the model's chat template; one RequestOutput per conversation (as vLLM)."""
        name = self._one_model(model)
        tokenizer = self.engine.get_tokenizer(name)
        if tokenizer is None:
            raise ValueError(f"model {name!r} has no tokenizer, so no chat template")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages must be a conversation (a non-empty list of messages) or a list of them")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = []
        for c, conversation in enumerate(conversations):
            _check_conversation(conversation, c if len(conversations) > 1 else None)
            text = tokenizer.apply_chat_template(list(conversation),
                                                 add_generation_prompt=add_generation_prompt)
            prompts.append({"prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, model=name, use_tqdm=use_tqdm)

    @staticmethod
    def _broadcast(value, count: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ValueError(f"{name}: got {len(value)} values for {count} prompts")
            return list(value)
        return [value] * count


def _is_token_ids(x) -> bool:
    return isinstance(x, (list, tuple)) and bool(x) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in x)


def _prompt_list(prompts) -> list:
    """One prompt or a sequence of prompts -> a list of prompts (ValueError for anything else)."""
    if isinstance(prompts, (str, dict)) or _is_token_ids(prompts):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)):
        raise ValueError("prompts: bytes are not a prompt; pass text (str) or token ids")
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a prompt (text, token ids or a dict) or a list of prompts, "
                         f"got {type(prompts).__name__}")
    return list(prompts)


def _check_conversation(conversation, index: Optional[int]) -> None:
    where = "" if index is None else f"conversation {index}: "
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(f"{where}a conversation must be a non-empty list of messages")
    for i, m in enumerate(conversation):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"{where}messages[{i}] must be a dict with a string 'role'")
        if not isinstance(m.get("content", ""), (str, list, type(None))):
            raise ValueError(f"{where}messages[{i}].content must be a string")


def _failed(rid: str, model: str, prompt, params: SamplingParams, message: str) -> RequestOutput:
    text = prompt if isinstance(prompt, str) else None
    ids = list(prompt) if _is_token_ids(prompt) else []
    outs = [CompletionOutput(index=i, text="", token_ids=[], finish_reason="error") for i in range(params.n)]
    return RequestOutput(request_id=rid, model=model, prompt=text, prompt_token_ids=ids, outputs=outs,
                         finished=True, error=message)
