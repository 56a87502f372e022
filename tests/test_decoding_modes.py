"""Every decoding mode on small random-weight models: losslessness, batching, accounting, limits."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import GreedyContract, assert_logits_agree, random_model
from hypothesis import given, settings
from hypothesis import strategies as st

from tridlm.decoding import POLICIES, DecodeBatch, GenerationParams, Row, sampling
from tridlm.decoding.spec import Spec
from tridlm.decoding.spec_quadratic import SpecQuadratic

MAX_NEW = 24
SPEC_MODES = ("spec", "spec-quadratic")
ALL_MODES = ("ar", "diffusion", "spec", "spec-quadratic")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return random_model(0)


def lively_model(seed: int, vocab: int = 12):
    """A random model whose attention is scaled up so its outputs depend on the context (plain
    random weights fill a diffusion block with one repeated token); vocab 12 makes drafts agree
    with the verifier often enough to accept several tokens per block."""
    m = random_model(seed, vocab_size=vocab, hidden_size=64)
    with torch.no_grad():
        for layer in m.encoder.layers:
            layer.self_attn.o_proj.weight *= 4
            layer.self_attn.v_proj.weight *= 2
    return m


@pytest.fixture(scope="module")
def small_vocab():
    return lively_model(0)


def prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 3, 5, 8, 13, 17, 30][:n]
    return [torch.randint(4, vocab, (k,), generator=g).tolist() for k in lengths]


def ar_ids(model, prompt, **kw) -> list[int]:
    return model.generate(prompt, "ar", **kw).ids


class OracleDrafts:
    """Drafts from a reference continuation with some tokens corrupted: any drafts must leave the
    output unchanged, and good ones make the verifier accept long prefixes (up to the whole block)."""

    def __init__(self, refs: dict[tuple, list[int]], vocab: int, mask_id: int, p_wrong: float = 0.25):
        self.refs, self.vocab, self.mask_id, self.p_wrong = refs, vocab, mask_id, p_wrong
        self.rng = random.Random(0)

    def tokens(self, row, k: int) -> torch.Tensor:
        ref = self.refs[tuple(row.prompt)]
        start = len(row.output)  # the drafts follow the last emitted token (or the prompt)
        out = []
        for i in range(k):
            t = ref[start + i] if start + i < len(ref) else 4
            if self.rng.random() < self.p_wrong:
                t = (t + 1) % self.vocab
                if t == self.mask_id:
                    t = (t + 1) % self.vocab
            out.append(t)
        return torch.tensor(out, dtype=torch.long)

    def install(self, monkeypatch):
        oracle = self

        def linear_draft(self, row, st, masked, logits):
            st.block[masked] = oracle.tokens(row, masked.numel())
            st.passes += 1
            row.metrics.denoise_passes.append(st.passes)

        def quadratic_draft(self, row, draft_logits):
            return oracle.tokens(row, draft_logits.shape[0]), None

        monkeypatch.setattr(Spec, "_draft", linear_draft)
        monkeypatch.setattr(SpecQuadratic, "_draft", quadratic_draft)


# -- losslessness at greedy -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", SPEC_MODES)
def test_self_speculation_equals_ar_greedy(model, mode):
    """The verify pass is a wider forward than AR's (other kernels): equal up to near ties (README)."""
    contract = GreedyContract(model)
    for p in prompts(8, 64):
        ref = ar_ids(model, p, max_new_tokens=MAX_NEW, ignore_eos=True)
        assert len(ref) == MAX_NEW
        for L in (1, 2, 7, 32):
            out = model.generate(p, mode, max_new_tokens=MAX_NEW, block_length=L, ignore_eos=True)
            contract.same(p, out.ids, ref)
    contract.assert_rare()


