"""`generate()`: one call, any mode, one prompt or a batch; optionally streamed.

    model.generate("To be", mode="spec", max_new_tokens=64, block_length=8)   # -> GenerationResult
    for chunk in model.generate(["a", "b"], mode="diffusion", stream=True):   # chunks are str
        print(chunk.row, chunk, end="")

A thin front over `tridlm.decoding`: it validates everything first (no forward runs on bad input),
builds one `Row` per prompt (row i seeded with seed + i), and steps a `DecodeBatch` until every
row is finished.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .decoding import CallMetrics, DecodeBatch, GenerationError, GenerationParams, Row, RowMetrics
from .decoding.block_length import resolve_auto_block_length
from .decoding.revise import ReviseOptions
from .rows import make_row

if TYPE_CHECKING:
    from .model import TriModeLM


class TextChunk(str):
    """A piece of streamed text that just became final, for row `row`; `ids` are its new token ids."""

    row: int
    ids: list[int]

    def __new__(cls, text: str, row: int = 0, ids=()):
        s = super().__new__(cls, text)
        s.row, s.ids = row, list(ids)
        return s


@dataclass
class RowResult:
    text: str
    ids: list[int]  # generated ids (EOS included when it ended the row; never the mask token)
    prompt_ids: list[int]
    finish_reason: str  # "eos" | "length" | "stop"
    metrics: RowMetrics

    def to_dict(self) -> dict:
        return {"text": self.text, "ids": self.ids, "finish_reason": self.finish_reason,
                "metrics": self.metrics.to_dict()}


@dataclass
class GenerationResult:
    mode: str
    rows: list[RowResult] = field(default_factory=list)
    metrics: CallMetrics = field(default_factory=CallMetrics)
    batched: bool = False
    block_length: int | None = None  # what ran (resolved from the default or "auto"); None for AR

    def _one(self) -> RowResult:
        if len(self.rows) != 1:
            raise ValueError(f"this result holds {len(self.rows)} rows: use .rows[i] or .texts")
        return self.rows[0]

    @property
    def text(self) -> str:
        return self._one().text

    @property
    def ids(self) -> list[int]:
        return self._one().ids

    @property
    def finish_reason(self) -> str:
        return self._one().finish_reason

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self.rows]

    def to_dict(self) -> dict:
        return {"mode": self.mode, "block_length": self.block_length, "rows": [r.to_dict() for r in self.rows],
                "metrics": self.metrics.to_dict()}


def _prompt_ids(prompt, tokenizer, add_special_tokens: bool) -> tuple[list[list[int]], bool]:
    """(one id list per row, whether the input was a batch)."""
    def encode(text: str) -> list[int]:
        if tokenizer is None:
            raise GenerationError("a text prompt needs a tokenizer (the model has none): pass token ids")
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    if isinstance(prompt, str):
        return [encode(prompt)], False
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 1:
            return [prompt.tolist()], False
        if prompt.dim() == 2:
            return [r.tolist() for r in prompt], True
        raise GenerationError(f"a tensor prompt must be [T] or [B, T], got shape {tuple(prompt.shape)}")
    prompt = list(prompt)
    if not prompt:
        raise GenerationError("empty prompt list")
    if all(isinstance(t, int) for t in prompt):
        return [prompt], False
    rows = []
    for p in prompt:
        if isinstance(p, str):
            rows.append(encode(p))
        elif isinstance(p, torch.Tensor):
            rows.append(p.tolist())
        else:
            rows.append([int(t) for t in p])
    return rows, True


class GenerationStream:
    """Iterates `TextChunk`s as text becomes final; `result` is set once the iteration ends."""

    def __init__(self, model: TriModeLM, rows: list[Row], mode: str, batched: bool):
        self.model, self.rows, self.mode, self.batched = model, rows, mode, batched
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[TextChunk]:
        t0 = time.perf_counter()
        batch = DecodeBatch(self.model)
        with torch.inference_mode():
            batch.add(*self.rows)
        while not batch.done:
            with torch.inference_mode():
                batch.step()
            for i, r in enumerate(self.rows):
                ids, text = r.take_ids(), r.take_text()
                if ids or text:
                    yield TextChunk(text, i, ids)
        for i, r in enumerate(self.rows):  # rows that finished before any forward (limit 0)
            text = r.take_text()
            if text:
                yield TextChunk(text, i, r.take_ids())
        metrics = CallMetrics(rows=[r.metrics for r in self.rows], prefill_forwards=batch.prefill_forwards,
                              forwards=batch.forwards, wall_time_s=time.perf_counter() - t0)
        block = self.rows[0].params.block_length if self.mode != "ar" and self.rows else None
        self.result = GenerationResult(
            mode=self.mode, batched=self.batched, metrics=metrics, block_length=block,
            rows=[RowResult(r.text, list(r.output), r.prompt, r.finish_reason, r.metrics) for r in self.rows])


def auto_block_length(model: TriModeLM) -> int:
    """block_length="auto": the length that maximises expected tokens/s on this device."""
    return resolve_auto_block_length(model)


def generate(model: TriModeLM, prompt, mode: str = "ar", *, tokenizer=None, stream: bool = False,
             add_special_tokens: bool = True, **params):
    """Generate from `prompt` (text, token ids, or a list of either for a batch) in `mode`.

    mode: "ar" | "diffusion" | "spec" | "spec-quadratic".
    params (see `GenerationParams`): max_new_tokens=128, temperature=0 (greedy), top_k=0, top_p=1,
        seed=None, stop=(), eos_token_id (default the model's), ignore_eos=False, block_length (default the
        checkpoint's block_size; "auto": measured cost and acceptance profiles pick it, tridlm.decoding.block_length),
        commit_threshold (diffusion, 0.9), draft_threshold (spec, 0 = one-pass draft) or threshold (the
        mode's own of the two), steps (default block_length),
        selection_policy="confidence_threshold" | "low_confidence" | "margin" | "entropy" | "leftmost".
    revise_rounds / revise_remask_threshold (alias revise_threshold) / revise_budget / revise_groups
        (diffusion only; revise_ + a `ReviseOptions` field): after a block is filled and before it is
        committed, re-mask its least certain tokens and denoise them again, that many rounds (see
        `tridlm.edit.revise`); 0 (default) is plain diffusion.
    Returns a `GenerationResult` (`.text`, `.ids`, `.metrics`, `.rows`), or with stream=True a
    `GenerationStream` of `TextChunk`s whose `.result` is set at the end.
    Raises `GenerationError` (a ValueError) for invalid parameters or prompts, before any forward.

    What is exact (README; the error model is `tridlm.numerics`): at temperature 0 the same call
    gives the same tokens, and diffusion at block_length=1 gives AR's tokens, bit for bit (same
    forwards, same shapes). "spec" and "spec-quadratic" give AR's tokens, and a batch gives each
    row's tokens alone, except at a near tie: a position whose exact top-2 logit gap is below 2E
    (a few thousandths of a logit for a 135M model in fp32), where the other kernel shapes of a
    wider forward may pick the other token. In bf16 that bound is of the order of a logit: the
    agreement is measured (`tridlm bench`), not guaranteed.
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    revision = {k.removeprefix("revise_"): params.pop(k) for k in list(params) if k.startswith("revise_")}
    if "threshold" in revision:  # the older name of revise_remask_threshold
        revision.setdefault("remask_threshold", revision.pop("threshold"))
    try:
        gp = GenerationParams(mode=mode, **params)
    except TypeError as e:
        raise GenerationError(f"unknown generation parameter: {e}") from None
    prompts, batched = _prompt_ids(prompt, tokenizer, add_special_tokens)
    gp = gp.resolve(model.config, [len(p) for p in prompts], auto_block_length=lambda: auto_block_length(model))
    try:  # drafter: the diffusion mode's own weights, a LoRA drafter on for the block
        revise = ReviseOptions(**{"rounds": 0, "drafter": True, **revision}) if revision else None
    except TypeError as e:
        raise GenerationError(f"unknown revision parameter: {e}") from None
    if revise is not None and not revise.rounds:
        revise.validate()
        revise = None
    rows = [make_row("generate", p, gp, model.config, tokenizer, seed=None if gp.seed is None else gp.seed + i,
                     device=model.device, revise=revise) for i, p in enumerate(prompts)]
    s = GenerationStream(model, rows, gp.mode, batched)
    if stream:
        return s
    for _ in s:
        pass
    return s.result
