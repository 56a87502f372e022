"""Revision: re-mask the tokens the model is least sure of and denoise them again with full context.

Scoring. A token's score is the model's block-pattern probability of that very token with the token
masked. Masking each token in its own forward would cost one forward per token; instead a window's
tokens are split into `groups` interleaved groups and each group is masked in its own copy of the
window, all copies side by side in one forward (a block-diagonal pattern), so every token is scored
with its neighbours visible. Windows of `window` positions hold the tokens they score followed by
`context` more tokens of right context, and see everything before them causally -- the training
layout of a noisy block over clean earlier text. groups=0 scores every token with itself visible
(one copy, cheaper, but absorbing-state training never scores visible tokens).

Re-denoising. The selected tokens (below `remask_threshold`, and/or the `budget` lowest) are re-masked and
denoised window by window, left to right, each window over the revised text before it. Tokens
outside the allowed region are never selected, so never change; a zero budget changes nothing and
runs no forward. `rounds` repeats score-and-redo (stopping early once nothing is selected).

`RevisingDiffusion` brings the same step inside diffusion decoding: after a block is filled and before
its causal commit, `rounds` times score the block and re-denoise its weakest tokens. Its tokens are
emitted only once the block is final.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .diffusion import BlockState, Diffusion, denoise_pass
from .params import GenerationError, check_knob, knob
from .row import Plan, Row
from .sampling import ban
from .scripted import Script, ScriptRow


def _count(v, most: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0 and (most is None or v <= most)


MAX_ROUNDS, MAX_WINDOW, MAX_GROUPS = 16, 256, 8  # a revision's work grows with each

@dataclass
class ReviseOptions:
    """One revision's settings, each declared once (`knob`): `validate`, the CLI and the server read them."""

    rounds: int = knob(1, "score-and-redo rounds", f"be an integer in [0, {MAX_ROUNDS}]",
                       lambda v: _count(v, MAX_ROUNDS))
    remask_threshold: float | None = knob(
        None, "re-mask tokens whose probability (masked, in context) is below it (neither it nor budget: below "
        "0.1, at most a tenth of the tokens)", "lie in [0, 1]", lambda v: v is None or 0.0 <= float(v) <= 1.0)
    budget: int | float | None = knob(
        None, "tokens re-masked per round at most: a count, or a fraction below 1 of the tokens",
        "be an integer >= 0 or a fraction in [0, 1]",
        lambda v: v is None or _count(v) or (isinstance(v, float) and 0.0 <= v <= 1.0))
    window: int = knob(16, "positions scored and re-denoised together (plus `context` after them)",
                       f"be an integer in [1, {MAX_WINDOW}]", lambda v: _count(v, MAX_WINDOW) and v >= 1)
    context: int = knob(8, "right context visible to a window", f"be an integer in [0, {MAX_WINDOW}]",
                        lambda v: _count(v, MAX_WINDOW))
    groups: int = knob(2, "masked copies per window (0: score tokens visible, one copy)",
                       f"be an integer in [0, {MAX_GROUPS}]", lambda v: _count(v, MAX_GROUPS))
    min_gain: float = knob(1.0, "a new token replaces the old only if this many times likelier (1: always)",
                           "be a number >= 1", lambda v: isinstance(v, int | float) and not isinstance(v, bool)
                           and 1.0 <= v < float("inf"))
    drafter: bool = False  # switch a LoRA drafter on for the noisy copies
    max_forward_tokens: int = 2048  # split the scoring forward beyond this many tokens

    def validate(self) -> None:
        for name in ("rounds", "remask_threshold", "budget", "window", "context", "groups", "min_gain"):
            check_knob(self, name)

    def budget_for(self, n: int) -> int | None:
        b = self.budget
        if b is None:
            return None
        return math.floor(b * n) if isinstance(b, float) else int(b)

    @property
    def identity(self) -> bool:
        """Settings that can change nothing: no forward runs."""
        return self.rounds == 0 or self.budget_for(1 << 30) == 0 or self.remask_threshold == 0.0


DEFAULT_REMASK_THRESHOLD, DEFAULT_BUDGET = 0.1, 0.1


