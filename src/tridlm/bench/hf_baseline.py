"""The Hugging Face transformers baseline: `LlamaForCausalLM.generate` (AR, greedy) on the same weights.

The tridlm model is a Llama/Ministral3 decoder, so its tensors map one to one onto transformers'
Llama (``encoder.`` -> ``model.``, ``diffusion_head`` -> ``lm_head``); the baseline shares the very
same tensors, so both sides compute with identical weights in the same process.
"""

from __future__ import annotations

import importlib.util
import time

import torch


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _hf_config(model):
    from transformers import LlamaConfig

    c = model.config
    rp = c.rope_parameters
    rope = {"rope_type": rp.rope_type, "rope_theta": rp.rope_theta}
    if rp.rope_type == "linear":
        rope["factor"] = rp.factor
    elif rp.rope_type == "yarn":
        rope.update(factor=rp.factor, original_max_position_embeddings=rp.original_max_position_embeddings,
                    beta_fast=rp.beta_fast, beta_slow=rp.beta_slow, mscale=rp.mscale,
                    mscale_all_dim=rp.mscale_all_dim)
    # Llama has no Llama-4 query scale (llama_4_scaling_beta); it is exactly 1 below
    # original_max_position_embeddings, far beyond any benchmark prompt
    return LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, rope_parameters=rope,
        tie_word_embeddings=c.tie_word_embeddings, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id if c.pad_token_id is not None else c.eos_token_id,
        attention_bias=False, mlp_bias=False, hidden_act="silu")


def to_transformers(model):
    """A `LlamaForCausalLM` whose parameters are the tridlm model's tensors (no copy)."""
    from transformers import LlamaForCausalLM

    cfg = _hf_config(model)
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    sd = {}
    for name, t in model.state_dict().items():
        if name.startswith("encoder."):
            sd["model." + name.removeprefix("encoder.")] = t
        elif name == "diffusion_head.weight":
            sd["lm_head.weight"] = t
    hf.load_state_dict(sd, assign=True, strict=not cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    # the rotary frequencies are a non-persistent buffer, still on the meta device: rebuild the module
    hf.model.rotary_emb = type(hf.model.rotary_emb)(cfg).to(model.device)
    return hf.eval()


@torch.inference_mode()
def hf_generate(hf, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None,
                ignore_eos: bool = False) -> tuple[list[int], float]:
    """(generated ids, wall seconds) for one greedy `generate` call at batch 1."""
    ids = torch.tensor([prompt_ids], device=hf.device)
    kw = dict(max_new_tokens=max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids),
              pad_token_id=hf.config.pad_token_id, temperature=None, top_p=None, top_k=None)
    if ignore_eos:
        kw.update(eos_token_id=None, min_new_tokens=max_new_tokens)
    elif eos_token_id is not None:
        kw["eos_token_id"] = eos_token_id
    t0 = time.perf_counter()
    out = hf.generate(ids, **kw)
    dt = time.perf_counter() - t0
    return out[0, ids.shape[1]:].tolist(), dt
