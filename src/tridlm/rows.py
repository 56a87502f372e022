"""The one request factory: `make_row(kind, ...)` builds the decoding row of any request -- a generation
(optionally revising each diffusion block), an infill, a revision -- for `generate()`, `infill()`,
`revise()`, the engine and the server alike. Building a row validates its parameters (GenerationError,
before any forward)."""

from __future__ import annotations

from .decoding import GenerationError, GenerationParams, Row
from .decoding.infill import InfillOptions, InfillRow
from .decoding.revise import ReviseOptions, ReviseRow, revising_row
from .tokenizer import fim_tokens

KINDS = ("generate", "infill", "revise")


def make_row(kind: str, prompt_ids, params: GenerationParams, config, tokenizer=None, seed=None, device=None,
             **options) -> Row:
    """The row of one request of `kind`; `options` are that kind's:

    generate: revise (ReviseOptions: revise each diffusion block before committing it).
    infill: suffix_ids (the text after the hole) or segments (every part, holes between them) and holes
        (a length per hole, None: variable); method, suffix_window, max_length (default
        params.max_new_tokens), stop (default params.stop), stop_after, candidates, lengths,
        rank_temperature, drafter. Its output (what streams) is the middle.
    revise: prompt_ids is the text to revise; prefix_ids, suffix_ids, and the ReviseOptions fields (rounds,
        remask_threshold, budget, window, context, groups, min_gain, drafter). Its output (what streams,
        once) is the revised text.
    """
    if kind == "generate":
        revise = options.pop("revise", None)
        _no_more(kind, options)
        if revise is not None:
            return revising_row(prompt_ids, params, config, tokenizer, seed=seed, device=device, options=revise)
        return Row(prompt_ids, params, config, tokenizer, seed=seed, device=device)
    if kind == "infill":
        return _infill_row(prompt_ids, params, config, tokenizer, seed, device, **options)
    if kind == "revise":
        return _revise_row(prompt_ids, params, config, tokenizer, seed, device, **options)
    raise GenerationError(f"unknown request kind {kind!r}; choose one of {', '.join(KINDS)}")


def _no_more(kind: str, options: dict) -> None:
    if options:
        raise GenerationError(f"a {kind} request takes no option {', '.join(sorted(options))}")


def resolve_method(method: str, mode: str, tokenizer) -> str:
    """auto: diffusion fills a block holding the suffix; AR/spec use the FIM ordering when the model was
    trained for it (its tokenizer has the FIM tokens), else rank left-to-right candidates by the suffix."""
    if method != "auto":
        return method
    if mode == "diffusion":
        return "block"
    return "fim" if fim_tokens(tokenizer) is not None else "rank"


def _infill_row(prompt_ids, params, config, tokenizer, seed, device, *, suffix_ids=(), segments=None, holes=None,
                method: str = "auto", suffix_window: int | None = None, max_length: int | None = None, stop=None,
                stop_after: int = 0, candidates: int = 4, lengths=None, rank_temperature: float = 0.8,
                drafter: bool = False) -> InfillRow:
    segments = [list(s) for s in segments] if segments is not None else [list(prompt_ids), list(suffix_ids)]
    holes = list(holes) if holes is not None else [None] * (len(segments) - 1)
    p = params.resolve(config, [max(1, len(segments[0]))])
    fim = fim_tokens(tokenizer)
    opts = InfillOptions(method=resolve_method(method, p.mode, tokenizer),
                         suffix_window=config.block_size if suffix_window is None else suffix_window,
                         max_length=max(1, p.max_new_tokens) if max_length is None else max_length,
                         stop=p.stop if stop is None else tuple(stop), stop_after=stop_after, candidates=candidates,
                         lengths=tuple(lengths) if lengths else None, rank_temperature=rank_temperature,
                         drafter=drafter, fim_tokens=(fim.prefix, fim.suffix, fim.middle) if fim else None)
    return InfillRow(segments, holes, p, config, tokenizer, seed, device, opts)


def _revise_row(text_ids, params, config, tokenizer, seed, device, *, prefix_ids=(), suffix_ids=(), window=None,
                context=None, **revise_options) -> ReviseRow:
    half = max(1, config.block_size // 2)  # window and context default to half a block each
    try:
        opts = ReviseOptions(window=window or half, context=half if context is None else context, **revise_options)
    except TypeError as e:
        raise GenerationError(f"unknown revision option: {e}") from None
    pre, body, post = list(prefix_ids), list(text_ids), list(suffix_ids)
    if not body:
        raise GenerationError("nothing to revise: the text is empty")
    allowed = [False] * len(pre) + [True] * len(body) + [False] * len(post)
    return ReviseRow(pre + body + post, allowed, params, config, tokenizer, seed, device, options=opts)
