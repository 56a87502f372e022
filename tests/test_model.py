"""The model's three patterns over the KV cache: chunked = one pass, read-only = no cache, batch = alone."""

import json

import pytest
import torch
from conftest import assert_logits_agree, random_model

from tridlm import ModelConfig, TriModeLM
from tridlm.config import ConfigError
from tridlm.masks import causal_mask


def test_chunked_causal_through_cache_equals_one_pass():
    model = random_model(seed=1)
    ids = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 64)
        parts = [model(ids[:, a:b], cache=cache) for a, b in [(0, 5), (5, 6), (6, 15), (15, 16), (16, 23)]]
    chunked = torch.cat(parts, dim=1)
    assert_logits_agree(model, full, chunked)
    assert cache.lengths.tolist() == [23, 23]


def test_block_pass_over_read_only_cache():
    model = random_model(seed=2)
    g = torch.Generator().manual_seed(1)
    prefix, blk = torch.randint(0, 64, (1, 9), generator=g), torch.randint(0, 64, (1, 6), generator=g)
    with torch.no_grad():
        cache = model.new_cache(1, 32)
        model(prefix, cache=cache)
        k0, v0, len0 = cache.k.clone(), cache.v.clone(), cache.lengths.clone()
        out = model(blk, cache=cache, pattern="block")
        # the cache's valid entries are bit-identical afterwards (slots past the length are scratch)
        n = int(len0[0])
        assert torch.equal(cache.k[..., :n, :], k0[..., :n, :]) and torch.equal(cache.v[..., :n, :], v0[..., :n, :])
        assert torch.equal(cache.lengths, len0)
        # ... and the result equals the same attention pattern computed with no cache at all:
        # prefix token-causal, block tokens see the whole prefix and each other
        n, m = prefix.shape[1], blk.shape[1]
        pattern = causal_mask(n + m)
        pattern[n:, :] = True
        ref = model(torch.cat([prefix, blk], 1), pattern=pattern)[:, n:]
    assert_logits_agree(model, out, ref)


def test_block_differs_from_causal():
    """Guards against a pattern argument that is silently ignored."""
    model = random_model(seed=3)
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        assert (model(ids, pattern="block") - model(ids, pattern="causal")).abs().max() > 1e-3


def test_batch_of_different_lengths_equals_each_row_alone():
    model = random_model(seed=4)
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, 64, (n,), generator=g) for n in (3, 11, 7)]
    steps = [torch.randint(0, 64, (len(rows),), generator=g) for _ in range(3)]
    blk = torch.randint(0, 64, (len(rows), 4), generator=g)
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = r
        valid[b, : len(r)] = True
    with torch.no_grad():
        cache = model.new_cache(len(rows), 64)
        batched_prefill = model(ids, cache=cache, valid=valid)
        batched_steps = [model(s[:, None], cache=cache) for s in steps]
        batched_block = model(blk, cache=cache, pattern="block")
        for b, r in enumerate(rows):
            c1 = model.new_cache(1, 64)
            alone = model(r[None], cache=c1)
            assert_logits_agree(model, alone[0], batched_prefill[b, : len(r)])
            for s, bs in zip(steps, batched_steps, strict=True):
                assert_logits_agree(model, model(s[b].view(1, 1), cache=c1)[0], bs[b])
            assert_logits_agree(model, model(blk[b : b + 1], cache=c1, pattern="block")[0], batched_block[b])
    assert cache.lengths.tolist() == [len(r) + 3 for r in rows]


