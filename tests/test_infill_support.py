"""Shared by the infilling and revision tests (no tests here): random models with a real tokenizer."""

from __future__ import annotations

import torch

from tridlm import ModelConfig, TriModeLM
from tridlm.tokenizer import add_fim_tokens
from tridlm.training.bpe import train_bpe

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "def mul(a, b):\n    result = a * b\n    return result\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "The cat sat on the mat. The dog sat on the log.\n",
] * 20

_TOKENIZERS: dict[bool, object] = {}


def tokenizer(fim: bool = False):
    if fim not in _TOKENIZERS:
        tok = train_bpe(CORPUS, 300, min_frequency=1)
        if fim:
            add_fim_tokens(tok)
        _TOKENIZERS[fim] = tok
    return _TOKENIZERS[fim]


def text_model(seed: int = 0, fim: bool = False, **overrides) -> TriModeLM:
    """A random 2-layer model whose vocabulary is a small byte-level BPE (with the FIM tokens if asked)."""
    tok = tokenizer(fim)
    kw = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, mask_token_id=tok.mask_id, bos_token_id=tok.bos_id,
              eos_token_id=tok.eos_id, max_position_embeddings=512, block_size=8)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = TriModeLM(ModelConfig(**kw)).eval()
    model.tokenizer = tok
    return model

