"""The error model behind every tolerance of the suite, and the exactness contract it gives (README,
"What is exact"): bounds hold across kernels and thread counts, are tight enough to catch real bugs,
and greedy outputs part only at near ties."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import GreedyContract, assert_logits_agree, random_model, suite_threads

from tridlm.cli import main
from tridlm.numerics import agreement_tolerance, greedy_divergence, logit_error, unit_roundoff


def threads(n: int):
    class _Threads:
        def __enter__(self):
            self.before = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.before)

    return _Threads()


def wide_model(seed: int = 0):
    """Wide enough that torch splits its matmuls over two threads (tiny ones run on one anyway)."""
    return random_model(seed, vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=3,
                        num_attention_heads=8, num_key_value_heads=2)


def test_the_bound_grows_with_roundoff_depth_width_and_scale():
    m = wide_model()
    c = m.config
    assert unit_roundoff(torch.float32) == 2.0 ** -24 and unit_roundoff(torch.bfloat16) == 2.0 ** -8
    e = logit_error(c, torch.float32, 10.0)
    assert logit_error(c, torch.float32, 20.0) == pytest.approx(2 * e)
    assert logit_error(c, torch.float32, 10.0, n_keys=4 * c.intermediate_size) == pytest.approx(2 * e)
    assert logit_error(c, torch.bfloat16, 10.0) > 100 * e
    assert logit_error(c, torch.float64, 10.0) < 1e-8 * e


def test_fp32_evaluations_stay_within_the_bound_of_the_exact_logits():
    """Each fp32 path is within E of a float64 evaluation (the 'exact' value to ~1e-16)."""
    m = wide_model(1)
    exact_model = wide_model(1).double()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = exact_model(ids)
        e = logit_error(m.config, torch.float32, float(exact.abs().max()))
        cache = m.new_cache(2, 40)
        paths = {"one pass": m(ids), "chunked": torch.cat([m(ids[:, a:b], cache=cache) for a, b in
                                                           ((0, 1), (1, 9), (9, 10), (10, 40))], 1)}
        for n in (1, 2):
            with threads(n):
                paths[f"{n} threads"] = m(ids)
    for name, logits in paths.items():
        assert float((logits.double() - exact).abs().max()) <= e, name


def test_the_bound_catches_a_cache_that_drops_one_position():
    m = wide_model(2)
    ids = torch.randint(0, 512, (1, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(1, 30)
        m(ids[:, :20], cache=cache)
        cache.k[:, :, :, 5:19] = cache.k[:, :, :, 6:20].clone()  # forget position 5
        cache.v[:, :, :, 5:19] = cache.v[:, :, :, 6:20].clone()
        cache.crop(19)
        broken = m(ids[:, 20:], positions=torch.arange(20, 30)[None], cache=cache)
        cache.crop(0)
        m(ids[:, :20], cache=cache)
        fine = m(ids[:, 20:], cache=cache)
    assert_logits_agree(m, fine, full[:, 20:])
    with pytest.raises(AssertionError, match="more than the error model's bound"):
        assert_logits_agree(m, broken, full[:, 20:])


def test_one_and_two_threads_agree_under_the_contract():
    """Whatever thread count the suite runs with (TRIDLM_TEST_THREADS), its results are those of 1 and 2."""
    assert torch.get_num_threads() == suite_threads()
    m = wide_model(3)
    ids = torch.randint(4, 512, (3, 33), generator=torch.Generator().manual_seed(2))
    outs = {}
    for n in (1, 2):
        with threads(n), torch.no_grad():
            outs[n] = (m(ids), [m.generate(p, mode, max_new_tokens=16, block_length=4, ignore_eos=True).ids
                                for p in ids[:, :9].tolist() for mode in ("ar", "spec", "spec-quadratic")])
    assert_logits_agree(m, outs[1][0], outs[2][0])
    contract = GreedyContract(m)
    prompts = [p for p in ids[:, :9].tolist() for _ in range(3)]
    for prompt, a, b in zip(prompts, outs[1][1], outs[2][1], strict=True):
        contract.same(prompt, a, b)
    contract.assert_rare()


def test_greedy_divergence_explains_ties_and_only_ties():
    m = random_model(4)
    prompt = [5, 6, 7]
    ref = m.generate(prompt, "ar", max_new_tokens=12, ignore_eos=True).ids
    assert greedy_divergence(m, prompt, ref, ref) is None
    with torch.no_grad():
        logits = m(torch.tensor([prompt + ref[:4]]))[0, -1]
    logits[m.config.mask_token_id] = -float("inf")
    far = int(logits.argmin())
    wrong = greedy_divergence(m, prompt, ref[:4] + [far], ref[:5])
    assert wrong.position == 4 and not wrong.near_tie and wrong.gap > 0.01
    assert not greedy_divergence(m, prompt, ref[:4], ref[:5]).near_tie  # stopping early is no rounding
    # give another token the head row of the first greedy token: an exact tie there, either choice is fine
    top = ref[0]
    twin = next(t for t in range(8, 64) if t != top)  # not a prompt token (the head may be tied to them)
    with torch.no_grad():
        m.diffusion_head.weight[twin] = m.diffusion_head.weight[top]
    d = greedy_divergence(m, prompt, [twin], [top])
    assert d.position == 0 and d.near_tie and d.gap == 0


def test_agreement_tolerance_is_twice_the_bound_of_the_reference_scale():
    m = wide_model()
    ref = torch.tensor([[-3.0, 7.5], [1.0, 0.0]])
    assert agreement_tolerance(m.config, torch.float32, ref) == pytest.approx(
        2 * logit_error(m.config, torch.float32, 7.5))


def test_env_command_reports_what_a_bug_report_needs(capsys):
    assert main(["env", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert report["torch"] == torch.__version__ and report["torch_threads"] == torch.get_num_threads()
    for key in ("cpu", "cpu_flags", "default_dtype", "kernels", "int8_weight_only", "cache", "cache_bytes"):
        assert key in report
    with threads(torch.get_num_threads()):  # the command sets the process's threads
        assert main(["env", "--threads", "1"]) == 0
    text = capsys.readouterr().out
    assert "cpu_isa" in text and "torch_threads          1" in text
    assert main(["env", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
