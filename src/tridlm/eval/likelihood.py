"""How well each context layout predicts the true middle: negative log-likelihood per token.

Exact match moves only when a whole line comes out right, so small models barely register; the
likelihood the model gives the true middle under each layout shows what the suffix is worth to it:

* ``left``: causal, the prefix only (chain rule, teacher-forced);
* ``fim``: causal, ``<fim_prefix> prefix <fim_suffix> suffix <fim_middle>`` then the middle;
* ``block-wN``: the block infiller's layout, the prefix causal and one block ``[last prefix token,
  MASK x k, first N suffix tokens]`` seeing it; the middle's masked cross-entropy in one pass
  (``-nodraft``: a LoRA drafter off). block-w0 is the same without the suffix.

Causal layouts score a chain of conditionals and the block one independent marginals, so compare
left with fim and block-w0 with block-wN: each pair differs only in whether the suffix is seen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..tokenizer import fim_tokens
from .tasks import InfillTask


def _causal_nll(model, ids: list[int], start: int) -> tuple[float, int]:
    """Summed NLL of ids[start:] given everything before them, under the causal pattern."""
    x = torch.tensor(ids, device=model.device)[None]
    logits = model(x, torch.arange(len(ids), device=model.device)[None], pattern="causal", write_cache=False)[0]
    targets = x[0, start:]
    return float(F.cross_entropy(logits[start - 1:-1].float(), targets, reduction="sum")), targets.numel()


def _block_nll(model, prefix: list[int], middle: list[int], suffix: list[int], window: int,
               drafter: bool) -> tuple[float, int]:
    mask = model.config.mask_token_id
    ctx, seed = prefix[:-1], prefix[-1:]
    block = seed + [mask] * len(middle) + suffix[:window]
    n, t = len(ctx), len(ctx) + len(block)
    pattern = torch.ones(t, t, dtype=torch.bool, device=model.device).tril()
    pattern[n:, n:] = True
    draft = torch.zeros(1, t, dtype=torch.bool, device=model.device)
    draft[0, n:] = drafter
    x = torch.tensor(ctx + block, device=model.device)[None]
    at = torch.arange(n + len(seed), n + len(seed) + len(middle), device=model.device)[None]
    logits = model(x, torch.arange(t, device=model.device)[None], pattern=pattern, write_cache=False,
                   logits_at=at, draft=draft)[0].float()
    logits[:, mask] = -torch.inf
    return float(F.cross_entropy(logits, torch.tensor(middle, device=model.device), reduction="sum")), len(middle)


@torch.inference_mode()
def middle_nll(model, task: InfillTask, layout: str) -> tuple[float, int]:
    """(summed NLL, tokens) of the first hole's true middle under `layout`."""
    tok = model.tokenizer
    prefix, middle, suffix = tok.encode(task.segments[0]), tok.encode(task.answers[0]), tok.encode(task.segments[1])
    if not prefix or not middle:
        return 0.0, 0
    base, *mods = layout.split("-")
    if base == "left":
        return _causal_nll(model, prefix + middle, len(prefix))
    if base == "fim":
        ft = fim_tokens(tok)
        if ft is None:
            raise ValueError("layout 'fim' needs a model trained for FIM")
        head = [ft.prefix] + prefix + [ft.suffix] + suffix + [ft.middle]
        return _causal_nll(model, head + middle, len(head))
    if base == "block":
        window = next((int(m[1:]) for m in mods if m.startswith("w") and m[1:].isdigit()), model.config.block_size)
        drafter = getattr(model, "draft_adapter", None) is not None and "nodraft" not in mods
        return _block_nll(model, prefix, middle, suffix, window, drafter)
    raise ValueError(f"unknown layout {layout!r}")


def nll_table(model, tasks: list[InfillTask], layouts: list[str]) -> list[dict]:
    rows = []
    for layout in layouts:
        total = count = 0
        for task in tasks:
            s, n = middle_nll(model, task, layout)
            total, count = total + s, count + n
        rows.append({"layout": layout, "tasks": len(tasks), "tokens": count, "nll_per_token": total / max(1, count)})
    return rows
