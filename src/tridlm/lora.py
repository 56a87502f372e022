"""A LoRA *drafter*: low-rank deltas that act only on draft (diffusion) tokens.

NLD's optional `linear_spec_lora/` adapter is switched on for the diffusion draft pass and off for
the prefill and the causal verify pass (spec §4.3), so the verifier -- and therefore AR mode and the
output of greedy self-speculation -- stays exactly the base model. Here the switch is per *token*
rather than per forward: each forward gets a gate [B, T] saying which tokens are drafts. Per-token
gating is what lets one dual-stream training forward train the drafter on the noisy half while the
clean half stays the untouched base model, and it serves forwards that mix verify and draft tokens
(quadratic self-speculation). peft switches adapters per forward or per sample only, hence this
small module; adapters are stored in peft's file layout (adapter_config.json +
adapter_model.safetensors) so NLD's released adapters load and ours load in peft.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

ADAPTER_DIR = "linear_spec_lora"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class DraftGate:
    """Which tokens of the current forward are drafts: None (none), "all", or a [B, T, 1] float mask; with a
    mask, `rows` may name the span of the flattened tokens that holds every draft (None: anywhere)."""

    def __init__(self):
        self.value: torch.Tensor | str | None = None
        self.rows: slice | None = None
        self._scale: tuple | None = None  # (value, rows, row_scale()'s answer for them)

    def row_scale(self) -> torch.Tensor:
        """The mask as one fp32 value per flattened token of `rows` (of all tokens without rows): worked out
        once per value, not in every product of the forward."""
        known = self._scale
        if known is None or known[0] is not self.value or known[1] != self.rows:
            flat = self.value.reshape(-1).float()
            known = (self.value, self.rows, flat if self.rows is None else flat[self.rows])
            if not torch.compiler.is_compiling():  # a graph's tensors stay in the graph
                self._scale = known
        return known[2]


class LoRALinear(nn.Linear):
    """nn.Linear (same `weight` name, so base checkpoints load unchanged) plus a gated low-rank delta."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, gate: DraftGate):
        super().__init__(base.in_features, base.out_features, bias=False, device="meta")
        self.weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        g = self.gate.value
        if g is None:  # no draft token in this forward: exactly the base layer, at no extra cost
            return y
        delta = F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling
        return y + (delta if isinstance(g, str) else delta * g)


def attach(model, rank: int = 16, alpha: float = 32.0, targets=TARGETS) -> None:
    """Replace the target linears of every layer by gated LoRA linears (B = 0: no change at first)."""
    if getattr(model, "draft_adapter", None) is not None:
        raise ValueError("this model already has a draft adapter")
    gate = DraftGate()
    for layer in model.encoder.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, gate))
    model.draft_adapter = {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
    model._draft_gate = gate


def lora_parameters(model) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


def save(model, folder, dtype: torch.dtype | None = None) -> None:
    """Write the adapter in peft's layout (a folder of its own, e.g. <checkpoint>/linear_spec_lora).

    dtype: store the tensors in this type (bf16 halves a shipped adapter; loading casts back)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(model.draft_adapter)
    cfg.update({"peft_type": "LORA", "bias": "none", "lora_dropout": 0.0, "task_type": None,
                "inference_mode": True, "draft_only": True})
    tensors = {PEFT_PREFIX + n.replace(".lora_A", ".lora_A.weight").replace(".lora_B", ".lora_B.weight"):
               p.detach().to(dtype or p.dtype).contiguous() for n, p in lora_parameters(model).items()}
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2))


def load(model, folder) -> None:
    """Attach and fill a draft adapter from a peft-layout folder; names and shapes are checked."""
    folder = Path(folder)
    for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / f).is_file():
            raise FileNotFoundError(f"draft adapter folder {folder} has no {f}")
    cfg = json.loads((folder / ADAPTER_CONFIG).read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{folder / ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r} is not LORA")
    targets = cfg.get("target_modules") or list(TARGETS)
    if isinstance(targets, str):
        targets = [targets]
    attach(model, int(cfg["r"]), float(cfg["lora_alpha"]), [t.split(".")[-1] for t in targets])
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    params = lora_parameters(model)
    want = {PEFT_PREFIX + n.replace(".lora_A", ".lora_A.weight").replace(".lora_B", ".lora_B.weight"): n
            for n in params}
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise ValueError(f"draft adapter {folder}: missing {missing[:3]} unexpected {extra[:3]} tensors")
    with torch.no_grad():
        for key, name in want.items():
            t = tensors[key]
            if t.shape != params[name].shape:
                raise ValueError(f"draft adapter tensor {key} has shape {list(t.shape)}, expected "
                                 f"{list(params[name].shape)}")
            params[name].copy_(t)