@pytest.mark.parametrize("mode", SPEC_MODES)
def test_self_speculation_equals_ar_with_long_acceptances(small_vocab, mode, monkeypatch):
    m = small_vocab
    ps = prompts(6, 12, seed=1)
    refs = {tuple(p): ar_ids(m, p, max_new_tokens=40, ignore_eos=True) for p in ps}
    OracleDrafts(refs, 12, m.config.mask_token_id).install(monkeypatch)
    contract = GreedyContract(m)
    longest = 0
    for L in (2, 7, 32):
        for p in ps:
            out = m.generate(p, mode, max_new_tokens=40, block_length=L, ignore_eos=True)
            contract.same(p, out.ids, refs[tuple(p)])
            longest = max(longest, max(out.metrics.acceptance_lengths))
        batch = m.generate(ps, mode, max_new_tokens=40, block_length=L, ignore_eos=True)
        for p, r in zip(ps, batch.rows, strict=True):
            contract.same(p, r.ids, refs[tuple(p)])
    assert longest >= 8  # whole runs of drafts were accepted and the cache cropped after them
    # a batch whose rows end at an EOS at different points, inside accepted runs
    eos = next(e for e in range(4, 12) if len({r.index(e) if e in r else 40 for r in refs.values()}) >= 3)
    want = [r[:r.index(eos) + 1] if eos in r else r for r in (refs[tuple(p)] for p in ps)]
    for L in (3, 8):
        batch = m.generate(ps, mode, max_new_tokens=40, block_length=L, eos_token_id=eos)
        for p, r, w in zip(ps, batch.rows, want, strict=True):
            contract.same(p, r.ids, w)
    contract.assert_rare()


@pytest.mark.parametrize("mode", ALL_MODES)
def test_eos_ends_the_row_wherever_it_lands(small_vocab, mode, monkeypatch):
    """With EOS on, the output is the EOS-free output cut just after the first EOS -- also when the
    EOS falls inside a block or an accepted prefix."""
    m = small_vocab
    ps = prompts(6, 12, seed=2)
    refs = {tuple(p): ar_ids(m, p, max_new_tokens=40, ignore_eos=True) for p in ps}
    if mode in SPEC_MODES:
        OracleDrafts(refs, 12, m.config.mask_token_id).install(monkeypatch)
    checked = 0
    for p in ps:
        free = m.generate(p, mode, max_new_tokens=40, block_length=7, ignore_eos=True).ids
        for j in range(1, len(free)):
            eos = free[j]
            if eos in free[:j] or j % 7 in (0, 6):  # the first occurrence, strictly inside a block
                continue
            out = m.generate(p, mode, max_new_tokens=40, block_length=7, eos_token_id=eos)
            assert out.ids == free[:j + 1] and out.finish_reason == "eos", (len(p), j)
            checked += 1
            break
    assert checked >= 3


def test_diffusion_block_length_1_equals_ar(model):
    """Exact: at block length 1 diffusion runs AR's own forwards (one token, same cache), no other kernel."""
    for p in prompts(8, 64):
        ref = ar_ids(model, p, max_new_tokens=MAX_NEW, ignore_eos=True)
        out = model.generate(p, "diffusion", max_new_tokens=MAX_NEW, block_length=1, ignore_eos=True)
        assert out.ids == ref
        assert out.metrics.forwards == MAX_NEW  # one commit pass per token, no denoise pass


# -- batching -----------------------------------------------------------------------------------------
def _eos_that_staggers(model, ps, mode, **kw) -> int:
    """A token id that, as EOS, ends the rows' greedy outputs at different lengths."""
    refs = [model.generate(p, mode, ignore_eos=True, **kw).ids for p in ps]
    for e in range(4, model.config.vocab_size):
        ends = {r.index(e) if e in r else len(r) for r in refs}
        if len(ends) >= 3:
            return e
    raise AssertionError("no staggering EOS candidate")


@pytest.mark.parametrize("mode,extra", [
    ("ar", {}),
    ("diffusion", {"block_length": 4}),
    ("diffusion", {"block_length": 5, "selection_policy": "low_confidence", "steps": 2}),
    ("diffusion", {"block_length": 8, "threshold": 0.2, "selection_policy": "margin"}),
    ("spec", {"block_length": 5}),
    ("spec", {"block_length": 6, "threshold": 0.3}),
    ("spec-quadratic", {"block_length": 4}),
])
def test_batched_rows_equal_each_row_alone(small_vocab, mode, extra):
    m = small_vocab
    ps = prompts(6, 12, seed=3)
    eos = _eos_that_staggers(m, ps, mode, max_new_tokens=30, **extra)
    kw = dict(max_new_tokens=30, eos_token_id=eos, **extra)
    alone = [m.generate(p, mode, **kw) for p in ps]
    batch = m.generate(ps, mode, **kw)
    assert len({len(a.ids) for a in alone}) >= 2  # the rows did stop at different times
    # a batch is a wider forward than one row (other kernels): greedy rows agree up to near ties (README)
    contract = GreedyContract(m) if mode != "diffusion" else None
    for p, r, a in zip(ps, batch.rows, alone, strict=True):
        if contract is not None and not contract.same(p, r.ids, a.ids):
            continue
        assert r.ids == a.ids  # diffusion: exact here (README: its confidence ranking has near ties too)
        assert r.finish_reason == a.finish_reason
        assert r.metrics.forwards == a.metrics.forwards
        assert r.metrics.acceptance_lengths == a.metrics.acceptance_lengths
    if contract is not None:
        contract.assert_rare()


