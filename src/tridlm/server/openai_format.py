"""Response bodies and stream chunks in the OpenAI format, with tridlm's generation stats in `usage`."""

from __future__ import annotations

import json
import time
import uuid

from ..decoding import RowMetrics

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_lengths: list[int], metrics: list[RowMetrics], mode: str, block_length) -> dict:
    """OpenAI's three counts plus how the tokens were made (summed over the request's rows)."""
    completion = sum(m.generated_tokens for m in metrics)
    forwards = sum(m.forwards for m in metrics)
    accept = [a for m in metrics for a in m.acceptance_lengths]
    prompt = sum(prompt_lengths)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "mode": mode,
        "block_length": None if mode == "ar" else block_length,
        "forwards": forwards,
        "prefill_forwards": sum(m.prefill_forwards for m in metrics),
        "tokens_per_forward": completion / forwards if forwards else None,
        "mean_acceptance": sum(accept) / len(accept) if accept else None,
    }


class Formatter:
    """Builds one request's bodies: `chat` picks chat.completion(.chunk) over text_completion."""

    def __init__(self, chat: bool, model: str, mode: str):
        self.chat, self.model, self.mode = chat, model, mode
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "mode": self.mode}

    def response(self, texts: list[str], reasons: list[str], usage_: dict) -> dict:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": FINISH.get(r, r)} for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
            return {**self._head("chat.completion"), "choices": choices, "usage": usage_}
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": FINISH.get(r, r)}
                   for i, (t, r) in enumerate(zip(texts, reasons, strict=True))]
        return {**self._head("text_completion"), "choices": choices, "usage": usage_}

    def chunk(self, index: int, text: str | None = None, reason: str | None = None, role: bool = False,
              usage_: dict | None = None) -> dict:
        finish = FINISH.get(reason, reason) if reason else None
        if self.chat:
            delta: dict = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            body = {**self._head("chat.completion.chunk"),
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        else:
            body = {**self._head("text_completion"),
                    "choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}]}
        if usage_ is not None:
            body["usage"] = usage_
        return body

    def usage_chunk(self, usage_: dict) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage_}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
