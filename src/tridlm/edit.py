"""`infill()` and `revise()`: fill-in-the-middle and revision in one call (fronts over `tridlm.decoding`).

    model.infill("def add(a, b):\\n    return ", "\\n", length=3)            # -> InfillResult (.text, .middle)
    model.infill(segments=["x = ", " + ", "\\n"], length=[2, 2])           # several holes
    model.infill(prefix, suffix, max_length=24, stop=["\\n"])              # length unknown: up to a marker
    model.revise("The cat sat on the the mat.", budget=2)                 # -> RevisionResult (.text, .changes)

Like `generate()`, both validate everything before any forward (`GenerationError`), then step a
`DecodeBatch` holding one scripted row. Text in, text out (the given text verbatim); or token ids in,
ids out. See `tridlm.decoding.infill` and `tridlm.decoding.revise` for the methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .decoding import DecodeBatch, GenerationError, GenerationParams, RowMetrics
from .decoding.infill import METHODS
from .decoding.revise import Change, ReviseRow
from .rows import make_row

if TYPE_CHECKING:
    from .model import TriModeLM


@dataclass
class InfillResult:
    text: str  # the whole text: given segments verbatim, holes filled ("" without a tokenizer)
    fills: list[str]  # each hole's text
    fill_ids: list[list[int]]
    ids: list[int]  # the whole text's ids
    method: str
    finish_reason: str  # of the last hole: "length" (fixed or maximum reached) | "stop" | "eos"
    hole_reasons: list[str]
    metrics: RowMetrics
    candidates: list[list[dict]] = field(default_factory=list)  # ranked candidates per hole (ids, score)

    @property
    def middle(self) -> str:
        return self.fills[0] if self.fills else ""

    def to_dict(self) -> dict:
        return {"text": self.text, "fills": self.fills, "fill_ids": self.fill_ids, "method": self.method,
                "finish_reason": self.finish_reason, "hole_reasons": self.hole_reasons,
                "metrics": self.metrics.to_dict()}


@dataclass
class TokenChange:
    position: int  # index into the revised part's tokens
    old: str
    new: str
    old_id: int
    new_id: int
    round: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RevisionResult:
    text: str  # the revised text (the revisable part only; the context is unchanged by construction)
    ids: list[int]
    changes: list[TokenChange]  # tokens that differ from the input
    selected: list[list[int]]  # positions re-masked in each round (revisable-part indices)
    metrics: RowMetrics

    def to_dict(self) -> dict:
        return {"text": self.text, "ids": self.ids, "changes": [c.to_dict() for c in self.changes],
                "selected": self.selected, "metrics": self.metrics.to_dict()}


def _params(mode: str, params: dict) -> GenerationParams:
    try:
        return GenerationParams(mode=mode, **params)
    except TypeError as e:
        raise GenerationError(f"unknown generation parameter: {e}") from None


def _encode(parts: list, tokenizer) -> tuple[list[list[int]], bool]:
    """(ids per part, whether the parts were text)."""
    if all(isinstance(p, str) for p in parts):
        if tokenizer is None:
            raise GenerationError("text needs a tokenizer (the model has none): pass token ids")
        return [tokenizer.encode(p) for p in parts], True
    if any(isinstance(p, str) for p in parts):
        raise GenerationError("give every part as text or every part as token ids, not a mix")
    return [[int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)] for p in parts], False


def _run(model: TriModeLM, row) -> None:
    batch = DecodeBatch(model)
    with torch.inference_mode():
        batch.add(row)
        while not batch.done:
            batch.step()


def infill(model: TriModeLM, prefix=None, suffix=None, *, segments=None, length=None, max_length: int = 32,
           stop=(), stop_after: int = 0, mode: str = "diffusion", method: str = "auto",
           suffix_window: int | None = None, candidates: int = 4, lengths=None, rank_temperature: float = 0.8,
           drafter: bool | None = None, tokenizer=None, **params) -> InfillResult:
    """Fill the hole between `prefix` and `suffix` (or the holes between `segments`) so it fits both sides.

    length: an int (every hole exactly that many tokens), None (variable: up to `max_length`, ending
        before the first `stop` string or at end-of-text), or one of these per hole. stop_after: stop
        strings count from this character of a fill on (1: a hole that begins with a newline -- BPE
        vocabularies merge a newline with the next line's indent -- and ends at the next newline).
    mode: "diffusion" | "ar" | "spec" | "spec-quadratic" -- the decoding for methods fim and left.
    method: "auto" | "block" | "fim" | "rank" | "left" (see `tridlm.decoding.infill`); auto picks block
        for diffusion, and for AR/spec fim when the model was trained for it, else rank.
    suffix_window: right-context tokens a hole's block holds (block) or ranks by (rank); default the
        model's block size. candidates / lengths: rank's candidates; block's lengths for a variable hole.
    drafter: switch the LoRA drafter on in block forwards (default: when the model has one).
    params: the sampler's (temperature, threshold, steps, selection_policy, block_length, seed, ...).
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if segments is None:
        if prefix is None:
            raise GenerationError("give prefix (and suffix) or segments")
        segments = [prefix, "" if suffix is None and isinstance(prefix, str) else (suffix or [])]
    elif prefix is not None or suffix is not None:
        raise GenerationError("give either prefix/suffix or segments, not both")
    segments = list(segments)
    if len(segments) < 2:
        raise GenerationError("segments needs at least two parts (one hole between them)")
    n_holes = len(segments) - 1
    holes = list(length) if isinstance(length, (list, tuple)) else [length] * n_holes
    if len(holes) != n_holes:
        raise GenerationError(f"{n_holes} holes but {len(holes)} lengths")
    seg_ids, is_text = _encode(segments, tokenizer)
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if method not in METHODS + ("auto",):
        raise GenerationError(f"unknown infill method {method!r}; choose auto or one of {', '.join(METHODS)}")
    if drafter is None:
        drafter = getattr(model, "draft_adapter", None) is not None
    elif drafter and getattr(model, "draft_adapter", None) is None:
        raise GenerationError("drafter=True but the model has no LoRA drafter")
    row = make_row("infill", seg_ids[0], _params(mode, params), model.config, tokenizer, device=model.device,
                   segments=seg_ids, holes=holes, method=method, suffix_window=suffix_window, max_length=max_length,
                   stop=stop, stop_after=stop_after, candidates=candidates, lengths=lengths,
                   rank_temperature=rank_temperature, drafter=bool(drafter))
    _run(model, row)
    fills = [f or [] for f in row.fills]
    fill_texts = [tokenizer.decode(f) for f in fills] if tokenizer is not None else [""] * len(fills)
    if is_text:
        text = segments[0] + "".join(f + s for f, s in zip(fill_texts, segments[1:], strict=True))
    else:
        text = tokenizer.decode(row.ids) if tokenizer is not None else ""
    return InfillResult(text, fill_texts, fills, row.ids, row.options.method, row.finish_reason,
                        [r or "length" for r in row.hole_reasons], row.metrics, row.candidate_log)


def revise(model: TriModeLM, text, *, prefix="", suffix="", rounds: int = 1, remask_threshold: float | None = None,
           budget: int | float | None = None, window: int | None = None, context: int | None = None,
           groups: int = 2, min_gain: float = 1.0, drafter: bool | None = None, commit_threshold: float | None = None,
           tokenizer=None, threshold: float | None = None, **params) -> RevisionResult:
    """Re-mask the tokens of `text` the model is least confident of and denoise them again, `rounds` times.

    prefix / suffix: context around `text`, read but never changed. remask_threshold (alias threshold): re-mask
    tokens whose
    probability (masked, in context) is below it; budget: at most this many per round (an int, or a
    fraction of the tokens); neither: below 0.1, at most a tenth of the tokens. min_gain: a re-denoised
    token replaces the old one only if the model finds it that many times likelier in the same context
    (1: always the denoiser's choice). budget=0 or rounds=0 returns `text` unchanged
    without running the model. window/context: tokens scored together and the right context they see
    (default: half the model's block size each). groups: masked copies per window (0: score visible).
    commit_threshold and params: the re-denoiser's sampler (`GenerationParams`).
    """
    if threshold is not None:
        if remask_threshold is not None and remask_threshold != threshold:
            raise GenerationError("threshold is an alias of remask_threshold; give one")
        remask_threshold = threshold
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    parts = [prefix, text, suffix]
    if not isinstance(text, str):
        parts = [p if not isinstance(p, str) or p else [] for p in parts]
    (pre, body, post), is_text = _encode(parts, tokenizer)
    if drafter is None:
        drafter = getattr(model, "draft_adapter", None) is not None
    gp = _params("diffusion", dict(params, commit_threshold=commit_threshold))
    row = make_row("revise", body, gp, model.config, tokenizer, device=model.device, prefix_ids=pre, suffix_ids=post,
                   rounds=rounds, remask_threshold=remask_threshold, budget=budget, window=window, context=context,
                   groups=groups, min_gain=min_gain, drafter=bool(drafter))
    if not row.finished:
        _run(model, row)
    new = row.revised[len(pre):len(pre) + len(body)]
    dec = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else (lambda ids: "")
    changes = [_token_change(c, len(pre), dec) for c in row.changes]
    unchanged = not row.changes
    out_text = (text if unchanged else dec(new)) if is_text else dec(new)
    selected = [[p - len(pre) for p in s] for s in row.selected]
    return RevisionResult(out_text, new, changes, selected, row.metrics)


def _token_change(c: Change, offset: int, dec) -> TokenChange:
    return TokenChange(c.position - offset, dec([c.old]), dec([c.new]), c.old, c.new, c.round)


def revision_body(row: ReviseRow, tokenizer=None) -> dict:
    """The JSON answer to a finished revision request: the revised text, the changed tokens (positions
    within the text), the positions re-masked per round, and the usage."""
    dec = tokenizer.decode if tokenizer is not None else (lambda ids: "")
    start = row.allowed.index(True)
    changes = [_token_change(c, start, dec).to_dict() for c in row.changes]
    m = row.metrics
    return {"object": "revision", "text": dec(row.output), "ids": list(row.output), "changes": changes,
            "selected": [[p - start for p in s] for s in row.selected],
            "usage": {"prompt_tokens": len(row.original), "completion_tokens": len(row.output),
                      "total_tokens": len(row.original) + len(row.output), "forwards": m.forwards,
                      "prefill_forwards": m.prefill_forwards}}