def test_rows_of_mixed_modes_join_and_leave_between_steps(small_vocab):
    """The server contract: rows of any modes share a DecodeBatch, join mid-run, leave when done."""
    m = small_vocab
    ps = prompts(5, 12, seed=4)
    cfgs = [("ar", {}), ("diffusion", {"block_length": 4}), ("spec", {"block_length": 5}),
            ("spec-quadratic", {"block_length": 3}), ("diffusion", {"block_length": 6, "steps": 2})]
    want = [m.generate(p, mode, max_new_tokens=20, ignore_eos=True, **kw).ids
            for p, (mode, kw) in zip(ps, cfgs, strict=True)]
    rows = [Row(p, GenerationParams(mode=mode, max_new_tokens=20, ignore_eos=True, **kw), m.config)
            for p, (mode, kw) in zip(ps, cfgs, strict=True)]
    batch = DecodeBatch(m, rows[:2])
    steps = 0
    with torch.inference_mode():
        while not batch.done or steps < 3:
            if steps == 3:
                batch.add(*rows[2:4])
            if steps == 7:
                batch.add(rows[4])
            batch.step()
            steps += 1
    contract = GreedyContract(m)
    for p, r, w in zip(ps, rows, want, strict=True):
        if r.params.mode != "diffusion":
            contract.same(p, r.output, w)
        else:
            assert r.output == w
    contract.assert_rare()
    assert all(r.finished for r in rows) and batch.cache is None


def test_a_joining_prompt_prefills_in_a_call_of_its_own(small_vocab):
    """Rows decoding one token each, then a row with a long prompt joins: the step makes two calls (the
    decoding rows at width 1, the new row's prompt at its own width) instead of padding every row to the
    prompt, and each row's cache moves on by what it wrote."""
    from tridlm.decoding.batch import step_together

    m = small_vocab
    params = GenerationParams(mode="ar", max_new_tokens=8, ignore_eos=True)
    old = [Row(p, params, m.config) for p in prompts(3, 12, seed=5)]
    new = Row(prompts(1, 12, seed=6)[0] * 4 + [3], params, m.config)
    batch = DecodeBatch(m, old)
    with torch.inference_mode():
        batch.step()  # the prefill of the first rows
        batch.step()  # their first decode step
        before = [r.cached for r in old]
        batch.add(new)
        step = step_together([batch])[0]
    assert step.spans == [(0, 3), (3, 4)]
    assert step.tokens == 3 + len(new.prompt) - 1
    assert [r.cached for r in old] == [c + 1 for c in before] and new.cached == len(new.prompt) - 1
    assert batch.cache.lengths.tolist() == [r.cached for r in batch.rows]


