"""Fused projections (tridlm.fusion): the same logits as one product per projection, in every pattern,
with and without a drafter; the fused layout follows whatever replaces or changes a parameter."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_logits_agree, paired_cache_steps, random_model, route_through_graph_layout

import tridlm
from tridlm import fusion, lora
from tridlm.fusion import FusedProjections

pytestmark = pytest.mark.usefixtures("one_thread")


def drafted(seed: int = 0):
    m = random_model(seed)
    lora.attach(m, rank=4, alpha=8)
    with torch.no_grad():
        for p in lora.lora_parameters(m).values():
            p.normal_(0, 0.2)
    return m


def both_ways(model, *args, **kw):
    """(fused, unfused) outputs of one forward."""
    out, make_cache = {}, kw.pop("make_cache", lambda: None)
    for fuse in (True, False):
        model.fuse_projections = fuse
        with torch.no_grad():
            cache = make_cache()
            if cache is not None:
                model(torch.arange(4, 13)[None].expand(args[0].shape[0], -1), cache=cache)
            out[fuse] = model(*args, cache=cache, **kw) if cache is not None else model(*args, **kw)
    model.fuse_projections = True
    return out[True], out[False]


@pytest.mark.parametrize("with_drafter", [False, True])
@pytest.mark.parametrize("pattern", ["causal", "block", "dual", "explicit", "mixed-gate"])
def test_fused_forward_gives_the_unfused_logits(with_drafter, pattern):
    m = drafted(1) if with_drafter else random_model(1)
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    kw = {}
    if pattern == "dual":
        kw = dict(positions=torch.arange(4).repeat(2)[None].expand(2, -1), pattern="dual", block_size=2)
    elif pattern == "explicit":
        some = torch.rand(8, 8, generator=torch.Generator().manual_seed(1)) < 0.5
        kw = dict(pattern=some | torch.eye(8, dtype=torch.bool))
    elif pattern == "mixed-gate":
        kw = dict(pattern="block", draft=torch.arange(8)[None].expand(2, -1) % 3 == 0)
    else:
        kw = dict(pattern=pattern)
    fused, plain = both_ways(m, ids, **kw)
    assert_logits_agree(m, fused, plain)
    if pattern != "dual":  # over a prefix in the cache too (read-only for block / explicit patterns)
        kw.pop("positions", None)
        fused, plain = both_ways(m, ids, make_cache=lambda: m.new_cache(2, 32), **kw)
        assert_logits_agree(m, fused, plain)


def test_a_drafter_changes_only_draft_tokens_and_non_drafts_stay_exact():
    base, m = random_model(2), drafted(2)
    ids = torch.randint(4, 64, (1, 8), generator=torch.Generator().manual_seed(2))
    gate = torch.zeros(1, 8, dtype=torch.bool)
    gate[0, 5] = True
    with torch.no_grad():
        assert torch.equal(m(ids), base(ids))  # causal: the base rows of the fused weight, same shapes
        mixed = m(ids, pattern="causal", draft=gate)
        assert torch.equal(mixed[:, :5], base(ids)[:, :5])  # tokens before the draft: exactly the base
        assert (mixed[:, 5] - base(ids)[:, 5]).abs().max() > 1e-3


def test_the_layout_follows_changes_and_replacements():
    m = drafted(3)
    ids = torch.randint(4, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m(ids)  # fuse
        attn = m.encoder.layers[0].self_attn
        assert attn.v_proj.weight.data_ptr() != attn.q_proj.weight.data_ptr()
        assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
        attn.v_proj.weight *= 2  # an in-place change reaches the fused storage
        for pattern in ("causal", "block"):
            assert_logits_agree(m, *both_ways(m, ids, pattern=pattern))
        twin = copy.deepcopy(m)  # a copy fuses its own storage
        assert_logits_agree(m, twin(ids, pattern="block"), m(ids, pattern="block"))
        half = copy.deepcopy(m).to(torch.bfloat16)
        assert half(ids, pattern="block").dtype == torch.bfloat16
        assert_logits_agree(half, *both_ways(half, ids, pattern="block"))
        # parameters replaced after fusing: a new object, new memory under the same object
        attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach() * 3)
        attn.o_proj.lora_B.data = attn.o_proj.lora_B.detach() + 0.5
        assert_logits_agree(m, *both_ways(m, ids, pattern="block"))
        assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()


def test_checkpoint_names_and_bits_survive_fusion(tmp_path):
    m = drafted(4)
    names = sorted(m.state_dict())
    with torch.no_grad():
        m(torch.tensor([[5, 6, 7]]), pattern="block")
    assert sorted(m.state_dict()) == names and "encoder.layers.0.self_attn.q_proj.weight" in names
    m.save(tmp_path / "ckpt")
    back = tridlm.load(tmp_path / "ckpt")
    for k, v in m.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_gradients_reach_every_parameter_unfused():
    m = drafted(5)
    with torch.no_grad():
        m(torch.tensor([[5, 6, 7]]), pattern="block")  # fused once
    m(torch.tensor([[5, 6, 7, 8]]), pattern="block").sum().backward()
    attn = m.encoder.layers[1].self_attn
    assert attn.q_proj.weight.grad is not None and attn.k_proj.lora_A.grad is not None
    assert attn.v_proj.lora_B.grad is not None and m.encoder.layers[1].mlp.up_proj.weight.grad is not None


def test_a_model_loaded_under_inference_mode_fuses_and_runs_outside_it():
    with torch.inference_mode():
        m = random_model(6)
        ids = torch.tensor([[5, 6, 7]])
        inside = m(ids)
    m.fuse_projections = False
    with torch.inference_mode():
        assert_logits_agree(m, m(ids), inside)


def dequantized_twin(m, fmt):
    """A bf16 copy of model `m` whose projection weights are m's quantized ones (int8: the codes times their
    scales; int4: what the kernel itself makes of the packed codes, read back through an identity input)."""
    twin = copy.deepcopy(m)
    with torch.no_grad():
        twin(torch.tensor([[5, 6]]))  # fuse the copy too
        for a, b in zip(m.modules(), twin.modules(), strict=True):
            for name in ("qkv", "out", "gate_up", "down", "head"):
                group = getattr(a, name, None)
                if isinstance(group, FusedProjections) and group._weight is not None:
                    if fmt == "int8":
                        q, scales = group._int8_rows()
                        getattr(b, name)._weight.copy_((q.float() * scales.float()[:, None]).to(torch.bfloat16))
                    else:  # int4 covers the base rows; a drafter's A rows stay bf16
                        packed, sz = group._int4_rows()
                        eye = torch.eye(group._weight.shape[1], dtype=torch.bfloat16)
                        base = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, fusion.INT4_GROUP, sz)
                        getattr(b, name)._weight[:group._n_base].copy_(base.T)
    return twin


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("with_drafter", [False, True])
def test_quantized_weights_compute_the_dequantized_model(with_drafter, fmt):
    m = (drafted(7) if with_drafter else random_model(7)).to(torch.bfloat16).set_weight_format(fmt, max_tokens=18)
    ids = torch.randint(4, 64, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        m(ids)  # fuse, quantize
        twin = dequantized_twin(m, fmt).set_weight_format("float")
        for pattern in ("causal", "block"):
            got, want = m(ids, pattern=pattern), twin(ids, pattern=pattern)
            assert_logits_agree(m, got, want)
        m.set_weight_format("float")
        assert not torch.equal(m(ids, pattern="block"), got)  # the quantized path did run: float weights differ


def test_int4_holds_q4_1_style_groups_exactly():
    """Weights that already are 4-bit codes times a scale plus a minimum per group of 32 (GGUF's Q4_1, the
    default model's source) come back from int4 as they were, to the rounding of bf16 scales."""
    gen = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (64, 4, 32), generator=gen).float()
    codes[..., 0], codes[..., 1] = 0, 15  # Q4_1 blocks span their range
    scale = (torch.rand(64, 4, 1, generator=gen) * 0.05 + 0.01).to(torch.bfloat16).float()
    lo = (torch.randn(64, 4, 1, generator=gen) * 0.1).to(torch.bfloat16).float()
    w = (codes * scale + lo).view(64, 128).to(torch.bfloat16).float()
    packed, sz = fusion.quantize_int4(w.to(torch.bfloat16))
    back = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.eye(128, dtype=torch.bfloat16), packed,
                                                       fusion.INT4_GROUP, sz).T.float()
    step = scale.expand(64, 4, 32).reshape(64, 128)
    # three bf16 roundings (u = 2^-8, relative): the scale (times up to 15 codes), the offset
    # (|min| + 8 scale) and the output; a wrong code would be off by a whole step
    u = 2.0 ** -8
    tol = u * (15 * step + lo.abs().expand(64, 4, 32).reshape(64, 128) + 8 * step + w.abs())
    assert bool((tol < step / 2).all())  # the bound tells codes apart
    assert bool(((back - w).abs() <= tol).all())