def test_forwards_run_as_one_give_what_each_gives_alone():
    """forward_many: a causal step writing one cache, a padded block pass over another (read-only, drafts,
    logits at some positions only) and a cache-free forward returning hidden states, as one forward: each
    gets its own forward's logits (within the error model: the products see more rows) and cache lengths."""
    from tridlm import lora

    model = random_model(seed=6)
    lora.attach(model, rank=4, alpha=8)
    with torch.no_grad():
        for p in lora.lora_parameters(model).values():
            p.normal_(0, 0.2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        caches = [model.new_cache(3, 40), model.new_cache(2, 40)]
        model(torch.randint(0, 64, (3, 7), generator=g), cache=caches[0])
        model(torch.randint(0, 64, (2, 12), generator=g), cache=caches[1])
        valid = torch.ones(2, 5, dtype=torch.bool)
        valid[1, 3:] = False
        calls = [dict(input_ids=torch.randint(0, 64, (3, 1), generator=g), cache=caches[0]),
                 dict(input_ids=torch.randint(0, 64, (2, 5), generator=g), cache=caches[1], pattern="block",
                      valid=valid, logits_at=torch.tensor([[0, 2], [1, 2]]), draft=True),
                 dict(input_ids=torch.randint(0, 64, (1, 6), generator=g), return_hidden=True)]
        copies = [c.clone() for c in caches]
        alone = [model(**dict(calls[0], cache=copies[0])), model(**dict(calls[1], cache=copies[1])),
                 model(**calls[2])]
        together = model.forward_many(calls)
    for a, t in zip(alone[:2], together[:2], strict=True):
        assert t.shape == a.shape
        assert_logits_agree(model, t, a, n_keys=17)
    assert together[2].shape == alone[2].shape == (1, 6, model.config.hidden_size)
    assert_logits_agree(model, together[2], alone[2])  # the same error model, scaled by the hidden states
    assert [c.lengths.tolist() for c in caches] == [c.lengths.tolist() for c in copies] == [[8, 8, 8], [12, 12]]
    with pytest.raises(RuntimeError, match="inference"):
        model.forward_many(calls)  # gradients on


def test_crop_then_rewrite_matches_fresh_run():
    model = random_model(seed=5)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        cache = model.new_cache(1, 32)
        model(ids[:, :8], cache=cache)
        model(torch.randint(0, 64, (1, 4)), cache=cache)  # a rejected draft
        cache.crop(8)
        out = model(ids[:, 8:], cache=cache)
        ref = model(ids)[:, 8:]
    assert_logits_agree(model, out, ref)


def test_yarn_and_llama4_scale_take_effect():
    rope = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 16,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1, "mscale_all_dim": 1, "llama_4_scaling_beta": 0.1}
    model = random_model(seed=6, rope_parameters=rope, max_position_embeddings=256)
    assert model.attention_factor == pytest.approx(1.0)
    ids = torch.randint(0, 64, (1, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(1, 64)
        chunked = torch.cat([model(ids[:, :20], cache=cache), model(ids[:, 20:], cache=cache)], 1)
    assert_logits_agree(model, full, chunked)


def test_unsupported_rope_type_is_refused():
    with pytest.raises(ConfigError, match="unsupported rope_type 'dynamic'"):
        ModelConfig.from_dict({"rope_parameters": {"rope_type": "dynamic"}})


RELEASED = {
    "common": {"model_type": "nemotron_labs_diffusion", "architectures": ["NemotronLabsDiffusionModel"],
               "vocab_size": 131072, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
               "rms_norm_eps": 1e-5, "max_position_embeddings": 262144, "tie_word_embeddings": False,
               "mask_token_id": 100, "bos_token_id": 1, "eos_token_id": 11, "block_size": 32,
               "dlm_paradigm": "bidirectional", "ar_loss_weight": 1.0, "dlm_loss_weight": None,
               "rope_parameters": {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16384,
                                   "rope_theta": 1e6, "beta_fast": 32, "beta_slow": 1, "mscale": 1,
                                   "mscale_all_dim": 1, "llama_4_scaling_beta": 0.1},
               "some_future_field": {"ignored": True}},
    "3B": {"num_hidden_layers": 26, "hidden_size": 3072, "intermediate_size": 9216},
    "8B": {"num_hidden_layers": 34, "hidden_size": 4096, "intermediate_size": 14336},
}


@pytest.mark.parametrize("size,billions", [("3B", 3.83), ("8B", 8.49)])
def test_released_configs_build_on_meta_device(tmp_path, size, billions):
    d = {**RELEASED["common"], **RELEASED[size]}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = ModelConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    with torch.device("meta"):
        model = TriModeLM(cfg)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    n = model.num_parameters()
    assert n == cfg.num_parameters()
    assert abs(n / 1e9 - billions) / billions <= 0.01, n