def test_rows_that_leave_mid_batch_leave_the_others_entries_intact(small_vocab):
    """Rows of several lengths finish in the middle of the batch (the last row moves into each slot) and new
    rows join into the room left: every row keeps its cache entries bit for bit wherever it moves, and makes
    its solo tokens. A row that is still prefilling stays last when a row before it leaves, so its next
    prompt chunk is still a call of its own."""
    from tridlm.decoding.batch import step_together

    def entries(batch):
        c = batch.cache
        return {id(r): (c.k[:, i, :, :r.cached].clone(), c.v[:, i, :, :r.cached].clone())
                for i, r in enumerate(batch.rows)}

    def kept(batch, before):
        c = batch.cache
        assert c.lengths.tolist() == [r.cached for r in batch.rows]
        for i, r in enumerate(batch.rows):
            if id(r) in before:
                k, v = before[id(r)]
                assert torch.equal(c.k[:, i, :, :k.shape[2]], k) and torch.equal(c.v[:, i, :, :v.shape[2]], v)

    m = small_vocab
    ps = prompts(7, 12, seed=8)
    lengths = [12, 3, 9, 2, 12, 6, 8]
    want = [m.generate(p, "ar", max_new_tokens=n, ignore_eos=True).ids for p, n in zip(ps, lengths, strict=True)]
    rows = [Row(p, GenerationParams(mode="ar", max_new_tokens=n, ignore_eos=True), m.config)
            for p, n in zip(ps, lengths, strict=True)]
    batch = DecodeBatch(m, rows[:5])
    with torch.inference_mode():
        for step in range(40):
            if step == 4:  # rows 3 and 1 have left from the middle by now
                assert [r for r in rows[:5] if r.finished] == [rows[1], rows[3]]
                batch.add(*rows[5:])
            if batch.done:
                break
            before = entries(batch)
            batch.step()
            if not batch.done:
                kept(batch, before)
    contract = GreedyContract(m)
    for p, r, w in zip(ps, rows, want, strict=True):
        contract.same(p, r.output, w)
    contract.assert_rare()
    assert all(r.finished for r in rows) and batch.cache is None

    params = GenerationParams(mode="ar", max_new_tokens=6, ignore_eos=True)
    first = [Row(p, params, m.config) for p in prompts(3, 12, seed=9)]
    long = Row(prompts(1, 12, seed=10)[0] * 6, params, m.config)
    long.prefill_chunk = 4  # several steps of prompt
    batch = DecodeBatch(m, first)
    with torch.inference_mode():
        batch.step()
        batch.add(long)
        batch.step()  # the long prompt's first chunk
        before = entries(batch)
        batch.remove(first[0])
        assert batch.rows[2] is long and set(map(id, batch.rows[:2])) == {id(first[1]), id(first[2])}
        assert not long.prefilled
        kept(batch, before)
        step = step_together([batch])[0]
    assert step.spans == [(0, 2), (2, 3)]
    assert batch.cache.lengths.tolist() == [r.cached for r in batch.rows]


def test_cancelled_row_leaves_others_unchanged(small_vocab):
    m = small_vocab
    ps = prompts(3, 12, seed=5)
    want = [m.generate(p, "spec", max_new_tokens=20, ignore_eos=True, block_length=4).ids for p in ps]
    params = GenerationParams(mode="spec", max_new_tokens=20, ignore_eos=True, block_length=4)
    rows = [Row(p, params, m.config) for p in ps]
    batch = DecodeBatch(m, rows)
    with torch.inference_mode():
        for _ in range(4):
            batch.step()
        batch.remove(rows[1])
        while not batch.done:
            batch.step()
    contract = GreedyContract(m)
    contract.same(ps[0], rows[0].output, want[0])
    contract.same(ps[2], rows[2].output, want[2])
    contract.same(ps[1], rows[1].output, want[1][:len(rows[1].output)])
    contract.assert_rare()
    assert not rows[1].finished and len(rows[1].output) < len(want[1])


# -- forward accounting --------------------------------------------------------------------------------
def test_ar_accounting(model):
    for p in ([7], [5, 6, 7, 8]):
        out = model.generate(p, "ar", max_new_tokens=17, ignore_eos=True)
        m = out.metrics
        assert m.generated_tokens == 17 and m.forwards == 17 and m.tokens_per_forward == 1.0
        assert m.prefill_forwards == (0 if len(p) == 1 else 1)
        assert out.rows[0].metrics.forwards == 17


def test_diffusion_accounting_and_steps(model):
    # block 4: a seed from the causal pass + 3 masks; low_confidence commits ceil(masks / passes left)
    for steps, passes in ((1, 1), (2, 2), (3, 3), (4, 3), (32, 3)):
        out = model.generate([5, 6, 7], "diffusion", max_new_tokens=16, block_length=4, steps=steps,
                             selection_policy="low_confidence", ignore_eos=True)
        m = out.metrics
        assert m.generated_tokens == 16 and m.denoise_passes == [passes] * 4
        # 4 commit passes (the first commits the prompt's last token; none after the final block)
        assert m.forwards == 4 + 4 * passes and m.prefill_forwards == 1
        assert m.tokens_per_forward == pytest.approx(16 / (4 + 4 * passes))
    # threshold 0 commits every mask in one pass; a threshold never met commits one token per pass
    kw = dict(max_new_tokens=16, block_length=8, ignore_eos=True)
    m0 = model.generate([5, 6], "diffusion", threshold=0.0, **kw)
    assert m0.metrics.denoise_passes == [1, 1]
    m1 = model.generate([5, 6], "diffusion", threshold=1.0, **kw)
    assert m1.metrics.denoise_passes == [7, 7]
    lc = model.generate([5, 6], "diffusion", selection_policy="low_confidence", **kw)
    assert lc.ids == m1.ids  # both commit the single most confident token per pass