def remask_positions(scores: dict[int, float], opts: ReviseOptions, n_allowed: int) -> list[int]:
    """Positions to re-mask: below the threshold (when set), at most the budget lowest (when set).
    Neither set: below 0.1, at most a tenth of the tokens (at least one)."""
    threshold, b = opts.remask_threshold, opts.budget_for(n_allowed)
    if threshold is None and opts.budget is None:
        threshold, b = DEFAULT_REMASK_THRESHOLD, max(1, round(DEFAULT_BUDGET * n_allowed))
    cand = [(s, p) for p, s in scores.items() if threshold is None or s < threshold]
    cand.sort()
    if b is not None:
        cand = cand[:b]
    return sorted(p for _, p in cand)


@dataclass
class Window:
    start: int  # absolute position of the window's first token
    tokens: torch.Tensor  # [w] the window's tokens (scored part + right context)
    scored: torch.Tensor  # bool [w]: tokens to score


def copies_plan(windows: list[Window], groups: int, mask_id: int, drafter: bool, device,
                clean: torch.Tensor | None = None, clean_start: int = 0) -> tuple[Plan, list[tuple[int, int]]]:
    """One read-only forward scoring every window's `scored` tokens, masked group by group.

    Layout: [clean tokens (causal) | copies]; copy c of window w masks the scored tokens whose index
    within the window is c mod groups, sees its own copy both ways and the clean tokens before its
    window. Returns the plan and, per logit it asks for, (window index, index within the window).
    """
    n_clean = 0 if clean is None else clean.numel()
    parts, pos, spans, owners, at = [], [], [], [], []
    if n_clean:
        parts.append(clean)
        pos.append(torch.arange(clean_start, clean_start + n_clean, device=device))
    offset = n_clean
    for wi, w in enumerate(windows):
        idx = torch.arange(w.tokens.numel(), device=device)
        for c in range(max(1, groups)):
            hide = w.scored & (idx % groups == c) if groups else torch.zeros_like(w.scored)
            look = hide if groups else w.scored
            if not bool(look.any()):
                continue
            copy = torch.where(hide, torch.full_like(w.tokens, mask_id), w.tokens)
            parts.append(copy)
            pos.append(torch.arange(w.start, w.start + copy.numel(), device=device))
            spans.append((offset, copy.numel(), w.start - clean_start))
            for i in torch.nonzero(look)[:, 0].tolist():
                at.append(offset + i)
                owners.append((wi, i))
            offset += copy.numel()
    tokens = torch.cat(parts)
    t = tokens.numel()
    pattern = torch.zeros(t, t, dtype=torch.bool, device=device)
    if n_clean:
        pattern[:n_clean, :n_clean] = torch.ones(n_clean, n_clean, dtype=torch.bool, device=device).tril()
    draft = torch.zeros(t, dtype=torch.bool, device=device)
    for start, n, sees in spans:
        pattern[start:start + n, start:start + n] = True
        pattern[start:start + n, :max(0, min(sees, n_clean))] = True
        draft[start:start + n] = drafter
    plan = Plan(tokens, torch.cat(pos), pattern, False, torch.tensor(at, dtype=torch.long, device=device),
                draft=draft)
    return plan, owners


def token_scores(logits: torch.Tensor, targets: torch.Tensor, mask_id: int) -> torch.Tensor:
    """p(target) under each row of logits (the mask token banned)."""
    return ban(logits, mask_id).softmax(-1).gather(-1, targets[:, None])[:, 0]


@dataclass
class Change:
    position: int  # index into the row's ids
    old: int
    new: int
    round: int  # the last round that changed it (1-based)