def test_forwards_wider_than_the_int8_range_use_the_bf16_weights():
    m = random_model(7).to(torch.bfloat16).set_weight_format("int8", max_tokens=4)
    float_twin = copy.deepcopy(m).set_weight_format("float")
    wide_int8 = copy.deepcopy(m).set_weight_format("int8", max_tokens=64)
    ids = torch.randint(4, 64, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(m(ids), float_twin(ids))  # 8 tokens > 4: the bf16 products, bit for bit
        assert torch.equal(m(ids[:, :4]), wide_int8(ids[:, :4]))  # 4 tokens: the int8 ones
        assert not torch.equal(m(ids[:, :4]), float_twin(ids[:, :4]))


def test_the_int8_range_is_measured_once_per_machine_and_ends_where_bf16_wins(monkeypatch, tmp_path):
    from tridlm import kernels

    monkeypatch.setenv("TRIDLM_CACHE", str(tmp_path))
    calls = []
    fake = {1: (1.0, 2.0), 2: (1.0, 2.0), 4: (1.0, 1.5), 8: (2.0, 1.0), 16: (1.0, 3.0)}  # int8 loses at 8
    def measure(model, fmt, native=False):
        if not native:  # tridlm.native's range has its own test
            calls.append(fmt)
        return fake

    monkeypatch.setattr(kernels, "measure_widths", measure)
    m = random_model(7).to(torch.bfloat16)
    assert m.set_weight_format("int8").quant_max_tokens == 4  # 16 is past the first loss: not int8's
    assert random_model(8).to(torch.bfloat16).set_weight_format("int8").quant_max_tokens == 4  # same shapes
    assert calls == ["int8"] and kernels.cache_file(m, "int8").exists()
    assert m.set_weight_format("int8", max_tokens=16).quant_max_tokens == 16  # an explicit range wins
    assert m.set_weight_format("int4").quant_max_tokens == 4 and calls == ["int8", "int4"]  # its own measurement
    kernels.cache_file(m, "int8").write_text('{"old": 1}')  # another version's file: measured again
    assert m.set_weight_format("int8").quant_max_tokens == 4 and calls == ["int8", "int4", "int8"]


def test_the_int8_measurement_times_both_paths_at_every_width():
    from tridlm import kernels

    for fmt in ("int8", "int4"):
        got = kernels.measure_widths(random_model(7).to(torch.bfloat16), fmt, widths=(1, 8), repeats=1)
        assert sorted(got) == [1, 8] and all(a > 0 and b > 0 for a, b in got.values())


def test_int8_is_refused_with_the_fix_when_it_cannot_run(monkeypatch):
    from tridlm import fusion

    with pytest.raises(ValueError, match=r"need bf16 activations.*to\(torch.bfloat16\)"):
        random_model(8).set_weight_format("int8")
    with pytest.raises(ValueError, match=r"int4 weights need bf16 activations.*to\(torch.bfloat16\)"):
        random_model(8).set_weight_format("int4")
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        random_model(8).set_weight_format("int3")
    with pytest.raises(ValueError, match=r"do not fit.*hidden_size 48 \(inputs: a multiple of 32\).*use int8"):
        random_model(8, hidden_size=48, num_attention_heads=4).to(torch.bfloat16).set_weight_format("int4")
    misfit = r"int8 weights do not fit.*hidden_size 36 \(inputs: a multiple of 16\).*use bfloat16"
    with pytest.raises(ValueError, match=misfit):
        random_model(8, hidden_size=36, num_attention_heads=4).to(torch.bfloat16).set_weight_format("int8")
    monkeypatch.setattr(fusion, "int8_available", lambda device: False)
    monkeypatch.setattr(fusion, "int4_available", lambda device: False)
    for fmt in ("int8", "int4"):
        with pytest.raises(ValueError, match=f"{fmt} weight-only products are not available on cpu.*use bfloat16"):
            random_model(8).to(torch.bfloat16).set_weight_format(fmt)


@pytest.mark.parametrize("with_drafter", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_layout_computes_the_eager_forward(dtype, with_drafter):
    """What compile_decode compiles, run uncompiled: attention over the read-only cache merged with the new
    tokens' by log-sum-exp, keys/values stored after the graph. From an empty cache on, every pattern (and
    padding) gives the eager forward's logits within the error model, and the same cache."""
    make = (lambda: drafted(11)) if with_drafter else (lambda: random_model(11))
    eager, static = make().to(dtype), make().to(dtype)
    route_through_graph_layout(static)
    for want, got, real, n_keys, ce, cs in paired_cache_steps(eager, static, seed=5):
        assert_logits_agree(eager, got[real], want[real], n_keys=n_keys)
        n = int(ce.lengths)
        assert torch.equal(cs.lengths, ce.lengths)
        # layer 0's keys/values are the same products bit for bit; deeper ones carry the attention's
        # rounding, and the next steps' logits (checked above) read them
        assert torch.equal(cs.k[0, :, :, :n], ce.k[0, :, :, :n])
        assert torch.equal(cs.v[0, :, :, :n], ce.v[0, :, :, :n])
    assert n == 1 + 4 + 4 + 1 + 3  # the written steps, padding not counted


def test_compiled_decode_graphs_give_the_eager_tokens_and_leave_other_widths_eager():
    """compile_decode (Inductor, weights frozen; the quick "default" mode here) serves the widths it was given:
    greedy AR and self-speculation equal the eager model's under the contract; a prefill stays eager."""
    from conftest import GreedyContract

    eager, m = random_model(9), random_model(9)
    m.compile_decode(tokens=(1, 4), mode="default")
    calls = []
    real = m._compiled
    m._compiled = lambda *a: calls.append(a[0].shape[1]) or real(*a)
    contract = GreedyContract(eager)
    prompt = [5, 6, 7, 8, 9, 10]
    with torch.inference_mode():
        for mode in ("ar", "spec"):
            want = eager.generate(prompt, mode, max_new_tokens=12, block_length=4, ignore_eos=True).ids
            got = m.generate(prompt, mode, max_new_tokens=12, block_length=4, ignore_eos=True).ids
            contract.same(prompt, got, want)
    contract.assert_rare()
    assert set(calls) == {1, 4}  # the 6-token prefill ran eager; decode steps and 4-token blocks compiled
    m.to(torch.bfloat16)  # the graphs hold fp32 weights: refused with the fix, not run stale
    with pytest.raises(RuntimeError, match="changed since compile_decode.*call compile_decode again"):
        m.generate(prompt, "ar", max_new_tokens=2)
    with pytest.raises(ValueError, match="token counts >= 1"):
        random_model(9).compile_decode(tokens=(0,))