def test_spec_accounting(small_vocab, monkeypatch):
    m = small_vocab
    p = [5, 6, 7, 8]
    refs = {tuple(p): ar_ids(m, p, max_new_tokens=50, ignore_eos=True)}
    OracleDrafts(refs, 12, m.config.mask_token_id).install(monkeypatch)
    lin = m.generate(p, "spec", max_new_tokens=50, block_length=6, ignore_eos=True).metrics
    cycles = len(lin.acceptance_lengths)
    # one draft + one verify pass per cycle (a last one-token block has nothing to draft)
    assert lin.denoise_passes == [1] * len(lin.denoise_passes) and len(lin.denoise_passes) >= cycles - 1
    assert lin.forwards == len(lin.denoise_passes) + cycles and lin.prefill_forwards == 1
    assert sum(lin.acceptance_lengths) == 50 == lin.generated_tokens
    assert all(1 <= a <= 6 for a in lin.acceptance_lengths) and max(lin.acceptance_lengths) == 6
    quad = m.generate(p, "spec-quadratic", max_new_tokens=50, block_length=6, ignore_eos=True).metrics
    assert quad.forwards == len(quad.acceptance_lengths)  # one forward per cycle
    assert sum(quad.acceptance_lengths) == 50 and quad.acceptance_lengths[0] == 1  # no draft yet
    assert quad.tokens_per_forward > lin.tokens_per_forward
    d = quad.to_dict()
    assert sum(d["acceptance_length_histogram"].values()) == len(quad.acceptance_lengths)
    assert d["acceptance_length_mean"] == pytest.approx(50 / len(quad.acceptance_lengths))


def test_spec_threshold_drafting_counts_its_passes(model):
    out = model.generate([5, 6, 7], "spec", max_new_tokens=20, block_length=8, threshold=1.0, ignore_eos=True)
    m = out.metrics
    # a threshold never met drafts one token per pass: 7 passes, then the verify pass (the blocks
    # shrink only within 8 tokens of the limit)
    assert m.denoise_passes[:5] == [7] * 5
    assert m.forwards == sum(m.denoise_passes) + len(m.acceptance_lengths)
    contract = GreedyContract(model)
    contract.same([5, 6, 7], out.ids, ar_ids(model, [5, 6, 7], max_new_tokens=20, ignore_eos=True))
    contract.assert_rare()


def test_threshold_is_each_modes_own_threshold(model):
    """`threshold` names diffusion's commit_threshold and spec's draft_threshold: the same tokens either way."""
    kw = dict(max_new_tokens=12, block_length=4, ignore_eos=True)
    for mode, own in (("diffusion", "commit_threshold"), ("spec", "draft_threshold")):
        by_alias = model.generate([5, 6, 7], mode, threshold=0.6, **kw)
        by_name = model.generate([5, 6, 7], mode, **{own: 0.6}, **kw)
        assert by_alias.ids == by_name.ids and by_alias.metrics.forwards == by_name.metrics.forwards
    p = GenerationParams(mode="spec", commit_threshold=0.3).resolve(model.config)
    assert (p.commit_threshold, p.draft_threshold, p.threshold) == (0.3, 0.0, 0.0)  # the mode's own, resolved
    p = GenerationParams(mode="diffusion").resolve(model.config)
    assert (p.commit_threshold, p.draft_threshold, p.threshold) == (0.9, 0.0, 0.9)


def test_parameters_are_resolved_once_per_request(model, monkeypatch):
    calls = []
    resolve = GenerationParams.resolve

    def counted(self, *a, **k):
        calls.append(self.mode)
        return resolve(self, *a, **k)

    monkeypatch.setattr(GenerationParams, "resolve", counted)
    for mode in ("ar", "diffusion", "spec"):
        calls.clear()
        model.generate([[5, 6, 7], [8, 9]], mode, max_new_tokens=4, block_length=4)
        assert calls == [mode]


# -- limits, policies, the mask token -----------------------------------------------------------------
def test_any_max_new_tokens(model):
    full = model.generate([9, 10], "diffusion", max_new_tokens=23, block_length=4, ignore_eos=True).ids
    for n in (0, 1, 2, 3, 5, 9, 22):
        for mode in ALL_MODES:
            out = model.generate([9, 10], mode, max_new_tokens=n, block_length=4, ignore_eos=True)
            assert len(out.ids) == n and (n == 0 or out.finish_reason == "length")
            if mode == "diffusion":
                assert out.ids == full[:n]  # a shorter limit is a prefix of a longer one
    # the context window caps generation
    out = model.generate(list(range(4, 14)) * 50 + [4] * 6, "spec", max_new_tokens=50, block_length=8)
    assert len(out.ids) == model.config.max_position_embeddings - 506 and out.finish_reason == "length"


