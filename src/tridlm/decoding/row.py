"""One request being decoded (`Row`), the forward a mode asks for (`Plan`), and the mode base class.

A row owns everything about its request: prompt, parameters, seeded generator, the tokens already
final (`output`), the committed tokens not yet in the KV cache (`tail`), how many cache entries it
holds (`cached`), its metrics, and a mode-specific `state`. A `Mode` is stateless: `plan(row)` says
what one forward must compute for the row, `consume(row, plan, logits)` reads the logits back,
emits final tokens through `row.emit`, and says which of the entries the forward wrote to keep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .metrics import RowMetrics
from .params import GenerationParams
from .sampling import make_generator


@dataclass
class Plan:
    """One row's part of a forward.

    tokens/positions [t]: ids and absolute positions of the new tokens (the row's cached prefix,
    `row.cached` entries, is always fully visible to them).
    pattern: "causal" | "block" | bool [t, t] among the new tokens.
    write: keep the new keys/values in the cache (then `consume` may keep fewer); False = read only.
    logits_at [k]: indices into the t tokens whose logits `consume` receives, in that order.
    prefill: counted apart in the metrics.
    draft: which tokens are drafts (a LoRA drafter, `tridlm.lora`, acts on them only): bool or [t].
    lazy_logits: `consume` gets a `LazyLogits` (the head runs only on the positions it indexes).
    """

    tokens: torch.Tensor
    positions: torch.Tensor
    pattern: str | torch.Tensor
    write: bool
    logits_at: torch.Tensor
    prefill: bool = False
    draft: bool | torch.Tensor = False
    lazy_logits: bool = False

    @property
    def size(self) -> int:
        return self.tokens.numel()


# the modes by name: filled by tridlm.decoding, which imports them (they import this module)
MODE_CLASSES: dict[str, Mode] = {}


def span(start: int, n: int, device) -> torch.Tensor:
    return torch.arange(start, start + n, device=device)


class Row:
    def __init__(self, prompt_ids, params: GenerationParams, config, tokenizer=None, seed: int | None = None,
                 device=None):
        self.prompt = [int(t) for t in prompt_ids]
        # resolved once per request by its builder (`tridlm.rows.make_row`); a Row built by hand resolves its own
        self.params = params if params.resolved else params.resolve(config, [len(self.prompt)])
        self.mode: Mode = MODE_CLASSES[self.params.mode]
        self.mask_id = config.mask_token_id
        self.eos_id = self.params.eos_token_id
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.generator = make_generator(self.params.seed if seed is None else seed, self.device)
        # never generate past the context window
        self.limit = min(self.params.max_new_tokens, config.max_position_embeddings - len(self.prompt))
        self.cached = 0
        self.prefilled = len(self.prompt) == 1  # a one-token prompt has nothing to prefill
        self.prefill_chunk: int | None = None  # prefill at most this many prompt tokens per forward (None: all)
        self.tail: list[int] = self.prompt[-1:] if self.prefilled else []
        self.output: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self.stop_text: str | None = None
        self.metrics = RowMetrics(prompt_tokens=len(self.prompt))
        self.t_start = time.perf_counter()
        self._ids_taken = 0
        self._text_taken = 0
        self.state = None
        self.mode.start(self)
        if self.limit <= 0:
            self.finish("length")

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def remaining(self) -> int:
        return 0 if self.finished else self.limit - len(self.output)

    def finish(self, reason: str) -> None:
        if not self.finished:
            self.finished, self.finish_reason = True, reason
            self.metrics.wall_time_s = time.perf_counter() - self.t_start

    def emit(self, tokens) -> None:
        """Make `tokens` final, in order, up to EOS (kept), the token limit, or a stop string."""
        before = len(self.output)
        for t in tokens:
            if self.finished:
                break
            t = int(t)
            self.output.append(t)
            if self.eos_id is not None and t == self.eos_id:
                self.finish("eos")
            elif t in self.params.stop_token_ids:
                self.finish("stop")
            elif len(self.output) >= self.limit:
                self.finish("length")
        if self.params.stop and self.tokenizer is not None and len(self.output) > before:
            self._check_stop(before)
        self.metrics.generated_tokens = len(self.output)

    def _check_stop(self, before: int) -> None:
        text = self.decode(self.output)
        hits = [(text.find(s), s) for s in self.params.stop if s in text]
        if not hits:
            return
        cut, s = min(hits)
        # the shortest output whose text holds the stop string (the earlier output did not)
        for k in range(max(before, 1), len(self.output) + 1):
            if s in self.decode(self.output[:k]):
                del self.output[k:]
                break
        self.stop_text = text[:cut]
        if self.finished:  # the same token also hit EOS or the limit: the stop string wins
            self.finish_reason = "stop"
        self.finish("stop")

    # -- text --------------------------------------------------------------------------------
    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    @property
    def text(self) -> str:
        return self.stop_text if self.stop_text is not None else self.decode(self.output)

    def take_ids(self) -> list[int]:
        """The final ids not yet taken (for streaming)."""
        new = self.output[self._ids_taken:]
        self._ids_taken = len(self.output)
        return new

    def take_text(self) -> str:
        """The final text not yet taken. While the row runs, a trailing partial character and any
        suffix that could begin a stop string are held back, so a chunk is never taken back."""
        text = self.text
        end = len(text)
        if not self.finished:
            while end > self._text_taken and text[end - 1] == "\ufffd":
                end -= 1
            hold = 0
            for s in self.params.stop:
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        hold = max(hold, k)
                        break
            end -= hold
        if end <= self._text_taken:
            return ""
        chunk = text[self._text_taken:end]
        self._text_taken = end
        return chunk


class Mode:
    """A decoding mode as a step machine over rows; subclasses implement the decode part.

    Every mode starts with the same prefill: one causal forward over the prompt minus its last
    token, writing the cache (the last prompt token stays in `row.tail`, to be fed by the first
    decode forward, which is what yields the first generated token) -- or, with `row.prefill_chunk`,
    several, each over the next chunk with the chunks before it cached (a server bounds every
    forward's width this way).
    """

    name = ""

    def start(self, row: Row) -> None:
        row.state = None

    def scratch(self, params: GenerationParams) -> int:
        """Cache entries a forward may write beyond the row's final length (sizes the cache)."""
        return params.block_length + 1

    def plan(self, row: Row) -> Plan:
        if not row.prefilled:
            start, end = row.cached, len(row.prompt) - 1
            if row.prefill_chunk:
                end = min(end, start + row.prefill_chunk)
            ids = torch.tensor(row.prompt[start:end], device=row.device)
            return Plan(ids, span(start, end - start, row.device), "causal", True, ids[:0], prefill=True)
        return self.plan_decode(row)

    def consume(self, row: Row, plan: Plan, logits: torch.Tensor):
        """Returns which written entries to keep: None = all, int n = the first n, or index tensor."""
        if plan.prefill:
            if int(plan.positions[-1]) + 2 == len(row.prompt):  # the last chunk: all but the last token cached
                row.prefilled, row.tail = True, row.prompt[-1:]
            return None
        return self.consume_decode(row, plan, logits)

    def plan_decode(self, row: Row) -> Plan:
        raise NotImplementedError

    def consume_decode(self, row: Row, plan: Plan, logits: torch.Tensor):
        raise NotImplementedError
