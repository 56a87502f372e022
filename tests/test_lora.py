"""The LoRA drafter acts on draft tokens only: causal passes stay exactly the base model."""

import json

import torch
from conftest import random_model

import tridlm
from tridlm import lora


def with_adapter(seed=0):
    base = random_model(seed=seed)
    model = random_model(seed=seed)
    lora.attach(model, rank=4, alpha=8)
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.normal_(0, 0.2)  # a trained-looking, non-zero delta
    return base, model


def test_causal_is_base_and_block_is_not():
    base, model = with_adapter()
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids, pattern="causal"), base(ids, pattern="causal"))
        assert (model(ids, pattern="block") - base(ids, pattern="block")).abs().max() > 1e-3
        # with a cache: prefill/verify exact, draft over a read-only cache changed
        c1, c2 = model.new_cache(2, 16), base.new_cache(2, 16)
        assert torch.equal(model(ids, cache=c1), base(ids, cache=c2))
        assert torch.equal(c1.k, c2.k)
        blk = torch.randint(0, 64, (2, 4))
        assert (model(blk, cache=c1, pattern="block") - base(blk, cache=c2, pattern="block")).abs().max() > 1e-3


def test_dual_forward_gates_the_noisy_half_only():
    base, model = with_adapter(seed=1)
    L = 8
    ids = torch.randint(0, 64, (1, 2 * L))
    pos = torch.arange(L).repeat(2)[None]
    with torch.no_grad():
        a = model(ids, pos, pattern="dual", block_size=4)
        b = base(ids, pos, pattern="dual", block_size=4)
    assert torch.equal(a[:, L:], b[:, L:])  # the clean (AR) stream never sees the adapter
    assert (a[:, :L] - b[:, :L]).abs().max() > 1e-3
    # a per-token gate: only token 2 is a draft
    gate = torch.zeros(1, 2 * L, dtype=torch.bool)
    gate[0, 2] = True
    with torch.no_grad():
        c = model(ids, pos, pattern="dual", block_size=4, draft=gate)
    # the clean stream and the other noisy block (positions 4..7) cannot see token 2 at all
    assert torch.equal(c[:, L:], b[:, L:]) and torch.equal(c[:, 4:L], b[:, 4:L])
    assert (c[:, 2] - b[:, 2]).abs().max() > 1e-3


def test_adapter_round_trip_in_peft_layout(tmp_path):
    _, model = with_adapter(seed=2)
    model.save(tmp_path / "m")
    folder = tmp_path / "m" / "linear_spec_lora"
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4
    from safetensors import safe_open

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.encoder.layers.0.self_attn.o_proj.lora_A.weight" in keys
    loaded = tridlm.load(tmp_path / "m")
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids, pattern="block"), model(ids, pattern="block"))
    plain = tridlm.load(tmp_path / "m", draft_adapter=False)
    assert plain.draft_adapter is None
