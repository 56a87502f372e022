"""Shared fixtures: small random-weight models and one tiny model trained inside the test session."""

from __future__ import annotations

import pytest
import torch

from tridlm import ModelConfig, TriModeLM


def small_config(**overrides) -> ModelConfig:
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, mask_token_id=3, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    kw.update(overrides)
    return ModelConfig(**kw)


def random_model(seed: int = 0, **overrides) -> TriModeLM:
    torch.manual_seed(seed)
    return TriModeLM(small_config(**overrides)).eval()


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """(model, tokenizer, checkpoint folder): a tiny tri-mode model trained for about a minute."""
    from tridlm.training.quick import train_tiny_model

    folder = tmp_path_factory.mktemp("tiny_trained")
    model, tokenizer = train_tiny_model(folder, seconds=60, seed=0)
    return model, tokenizer, folder
