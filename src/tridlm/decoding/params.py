"""Generation parameters, validated once, before any forward pass."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

MODES = ("ar", "diffusion", "spec", "spec-quadratic")
POLICIES = ("confidence_threshold", "low_confidence", "margin", "entropy", "leftmost")
# which threshold `threshold` stands for in each mode (ar has none), and their defaults
MODE_THRESHOLD = {"diffusion": "commit_threshold", "spec": "draft_threshold", "spec-quadratic": "draft_threshold"}
THRESHOLD_DEFAULTS = {"commit_threshold": 0.9, "draft_threshold": 0.0}


class GenerationError(ValueError):
    """Invalid generation parameters or prompt (raised before the model runs)."""


AUTO = "auto"  # block_length chosen from this machine's measured cost and the drafter's acceptance


def knob(default, help: str, rule: str | None = None, ok=None, label: str | None = None, choices=None):
    """One generation parameter's declaration: its default, help text and range, read by `resolve` (the
    check), the CLI (argparse options) and the server (request fields). `ok(value)` tells a value in
    range; `rule` says the range in words ("be an integer >= 1"); `label` names it in errors."""
    return dataclasses.field(default=default, metadata={"help": help, "rule": rule, "ok": ok, "label": label,
                                                        "choices": choices})


def _int_in(lo: int, hi: int | None = None):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= lo and (hi is None or v <= hi)


def _number_in(lo: float, hi: float, open_lo: bool = False):
    def ok(v):
        if not isinstance(v, int | float) or isinstance(v, bool):
            return False
        return (v > lo if open_lo else v >= lo) and v <= hi
    return ok


MAX_BLOCK_LENGTH = 1024  # a block beyond any context window tridlm serves
MAX_STEPS = 1024
MAX_TEMPERATURE = 100.0  # beyond it every token is as likely as any other: a client error, not a setting
TEMPERATURE_FLOOR = 1e-4  # below it sampling is greedy decoding (and 1/T would overflow); decoded as 0
SEED_BITS = 64


def forward_width(mode: str, block_length: int) -> int:
    """Tokens one decode forward of a row holds: ar 1; diffusion and spec the block; spec-quadratic a
    block per acceptance point, L * (L + 1). What a request's cost and a server's limits count."""
    if mode == "ar":
        return 1
    return block_length * (block_length + 1) if mode == "spec-quadratic" else block_length


def quadratic_block_length(width: int) -> int:
    """The largest spec-quadratic block whose forward holds at most `width` tokens (at least 1)."""
    L = 1
    while forward_width("spec-quadratic", L + 1) <= width:
        L += 1
    return L


def declaration(cls, name: str) -> dict:
    """A `knob` field's declaration: default, help, rule, ok, label, choices."""
    f = cls.__dataclass_fields__[name]
    return {"default": f.default, **f.metadata}


def check_knob(obj, name: str, label: str | None = None) -> None:
    """Raise GenerationError naming the field (or `label`) unless obj.name is in its declared range or choices."""
    d = declaration(type(obj), name)
    value = getattr(obj, name)
    if d["choices"]:
        if value not in d["choices"]:
            raise GenerationError(f"unknown {name} {value!r}; choose one of {', '.join(d['choices'])}")
        return
    try:
        fine = d["ok"](value)
    except (TypeError, ValueError):
        fine = False
    if not fine:
        raise GenerationError(f"{label or d['label'] or name} must {d['rule']}, got {value!r}")