class ReviseRow(ScriptRow):
    """Revise `ids` where `allowed`; results: `revised` (ids), `changes`, `selected` (per round)."""

    def __init__(self, ids, allowed, params, config, tokenizer=None, seed=None, device=None,
                 options: ReviseOptions | None = None):
        self.options = options or ReviseOptions()
        self.options.validate()
        self.original = [int(t) for t in ids]
        self.allowed = [bool(a) for a in allowed]
        if len(self.allowed) != len(self.original):
            raise GenerationError(f"allowed has {len(self.allowed)} entries for {len(self.original)} tokens")
        if not self.original:
            raise GenerationError("nothing to revise: the text is empty")
        if config.mask_token_id in self.original:
            raise GenerationError("the text holds the mask token")
        if params.mode != "diffusion":
            params = params.replace(mode="diffusion")  # the re-denoiser's defaults are diffusion's
        super().__init__(self.original, params.replace(max_new_tokens=1, stop=()), config, tokenizer, seed, device)

    def script(self) -> Script:
        o = self.options
        text = list(self.original)
        self.revised, self.selected, self.scores = text, [], []
        last_change: dict[int, int] = {}
        region = [i for i, a in enumerate(self.allowed) if a]
        if o.identity or not region:
            self._done(last_change)
            return
        r0, r1 = region[0], region[-1] + 1
        for rnd in range(1, o.rounds + 1):
            scores = yield from self._score(text, r0, r1)
            self.scores.append(scores)
            chosen = remask_positions(scores, o, len(region))
            self.selected.append(chosen)
            if not chosen:
                break
            before = list(text)
            yield from self._redo(text, chosen, r0, r1)
            for p in chosen:
                if text[p] != before[p]:
                    last_change[p] = rnd
            self.crop_to(min(self.cache_len, r0))
        self._done(last_change)

    def _done(self, last_change: dict[int, int]) -> None:
        self.changes = [Change(p, self.original[p], self.revised[p], last_change[p])
                        for p in sorted(last_change) if self.revised[p] != self.original[p]]
        region = [i for i, a in enumerate(self.allowed) if a] or [0]
        self.output = self.revised[region[0]:region[-1] + 1]  # what streams: the revisable span
        self.metrics.generated_tokens = len(self.output)
        self.finish("stop")

    def _windows(self, r0: int, r1: int) -> list[tuple[int, int, int]]:
        """(start, end of the scored part, end with right context) for windows covering [r0, r1)."""
        o, n = self.options, len(self.original)
        return [(a, min(a + o.window, r1), min(n, a + o.window + o.context)) for a in range(r0, r1, o.window)]

    def _commit(self, text: list[int], upto: int) -> Script:
        start = self.cache_len
        if upto > start:
            ids = torch.tensor(text[start:upto], device=self.device)
            yield Plan(ids, torch.arange(start, upto, device=self.device), "causal", True, ids[:0],
                       prefill=start == 0)

    def _score(self, text: list[int], r0: int, r1: int) -> Script:
        o, dev = self.options, self.device
        yield from self._commit(text, r0)
        wins = self._windows(r0, r1)
        per_copy = max(1, o.groups) * (o.window + o.context)
        scores: dict[int, float] = {}
        i = 0
        while i < len(wins):  # chunks of windows, each one forward over [clean since the cache | copies]
            j = i + 1
            while j < len(wins) and (wins[j][0] - wins[i][0]) + (j + 1 - i) * per_copy <= o.max_forward_tokens:
                j += 1
            chunk = wins[i:j]
            yield from self._commit(text, chunk[0][0])
            c0 = self.cache_len
            windows = []
            for a, e, ce in chunk:
                scored = torch.tensor([self.allowed[p] and p < e for p in range(a, ce)], device=dev)
                windows.append(Window(a, torch.tensor(text[a:ce], device=dev), scored))
            clean = torch.tensor(text[c0:chunk[-1][0]], device=dev) if chunk[-1][0] > c0 else None
            plan, owners = copies_plan(windows, o.groups, self.mask_id, o.drafter, dev, clean, c0)
            logits = yield plan
            targets = torch.tensor([text[windows[w].start + k] for w, k in owners], device=dev)
            for (w, k), s in zip(owners, token_scores(logits, targets, self.mask_id).tolist(), strict=True):
                scores[windows[w].start + k] = s
            i = j
        return scores

    def _keep_unless_gain(self, block: torch.Tensor, masked: torch.Tensor, logits: torch.Tensor,
                          old: list[int]) -> None:
        """Tokens just committed at `masked` that the model finds less than `min_gain` times likelier than the
        old token there, in the same context, go back to the old token."""
        gain = self.options.min_gain
        if gain <= 1.0:
            return
        probs = ban(logits, self.mask_id).softmax(-1)
        for row, (i, o) in enumerate(zip(masked.tolist(), old, strict=True)):
            new = int(block[i])
            if new != self.mask_id and new != o and float(probs[row, new]) < gain * float(probs[row, o]):
                block[i] = o

    def _redo(self, text: list[int], chosen: list[int], r0: int, r1: int) -> Script:
        dev = self.device
        todo = set(chosen)
        for a, e, ce in self._windows(r0, r1):
            mine = [p for p in range(a, e) if p in todo]
            if not mine:
                continue
            if self.cache_len > a:
                self.crop_to(a)  # scoring cached text beyond this window; it may change now
            yield from self._commit(text, a)
            block = torch.tensor([self.mask_id if p in todo else text[p] for p in range(a, ce)], device=dev)
            passes = 0
            while True:
                masked = torch.tensor([p - a for p in mine if int(block[p - a]) == self.mask_id],
                                      dtype=torch.long, device=dev)
                if masked.numel() == 0:
                    break
                logits = yield Plan(block, torch.arange(a, ce, device=dev), "block", False, masked,
                                    draft=self.options.drafter)
                denoise_pass(self, block, masked, logits, passes)
                self._keep_unless_gain(block, masked, logits, [text[a + int(i)] for i in masked])
                passes += 1
            for p in mine:
                text[p] = int(block[p - a])
                todo.discard(p)