@pytest.mark.parametrize("policy", POLICIES)
def test_selection_policies(model, policy):
    out = model.generate([5, 6, 7], "diffusion", max_new_tokens=24, block_length=6, steps=3, threshold=0.5,
                         selection_policy=policy, ignore_eos=True)
    assert len(out.ids) == 24 and model.config.mask_token_id not in out.ids
    assert all(1 <= p <= 3 for p in out.metrics.denoise_passes)
    if policy in ("low_confidence", "leftmost"):
        assert out.metrics.denoise_passes == [3] * 4  # 5 masks in exactly 3 passes: 2, 2, 1


def test_leftmost_policy_fills_left_to_right(model, monkeypatch):
    seen = []
    from tridlm.decoding import diffusion

    real = diffusion.denoise_pass

    def spy(row, block, masked, logits, passes_done, greedy_draws=False):
        real(row, block, masked, logits, passes_done, greedy_draws)
        seen.append((block == row.mask_id).tolist())

    monkeypatch.setattr(diffusion, "denoise_pass", spy)
    model.generate([5], "diffusion", max_new_tokens=6, block_length=6, selection_policy="leftmost", steps=5,
                   ignore_eos=True)
    assert seen == [[False] * k + [True] * (6 - k) for k in range(2, 7)]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_mask_token_is_never_emitted(mode):
    m = random_model(2, vocab_size=16)
    with torch.no_grad():  # make the mask token everyone's favourite prediction
        m.diffusion_head.weight[m.config.mask_token_id] = m.diffusion_head.weight.abs().max() * 50
    for temperature in (0.0, 1.0):
        out = m.generate([5, 6, 7], mode, max_new_tokens=20, block_length=4, temperature=temperature, seed=0,
                         ignore_eos=True)
        assert len(out.ids) == 20 and m.config.mask_token_id not in out.ids


# -- sampling -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ALL_MODES)
def test_seeded_sampling_is_reproducible(model, mode):
    kw = dict(max_new_tokens=16, block_length=4, temperature=0.9, top_k=20, top_p=0.9, ignore_eos=True)
    a = model.generate([5, 6, 7], mode, seed=11, **kw).ids
    assert a == model.generate([5, 6, 7], mode, seed=11, **kw).ids
    others = [model.generate([5, 6, 7], mode, seed=s, **kw).ids for s in (12, 13, 14)]
    assert any(o != a for o in others)
    # row i of a batch uses seed + i: it samples what it would alone with that seed
    batch = model.generate([[5, 6, 7], [5, 6, 7]], mode, seed=11, **kw)
    assert batch.rows[0].ids == a and batch.rows[1].ids == others[0]


