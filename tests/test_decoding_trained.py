"""Every mode on the tiny model trained inside the test session (text prompts, real tokenizer)."""

from __future__ import annotations

import pytest
import torch
from conftest import GreedyContract

PROMPTS = ["ROMEO:\nWhat light", "To be, or not to be", "KING HENRY:\nNow", "First Citizen:\n"]
N = 40


@pytest.fixture(scope="module")
def model(tiny_trained):
    n = torch.get_num_threads()  # the fixture trains first, with the threads it was given
    torch.set_num_threads(1)
    yield tiny_trained[0]
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ar(model):
    return model.generate(PROMPTS, "ar", max_new_tokens=N)


def prompt_ids(model, text):
    return model.tokenizer.encode(text, add_special_tokens=True)  # as generate() encodes it


def test_ar_batch_equals_rows_alone(model, ar):
    contract = GreedyContract(model)  # a batch is a wider forward: equal up to near ties (README)
    for p, row in zip(PROMPTS, ar.rows, strict=True):
        alone = model.generate(p, "ar", max_new_tokens=N)
        if contract.same(prompt_ids(model, p), row.ids, alone.ids):
            assert row.text == alone.text
        assert row.text == model.tokenizer.decode(row.ids)
    contract.assert_rare()
    assert ar.metrics.forwards == max(r.metrics.forwards for r in ar.rows)
    assert ar.metrics.tokens_per_forward == 1


@pytest.mark.parametrize("mode,block_length", [("spec", 2), ("spec", 7), ("spec", 32), ("spec-quadratic", 2),
                                               ("spec-quadratic", 8)])
def test_self_speculation_equals_ar(model, ar, mode, block_length):
    out = model.generate(PROMPTS, mode, max_new_tokens=N, block_length=block_length)
    contract = GreedyContract(model)
    for p, r, a in zip(PROMPTS, out.rows, ar.rows, strict=True):
        if contract.same(prompt_ids(model, p), r.ids, a.ids):
            assert r.text == a.text
    alone = model.generate(PROMPTS[1], mode, max_new_tokens=N, block_length=block_length)
    contract.same(prompt_ids(model, PROMPTS[1]), alone.ids, ar.rows[1].ids)
    contract.assert_rare()
    # a jointly trained model's diffusion drafts agree with its verifier some of the time (how often
    # depends on a minute of training, so only that it happens is asserted)
    acceptance = out.metrics.acceptance_lengths
    assert max(acceptance) > 1


def test_diffusion(model, ar):
    one = model.generate(PROMPTS, "diffusion", max_new_tokens=N, block_length=1)
    assert [r.ids for r in one.rows] == [r.ids for r in ar.rows]  # exact: the same batched forwards as AR's
    out = model.generate(PROMPTS, "diffusion", max_new_tokens=N, block_length=8)
    assert [r.ids for r in out.rows] == [model.generate(p, "diffusion", max_new_tokens=N, block_length=8).ids
                                          for p in PROMPTS]
    for r in out.rows:
        assert model.config.mask_token_id not in r.ids and 0 < len(r.ids) <= N
        assert all(1 <= p <= 7 for p in r.metrics.denoise_passes)


def test_streamed_text_equals_the_result(model):
    stream = model.generate(PROMPTS[0], "spec", max_new_tokens=N, block_length=8, stream=True)
    chunks = list(stream)
    assert "".join(chunks) == stream.result.text and len(chunks) >= 2
