"""From a request body to what the engine takes: prompt token ids and `GenerationParams`.

Completions encode text the way `generate()` does (special tokens added), so a completion request
decodes exactly what `model.generate(prompt, ...)` would. Chat renders the messages with the
tokenizer's chat template and stops at the template's end-of-turn tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..decoding import GenerationParams
from ..decoding.params import MODES
from ..engine import AUTO
from .errors import APIError, invalid
from .schemas import ChatCompletionRequest, CompletionRequest

# tokens that end an assistant turn in common chat templates
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "</s>")


@dataclass
class Limits:
    default_mode: str = AUTO
    default_temperature: float = 0.0  # greedy unless asked: the same default as `generate()`
    default_max_tokens: int = 16  # completions (OpenAI's default); chat defaults to max_tokens_cap
    max_tokens_cap: int = 2048
    max_n: int = 8
    max_prompts: int = 16  # prompts in one completions request
    max_prompt_tokens: int = 8192  # all of one request's prompts together (each prefill is work before any token)
    max_new_tokens_total: int = 16384  # prompts x n x max_tokens: the tokens one request may ask for
    max_revise_tokens: int = 512  # rounds x tokens re-masked per round (the budget, else all that may be)


def generation_params(body: CompletionRequest | ChatCompletionRequest, limits: Limits, max_tokens: int | None,
                      stop_token_ids: tuple[int, ...] = (), extra_stop: tuple[str, ...] = ()) -> GenerationParams:
    mode = body.mode or limits.default_mode
    if mode not in (*MODES, AUTO):
        raise invalid(f"unknown mode {mode!r}; choose one of {', '.join((*MODES, AUTO))}", "mode")
    field = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    if max_tokens is not None and max_tokens > limits.max_tokens_cap:
        raise invalid(f"{field} must be <= {limits.max_tokens_cap}, got {max_tokens}", field)
    if (body.n or 1) > limits.max_n:
        raise invalid(f"n must be <= {limits.max_n}, got {body.n}", "n")
    if isinstance(body.stop, list) and any(len(s) > 256 for s in body.stop) or isinstance(body.stop, str) \
            and len(body.stop) > 256:
        raise invalid("stop sequences must be at most 256 characters each", "stop")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    kw = dict(mode=mode, max_new_tokens=max_tokens or limits.max_tokens_cap,
              temperature=limits.default_temperature if body.temperature is None else body.temperature,
              seed=body.seed, stop=stop + extra_stop, stop_token_ids=stop_token_ids,
              ignore_eos=bool(body.ignore_eos))
    for name in ("top_p", "top_k", "block_length", "threshold", "commit_threshold", "draft_threshold", "steps",
                 "selection_policy"):  # ranges: checked by the request schema, from GenerationParams' declarations
        if getattr(body, name) is not None:
            kw[name] = getattr(body, name)
    return GenerationParams(**kw)


def _check_length(ids: list[int], window: int, field: str) -> list[int]:
    if not ids:
        raise invalid(f"{field} is empty; give at least one token", field)
    if len(ids) >= window:
        raise invalid(f"{field} has {len(ids)} tokens, but the model's context window is {window} tokens "
                      f"(no room left to generate)", field)
    return ids


def completion_prompts(body: CompletionRequest, tokenizer, config, limits: Limits) -> list[list[int]]:
    p = body.prompt
    if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
        items = [p]
    else:
        items = list(p)
    if not items:
        raise invalid("prompt is empty; give text or token ids", "prompt")
    if len(items) > limits.max_prompts:
        raise invalid(f"prompt holds {len(items)} prompts; at most {limits.max_prompts} per request", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            if tokenizer is None:
                raise invalid("this model has no tokenizer: send the prompt as token ids", "prompt")
            ids = tokenizer.encode(item, add_special_tokens=True)
        else:
            ids = list(item)
        out.append(_check_length(ids, config.max_position_embeddings, "prompt"))
    check_request_size(out, body.n or 1, body.max_tokens or limits.default_max_tokens, limits, "prompt")
    return out


def check_request_size(prompts: list[list[int]], n: int, max_tokens: int, limits: Limits, field: str) -> None:
    """Refuse what one request may not ask for: too many prompt tokens, or too many tokens to make."""
    total = sum(len(p) for p in prompts)
    if total > limits.max_prompt_tokens:
        raise invalid(f"{field} holds {total} tokens in all; at most {limits.max_prompt_tokens} per request", field)
    asked = len(prompts) * n * max_tokens
    if asked > limits.max_new_tokens_total:
        raise invalid(f"prompts x n x max_tokens = {asked} tokens; at most {limits.max_new_tokens_total} per "
                      "request: lower n or max_tokens", "max_tokens")


def chat_prompt(body: ChatCompletionRequest, tokenizer, config) -> tuple[list[int], tuple[int, ...], tuple[str, ...]]:
    """(prompt ids, end-of-turn stop token ids, extra stop strings) for a chat request."""
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so it cannot chat; use /v1/completions with token ids",
                       "messages")
    messages = []
    for m in body.messages:
        d = {**(m.model_extra or {}), "role": "system" if m.role == "developer" else m.role, "content": m.text()}
        messages.append(d)
    stop_ids = tuple(i for i in (tokenizer.token_to_id(t) for t in END_OF_TURN)
                     if i is not None and i != config.mask_token_id)
    if tokenizer.chat_template:
        try:  # contents are text: a special-token string typed in a message stays text (no forged turns)
            ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
        except Exception as e:  # the template's own checks (roles, order) or a broken template
            raise invalid(f"messages: the chat template rejected them: {e}", "messages") from None
        extra: tuple[str, ...] = ()
    else:  # a model without a template: plain "Role: text" lines, as `tridlm chat` does
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        ids = tokenizer.encode_text("\n".join(lines) + "\nAssistant:", add_special_tokens=True)
        extra = ("\nUser:",)
    return _check_length(ids, config.max_position_embeddings, "messages"), stop_ids, extra