# -- text: stop strings and streaming ---------------------------------------------------------------
class CharTokenizer:
    """id i <-> the i-th character of "ABCDabcdefgh" (the mask, id 3, is never decoded)."""

    chars = "ABCDabcdefgh"
    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [self.chars.index(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.chars[int(i)] for i in ids)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_stop_strings(small_vocab, mode):
    m, tok = small_vocab, CharTokenizer()
    free = m.generate("abc", mode, tokenizer=tok, max_new_tokens=30, block_length=5, ignore_eos=True)
    assert free.text == tok.decode(free.ids) and len(free.text) == 30
    stop = free.text[9:11]
    cut = free.text.index(stop)
    out = m.generate("abc", mode, tokenizer=tok, max_new_tokens=30, block_length=5, ignore_eos=True,
                     stop=[stop])
    assert out.finish_reason == "stop" and out.text == free.text[:cut]
    assert out.ids == free.ids[:cut + len(stop)]  # up to the token completing the stop string


@pytest.mark.parametrize("mode", ALL_MODES)
def test_streaming_emits_final_text_once(small_vocab, mode):
    m, tok = small_vocab, CharTokenizer()
    kw = dict(tokenizer=tok, max_new_tokens=30, block_length=5, ignore_eos=True)
    free = m.generate(["abc", "d"], mode, **kw)
    stop = free.rows[0].text[12:14]
    stream = m.generate(["abc", "d"], mode, stream=True, stop=[stop], **kw)
    chunks = list(stream)
    res = stream.result
    for i in range(2):
        mine = [c for c in chunks if c.row == i]
        assert "".join(mine) == res.rows[i].text
        assert [t for c in mine for t in c.ids] == res.rows[i].ids
    assert res.rows[0].text == free.rows[0].text[:free.rows[0].text.index(stop)]
    assert res.rows[1].ids == free.rows[1].ids or res.rows[1].finish_reason == "stop"
    if mode == "spec":  # one chunk per verify pass at most (an accepted prefix at a time)
        assert len([c for c in chunks if c.row == 1]) <= len(res.rows[1].metrics.acceptance_lengths)


# -- validation -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,message", [
    (dict(mode="beam"), "unknown mode 'beam'"),
    (dict(mode="diffusion", block_length=0), "block_length must be an integer in [1, 1024]"),
    (dict(mode="spec", block_length=-3), "block_length must be an integer in [1, 1024]"),
    (dict(mode="diffusion", threshold=1.5), "threshold must lie in [0, 1]"),
    (dict(mode="diffusion", threshold=-0.1), "threshold must lie in [0, 1]"),
    (dict(mode="diffusion", steps=0), "steps (denoise passes per block) must be an integer in [1, 1024]"),
    (dict(mode="diffusion", selection_policy="random"), "unknown selection_policy 'random'"),
    (dict(temperature=-1.0), "temperature must lie in [0, 100]"),
    (dict(top_p=0.0), "top_p must lie in (0, 1]"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(temperature=1e308), "temperature must lie in [0, 100]"),
    (dict(seed=-1), "seed must be an integer in [0, 2**64 - 1]"),
    (dict(seed=1 << 64), "seed must be an integer in [0, 2**64 - 1]"),
    (dict(top_k=10**9), "top_k must be at most the vocabulary size"),
    (dict(mode="spec", block_length=2000), "block_length must be an integer in [1, 1024]"),
    (dict(mode="diffusion", commit_threshold=2.0), "commit_threshold must lie in [0, 1]"),
    (dict(mode="spec", draft_threshold=-1.0), "draft_threshold must lie in [0, 1]"),
    (dict(mode="spec", threshold=0.5, draft_threshold=0.7), "threshold (0.5) and draft_threshold (0.7) disagree"),
    (dict(beam_width=4), "unknown generation parameter"),
])
def test_invalid_parameters_fail_before_any_forward(model, monkeypatch, kw, message):
    def no_forward(*a, **k):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(model, "forward", no_forward)
    mode = kw.pop("mode", "ar")
    with pytest.raises(ValueError) as e:
        model.generate([5, 6, 7], mode, **kw)
    assert message in str(e.value)


def test_prompt_longer_than_context_window(model, monkeypatch):
    monkeypatch.setattr(model, "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("forward")))
    window = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"prompt 1 has {window + 1} tokens, longer than the context window "
                                         f"\\({window} positions\\)"):
        model.generate([[5, 6], [5] * (window + 1)], "spec")
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        model.generate([[]], "ar")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        model.generate("hello", "ar")


def test_quadratic_layout_equals_one_forward_per_group(small_vocab):
    """In the quadratic forward, the b chain is a causal pass and group j's masks see exactly
    prefix + b_0..b_j + their own group -- nothing of the other groups."""
    from tridlm.decoding.spec_quadratic import layout

    m, L, mask_id = small_vocab, 3, small_vocab.config.mask_token_id
    prefix, b = [5, 6, 7, 8], torch.tensor([9, 4, 10, 11])
    n, c = b.numel(), len(prefix)
    cache = m.new_cache(1, 64)
    with torch.no_grad():
        m(torch.tensor([prefix]), cache=cache)
        group, off, pattern = layout(n, L, None)
        tokens = torch.where(off == 0, b[group], torch.full_like(group, mask_id))
        logits = m(tokens[None], positions=(c + group + off)[None], cache=cache, pattern=pattern)[0]
        assert int(cache.lengths[0]) == c  # an explicit pattern reads the cache without writing it
        causal = m(b[None], cache=cache, write_cache=False)[0]
        assert_logits_agree(m, logits[off == 0], causal)
        for j in range(n):
            toks = torch.cat([b[:j + 1], torch.full((L,), mask_id)])
            pos = c + torch.cat([torch.arange(j + 1), j + 1 + torch.arange(L)])
            pat = torch.ones(j + 1 + L, j + 1 + L, dtype=torch.bool)
            pat[:j + 1] = torch.ones(j + 1, j + 1 + L, dtype=torch.bool).tril()  # b's: causal, no masks
            alone = m(toks[None], positions=pos[None], cache=cache, pattern=pat)[0]
            assert_logits_agree(m, logits[(group == j) & (off > 0)], alone[j + 1:])


