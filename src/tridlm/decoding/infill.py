"""Fill-in-the-middle: holes between given segments, filled so that they fit both sides (spec §7).

A request is `segments[0] hole[0] segments[1] ... hole[n-1] segments[n]` (ids). A hole has a fixed
length k (exactly k tokens come out) or a maximum length with end-of-span markers (the fill stops
at the first marker, an end-of-text token or the maximum). Holes are filled left to right; the
given text is never altered. Methods:

* ``block`` (any tri-mode model, no special training): the block denoised over the prefix cache is
  ``[last given token, MASK x k, next `suffix_window` tokens after the hole]``, bidirectional, so
  the hole sees its right context the way a diffusion block sees any given token. Later holes that
  fit whole in the window are filled jointly. A variable-length hole is filled at several lengths
  side by side (one forward, a block-diagonal pattern) and the candidate the model finds likeliest
  with the suffix, log p(fill, suffix window | prefix) from one causal pass, is kept.
* ``fim`` (models trained with `tridlm.training.fim`): the prompt ``<fim_prefix> prefix
  <fim_suffix> suffix <fim_middle>`` decoded by an inner row of any mode (AR, spec, diffusion).
* ``rank`` (AR knowledge only): a few left-to-right candidates (greedy + samples) decoded side by
  side, ranked by the same joint likelihood of fill and suffix.
* ``left``: the suffix ignored -- plain left-to-right generation (the evaluation's baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .diffusion import denoise_pass
from .params import GenerationError
from .row import Plan
from .sampling import greedy, sample
from .scripted import Script, ScriptRow, run_row

METHODS = ("block", "fim", "rank", "left")


@dataclass
class InfillOptions:
    """How holes are filled (`GenerationParams` carries the sampler: temperature, threshold, steps...)."""

    method: str = "block"
    suffix_window: int = 16  # given tokens after a hole that its block holds (block method)
    max_length: int = 32  # a variable-length hole: at most this many tokens
    stop: tuple[str, ...] = ()  # a variable-length hole ends before the first of these strings...
    stop_after: int = 0  # ... found from this character of its text on (1: a hole that starts with a newline)
    candidates: int = 4  # rank: left-to-right candidates; block: lengths tried for a variable hole
    lengths: tuple[int, ...] | None = None  # block: the lengths to try (default: spread up to max_length)
    rank_temperature: float = 0.8  # rank: candidates after the first (greedy) one are sampled so
    drafter: bool = False  # block forwards switch a LoRA drafter on (the model must have one)
    fim_tokens: tuple[int, int, int] | None = None  # (prefix, suffix, middle) ids, for method "fim"


def block_diagonal(sizes: list[int], causal: bool, device=None) -> torch.Tensor:
    """Bool [t, t]: tokens see only their own group (causally or both ways)."""
    t = sum(sizes)
    out = torch.zeros(t, t, dtype=torch.bool, device=device)
    start = 0
    for n in sizes:
        blk = torch.ones(n, n, dtype=torch.bool, device=device)
        out[start:start + n, start:start + n] = blk.tril() if causal else blk
        start += n
    return out


def spread_lengths(max_length: int, n: int) -> list[int]:
    """n lengths from 1 to max_length, closer together at the short end (geometric)."""
    if n <= 1:
        return [max_length]
    out = {max(1, round(max_length ** (i / (n - 1)))) for i in range(n)}
    return sorted(out)


class InfillRow(ScriptRow):
    """Fill `holes` between `segments` (ids); results in `fills` (ids per hole) and `ids` (the whole text).

    holes: one entry per hole, an int length (fixed) or None (variable: options.max_length, stop).
    `output` (what streams) is the fills, concatenated, each appended once its hole is final.
    """

    def __init__(self, segments: list[list[int]], holes: list[int | None], params, config, tokenizer=None,
                 seed=None, device=None, options: InfillOptions | None = None):
        o = options or InfillOptions()
        self.options = o
        self.model_config = config
        self.segments = [[int(t) for t in s] for s in segments]
        self.holes = list(holes)
        self._validate(config, params)
        if o.method == "block" and params.mode != "diffusion":
            params = params.replace(mode="diffusion")  # the denoiser's defaults (threshold) are diffusion's
        budget = sum(o.max_length if k is None else k for k in self.holes)
        given = [t for s in self.segments for t in s]
        lead = given or [config.bos_token_id if config.bos_token_id is not None else config.eos_token_id]
        super().__init__(lead, params.replace(max_new_tokens=max(1, budget), stop=()), config, tokenizer, seed,
                         device)

    def _validate(self, config, params) -> None:
        o = self.options
        if len(self.segments) != len(self.holes) + 1:
            raise GenerationError(f"{len(self.holes)} holes need {len(self.holes) + 1} segments around them, "
                                  f"got {len(self.segments)}")
        if o.method not in METHODS:
            raise GenerationError(f"unknown infill method {o.method!r}; choose one of {', '.join(METHODS)}")
        for k in self.holes:
            if k is not None and (not isinstance(k, int) or k < 0):
                raise GenerationError(f"a hole length must be an integer >= 0 (or None), got {k!r}")
        if not isinstance(o.max_length, int) or o.max_length < 1:
            raise GenerationError(f"max_length must be an integer >= 1, got {o.max_length!r}")
        if o.suffix_window < 0 or o.candidates < 1:
            raise GenerationError("suffix_window must be >= 0 and candidates >= 1")
        if o.method == "fim" and o.fim_tokens is None:
            raise GenerationError("method 'fim' needs a model trained for FIM: its tokenizer has no "
                                  "<fim_prefix>/<fim_suffix>/<fim_middle> tokens")
        for s in self.segments:
            bad = [t for t in s if not 0 <= t < config.vocab_size or t == config.mask_token_id]
            if bad:
                raise GenerationError(f"given text holds token id {bad[0]}: the mask token or outside the vocabulary")
        total = sum(map(len, self.segments)) + sum(o.max_length if k is None else k for k in self.holes) + 4
        if total > config.max_position_embeddings:
            raise GenerationError(f"the text with its holes needs {total} positions, more than the context window "
                                  f"({config.max_position_embeddings})")

    # -- results ------------------------------------------------------------------------------------
    @property
    def ids(self) -> list[int]:
        """The whole text: segments with every hole's fill."""
        out = list(self.segments[0])
        for fill, seg in zip(self.fills, self.segments[1:], strict=True):
            out += fill + seg
        return out

    def _finish_hole(self, h: int, fill: list[int], reason: str) -> None:
        self.fills[h] = list(fill)
        self.hole_reasons[h] = reason
        self.output.extend(fill)
        self.metrics.generated_tokens = len(self.output)

    # -- the script ----------------------------------------------------------------------------------
    def script(self) -> Script:
        self.fills: list[list[int] | None] = [None] * len(self.holes)
        self.hole_reasons: list[str | None] = [None] * len(self.holes)
        self.candidate_log: list[list[dict]] = [[] for _ in self.holes]
        for h, k in enumerate(self.holes):
            if k == 0:
                self._finish_hole(h, [], "length")
        m = self.options.method
        if m == "block":
            yield from self._block_script()
        else:
            yield from self._sequential_script(m)
        reasons = [r for r in self.hole_reasons if r]
        self.finish(reasons[-1] if reasons else "length")

    # Text as a flat list: given ids, MASK for fixed-hole slots still to fill, None for a variable hole.
    def _flatten(self) -> tuple[list[int | None], list[int]]:
        seq, owner = list(self.segments[0]), [-1] * len(self.segments[0])
        for h, (k, seg) in enumerate(zip(self.holes, self.segments[1:], strict=True)):
            slots = [None] if k is None else [self.mask_id] * k
            seq += slots + seg
            owner += [h] * len(slots) + [-1] * len(seg)
        return seq, owner

    def _commit(self, seq: list[int], upto: int) -> Script:
        """Write seq[cache_len:upto] to the cache (a causal pass whose logits are not needed)."""
        start = self.cache_len
        if upto > start:
            ids = torch.tensor(seq[start:upto], device=self.device)
            pos = torch.arange(start, upto, device=self.device)
            yield Plan(ids, pos, "causal", True, ids[:0], prefill=start == 0)

    def _seed_start(self, q: int) -> int:
        """A block starts at the last given token before the hole (not yet cached), as a diffusion block
        starts at its AR seed; at the very start there is none."""
        return q - 1 if q > 0 else q

    def _window_end(self, seq, owner, after: int, given_only: bool) -> int:
        """End of the right context after position `after`: up to suffix_window positions, never into a
        variable hole, and (given_only) never into a fixed hole, else only over fixed holes that fit whole."""
        end = min(len(seq), after + self.options.suffix_window)
        j = after
        while j < end:
            if seq[j] is None or (seq[j] == self.mask_id and owner[j] >= 0):
                if seq[j] is None or given_only:
                    return j
                r = j
                while r < len(seq) and owner[r] == owner[j] and seq[r] == self.mask_id:
                    r += 1
                if r > end:
                    return j
                j = r
            else:
                j += 1
        return end

    # -- block method -------------------------------------------------------------------------------
    def _block_script(self) -> Script:
        seq, owner = self._flatten()
        while True:
            q = next((i for i, t in enumerate(seq) if t is None or (t == self.mask_id and owner[i] >= 0)), None)
            if q is None:
                return
            h = owner[q]
            start = self._seed_start(q)
            yield from self._commit(seq, start)
            if seq[q] is None:
                fill, reason = yield from self._block_variable(seq, owner, q, start)
                seq[q:q + 1] = fill
                owner[q:q + 1] = [-2] * len(fill)
                self._finish_hole(h, fill, reason)
                continue
            r = q
            while r < len(seq) and owner[r] == h and seq[r] == self.mask_id:
                r += 1
            end = self._window_end(seq, owner, r, given_only=False)
            block = torch.tensor(seq[start:end], device=self.device)
            yield from self._denoise([block], start, ban_eos=True)
            seq[start:end] = block.tolist()
            for g in sorted({owner[i] for i in range(q, end) if owner[i] >= 0}):
                fill = [seq[i] for i in range(len(seq)) if owner[i] == g]
                for i in range(len(seq)):
                    if owner[i] == g:
                        owner[i] = -2  # filled
                self._finish_hole(g, fill, "length")

    def _denoise(self, blocks: list[torch.Tensor], start: int, ban_eos: bool) -> Script:
        """Denoise the masks of several same-start blocks side by side (one forward per pass) in place."""
        sizes = [b.numel() for b in blocks]
        pattern = "block" if len(blocks) == 1 else block_diagonal(sizes, causal=False, device=self.device)
        pos = torch.cat([torch.arange(start, start + n, device=self.device) for n in sizes])
        passes = [0] * len(blocks)
        while True:
            tokens = torch.cat(blocks)
            masked = torch.nonzero(tokens == self.mask_id)[:, 0]
            if masked.numel() == 0:
                return
            logits = yield Plan(tokens, pos, pattern, False, masked, draft=self.options.drafter)
            if ban_eos and self.eos_id is not None:
                logits = logits.clone()
                logits[..., self.eos_id] = -math.inf
            offset = 0
            for b, blk in enumerate(blocks):
                sel = (masked >= offset) & (masked < offset + sizes[b])
                if bool(sel.any()):
                    denoise_pass(self, blk, masked[sel] - offset, logits[sel], passes[b])
                    passes[b] += 1
                offset += sizes[b]

    def _block_variable(self, seq, owner, q: int, start: int) -> Script:
        o = self.options
        lengths = sorted({min(o.max_length, max(1, int(n))) for n in (o.lengths or
                                                                      spread_lengths(o.max_length, o.candidates))})
        end = self._window_end(seq, owner, q + 1, given_only=True)
        lead, window = seq[start:q], seq[q + 1:end]
        blocks = [torch.tensor(lead + [self.mask_id] * n + window, device=self.device) for n in lengths]
        yield from self._denoise(blocks, start, ban_eos=False)
        fills = [self._cut(b[len(lead):len(lead) + n].tolist(), n) for b, n in zip(blocks, lengths, strict=True)]
        return (yield from self._rank(lead, window, fills, start, q))

    # -- rank, fim and left methods -------------------------------------------------------------------
    def _sequential_script(self, method: str) -> Script:
        seq, owner = self._flatten()
        for h, k in enumerate(self.holes):
            if k == 0:
                continue
            q = next(i for i, t in enumerate(seq) if owner[i] == h)
            end = next((i for i in range(q, len(seq)) if owner[i] >= 0 and owner[i] != h), len(seq))
            hole_end = q + (1 if k is None else k)
            suffix = seq[hole_end:end]
            if method == "rank":
                start = self._seed_start(q)
                yield from self._commit(seq, start)
                fill, reason = yield from self._rank_candidates(seq[start:q], suffix, start, q, k)
            else:
                fill, reason = yield from self._inner(seq[:q], suffix, k, fim=method == "fim")
            seq[q:hole_end] = fill
            owner[q:hole_end] = [-2] * len(fill)
            self._finish_hole(h, fill, reason)

    def _rank_candidates(self, lead: list[int], suffix: list[int], start: int, q: int, k: int | None) -> Script:
        o = self.options
        if not lead:
            raise GenerationError("method 'rank' needs at least one given token before the hole")
        limit = o.max_length if k is None else k
        window = suffix[:o.suffix_window]
        cands: list[list[int]] = [[] for _ in range(o.candidates)]
        live = [limit > 0] * o.candidates
        reasons = ["length"] * o.candidates
        hot = self.params.replace(temperature=o.rank_temperature)
        while any(live):
            groups = [lead + c for c, ok in zip(cands, live, strict=True) if ok]
            sizes = [len(g) for g in groups]
            tokens = torch.tensor([t for g in groups for t in g], device=self.device)
            pos = torch.cat([torch.arange(start, start + n, device=self.device) for n in sizes])
            last = torch.tensor(sizes, device=self.device).cumsum(0) - 1
            logits = yield Plan(tokens, pos, block_diagonal(sizes, causal=True, device=self.device), False, last)
            if k is not None and self.eos_id is not None:
                logits = logits.clone()
                logits[..., self.eos_id] = -math.inf
            for row, c in enumerate([c for c, ok in zip(range(o.candidates), live, strict=True) if ok]):
                tok = int(greedy(logits[row], self.mask_id) if c == 0 else sample(logits[row], hot, self.generator,
                                                                                   self.mask_id))
                if k is None and tok == self.eos_id:
                    live[c], reasons[c] = False, "eos"
                    continue
                cands[c].append(tok)
                if k is None and self._stopped(cands[c]):
                    live[c], reasons[c] = False, "stop"
                elif len(cands[c]) >= limit:
                    live[c] = False
        fills = [(self._cut(c, limit) if k is None else (c, "length")) for c in cands]
        fills = [(f, r if r != "length" else reasons[i]) for i, (f, r) in enumerate(fills)]
        return (yield from self._rank(lead, window, fills, start, q))

    def _inner(self, before: list[int], suffix: list[int], k: int | None, fim: bool) -> Script:
        """Run a whole row of the request's mode: on the FIM prompt, or (left) on the prefix alone."""
        from .row import Row

        o = self.options
        if fim:
            pre, suf, mid = o.fim_tokens
            prompt = [pre] + before + [suf] + suffix + [mid]
        else:
            prompt = before or [self.prompt[0]]
        limit = o.max_length if k is None else k
        # the stop strings are checked here (they may count only from `stop_after` on), not by the inner row
        p = self.params.replace(max_new_tokens=limit, ignore_eos=k is not None, stop=(),
                                eos_token_id=None if k is not None else self.eos_id)
        inner = Row(prompt, p, self.model_config, self.tokenizer, device=self.device)
        inner.generator = self.generator
        if inner.finished:
            return [], "length"
        yield from run_row(self, inner, until=self._stopped if k is None else None)
        self.crop_to(0)  # the next hole's prompt is another text
        if k is not None:
            return list(inner.output), "length"
        fill, reason = self._cut(list(inner.output), limit)
        return fill, reason if reason != "length" else (inner.finish_reason or "length")

    # -- shared: cutting at the end-of-span markers, and ranking by log p(fill, suffix | prefix) --------
    def _stopped(self, ids: list[int]) -> bool:
        if any(t in self.params.stop_token_ids for t in ids):
            return True
        if not self.options.stop or self.tokenizer is None:
            return False
        text = self.tokenizer.decode(ids)[self.options.stop_after:]
        return any(s in text for s in self.options.stop)

    def _cut(self, ids: list[int], limit: int) -> tuple[list[int], str]:
        """A variable hole's fill: up to EOS / a stop token / the first stop string (excluded)."""
        for i, t in enumerate(ids):
            if t == self.eos_id:
                return ids[:i], "eos"
            if t in self.params.stop_token_ids:
                return ids[:i], "stop"
        if self.options.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(ids)
            hits = [i for i in (text.find(s, self.options.stop_after) for s in self.options.stop) if i >= 0]
            if hits:
                return self.tokenizer.encode(text[:min(hits)]), "stop"
        return ids[:limit], "length"

    def _rank(self, lead: list[int], window: list[int], fills: list[tuple[list[int], str]], start: int,
              q: int) -> Script:
        """The fill whose (fill + window) the model finds likeliest after the prefix; ties keep the first."""
        unique: list[tuple[list[int], str]] = []
        for f in fills:
            if f[0] not in [u[0] for u in unique]:
                unique.append(f)
        if len(unique) == 1 or not lead:
            return unique[0]
        groups = [lead + f + window for f, _ in unique]
        sizes = [len(g) for g in groups]
        tokens = torch.tensor([t for g in groups for t in g], device=self.device)
        pos = torch.cat([torch.arange(start, start + n, device=self.device) for n in sizes])
        firsts = [sum(sizes[:g]) for g in range(len(sizes))]
        # causal logits at every token but each group's last (which would predict past the window)
        at = torch.tensor([f + i for f, n in zip(firsts, sizes, strict=True) for i in range(n - 1)],
                          device=self.device)
        logits = yield Plan(tokens, pos, block_diagonal(sizes, causal=True, device=self.device), False, at)
        logp = torch.log_softmax(logits.float(), -1)
        scores, offset = [], 0
        for g, n in zip(groups, sizes, strict=True):
            targets = torch.tensor(g[len(lead):], device=self.device)  # tokens after the last lead token
            rows = logp[offset + len(lead) - 1:offset + n - 1]
            scores.append(float(rows.gather(-1, targets[:, None]).sum()))
            offset += n - 1
        best = max(range(len(unique)), key=lambda i: scores[i])
        h = next(i for i, f in enumerate(self.fills) if f is None)
        self.candidate_log[h] = [{"ids": f, "score": s} for (f, _), s in zip(unique, scores, strict=True)]
        return unique[best]
