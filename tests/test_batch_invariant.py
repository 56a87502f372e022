"""Batch-invariant forwards (TriModeLM.set_batch_invariant): a row's bits do not depend on what shares its
forward, so greedy results are the same alone and batched, and greedy self-speculation is AR exactly."""

from __future__ import annotations

import argparse

import pytest
import torch
from conftest import random_model
from test_native import REASON, attention_model, needs_native

from tridlm.commands.serve import checked_batch_invariant

MODES = ("ar", "diffusion", "spec", "spec-quadratic")


@pytest.fixture(scope="module")
def invariant_model():
    if REASON is not None:  # tridlm's attention is what makes attention invariant
        pytest.skip(f"tridlm.native unavailable here: {REASON}")
    torch.manual_seed(0)
    return attention_model(3, with_drafter=True).set_batch_invariant()


@needs_native
def test_attention_bits_depend_only_on_the_visible_keys_in_order():
    """Queries over the same visible keys, laid out two ways: all in the cache beside the query's own new key
    (an AR step); and, per row, some in the cache and the rest among new tokens at random slots between
    hidden ones, the rows padded to one width (a batched verify block of quadratic self-speculation). Both
    give the same bits: hidden slots, padding and where the cache ends change nothing. (A sum ordered by
    slot instead of by key rounds otherwise in about one bf16 output in 10^4 to 10^5: too rarely for a test
    this size to see, but through the default model's 30 layers in bf16, with tridlm's attention at every
    width, it made greedy spec-quadratic leave AR's tokens on 2 of 16 prompts.)"""
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, D, n, T = 512, 8, 2, 128, 64, 24
    keys, values = (torch.randn(B, Hkv, n + 1, D, generator=gen).bfloat16() for _ in range(2))  # + the query's
    q = torch.randn(B, H, 1, D, generator=gen).bfloat16()
    ar = torch.ops.tridlm.attend_bf16(q, keys[:, :, :n], values[:, :, :n], torch.full((B,), n), keys[:, :, n:],
                                      values[:, :, n:], torch.ones(B, 1, 1, dtype=torch.bool), D ** -0.5)
    k_cache, v_cache = (torch.randn(B, Hkv, n, D, generator=gen).bfloat16() * 4 for _ in range(2))  # stale slots
    k_new, v_new = (torch.randn(B, Hkv, T, D, generator=gen).bfloat16() * 4 for _ in range(2))  # hidden: junk
    q_new = torch.randn(B, H, T, D, generator=gen).bfloat16()
    mask = torch.eye(T, dtype=torch.bool).repeat(B, 1, 1)
    lengths = torch.zeros(B, dtype=torch.long)
    queries = []
    for b in range(B):
        c = int(torch.randint(n - T + 2, n - 4, (1,), generator=gen))  # keys in the cache; the rest are new
        lengths[b] = c
        k_cache[b, :, :c], v_cache[b, :, :c] = keys[b, :, :c], values[b, :, :c]
        width = int(torch.randint(n - c + 1, T + 1, (1,), generator=gen))  # this row's new tokens; the rest pad
        slots = torch.randperm(width - 1, generator=gen)[:n - c].sort().values  # the visible ones, in order
        k_new[b, :, slots], v_new[b, :, slots] = keys[b, :, c:n], values[b, :, c:n]
        query = width - 1
        queries.append(query)
        k_new[b, :, query], v_new[b, :, query], q_new[b, :, query] = keys[b, :, n], values[b, :, n], q[b, :, 0]
        mask[b, query, slots] = True
        mask[b, :, width:] = False  # padding: seen by no one
        mask[b, width:] = torch.eye(T, dtype=torch.bool)[width:]
    out = torch.ops.tridlm.attend_bf16(q_new, k_cache, v_cache, lengths, k_new, v_new, mask, D ** -0.5)
    assert torch.equal(out[torch.arange(B), torch.tensor(queries)], ar[:, 0])