def test_lora_drafter_changes_drafts_not_the_output(small_vocab):
    """A LoRA drafter acts on draft tokens only: self-speculation stays AR's output (its verify chain
    is the base model), its acceptance changes; diffusion's denoise passes use it too, but its causal
    passes do not, so at block length 1 (no denoise pass) diffusion is still AR."""
    import copy

    from tridlm import lora

    base = small_vocab
    m = copy.deepcopy(base)
    lora.attach(m, rank=4, alpha=8)
    with torch.no_grad():
        for p in lora.lora_parameters(m).values():
            p.normal_(0, 0.5)
    ps = prompts(4, 12, seed=6)
    kw = dict(max_new_tokens=30, ignore_eos=True)
    ref = [base.generate(p, "ar", **kw).ids for p in ps]
    contract = GreedyContract(base)
    for mode in SPEC_MODES:
        with_lora = m.generate(ps, mode, block_length=5, **kw)
        for p, r, want in zip(ps, with_lora.rows, ref, strict=True):
            contract.same(p, r.ids, want)
        without = base.generate(ps, mode, block_length=5, **kw)
        assert with_lora.metrics.acceptance_lengths != without.metrics.acceptance_lengths
    diffusion = [model.generate(ps, "diffusion", block_length=5, **kw).rows for model in (m, base)]
    assert [r.ids for r in diffusion[0]] != [r.ids for r in diffusion[1]]
    for p, r, want in zip(ps, m.generate(ps, "diffusion", block_length=1, **kw).rows, ref, strict=True):
        contract.same(p, r.ids, want)  # a batch of 4 rows against each alone
    contract.assert_rare()


def test_auto_block_length_is_resolved_after_validation(small_vocab, monkeypatch):
    """block_length="auto" asks the cost/acceptance profiles only once every parameter is valid, and the
    generation then runs with the length they chose (steps defaulting to it)."""
    import importlib

    from tridlm.decoding import GenerationError

    gen_module = importlib.import_module("tridlm.generate")  # the module (the package attribute is the function)
    calls = []
    monkeypatch.setattr(gen_module, "auto_block_length", lambda model: calls.append(1) or 5)
    with pytest.raises(GenerationError, match="threshold"):
        small_vocab.generate([5, 6, 7], "spec", block_length="auto", threshold=2.0)
    assert calls == []
    auto = small_vocab.generate([5, 6, 7], "diffusion", block_length="auto", max_new_tokens=10, ignore_eos=True)
    fixed = small_vocab.generate([5, 6, 7], "diffusion", block_length=5, max_new_tokens=10, ignore_eos=True)
    assert calls == [1] and auto.ids == fixed.ids
    assert auto.metrics.forwards == fixed.metrics.forwards


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 0.25, 0.5, 0.8999999761581421, 0.9, 0.95, 1.0, float("-inf")])
                       | st.floats(0.0, 1.0, width=32), min_size=1, max_size=12),
       open_=st.lists(st.booleans(), min_size=12, max_size=12),
       policy=st.sampled_from(POLICIES), threshold=st.sampled_from([0.0, 0.5, 0.9, 1.0]), n_min=st.integers(0, 13))
def test_commit_positions_ranks_as_the_tensor_ops_do(values, open_, policy, threshold, n_min):
    """The Python ranking of a block's few positions chooses what the sort and threshold tensor ops choose
    (ties towards the left, the threshold compared in the scores' fp32, never a position that is not
    masked); a score with a NaN takes the tensor ops themselves."""
    score = torch.tensor(values, dtype=torch.float32)
    masked = torch.tensor(open_[:len(values)])
    if not bool(masked.any()):
        masked[0] = True
    got = sampling.commit_positions(score, masked, policy, threshold, n_min)
    assert got.dtype == torch.bool and not bool((got & ~masked).any())
    if bool((score[masked] == float("-inf")).any()):
        return  # the tensor ops may rank an unmasked -inf before a masked one: they are not the reference there
    assert torch.equal(got, sampling._commit_positions_torch(score, masked, policy, threshold, n_min))
