"""OpenAI response bodies: completions and chat, whole and as stream chunks, usage, logprobs.

Everything here is a pure function of plain values (choice deltas, counts, a tokenizer for
spelling tokens), so the shapes can be tested without a server.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from crosspool_jax.server.async_engine import ChoiceDelta


@dataclasses.dataclass
class ChoiceState:
    """One choice accumulated over the events of a request (non-streaming responses)."""

    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[dict] = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: Optional[object] = None

    def add(self, delta: ChoiceDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.stop_reason = delta.stop_reason


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tokenizer, token_id: int, logprob=None) -> str:
    """How a token is spelled in logprobs: the engine's decoding, the tokenizer's, or its id."""
    if logprob is not None and getattr(logprob, "decoded_token", None) is not None:
        return logprob.decoded_token
    if tokenizer is not None:
        try:
            return tokenizer.decode([token_id], skip_special_tokens=False)
        except Exception:  # noqa: BLE001 - a token the tokenizer cannot spell
            pass
    return f"token_id:{token_id}"


def _top(entries: dict, k: int) -> list[tuple[int, object]]:
    """The k most likely (token_id, Logprob) of one position, best first."""
    ranked = sorted(entries.items(), key=lambda kv: (
        kv[1].rank if kv[1].rank is not None else 1 << 30, -kv[1].logprob))
    return ranked[:k]


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict], k: int,
                        text_offset: int) -> dict:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_lps, tops, offsets = [], [], [], []
    offset = text_offset
    for tid, entries in zip(token_ids, logprobs):
        chosen = entries.get(tid)
        text = token_text(tokenizer, tid, chosen)
        tokens.append(text)
        token_lps.append(chosen.logprob if chosen is not None else None)
        tops.append({token_text(tokenizer, t, lp): lp.logprob for t, lp in _top(entries, k)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


def prompt_logprobs(prompt_ids: list[int], entries: list, k: int) -> list:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token
    {"token id": {logprob, rank, decoded_token}} of the prompt token and the k most likely
    (logprobs floored at -9999, as vLLM, so the JSON stays finite)."""
    out: list = [None]
    for tid, position in zip(prompt_ids[1:], entries[1:]):
        keep = {t: lp for t, lp in (position or {}).items() if t == tid or (lp.rank is not None and lp.rank <= k)}
        out.append({str(t): {"logprob": max(lp.logprob, -9999.0), "rank": lp.rank, "decoded_token": lp.decoded_token}
                    for t, lp in keep.items()})
    return out


def echo_logprobs(tokenizer, prompt_ids: list[int], entries: list, k: int) -> dict:
    """Completions logprobs of an echoed prompt (OpenAI's shape: the first token has no logprob
    and no top_logprobs), text offsets from 0."""
    first = token_text(tokenizer, prompt_ids[0])
    rest = completion_logprobs(tokenizer, prompt_ids[1:], [e or {} for e in entries[1:]], k, len(first))
    return {"tokens": [first] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
            "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}


def join_logprobs(a: dict, b: dict) -> dict:
    """Two completions logprobs one after the other."""
    return {key: a[key] + b[key] for key in a}


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict], k: int) -> dict:
    """Chat logprobs: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    content = []
    for tid, entries in zip(token_ids, logprobs):
        chosen = entries.get(tid)
        text = token_text(tokenizer, tid, chosen)
        top = []
        for t, lp in _top(entries, k):
            s = token_text(tokenizer, t, lp)
            top.append({"token": s, "logprob": lp.logprob, "bytes": list(s.encode("utf-8"))})
        content.append({"token": text,
                        "logprob": chosen.logprob if chosen is not None else float("-inf"),
                        "bytes": list(text.encode("utf-8")), "top_logprobs": top})
    return {"content": content}


def completion_body(request_id: str, created: int, model: str, choices: list[dict],
                    usage_: Optional[dict], *, chunk: bool) -> dict:
    body = {"id": request_id, "object": "text_completion", "created": created, "model": model,
            "choices": choices}
    if usage_ is not None or not chunk:
        body["usage"] = usage_
    return body


def completion_choice(index: int, text: str, logprobs: Optional[dict],
                      finish_reason: Optional[str], stop_reason=None,
                      token_ids: Optional[list[int]] = None, prompt_logprobs_: Optional[list] = None) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason,
              "stop_reason": stop_reason if isinstance(stop_reason, (str, int)) else None}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    if prompt_logprobs_ is not None:
        choice["prompt_logprobs"] = prompt_logprobs_
    return choice


def chat_body(request_id: str, created: int, model: str, choices: list[dict],
              usage_: Optional[dict], prompt_logprobs_: Optional[list] = None) -> dict:
    body = {"id": request_id, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}
    if prompt_logprobs_ is not None:
        body["prompt_logprobs"] = prompt_logprobs_
    return body


def chat_choice(index: int, text: str, logprobs: Optional[dict],
                finish_reason: Optional[str], token_ids: Optional[list[int]] = None) -> dict:
    choice = {"index": index, "message": {"role": "assistant", "content": text},
              "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def chat_chunk(request_id: str, created: int, model: str, choices: list[dict],
               usage_: Optional[dict] = None) -> dict:
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def chat_chunk_choice(index: int, delta: dict, logprobs: Optional[dict],
                      finish_reason: Optional[str], token_ids: Optional[list[int]] = None) -> dict:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def model_card(name: str, created: int, max_model_len: int, resident: Optional[bool],
               device: Optional[int] = None) -> dict:
    """device: the id of the device the model is placed on (shared/static), None when it spans several."""
    return {"id": name, "object": "model", "created": created, "owned_by": "crosspool-jax",
            "root": name, "parent": None, "max_model_len": max_model_len, "resident": resident, "device": device}