@needs_native
def test_greedy_rows_are_the_same_alone_and_batched_in_every_mode(invariant_model):
    """Prompts of different lengths (padding), batched and one by one: the same tokens in every mode; greedy
    self-speculation, both variants, gives AR's tokens."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(4, 64, (n,), generator=gen).tolist() for n in (3, 11, 6, 17, 9)]
    got = {}
    with torch.inference_mode():
        for mode in MODES:
            batched = invariant_model.generate(prompts, mode, max_new_tokens=20, ignore_eos=True, block_length=4)
            alone = [invariant_model.generate([p], mode, max_new_tokens=20, ignore_eos=True, block_length=4)
                     for p in prompts]
            got[mode] = [r.rows[0].ids for r in alone]
            assert [r.ids for r in batched.rows] == got[mode], mode
    assert got["spec"] == got["ar"]
    assert got["spec-quadratic"] == got["ar"]


@needs_native
def test_batches_stepped_together_give_every_row_its_solo_tokens(invariant_model):
    """One batch per mode, all stepped in one forward each time (`step_together`, as the server's runner
    does), the rows joining at different steps: every row gets the tokens it gets alone, bit for bit."""
    from tridlm.decoding import DecodeBatch, GenerationParams, Row
    from tridlm.decoding.batch import step_together

    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(4, 64, (n,), generator=gen).tolist() for n in (3, 11, 6, 17, 9, 5)]

    def row(i, mode):
        p = GenerationParams(mode=mode, max_new_tokens=14, ignore_eos=True, block_length=4)
        return Row(prompts[i], p, invariant_model.config)

    with torch.inference_mode():
        alone = {(i, m): invariant_model.generate([prompts[i]], m, max_new_tokens=14, ignore_eos=True,
                                                  block_length=4).rows[0].ids for i in range(6) for m in MODES}
        batches = {m: DecodeBatch(invariant_model) for m in MODES}
        rows = {}
        for step in range(200):
            if step < 6:  # a row of every mode joins at each of the first steps
                for m in MODES:
                    rows[(step, m)] = row(step, m)
                    batches[m].add(rows[(step, m)])
            if all(b.done for b in batches.values()):
                break
            step_together(list(batches.values()))
    assert {k: r.output for k, r in rows.items()} == alone


@needs_native
def test_a_draft_token_beside_base_tokens_gets_the_bits_of_an_all_draft_forward(invariant_model):
    """In one batch some rows draft (the LoRA drafter on) while others verify (off): each token's products
    are those of a forward in which every token is of its own kind."""
    group = invariant_model.encoder.layers[0].mlp.gate_up
    gate = group._gate_src
    x = torch.randn(1, 40, invariant_model.config.hidden_size).bfloat16()
    draft = torch.rand(1, 40, 1) < 0.5
    with torch.inference_mode():
        gate.value = "all"
        all_draft = group(x)[0]
        gate.value = None
        no_draft = group(x)[0]
        gate.value = draft.to(x.dtype)
        mixed = group(x)[0]
        gate.value = None
    d = draft[..., 0]
    assert torch.equal(mixed[d], all_draft[d])
    assert torch.equal(mixed[~d], no_draft[~d])
    # a joint forward names the span that holds its drafts (`DraftGate.rows`): the delta is added there only,
    # with the bits it has in a forward that adds it everywhere
    draft[:, :9] = draft[:, 31:] = False
    with torch.inference_mode():
        gate.value = draft.to(x.dtype)
        everywhere = group(x)[0]
        gate.rows = slice(9, 31)
        spanned = group(x)[0]
        draft[:, 35] = True  # a draft outside the named span gets no delta: the span is what is read
        gate.value = draft.to(x.dtype)
        outside = group(x)[0]
        gate.value = gate.rows = None
    assert torch.equal(spanned, everywhere) and torch.equal(outside, everywhere)
    assert not torch.equal(spanned[:, 9:31], no_draft[:, 9:31])


@needs_native
def test_each_weight_takes_a_kernel_this_machine_runs(monkeypatch):
    """The choice is among the kernels that run here, and torch's alone where the packed layout misfits."""
    from tridlm import kernels, native

    w = torch.randn(64, 64).bfloat16()
    runs = ("torch", "native") + (() if native.amx_unavailable() else ("amx",))
    assert kernels.invariant_choice(w, native_fits=True, rows=8)[1] in runs
    assert kernels.invariant_choice(w, native_fits=False, rows=8)[1] == "torch"
    monkeypatch.setattr(native, "amx_unavailable", lambda: "this CPU lacks amx_tile")
    assert kernels.invariant_choice(w, native_fits=True, rows=8)[1] in ("torch", "native")


