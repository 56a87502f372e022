"""tridlm's own CPU products (tridlm.native): their sums against exact ones, row independence, the model
through them against torch's products, and the fallback where they cannot run."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_logits_agree, paired_cache_steps, random_model, route_through_graph_layout, small_config

from tridlm import lora, native
from tridlm.fusion import FusedProjections

REASON = native.unavailable()
needs_native = pytest.mark.skipif(REASON is not None, reason=f"tridlm.native unavailable here: {REASON}")


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case error of one bf16 output of fp32 sums over K products (exact in fp32: bf16 x bf16 has
    16 significant bits): K fp32 roundings of partial sums (gamma_K <= 1.01 K u32 for K u32 < 0.01), each
    at most the sum of |products|, then the output's rounding to bf16 (half an ulp, u16 relative)."""
    k = x.shape[1]
    mag = x.double().abs() @ w.double().abs().T
    exact = (x.double() @ w.double().T).abs()
    return 1.01 * k * 2.0**-24 * mag + 2.0**-8 * (exact + 1.01 * k * 2.0**-24 * mag) + 1e-30


def cases():
    gen = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 64, 32), (3, 96, 576), (8, 40, 64), (11, 32, 1536), (20, 70, 96)):
        yield (torch.randn(m, k, generator=gen).bfloat16(), torch.randn(n, k, generator=gen).bfloat16() * 0.05)


@needs_native
def test_bf16_products_are_the_exact_sums_to_rounding():
    for x, w in cases():
        got = torch.ops.tridlm.gemm_bf16(x, native.pack(w))[:, :w.shape[0]].double()
        exact = x.double() @ w.double().T
        assert bool(((got - exact).abs() <= bound(x, w)).all())


@needs_native
def test_int8_products_scale_the_code_sums():
    gen = torch.Generator().manual_seed(1)
    for x, w in cases():
        q = torch.randint(-127, 128, w.shape, generator=gen, dtype=torch.int8)
        scale = torch.rand(w.shape[0], generator=gen) * 0.01
        pad = torch.zeros(native.padded(len(scale)) - len(scale))
        got = torch.ops.tridlm.gemm_int8(x, native.pack(q), torch.cat([scale, pad]))[:, :w.shape[0]].double()
        codes = q.to(torch.bfloat16)  # exact: |code| <= 127
        exact = (x.double() @ codes.double().T) * scale.double()
        # the scale multiplies the fp32 sum once more (one more u32 rounding) before the bf16 output
        assert bool(((got - exact).abs() <= bound(x, codes) * scale.double() * 1.0001 + 2.0**-24 * exact.abs()).all())


@needs_native
def test_a_row_does_not_depend_on_the_rows_beside_it():
    """Each output is summed in one order whatever M is: a verify block's products are AR's bit for bit."""
    gen = torch.Generator().manual_seed(2)
    w = native.pack(torch.randn(96, 128, generator=gen).bfloat16())
    wide = torch.randn(20, 200, generator=gen).bfloat16()
    x = wide[:, 40:168]  # rows of a wider tensor: read in place
    every = torch.ops.tridlm.gemm_bf16(x, w)
    assert torch.equal(every, torch.ops.tridlm.gemm_bf16(x.contiguous(), w))
    for i in range(20):
        assert torch.equal(torch.ops.tridlm.gemm_bf16(x[i:i + 1], w)[0], every[i])
        assert torch.equal(torch.ops.tridlm.gemm_bf16(x[:i + 1], w), every[:i + 1])


AMX_REASON = native.amx_unavailable()
needs_amx = pytest.mark.skipif(AMX_REASON is not None, reason=f"tridlm's AMX product unavailable here: {AMX_REASON}")


@needs_amx
def test_amx_products_are_the_exact_sums_to_rounding():
    for x, w in cases():
        got = torch.ops.tridlm.gemm_bf16_amx(x, native.pack(w))[:, :w.shape[0]].double()
        assert bool(((got - x.double() @ w.double().T).abs() <= bound(x, w)).all())


@needs_amx
def test_an_amx_row_does_not_depend_on_the_rows_beside_it():
    """Whole 32-row blocks, what is left after them, and a first row group alone: one order for each output."""
    gen = torch.Generator().manual_seed(7)
    w = native.pack(torch.randn(96, 128, generator=gen).bfloat16())
    wide = torch.randn(70, 200, generator=gen).bfloat16()
    x = wide[:, 40:168]
    every = torch.ops.tridlm.gemm_bf16_amx(x, w)
    assert torch.equal(every, torch.ops.tridlm.gemm_bf16_amx(x.contiguous(), w))
    for m in (1, 5, 16, 17, 31, 32, 33, 48, 63, 64, 65):
        assert torch.equal(torch.ops.tridlm.gemm_bf16_amx(x[:m], w), every[:m])
        assert torch.equal(torch.ops.tridlm.gemm_bf16_amx(x[m:m + 1], w)[0], every[m])