@dataclass
class GenerationParams:
    """Everything one row needs to decode; `resolve` fills model-dependent defaults and checks ranges,
    each field's as declared here (`knob`)."""

    mode: str = knob("ar", f"decoding mode: {', '.join(MODES)}", choices=MODES)
    max_new_tokens: int = knob(128, "tokens to generate at most", "be an integer >= 0", _int_in(0))
    temperature: float = knob(0.0, f"0 = greedy (so is anything below {TEMPERATURE_FLOOR:g})",
                              f"lie in [0, {MAX_TEMPERATURE:g}]", _number_in(0.0, MAX_TEMPERATURE))
    top_k: int = knob(0, "sample among the k likeliest tokens (0 = off)",
                      "be an integer >= 0 (0 = off), at most the vocabulary size", _int_in(0))
    top_p: float = knob(1.0, "nucleus sampling mass (1 = off)", "lie in (0, 1]", _number_in(0.0, 1.0, open_lo=True))
    seed: int | None = knob(None, "seed of the sampler (reproducible output)",
                            f"be an integer in [0, 2**{SEED_BITS} - 1]",
                            lambda v: v is None or _int_in(0, (1 << SEED_BITS) - 1)(v))
    stop: tuple[str, ...] = knob((), "stop when the text contains TEXT; the output ends before it")
    eos_token_id: int | None = knob(None, "the end-of-sequence token (default: the model's)")
    stop_token_ids: tuple[int, ...] = knob((), "more tokens that end a row (e.g. a chat end-of-turn)")
    ignore_eos: bool = knob(False, "do not stop at the end-of-sequence token")
    block_length: int | str | None = knob(
        None, f"diffusion/spec block length, or '{AUTO}' (picked from this machine's measured forward costs "
        "and the drafter's acceptance); default: the checkpoint's block_size (spec-quadratic: the largest "
        "block whose L*(L+1)-token forward is no wider than that)",
        f"be an integer in [1, {MAX_BLOCK_LENGTH}]", _int_in(1, MAX_BLOCK_LENGTH))
    commit_threshold: float | None = knob(
        None, "diffusion: commit every masked position whose score reaches it (the best one always commits; "
        "default 0.9)",
        "lie in [0, 1]", lambda v: 0.0 <= float(v) <= 1.0)
    draft_threshold: float | None = knob(
        None, "spec: 0 drafts the block in one denoise pass (default); > 0 drafts it in diffusion passes, each "
        "committing the positions whose score reaches it", "lie in [0, 1]", lambda v: 0.0 <= float(v) <= 1.0)
    threshold: float | None = knob(
        None, "the mode's own threshold: commit_threshold in diffusion, draft_threshold in spec (ar has none); "
        "defaults 0.9 and 0", "lie in [0, 1]", lambda v: 0.0 <= float(v) <= 1.0)
    steps: int | None = knob(None, "denoise passes per block at most (default: the block length); the count "
                             "committed per pass never falls below what finishing the block within steps needs",
                             f"be an integer in [1, {MAX_STEPS}]", _int_in(1, MAX_STEPS),
                             label="steps (denoise passes per block)")
    selection_policy: str = knob("confidence_threshold", f"diffusion commit policy: {', '.join(POLICIES)}",
                                 choices=POLICIES)
    # set by `resolve`; a Row given resolved params does not resolve them again (`replace` clears it)
    resolved: bool = field(default=False, init=False, repr=False, compare=False)

    @staticmethod
    def declared(name: str) -> dict:
        """A field's declaration: default, help, rule, ok, label, choices."""
        return declaration(GenerationParams, name)

    @staticmethod
    def check(name: str, value, label: str | None = None) -> None:
        """Raise GenerationError (naming `label`, e.g. a CLI flag) unless `value` is in field `name`'s range."""
        check_knob(GenerationParams(**{name: value}), name, label)

    def replace(self, **kw) -> GenerationParams:
        return dataclasses.replace(self, **kw)

    def resolve(self, config, prompt_lengths=(), auto_block_length=None,
                max_forward_width: int | None = None) -> GenerationParams:
        """Check every parameter against `config` (a ModelConfig) and the prompts, and fill the defaults:
        the block length is the checkpoint's `block_size` unless given (spec-quadratic: the widest block
        no wider than that); "auto" calls `auto_block_length()` (it measures, so only after everything
        else has been checked). max_forward_width: refuse blocks whose forwards hold more tokens."""
        p = dataclasses.replace(self)
        p._check("mode")
        if p.block_length is None:
            p.block_length = (quadratic_block_length(config.block_size) if p.mode == "spec-quadratic"
                              else config.block_size)
        p._resolve_thresholds()
        for name in ("max_new_tokens", "temperature", "seed"):
            p._check(name)
        if p.temperature < TEMPERATURE_FLOOR:
            p.temperature = 0.0
        if p.steps is not None:
            p._check("steps")
        p._check("selection_policy")
        p.top_k = 0 if p.top_k is None else p.top_k
        p.top_p = 1.0 if p.top_p is None else p.top_p
        p._check("top_k")
        p._check("top_p")
        if p.top_k > config.vocab_size:
            raise GenerationError(f"top_k must be at most the vocabulary size ({config.vocab_size}), got {p.top_k}")
        if isinstance(p.stop, str):
            p.stop = (p.stop,)
        p.stop = tuple(s for s in (p.stop or ()) if s)
        p.stop_token_ids = tuple(int(t) for t in (p.stop_token_ids or ()))
        for t in p.stop_token_ids + ((p.eos_token_id,) if p.eos_token_id is not None else ()):
            if not 0 <= t < config.vocab_size or t == config.mask_token_id:
                raise GenerationError(f"stop/EOS token id {t} is not a vocabulary token other than the mask")
        if p.eos_token_id is None and not p.ignore_eos:
            p.eos_token_id = config.eos_token_id
        if p.ignore_eos:
            p.eos_token_id = None
        window = config.max_position_embeddings
        for i, n in enumerate(prompt_lengths):
            if n < 1:
                raise GenerationError(f"prompt {i} is empty; give at least one token")
            if n > window:
                raise GenerationError(f"prompt {i} has {n} tokens, longer than the context window "
                                      f"({window} positions)")
        if p.block_length == AUTO and auto_block_length is not None:
            p.block_length = auto_block_length()
        p._check("block_length")
        width = forward_width(p.mode, p.block_length)
        if max_forward_width is not None and width > max_forward_width:
            widest = quadratic_block_length(max_forward_width) if p.mode == "spec-quadratic" else max_forward_width
            raise GenerationError(f"block_length {p.block_length} makes {p.mode} forwards of {width} tokens; "
                                  f"the limit is {max_forward_width} (block_length <= {widest} in {p.mode})")
        if p.steps is None:
            p.steps = p.block_length
        p.resolved = True
        return p

    def _resolve_thresholds(self) -> None:
        """`threshold` is an alias of the mode's own threshold; afterwards it holds that one's value."""
        own = MODE_THRESHOLD.get(self.mode)
        if self.threshold is not None:
            self._check("threshold")
            mine = getattr(self, own) if own else None
            if mine is not None and mine != self.threshold:
                raise GenerationError(f"threshold ({self.threshold!r}) and {own} ({mine!r}) disagree; give one")
            if own:
                setattr(self, own, self.threshold)
        for name, default in THRESHOLD_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
            self._check(name)
        self.threshold = getattr(self, own) if own else None

    def _check(self, name: str) -> None:
        check_knob(self, name)
