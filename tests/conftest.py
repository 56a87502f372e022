"""Shared fixtures: small random-weight models and one tiny model trained inside the test session."""

from __future__ import annotations

import os

import pytest
import torch

from tridlm import ModelConfig, TriModeLM
from tridlm.numerics import agreement_tolerance, greedy_divergence


def suite_threads() -> int:
    """The suite's torch thread count: $TRIDLM_TEST_THREADS, else 2 (or 1 on a one-core machine).

    Set once for the session and printed in pytest's header, so a failure report says which it was;
    every result the suite checks holds on 1 and 2 threads alike (tests/test_numerics.py checks that)."""
    value = os.environ.get("TRIDLM_TEST_THREADS", "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise pytest.UsageError(f"TRIDLM_TEST_THREADS must be a positive integer, got {value!r}")
        return int(value)
    return min(2, os.cpu_count() or 1)


def pytest_configure(config):
    torch.set_num_threads(suite_threads())


def _suite_line() -> str:
    from tridlm.machine import cpu_isa, cpu_name

    return (f"tridlm: {cpu_name()} ({cpu_isa()}), torch {torch.__version__}; "
            f"suite threads {suite_threads()} (TRIDLM_TEST_THREADS)")


def pytest_report_header(config):
    return _suite_line()


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(_suite_line())  # also under -q, where the header is not shown


def small_config(**overrides) -> ModelConfig:
    kw = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, mask_token_id=3, bos_token_id=1, eos_token_id=2, max_position_embeddings=512)
    kw.update(overrides)
    return ModelConfig(**kw)


def random_model(seed: int = 0, **overrides) -> TriModeLM:
    torch.manual_seed(seed)
    return TriModeLM(small_config(**overrides)).eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared, busy 2-core machine a second OpenMP thread
    mostly waits at the barrier: a module that asks for this runs its tests on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_text_model(seed: int = 0) -> TriModeLM:
    """A random model with a real tokenizer (a 300-token BPE trained on the story openings)."""
    from tridlm.bench.prompts import STORY_OPENINGS
    from tridlm.training.bpe import train_bpe

    tok = train_bpe(list(STORY_OPENINGS) * 4, vocab_size=300)
    model = random_model(seed=seed, vocab_size=300, mask_token_id=tok.mask_id, eos_token_id=tok.eos_id,
                         bos_token_id=tok.eos_id)
    model.tokenizer = tok
    return model


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """(model, tokenizer, checkpoint folder): a tiny tri-mode model trained for about a minute."""
    from tridlm.training.quick import train_tiny_model

    folder = tmp_path_factory.mktemp("tiny_trained")
    model, tokenizer = train_tiny_model(folder, seconds=60, seed=0)
    return model, tokenizer, folder


def assert_logits_agree(model, got: torch.Tensor, ref: torch.Tensor, n_keys: int = 0) -> None:
    """`got` and `ref` are two evaluations of the same logits: within the error model's 2E (tridlm.numerics)."""
    tol = agreement_tolerance(model.config, model.dtype, ref, n_keys)
    diff = float((got.double() - ref.double()).abs().max())
    assert diff <= tol, f"logits differ by {diff:.3g}, more than the error model's bound {tol:.3g}"


class GreedyContract:
    """Checks greedy outputs of two kernel paths under the exactness contract (README, "What is exact"):
    identical, or parting at a near tie -- and near ties rare (at most one in ten comparisons, at least one
    allowed). Use `same` for each pair, then `assert_rare` once."""

    def __init__(self, model):
        self.model, self.compared, self.ties = model, 0, []

    def same(self, prompt, got, ref) -> bool:
        """True when identical; False when they part at a near tie; fails otherwise."""
        self.compared += 1
        d = greedy_divergence(self.model, list(prompt), list(got), list(ref))
        if d is None:
            return True
        assert d.near_tie, (f"greedy outputs part at generated token {d.position} where the logits' gap is "
                            f"{d.gap:.3g}, above the near-tie bound {d.bound:.3g}: not a rounding difference")
        self.ties.append(d)
        return False

    def assert_rare(self) -> None:
        assert self.compared > 0
        assert len(self.ties) <= max(1, self.compared // 10), f"{len(self.ties)} near ties in {self.compared}"


def paired_cache_steps(ref, other, seed: int, max_len: int = 40):
    """Run `ref` and `other` side by side over one cache each, from empty on: AR steps, causal and block
    passes, an explicit pattern (every token sees itself) and padding in both kinds of pass. Yields
    (ref's logits, other's, the real (non-padding) positions, the longest key length, ref's cache,
    other's cache) after each step."""
    gen = torch.Generator().manual_seed(seed)
    quad = (torch.rand(4, 4, generator=gen) < 0.5) | torch.eye(4, dtype=torch.bool)
    steps = [(1, "causal", None, None), (4, "causal", None, None), (4, "block", None, None),
             (4, quad, True, None), (1, "causal", None, None), (4, "causal", None, [True, True, True, False]),
             (4, "block", None, [True, True, False, True])]
    cr, co = ref.new_cache(1, max_len), other.new_cache(1, max_len)
    with torch.no_grad():
        for T, pattern, write, valid in steps:
            ids = torch.randint(4, 64, (1, T), generator=gen)
            kw = dict(pattern=pattern, write_cache=write, valid=None if valid is None else torch.tensor([valid]))
            want, got = ref(ids, cache=cr, **kw), other(ids, cache=co, **kw)
            n_keys = int(cr.lengths) + T  # a bound on the key length: the cache as it now holds, plus the step
            real = torch.tensor([valid or [True] * T])  # a padding token's logits are no one's output
            yield want, got, real, n_keys, cr, co


def route_through_graph_layout(model, tokens=(1, 4)):
    """Send `tokens`-wide decode forwards down compile_decode's route (the static layout) without compiling."""
    model._compiled, model._compiled_tokens = model._forward_static, tuple(tokens)
    model._compiled_for = model._graph_state()
    return model