# -- revision inside diffusion decoding ---------------------------------------------------------------------
@dataclass
class RevisingBlockState(BlockState):
    rounds_left: int = 0
    scoring: bool = False
    revised: list[int] = field(default_factory=list)  # block positions re-masked so far (for metrics)


def row_revise_options(row: Row) -> ReviseOptions:
    """A row's revision settings (`revising_row` sets them), else none: plain diffusion."""
    o = getattr(row, "revise_options", None)
    if o is None:
        o = row.revise_options = ReviseOptions(rounds=0)
    return o


class RevisingDiffusion(Diffusion):
    """Diffusion decoding with revision rounds per block before its commit (`row_revise_options`); with
    no rounds it is exactly `Diffusion`.

    Only the denoised positions are revised (the block's first token is the committed AR seed)."""

    def start(self, row: Row) -> None:
        row.state = RevisingBlockState()

    def plan_decode(self, row: Row) -> Plan:
        st: RevisingBlockState = row.state
        if st.block is None or not st.scoring:
            return super().plan_decode(row)
        o = row_revise_options(row)
        scored = torch.ones_like(st.block, dtype=torch.bool)
        scored[0] = False
        plan, owners = copies_plan([Window(row.cached, st.block, scored)], o.groups, row.mask_id, o.drafter,
                                   row.device)
        st.owners = owners
        return plan

    def consume_decode(self, row: Row, plan: Plan, logits: torch.Tensor):
        st: RevisingBlockState = row.state
        o = row_revise_options(row)
        p = row.params
        if st.block is None:  # commit pass: its last logit seeds the next block
            from .sampling import sample

            seed = int(sample(logits[-1], p, row.generator, row.mask_id))
            block = torch.full((p.block_length,), row.mask_id, dtype=torch.long, device=row.device)
            block[0] = seed
            st.block, st.emitted, st.passes = block, 0, 0
            st.rounds_left, st.scoring = (0 if o.identity else o.rounds), False
        elif st.scoring:
            st.scoring = False
            st.rounds_left -= 1
            targets = st.block[[k for _, k in st.owners]]
            s = token_scores(logits, targets, row.mask_id).tolist()
            chosen = remask_positions({k: v for (_, k), v in zip(st.owners, s, strict=True)}, o, st.block.numel() - 1)
            if chosen:
                st.block[chosen] = row.mask_id
                st.revised += chosen
            else:
                st.rounds_left = 0
        else:
            masked = plan.logits_at
            denoise_pass(row, st.block, masked, logits, 0 if st.revised else st.passes)
            st.passes += 1
        full = not bool((st.block == row.mask_id).any())
        if not full:
            return None
        if st.rounds_left > 0:
            st.scoring = True
            return None
        row.emit(st.block.tolist())
        row.metrics.denoise_passes.append(st.passes)
        st.revised = []
        if not row.finished:
            row.tail, st.block = st.block.tolist(), None
        return None


REVISING_DIFFUSION = RevisingDiffusion()


def revising_row(prompt_ids, params, config, tokenizer=None, seed=None, device=None,
                 options: ReviseOptions | None = None) -> Row:
    """A diffusion `Row` that revises each block `options.rounds` times before committing it."""
    if params.mode != "diffusion":
        raise GenerationError("revise_rounds applies to diffusion mode")
    o = options or ReviseOptions()
    o.validate()
    row = Row(prompt_ids, params, config, tokenizer, seed, device)
    row.mode, row.revise_options = REVISING_DIFFUSION, o
    row.mode.start(row)
    return row