@needs_amx
def test_the_amx_product_refuses_inputs_off_its_tile_step():
    x, w = torch.ones(2, 48, dtype=torch.bfloat16), native.pack(torch.ones(32, 48, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="multiple of 32 inputs, not 48"):
        torch.ops.tridlm.gemm_bf16_amx(x, w)
    assert not native.amx_fits(48) and native.amx_fits(576)


def drafted_bf16(seed: int):
    m = random_model(seed)
    lora.attach(m, rank=6, alpha=12)  # 18 q/k/v drafter rows: a padded tile
    with torch.no_grad():
        for p in lora.lora_parameters(m).values():
            p.normal_(0, 0.2)
    return m.to(torch.bfloat16)


@needs_native
@pytest.mark.parametrize("fmt", ["float", "int8"])
@pytest.mark.parametrize("with_drafter", [False, True])
def test_the_model_through_native_products_agrees_with_torchs(fmt, with_drafter, monkeypatch):
    asked = []  # the packed weights a forward asks for: shows which products ran
    quantized = FusedProjections._quantized
    monkeypatch.setattr(FusedProjections, "_quantized", lambda self, f: asked.append(f) or quantized(self, f))
    m = drafted_bf16(3) if with_drafter else random_model(3).to(torch.bfloat16)
    ids = torch.randint(4, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m.set_weight_format(fmt, max_tokens=64, native_max_tokens=0)
        want = {p: m(ids, pattern=p) for p in ("causal", "block")}
        m.set_weight_format(fmt, max_tokens=64, native_max_tokens=64)
        assert m.native_max_tokens == 64 and m.native_unavailable is None
        for pattern, ref in want.items():
            asked.clear()
            assert_logits_agree(m, m(ids, pattern=pattern), ref)
            assert ("native-int8" if fmt == "int8" else "native-bf16") in asked
            assert ("native-b" in asked) == (with_drafter and pattern == "block")
        gate = torch.zeros(2, 9, dtype=torch.bool)
        gate[:, 5:] = True  # drafts among base tokens (quadratic self-speculation's layout)
        m.set_weight_format(fmt, max_tokens=64, native_max_tokens=0)
        ref = m(ids, pattern="causal", draft=gate) if with_drafter else None
        if ref is not None:
            m.set_weight_format(fmt, max_tokens=64, native_max_tokens=64)
            assert_logits_agree(m, m(ids, pattern="causal", draft=gate), ref)


@needs_amx
@pytest.mark.parametrize("with_drafter", [False, True])
def test_the_model_through_amx_products_agrees_with_torchs(with_drafter, monkeypatch):
    from tridlm import fusion

    calls = []
    amx = fusion.OWN_PRODUCTS["amx"]
    monkeypatch.setitem(fusion.OWN_PRODUCTS, "amx", lambda x, w: calls.append(x.shape) or amx(x, w))
    m = random_model(3)
    if with_drafter:
        lora.attach(m, rank=32, alpha=32)  # rank-sized products take the AMX one too: 32 inputs
        with torch.no_grad():
            for p in lora.lora_parameters(m).values():
                p.normal_(0, 0.2)
    m = m.to(torch.bfloat16)
    ids = torch.randint(4, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m.set_weight_format("float", native_max_tokens=0)
        want = {p: m(ids, pattern=p) for p in ("causal", "block")}
        m.set_weight_format("float", native_max_tokens=64)
        m.native_kernel = "amx"
        for pattern, ref in want.items():
            calls.clear()
            assert_logits_agree(m, m(ids, pattern=pattern), ref)
            assert len(calls) >= 4 * m.config.num_hidden_layers + 1


def test_narrow_forwards_take_the_avx512_product_where_amx_cannot_serve(monkeypatch):
    from tridlm import kernels

    if REASON is None:
        assert kernels.native_kernel(drafted_bf16(3)) == "native"  # rank 6: B blocks of 18 inputs
    monkeypatch.setattr(native, "amx_unavailable", lambda: "this CPU lacks amx_tile")
    assert kernels.native_kernel(random_model(3).to(torch.bfloat16)) == "native"


def test_the_native_range_falls_back_to_torch_where_the_products_cannot_run(monkeypatch):
    monkeypatch.setattr(native, "unavailable", lambda: "this CPU lacks avx512_bf16")
    m = random_model(4).to(torch.bfloat16).set_weight_format("float")
    assert m.native_max_tokens == 0 and m.native_unavailable == "this CPU lacks avx512_bf16"
    with torch.no_grad():
        m(torch.randint(4, 64, (1, 5)))  # torch's products
    with pytest.raises(ValueError, match="cannot run here: this CPU lacks avx512_bf16.*native_max_tokens=0"):
        m.set_weight_format("float", native_max_tokens=8)
    monkeypatch.undo()
    fp32 = random_model(4).set_weight_format("float")
    assert fp32.native_max_tokens == 0 and "not float torch.float32" in fp32.native_unavailable
    odd = random_model(4, hidden_size=36, num_attention_heads=4).to(torch.bfloat16).set_weight_format("float")
    assert odd.native_max_tokens == 0 and "multiples of 32" in odd.native_unavailable


def test_a_failed_build_leaves_torchs_products(monkeypatch):
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_reason", None)
    monkeypatch.setattr(native, "_compiler", lambda: "/nonexistent/g++")
    monkeypatch.setattr(native, "_library_path", lambda cxx: native.Path("/nonexistent/lib.so"))
    monkeypatch.setattr(native, "_cpu_flags", lambda: set(native.CPU_FLAGS))
    monkeypatch.delenv("TRIDLM_NATIVE", raising=False)
    assert "failed" in native.unavailable()


@needs_native
def test_the_native_range_is_measured_against_torchs_products_in_the_same_format():
    from tridlm import kernels

    m = random_model(5).to(torch.bfloat16)
    for fmt in ("float", "int8"):
        if fmt == "int8":
            m.set_weight_format("int8", max_tokens=64, native_max_tokens=0)
        got = kernels.measure_widths(m, fmt, widths=(1, 8), repeats=1, native=True)
        assert sorted(got) == [1, 8] and all(a > 0 and b > 0 for a, b in got.values())



def attention_bound(q, keys, values, visible, out_exact) -> torch.Tensor:
    """Worst-case error of one bf16 output of tridlm's attention: each score is D exact products summed in
    fp32 (gamma_D <= 1.01 D u32 of the sum of |products|), scaled once more (u32); e^x adds ~2 ulp and the
    subtraction of the maximum one u32, so each softmax weight carries a relative error of at most
    d = score error + 4 u32 (to first order), twice over once normalised, and the weighted sum of n values
    gamma_n more; weights sum to 1, so the absolute error is at most (2d + 1.01 (n + 2) u32) max |v|; the
    bf16 output then rounds to half an ulp (u16 relative)."""
    u32 = 2.0**-24
    d_head, n = q.shape[-1], keys.shape[-2]
    mag = (q.double().abs() @ keys.double().abs().transpose(-1, -2)) * d_head ** -0.5  # [.., T, n]
    score_err = 1.01 * (d_head + 1) * u32 * mag.masked_fill(~visible, 0).amax(-1, keepdim=True)
    fp32 = (2 * (score_err + 4 * u32) + 1.01 * (n + 2) * u32) * values.double().abs().amax((-1, -2))[..., None, None]
    return fp32 + 2.0**-8 * (out_exact.abs() + fp32) + 1e-30


@needs_native
def test_attention_is_the_exact_softmax_to_rounding():
    """Rows of different cache lengths (one empty), grouped query heads, a causal and a random mask among the
    new tokens, q and the new keys/values as strided views (a forward's transposes): against float64."""
    gen = torch.Generator().manual_seed(6)
    for B, H, Hkv, T, D, S, lengths in ((2, 6, 2, 5, 64, 40, [23, 0]), (1, 4, 4, 1, 32, 16, [16]),
                                       (3, 8, 2, 9, 128, 30, [3, 30, 11])):
        q = torch.randn(B, T, H, D, generator=gen).bfloat16().transpose(1, 2)
        k_new, v_new = (torch.randn(B, T, Hkv, D, generator=gen).bfloat16().transpose(1, 2) for _ in range(2))
        k_cache, v_cache = (torch.randn(B, Hkv, S, D, generator=gen).bfloat16() for _ in range(2))
        mask = torch.rand(B, T, T, generator=gen) < 0.5 if T > 1 and B > 1 else torch.ones(B, T, T, dtype=torch.bool)
        mask |= torch.eye(T, dtype=torch.bool)  # every new token sees itself
        n_cached = torch.tensor(lengths)
        got = torch.ops.tridlm.attend_bf16(q, k_cache, v_cache, n_cached, k_new, v_new, mask, D ** -0.5)
        assert got.shape == (B, T, H, D)
        for b in range(B):
            n = lengths[b]
            keys = torch.cat([k_cache[b, :, :n], k_new[b]], 1).repeat_interleave(H // Hkv, 0)  # [H, n + T, D]
            values = torch.cat([v_cache[b, :, :n], v_new[b]], 1).repeat_interleave(H // Hkv, 0)
            visible = torch.cat([torch.ones(T, n, dtype=torch.bool), mask[b]], 1)  # [T, n + T]
            scores = (q[b].double() @ keys.double().transpose(-1, -2)) * D ** -0.5
            exact = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ values.double()  # [H, T, D]
            err = (got[b].transpose(0, 1).double() - exact).abs()
            assert bool((err <= attention_bound(q[b], keys, values, visible, exact)).all())


def attention_model(seed: int, with_drafter: bool):
    m = random_model(seed, hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    if with_drafter:
        lora.attach(m, rank=6, alpha=12)
        with torch.no_grad():
            for p in lora.lora_parameters(m).values():
                p.normal_(0, 0.2)
    return m.to(torch.bfloat16)


@needs_native
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("with_drafter", [False, True])
def test_the_model_through_native_attention_agrees_with_torchs(static, with_drafter):
    """Eager cache forwards and the compiled layout (run uncompiled), every pattern and padding, from an empty
    cache on: the logits through tridlm's attention agree with torch's within the error model, and both
    write the same cache entries' count."""
    ref, m = attention_model(12, with_drafter), attention_model(12, with_drafter)
    ref.set_weight_format("float", native_max_tokens=0, native_attention_max_tokens=0)
    m.set_weight_format("float", native_max_tokens=0, native_attention_max_tokens=64)
    assert m.native_attention_unavailable is None
    if static:
        route_through_graph_layout(ref)
        route_through_graph_layout(m)
    for want, got, real, n_keys, cr, cm in paired_cache_steps(ref, m, seed=7):
        assert_logits_agree(ref, got[real], want[real], n_keys=n_keys)
        assert torch.equal(cm.lengths, cr.lengths)


def test_native_attention_falls_back_to_torchs_where_it_cannot_run(monkeypatch):
    odd = random_model(4).to(torch.bfloat16).set_weight_format("float")  # head size 8
    assert odd.native_attention_max_tokens == 0
    assert "head sizes 32, 64, 96 or 128, not 8" in odd.native_attention_unavailable
    with pytest.raises(ValueError, match="attention cannot run here: .*native_attention_max_tokens=0"):
        odd.set_weight_format("float", native_attention_max_tokens=8)
    fp32 = random_model(4, hidden_size=128, num_attention_heads=4).set_weight_format("float")
    assert fp32.native_attention_max_tokens == 0 and "bf16" in fp32.native_attention_unavailable
    monkeypatch.setattr(native, "unavailable", lambda: "turned off by TRIDLM_NATIVE=0")
    m = attention_model(4, False).set_weight_format("float")
    assert m.native_attention_max_tokens == 0 and m.native_attention_unavailable == "turned off by TRIDLM_NATIVE=0"
    with torch.no_grad():
        m(torch.randint(4, 64, (1, 5)), cache=m.new_cache(1, 8))  # torch's attention


@needs_native
def test_the_native_attention_range_is_measured_against_torchs():
    from tridlm import kernels

    got = kernels.measure_attention(attention_model(5, False), widths=(1, 8), repeats=1, context=20)
    assert sorted(got) == [1, 8] and all(a > 0 and b > 0 for a, b in got.values())


@needs_native
def test_the_norm_kernel_is_torchs_formula_to_rounding_and_row_invariant():
    """tridlm's one-pass RMSNorm against the model's torch formula: the same roundings but its own order for
    the sum of squares, whose fp32 error (a few units in 10^7) can move the normalized value across a bf16
    rounding boundary, so an output may differ by that one bf16 step times the weight (two steps of the
    output at most); each row is the same normalized alone or among others, at any width, odd sizes too."""
    from tridlm.model import RMSNorm

    gen = torch.Generator().manual_seed(8)
    for hidden in (576, 100):
        norm = RMSNorm(hidden, 1e-5).bfloat16()
        with torch.no_grad():
            norm.weight.copy_(torch.randn(hidden, generator=gen) * 2)
        x = (torch.randn(300, hidden, generator=gen) * 5).bfloat16()
        with torch.inference_mode():
            got, ref = torch.ops.tridlm.rms_norm_bf16(x, norm.weight, norm.eps), norm.torch_forward(x)
            step = 2.0 ** (torch.floor(torch.log2(ref.float().abs().clamp_min(1e-30))) - 7)  # one bf16 step of ref
            assert bool(((got.float() - ref.float()).abs() <= 2 * step).all())
            for rows in (1, 7, 64):
                assert torch.equal(torch.ops.tridlm.rms_norm_bf16(x[:rows], norm.weight, norm.eps), got[:rows])
            assert torch.equal(torch.ops.tridlm.rms_norm_bf16(x[5:6], norm.weight, norm.eps)[0], got[5])
            assert torch.equal(torch.ops.tridlm.rms_norm_bf16(x.view(3, 100, hidden), norm.weight, norm.eps),
                               got.view(3, 100, hidden))


def test_norms_take_the_kernel_only_where_it_runs(monkeypatch):
    from tridlm.model import RMSNorm

    fp32 = random_model(4).set_weight_format("float")
    assert not any(m.native for m in fp32.modules() if isinstance(m, RMSNorm))
    monkeypatch.setattr(native, "unavailable", lambda: "turned off by TRIDLM_NATIVE=0")
    bf16 = random_model(4).to(torch.bfloat16).set_weight_format("float")
    assert not any(m.native for m in bf16.modules() if isinstance(m, RMSNorm))
    with torch.no_grad():
        bf16(torch.randint(4, 64, (1, 5)))  # torch's formula


def rope_inputs(B, T, Hq, Hk, D, gen):
    """q and k as a forward holds them (views into one [B, T, (Hq + 2 Hk) D] projection output), the
    model's cos/sin tables for random positions, bf16."""
    from tridlm.model import rope_frequencies

    qkv = (torch.randn(B, T, (Hq + 2 * Hk) * D, generator=gen) * 4).bfloat16()
    q, k, _ = qkv.split([Hq * D, Hk * D, Hk * D], dim=-1)
    q, k = q.reshape(B, T, Hq, D).transpose(1, 2), k.reshape(B, T, Hk, D).transpose(1, 2)
    inv_freq, _ = rope_frequencies(small_config().rope_parameters, D)
    freqs = torch.randint(0, 8192, (B, T), generator=gen).float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return q, k, emb.cos().bfloat16()[:, None], emb.sin().bfloat16()[:, None]


@needs_native
def test_the_rope_kernel_gives_torchs_formula_bit_for_bit():
    """One call for q and k with the eager formula's roundings (each product rounded to bf16, then the
    sum): equal bits, at one token and many, head sizes 32-128, grouped and plain heads."""
    from tridlm.model import rotate_half

    gen = torch.Generator().manual_seed(11)
    for B, T, Hq, Hk, D in ((1, 1, 9, 3, 64), (24, 1, 9, 3, 64), (8, 8, 9, 3, 64), (3, 5, 4, 2, 128),
                            (2, 33, 2, 2, 32)):
        q, k, cos, sin = rope_inputs(B, T, Hq, Hk, D, gen)
        got_q, got_k = torch.ops.tridlm.rope_bf16(q, k, cos, sin)
        assert got_q.shape == q.shape and got_k.shape == k.shape
        assert torch.equal(got_q, q * cos + rotate_half(q) * sin)
        assert torch.equal(got_k, k * cos + rotate_half(k) * sin)


@needs_native
@pytest.mark.parametrize("write", [True, False])
def test_one_call_for_a_parts_attention_gives_the_bits_of_its_three_ops(write):
    """attend_part_bf16 (rotary embedding, cache write, attention) against rope_bf16, kv_write and attend_bf16 in
    turn: q, k, v as the fused projection's column views, the output as one part's rows of a wider buffer,
    rows at different cache lengths (one empty), a random mask; the same output and cache bits (with `write`),
    or the same output and an untouched cache (without)."""
    gen = torch.Generator().manual_seed(13)
    for B, T, Hq, Hk, D, lengths in ((1, 1, 9, 3, 64, [17]), (24, 1, 9, 3, 64, list(range(0, 48, 2))),
                                     (8, 8, 9, 3, 64, [5, 40, 0, 33, 12, 7, 21, 19]), (3, 5, 4, 2, 128, [3, 30, 11]),
                                     (2, 33, 2, 2, 32, [0, 9])):
        S = max(lengths) + T + 3
        qkv = (torch.randn(B * T, (Hq + 2 * Hk) * D, generator=gen) * 4).bfloat16()
        q, k, v = qkv.split([Hq * D, Hk * D, Hk * D], dim=-1)
        _, _, cos, sin = rope_inputs(B, T, Hq, Hk, D, gen)
        k_cache, v_cache = (torch.randn(B, Hk, S, D, generator=gen).bfloat16() for _ in range(2))
        n = torch.tensor(lengths)
        mask = (torch.rand(B, T, T, generator=gen) < 0.5) | torch.eye(T, dtype=torch.bool)
        q4, k4, v4 = (t.reshape(B, T, -1, D).transpose(1, 2) for t in (q, k, v))  # [B, heads, T, D] views
        want_q, want_k = torch.ops.tridlm.rope_bf16(q4, k4, cos, sin)
        want = torch.ops.tridlm.attend_bf16(want_q, k_cache, v_cache, n, want_k, v4, mask, D ** -0.5)
        caches = k_cache.clone(), v_cache.clone()
        if write:
            torch.ops.tridlm.kv_write(*caches, n, want_k, v4)
        wide = torch.zeros(B * T + 4, Hq * D + 8, dtype=torch.bfloat16)  # a joint forward's output, this part's span
        got_k, got_v = k_cache.clone(), v_cache.clone()
        torch.ops.tridlm.attend_part_bf16(q, k, v, wide[2:2 + B * T, :Hq * D], cos, sin, got_k, got_v, n, mask,
                                          D ** -0.5, write)
        assert torch.equal(wide[2:2 + B * T, :Hq * D], want.reshape(B * T, Hq * D))
        assert not wide[:2].any() and not wide[2 + B * T:].any() and not wide[:, Hq * D:].any()
        assert torch.equal(got_k, caches[0]) and torch.equal(got_v, caches[1])


@needs_native
def test_the_rope_kernel_refuses_what_it_cannot_rotate():
    gen = torch.Generator().manual_seed(12)
    q, k, cos, sin = rope_inputs(2, 3, 4, 2, 48, gen)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.tridlm.rope_bf16(q, k, cos, sin)
    q, k, cos, sin = rope_inputs(2, 3, 4, 2, 64, gen)
    with pytest.raises(RuntimeError, match="cos must be bf16"):
        torch.ops.tridlm.rope_bf16(q, k, cos[:1], sin[:1])


@needs_native
def test_a_bf16_model_through_the_rope_kernel_gives_the_same_logits():
    from tridlm.model import Attention

    m = random_model(5, hidden_size=128, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2).to(torch.bfloat16).set_weight_format("float")
    layers = [a for a in m.modules() if isinstance(a, Attention)]
    ids = torch.randint(4, 64, (2, 7))
    with torch.inference_mode():
        outs = []
        for on in (True, False):
            for a in layers:
                a.native_rope = on
            cache = m.new_cache(2, 16)
            outs.append((m(ids, cache=cache), m(ids[:, :3], cache=cache)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@needs_native
def test_a_model_through_one_attention_call_a_part_gives_the_same_logits(monkeypatch):
    """Single forwards (writing and read-only) and a joint one of two parts: the same logits with
    attend_part_bf16 as with rope, attention and the cache write called apart."""
    from tridlm.model import Attention

    m = attention_model(8, with_drafter=True).set_weight_format("float", native_attention_max_tokens=64)
    ids = torch.randint(4, 64, (2, 7))

    def forwards():
        with torch.inference_mode():
            cache, other = m.new_cache(2, 32), m.new_cache(1, 32)
            out = [m(ids, cache=cache), m(ids[:, :3], cache=cache, pattern="block", write_cache=False),
                   m(ids[:1, :4], cache=other)]
            out += m.forward_many([dict(input_ids=ids[:, :1], cache=cache),
                                   dict(input_ids=ids[:1, 2:6], cache=other, pattern="block", write_cache=False)])
            return out

    taken = []
    one_call = Attention.in_one_call
    monkeypatch.setattr(Attention, "in_one_call", lambda self, p, q: taken.append(one_call(self, p, q)) or taken[-1])
    fused = forwards()
    assert taken and all(taken)
    monkeypatch.setattr(Attention, "in_one_call", lambda self, p, q: False)
    for got, want in zip(fused, forwards(), strict=True):
        assert torch.equal(got, want)


def test_rope_takes_the_kernel_only_where_it_runs(monkeypatch):
    from tridlm.model import Attention

    dims = dict(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    fp32 = random_model(4, **dims).set_weight_format("float")
    assert not any(a.native_rope for a in fp32.modules() if isinstance(a, Attention))
    narrow = random_model(4).to(torch.bfloat16).set_weight_format("float")  # head size 8
    assert not any(a.native_rope for a in narrow.modules() if isinstance(a, Attention))
    monkeypatch.setattr(native, "unavailable", lambda: "turned off by TRIDLM_NATIVE=0")
    bf16 = random_model(4, **dims).to(torch.bfloat16).set_weight_format("float")
    assert not any(a.native_rope for a in bf16.modules() if isinstance(a, Attention))


def add_cases():
    """(y, x, w, row_scale) for the add products: row scales of 1, 0 (a token that is not a draft) and others."""
    gen = torch.Generator().manual_seed(9)
    for m, n, k in ((1, 64, 32), (5, 96, 576), (33, 32, 64), (70, 40, 96)):
        x = torch.randn(m, k, generator=gen).bfloat16()
        w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
        y = torch.randn(m, native.padded(n), generator=gen).bfloat16()
        row_scale = torch.tensor([(1.0, 0.0, 0.5)[i % 3] for i in range(m)])
        yield y, x, w, row_scale


def check_add_product(op):
    """y += s * row_scale * (x @ W.T) rounded once: within the sums' bound (scaled) plus half a bf16 step of
    the result; a row whose scale is 0 keeps y's bits; every row as it is alone; no row_scale means 1."""
    s = 0.75
    for y, x, w, row_scale in add_cases():
        n = w.shape[0]
        packed = native.pack(w)
        got = op(y.clone(), x, packed, row_scale, s)
        exact = y.double()[:, :n] + s * row_scale.double()[:, None] * (x.double() @ w.double().T)
        err = (got[:, :n].double() - exact).abs()
        allowed = s * row_scale.double()[:, None] * bound(x, w) * 1.0001 + 2.0**-8 * exact.abs() + 1e-30
        assert bool((err <= allowed).all())
        off = row_scale == 0
        assert torch.equal(got[off], y[off])
        for i in (0, x.shape[0] - 1):
            alone = op(y[i:i + 1].clone(), x[i:i + 1], packed, row_scale[i:i + 1].contiguous(), s)
            assert torch.equal(alone[0], got[i])
        ones = op(y.clone(), x, packed, None, s)
        assert torch.equal(ones, op(y.clone(), x, packed, torch.ones(x.shape[0]), s))


@needs_native
def test_the_add_product_adds_the_scaled_sums_in_one_rounding():
    check_add_product(torch.ops.tridlm.gemm_bf16_add_)


@needs_amx
def test_the_amx_add_product_adds_the_scaled_sums_in_one_rounding():
    check_add_product(torch.ops.tridlm.gemm_bf16_amx_add_)


@needs_amx
def test_the_drafted_amx_product_is_the_product_then_the_add():
    """gemm_bf16_amx_drafted (base rows, then a drafter's A rows in one packed weight, B blocks beside): the bits
    of gemm_bf16_amx over the whole weight followed by gemm_bf16_amx_add_ of the A outputs through B on the
    draft rows, for spans inside, across and outside 32-row blocks, with and without per-row scales (0 among
    them: a token that is not a draft keeps the base bits)."""
    gen = torch.Generator().manual_seed(14)
    for m, n_base, k, rank in ((1, 64, 32, 32), (9, 96, 64, 64), (40, 64, 576, 32), (88, 128, 96, 96)):
        x = torch.randn(m, k, generator=gen).bfloat16()
        base, a = (torch.randn(n, k, generator=gen).bfloat16() * 0.05 for n in (n_base, rank))
        b = torch.randn(n_base, rank, generator=gen).bfloat16() * 0.05
        w, packed_b = native.pack(torch.cat([base, a])), native.pack(b)
        spans = {(0, m), (m // 3, m), (0, (m + 1) // 2), (m // 2, m // 2)} | ({(8, 40)} if m >= 40 else set())
        for start, stop in sorted(spans):
            for scaled in (False, True):
                rs = torch.tensor([(1.0, 0.0, 0.5)[i % 3] for i in range(stop - start)]) if scaled else None
                both = torch.ops.tridlm.gemm_bf16_amx(x, w)
                want = both[:, :n_base].clone()
                xa = both[start:stop, n_base:n_base + rank].contiguous()
                torch.ops.tridlm.gemm_bf16_amx_add_(want[start:stop], xa, packed_b, rs, 0.75)
                got = torch.ops.tridlm.gemm_bf16_amx_drafted(x, w, n_base, packed_b, rs, start, stop, 0.75)
                assert torch.equal(got, want), (m, start, stop, scaled)


@needs_native
def test_the_add_products_refuse_an_addend_of_another_shape():
    x, w = torch.ones(3, 64, dtype=torch.bfloat16), native.pack(torch.ones(32, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="of the product's shape"):
        torch.ops.tridlm.gemm_bf16_add_(torch.zeros(2, 32, dtype=torch.bfloat16), x, w, None, 1.0)
    with pytest.raises(RuntimeError, match="one fp32 value per row"):
        torch.ops.tridlm.gemm_bf16_add_(torch.zeros(3, 32, dtype=torch.bfloat16), x, w, torch.ones(2), 1.0)


@needs_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_rows_is_torchs_argmax_with_the_banned_id_left_out(dtype):
    """The first index of the largest value, the banned id never (unless every other value is -inf and it
    is first: torch's answer then too), the first NaN where there is one: at vocabularies that are and are
    not a multiple of the kernel's 16 lanes, the banned id in either part."""
    from tridlm.decoding.sampling import ban

    gen = torch.Generator().manual_seed(10)
    for V in (1, 15, 16, 100, 49152):
        x = torch.randn(12, V, generator=gen).to(dtype)
        x[1] = x[1].round()  # many ties
        x[2, :] = float("-inf")
        if V > 3:
            x[3, V // 2] = float("nan")
            x[3, V - 1] = float("nan")
            x[4, 0] = x[4].max() + 1  # the largest value at the banned id
            x[5, V - 1] = x[5].max() + 1
            x[6, V // 3] = float("inf")
        for banned in {0, V - 1, V // 2, -1}:
            expected = ban(x, None if banned < 0 else banned).argmax(-1)
            got = torch.ops.tridlm.argmax_rows(x, banned)
            assert torch.equal(got, expected), (V, banned)
        assert torch.equal(torch.ops.tridlm.argmax_rows(x.view(3, 4, V), 0), ban(x, 0).argmax(-1).view(3, 4))


needs_avx512_torch = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                        reason="torch's CPU kernels run below AVX-512 here: the confidence kernel "
                                               "is not their bits and is not used")


@needs_native
@needs_avx512_torch
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_confidence_is_torchs_argmax_and_softmax_bit_for_bit(dtype):
    """The picks of argmax_rows and their probabilities exactly as torch's softmax of the banned fp32 copy
    gives them (tridlm.decoding.sampling's path without the kernel): vocabularies that are and are not a
    multiple of 16 lanes, flat and peaked rows, ties, the largest value at the banned id, -inf, a NaN."""
    from tridlm.decoding.sampling import ban

    gen = torch.Generator().manual_seed(11)
    for V in (1, 15, 16, 100, 49152, 50000):
        for spread in (0.1, 1.0, 8.0):
            x = (torch.randn(10, V, generator=gen) * spread).to(dtype)
            if V > 3:
                x[1] = x[1].round()  # ties
                x[2, 0] = x[2].max() + 1  # the largest value at the banned id
                x[3, V // 2] = float("-inf")
                x[4, V // 3] = float("nan")
                x[5, :] = float("-inf")
                x[5, V - 1] = 0.0
            for banned in {0, V // 2, -1}:
                b = None if banned < 0 else banned
                ids, conf = torch.ops.tridlm.greedy_confidence(x, banned)
                expected = ban(x, b).argmax(-1)
                assert torch.equal(ids, expected), (V, spread, banned)
                p = ban(x, b).softmax(-1).gather(-1, expected[:, None])[:, 0]
                assert torch.equal(conf.isnan(), p.isnan()), (V, spread, banned)
                assert torch.equal(conf.nan_to_num(), p.nan_to_num()), (V, spread, banned)
    ids, conf = torch.ops.tridlm.greedy_confidence(x.view(2, 5, V), 0)
    assert ids.shape == conf.shape == (2, 5) and conf.dtype == torch.float32


@needs_native
def test_greedy_picks_the_same_ids_through_either_argmax(monkeypatch):
    from tridlm.decoding import sampling

    logits = torch.randn(4, 300).bfloat16()
    logits[:, 7] = 100.0  # the banned id would win
    for own in (False, True):
        monkeypatch.setattr(sampling, "_own_argmax", {torch.bfloat16: own})
        assert torch.equal(sampling.greedy(logits, 7), logits.float().clone().index_fill_(1, torch.tensor([7]),
                                                                                            float("-inf")).argmax(-1))


@needs_native
def test_kv_write_stores_each_rows_entries_after_its_own_length(monkeypatch):
    """The one-call write of rows at different lengths against slice assignments row by row, through a view
    of some rows of a larger cache (as a batch holds its rows): the same entries, nothing else touched, and
    a row that would overflow refused before anything is written. KVCache.write gives the same through the
    op and through torch's indexing (where the op is not loaded)."""
    from tridlm.cache import KVCache

    gen = torch.Generator().manual_seed(13)
    for dtype in (torch.bfloat16, torch.float32):
        store = KVCache(2, 7, 3, 64, 24, dtype=dtype)
        store.k.normal_(generator=gen)
        store.v.normal_(generator=gen)
        store.lengths.copy_(torch.tensor([5, 0, 3, 11, 2, 20, 9]))
        ref = store.clone()
        rows = store.rows(1, 6)
        k, v = (torch.randn(5, 4, 3, 64, generator=gen).to(dtype).transpose(1, 2) for _ in range(2))
        for b in range(5):
            n = int(ref.lengths[1 + b])
            ref.k[1, 1 + b, :, n:n + 4], ref.v[1, 1 + b, :, n:n + 4] = k[b], v[b]
        indexed, through_op = store.clone(), store.clone()
        torch.ops.tridlm.kv_write(rows.k[1], rows.v[1], rows.lengths, k, v)
        assert torch.equal(store.k, ref.k) and torch.equal(store.v, ref.v)
        through_op.rows(1, 6).write(1, k, v, None)
        with monkeypatch.context() as m:
            m.setattr(KVCache, "_native_write", lambda *a: False)
            indexed.rows(1, 6).write(1, k, v, None)
        for c in (indexed, through_op):
            assert torch.equal(c.k, ref.k) and torch.equal(c.v, ref.v)
        before = store.k.clone()
        five = torch.ones(5, 3, 5, 64, dtype=dtype)  # store row 5 holds 20 of 24 slots
        with pytest.raises(RuntimeError, match="do not fit"):
            torch.ops.tridlm.kv_write(rows.k[1], rows.v[1], rows.lengths, five, five)
        assert torch.equal(store.k, before)
