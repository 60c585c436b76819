"""The Python batch-generation API, shaped like vLLM's: `LLM(...).generate(...)`."""
from __future__ import annotations

import itertools
from typing import Optional, Sequence, Union

from crosspool_jax.engine.llm_engine import LLMEngine, Prompt
from crosspool_jax.outputs import CompletionOutput, RequestOutput
from crosspool_jax.sampling_params import SamplingParams

_TQDM_MIN_PROMPTS = 8


class LLM:
    """Many models, one engine.

    >>> llm = LLM(models={"mixtral-tiny": "checkpoints/mixtral-tiny"}, dtype="float32")
    >>> outs = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0.0), model="mixtral-tiny")

    `models` maps a served name to a checkpoint folder (a single path serves it under its
    folder name). Engine options (`mode`, `kv_devices`, `weight_devices`, `kv_pool_bytes`,
    `weights_pool_bytes`, `max_model_len`, ...) are keywords; see `EngineConfig`.
    """

    def __init__(self, models: Union[dict, str], dtype: str = "bfloat16", **options):
        if isinstance(models, str):
            models = {models.rstrip("/").split("/")[-1]: models}
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

        A prompt that cannot be served (too long for its model or for the whole KV pool)
        gets a finished RequestOutput with `error` set; the others complete. Invalid
        arguments (unknown model, mismatched list lengths) raise ValueError before anything runs.
        """
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
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
        order = []
        for prompt, p, name in zip(prompts, params, models):
            rid = f"gen-{next(self._ids)}"
            order.append(rid)
            try:
                self.engine.add_request(rid, name, prompt, p)
            except ValueError as e:
                results[rid] = _failed(rid, name, prompt, p, str(e))
        bar = None
        if use_tqdm and count >= _TQDM_MIN_PROMPTS:
            from tqdm.auto import tqdm
            bar = tqdm(total=count, desc="generate", unit="req", initial=len(results))
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        if bar is not None:
            bar.close()
        return [results[rid] for rid in order]

    def chat(self, messages: list, sampling_params: Optional[SamplingParams] = None,
             model: Optional[str] = None, add_generation_prompt: bool = True) -> RequestOutput:
        """One conversation rendered with the model's chat template."""
        name = self._one_model(model)
        tokenizer = self.engine.get_tokenizer(name)
        if tokenizer is None:
            raise ValueError(f"model {name!r} has no tokenizer, so no chat template")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.generate([text], sampling_params, model=name, use_tqdm=False)[0]

    @staticmethod
    def _broadcast(value, count: int, name: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != count:
                raise ValueError(f"{name}: got {len(value)} values for {count} prompts")
            return list(value)
        return [value] * count


def _failed(rid: str, model: str, prompt, params: SamplingParams, message: str) -> RequestOutput:
    text = prompt if isinstance(prompt, str) else None
    ids = list(prompt) if isinstance(prompt, (list, tuple)) else []
    outs = [CompletionOutput(index=i, text="", token_ids=[], finish_reason="error") for i in range(params.n)]
    return RequestOutput(request_id=rid, model=model, prompt=text, prompt_token_ids=ids, outputs=outs,
                         finished=True, error=message)
