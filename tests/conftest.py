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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared, busy 2-core machine a second OpenMP thread
    mostly waits at the barrier: a module that asks for this runs its tests on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_text_model(seed: int = 0) -> TriModeLM:
    """A random model with a real tokenizer (a 300-token BPE trained on the story openings)."""
    from tridlm.bench.prompts import STORY_OPENINGS
    from tridlm.training.bpe import train_bpe

    tok = train_bpe(list(STORY_OPENINGS) * 4, vocab_size=300)
    model = random_model(seed=seed, vocab_size=300, mask_token_id=tok.mask_id, eos_token_id=tok.eos_id,
                         bos_token_id=tok.eos_id)
    model.tokenizer = tok
    return model


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """(model, tokenizer, checkpoint folder): a tiny tri-mode model trained for about a minute."""
    from tridlm.training.quick import train_tiny_model

    folder = tmp_path_factory.mktemp("tiny_trained")
    model, tokenizer = train_tiny_model(folder, seconds=60, seed=0)
    return model, tokenizer, folder
