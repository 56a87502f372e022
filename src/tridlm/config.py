"""Model configuration, read from and written to `config.json` with the NLD field names."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPE = "nemotron_labs_diffusion"
ARCHITECTURE = "NemotronLabsDiffusionModel"
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")


class ConfigError(ValueError):
    """A config.json that cannot describe a model tridlm can build."""


@dataclass
class RopeParameters:
    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    llama_4_scaling_beta: float | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RopeParameters:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        rp = cls(**kwargs)
        if rp.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope_type {rp.rope_type!r} in config.json rope_parameters; "
                f"tridlm supports {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        return rp

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    rope_parameters: RopeParameters = field(default_factory=RopeParameters)
    tie_word_embeddings: bool = False
    mask_token_id: int = 3
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    block_size: int = 32
    dlm_loss_weight: float | None = 0.3
    ar_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if isinstance(self.rope_parameters, dict):
            self.rope_parameters = RopeParameters.from_dict(self.rope_parameters)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ConfigError(
                f"mask_token_id {self.mask_token_id} is outside the vocabulary (0..{self.vocab_size - 1})"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a config.json dict; unknown fields are ignored (forward compatibility)."""
        d = dict(d)
        if "rope_parameters" not in d:  # transformers 4.x layout: rope_theta + rope_scaling
            rope = dict(d.get("rope_scaling") or {})
            if "type" in rope and "rope_type" not in rope:
                rope["rope_type"] = rope.pop("type")
            rope.setdefault("rope_theta", d.get("rope_theta", 10000.0))
            d["rope_parameters"] = rope
        eos = d.get("eos_token_id")
        if isinstance(eos, list):
            d["eos_token_id"] = eos[0] if eos else None
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["rope_parameters"] = RopeParameters.from_dict(kwargs.get("rope_parameters") or {})
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_parameters"] = self.rope_parameters.to_dict()
        d["model_type"] = MODEL_TYPE
        d["architectures"] = [ARCHITECTURE]
        d["attention_bias"] = False
        d["mlp_bias"] = False
        d["hidden_act"] = "silu"
        d["dlm_paradigm"] = "bidirectional"
        return d

    def num_parameters(self) -> int:
        """Exact parameter count, computed from shapes alone."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        q = self.num_attention_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * per_layer + h + head


def llama4_query_scale(positions, beta: float, original_max: int):
    """Llama-4 query scale `1 + beta*log(1 + floor(pos/original_max))`; 1 for positions below original_max."""
    import torch

    return 1.0 + beta * torch.log1p(torch.floor(positions.to(torch.float32) / original_max))


def yarn_get_mscale(scale: float, mscale: float) -> float:
    if scale <= 1.0 or not mscale:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
