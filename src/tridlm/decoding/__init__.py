"""Decoding: every mode as a step machine over rows, and one batch runner that steps them together.

The contract (what an engine serving many requests relies on):

* A request is a `Row(prompt_ids, GenerationParams(mode=...), model.config, tokenizer, seed)`. It
  validates its parameters on construction (`GenerationError`, before any forward) and owns all
  per-request state: the seeded generator, the final tokens (`row.output`), the committed tokens not
  yet cached (`row.tail`), its cache entry count (`row.cached`), metrics and mode state.
* A mode (`MODE_CLASSES[name]`, stateless) has `plan(row) -> Plan` -- the row's new tokens,
  absolute positions, attention pattern among them, whether the forward keeps their keys/values, and
  which logits it needs -- and `consume(row, plan, logits)`, which samples, emits final tokens via
  `row.emit`, and returns which written cache entries to keep (None all, n the first n, or indices).
* `DecodeBatch(model)` steps any mix of rows and modes: `add(row)` joins between steps, `step()`
  runs one padded forward for every live row (each row sees only its own prefix and tokens, so a
  row computes what it would alone), `remove(row)` cancels; finished rows leave after their step.
  After each step, `row.take_text()` / `row.take_ids()` give what became final (streaming), and
  `row.finished`, `row.finish_reason` ("eos" | "length" | "stop"), `row.metrics` are current.
Sampling draws only from the row's own generator, so a row's tokens depend on its prompt, seed and
parameters, not on what else is in the batch.
"""

from .ar import AR
from .batch import DecodeBatch
from .diffusion import Diffusion
from .metrics import CallMetrics, RowMetrics
from .params import MODES, POLICIES, GenerationError, GenerationParams
from .row import MODE_CLASSES, Mode, Plan, Row
from .spec import Spec
from .spec_quadratic import SpecQuadratic

MODE_CLASSES.update({m.name: m for m in (AR(), Diffusion(), Spec(), SpecQuadratic())})

__all__ = ["AR", "CallMetrics", "DecodeBatch", "Diffusion", "GenerationError", "GenerationParams", "MODES",
           "MODE_CLASSES", "Mode", "POLICIES", "Plan", "Row", "RowMetrics", "Spec", "SpecQuadratic"]