def test_batch_invariance_needs_a_bf16_model_and_says_so():
    with pytest.raises(ValueError, match=r"bf16 model.*\.to\(torch\.bfloat16\)"):
        random_model(0).set_batch_invariant()


@pytest.mark.parametrize("flags, message", [
    ({"dtype": "float32"}, "drop --dtype float32"),
    ({"kernels": "compiled"}, "drop --kernels compiled"),
    ({"device": "cuda"}, "pass --device cpu"),
])
def test_serve_refuses_batch_invariance_with_conflicting_flags_before_loading(flags, message):
    args = argparse.Namespace(**{"dtype": None, "kernels": "eager", "device": "cpu", **flags})
    with pytest.raises(SystemExit, match=message):
        checked_batch_invariant(args, args.device)


def test_serve_batch_invariance_implies_bf16():
    args = argparse.Namespace(dtype=None, kernels="eager")
    checked_batch_invariant(args, "cpu")
    assert args.dtype == "bfloat16"


@needs_native
def test_rows_beside_a_lazy_logits_row_get_their_solo_logits(invariant_model, monkeypatch):
    """A quadratic self-speculation row makes its call return hidden states (its head runs on indexing);
    the rows beside it then get the head's product here, once for all of them: the bits of their logits
    must be those they get in a call of their own."""
    from tridlm.decoding import DecodeBatch, GenerationParams, Row, spec_quadratic
    from tridlm.decoding.diffusion import Diffusion

    monkeypatch.setattr(spec_quadratic, "LAZY_LOGITS_ABOVE", 0)  # every cycle reads its logits on demand
    seen: dict[int, list[torch.Tensor]] = {}
    consume = Diffusion.consume_decode

    def recording(self, row, plan, logits):
        seen.setdefault(id(row), []).append(logits.clone())
        return consume(self, row, plan, logits)

    monkeypatch.setattr(Diffusion, "consume_decode", recording)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 64, (n,), generator=gen).tolist() for n in (5, 9, 4)]

    def row(i, mode):
        p = GenerationParams(mode=mode, max_new_tokens=10, ignore_eos=True, block_length=4)
        return Row(prompts[i], p, invariant_model.config)

    with torch.inference_mode():
        alone = [row(i, "diffusion") for i in range(2)]
        beside = [row(i, "diffusion") for i in range(2)]
        for r in alone:
            b = DecodeBatch(invariant_model, [r])
            while not b.done:
                b.step()
        mixed = DecodeBatch(invariant_model, [beside[0], row(2, "spec-quadratic"), beside[1]])
        while not mixed.done:
            mixed.step()
    for a, b in zip(alone, beside, strict=True):
        assert len(seen[id(a)]) == len(seen[id(b)]) > 1
        assert all(torch.equal(x, y) for x, y in zip(seen[id(a)], seen[id(b)], strict=True))
        assert a.output == b.output


@needs_native
def test_quadratic_speculation_gives_the_same_tokens_with_logits_on_demand_or_in_the_forward(invariant_model,
                                                                                            monkeypatch):
    from tridlm.decoding import spec_quadratic

    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(4, 64, (n,), generator=gen).tolist() for n in (4, 10)]
    got = []
    with torch.inference_mode():
        for above in (0, 1000):  # lazy every cycle, then never
            monkeypatch.setattr(spec_quadratic, "LAZY_LOGITS_ABOVE", above)
            out = invariant_model.generate(prompts, "spec-quadratic", max_new_tokens=12, ignore_eos=True,
                                           block_length=3)
            got.append([r.ids for r in out.rows])
        ar = invariant_model.generate(prompts, "ar", max_new_tokens=12, ignore_eos=True)
    assert got[0] == got[1] == [r.ids for r in ar.rows]
