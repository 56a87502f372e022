"""The benchmark end to end on a tiny random model: every mode and sweep runs, every output is written."""

import json

import pytest
from conftest import tiny_text_model

from tridlm.bench import BenchSettings, plan_configs, run_bench
from tridlm.bench.runner import agreement

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return tiny_text_model()


def tiny_settings(**kw):
    base = dict(prompts="gsm8k,stories", n_prompts=2, max_new_tokens=6, repeats=2, block_length=4,
                block_lengths=(2, 4), thresholds=(0.5, 0.9), threshold_block_lengths=(4,), batch_sizes=(1, 2),
                quadratic_block_length=2, sol_prompts=1, sol_budget=20, cost_tokens=(1, 2, 4),
                cost_batch_sizes=(1, 2), cost_repeats=1, ignore_eos=True)
    base.update(kw)
    return BenchSettings.quick_settings(**base)


def test_plan_covers_every_sweep_once():
    s = BenchSettings()
    plan = plan_configs(s)
    cfgs = [c for c, _ in plan]
    assert len(cfgs) == len(set(cfgs))
    sweeps = {t for _, tags in plan for t in tags}
    assert sweeps >= {"main", "block", "threshold", "batch", "dtype"}
    assert {c.block_length for c in cfgs if c.mode == "spec"} == {4, 8, 16, 32, "auto"}
    assert {c.threshold for c in cfgs if c.mode == "diffusion"} == {0.5, 0.7, 0.9, 0.95}
    assert {c.batch_size for c in cfgs} == {1, 4, 16}
    assert {c.dtype for c in cfgs} == {"fp32", "bf16", "int8"}
    assert {c.mode for c in cfgs} == {"ar", "hf", "diffusion", "spec", "spec-quadratic"}
    # spec at the largest block runs before "auto", which reads its acceptance lengths
    order = [(c.mode, c.block_length, c.dtype) for c in cfgs]
    assert order.index(("spec", 32, "fp32")) < order.index(("spec", "auto", "fp32"))


def test_agreement():
    assert agreement([1, 2, 3], [1, 2, 3]) == 1.0
    assert agreement([1, 9, 3], [1, 2, 3]) == pytest.approx(2 / 3)
    assert agreement([1, 2], [1, 2, 3, 4]) == 0.5  # missing positions disagree
    assert agreement([], []) == 1.0


def test_run_bench_writes_every_output(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("TRIDLM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    rep = run_bench(tiny, tiny_settings(), out_dir=out, command="tridlm bench --test", log=lambda *_: None)
    for name in ("bench.md", "bench.json", "tpf_vs_quality.png", "acceptance_histogram.png",
                 "tokens_per_s_vs_block_length.png", "cost_profile.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / "bench.json").read_text())
    res = {r["label"]: r for r in data["results"]}
    ar = res["ar b=1 fp32"]
    assert ar["tpf"] == 1.0 and ar["speedup_vs_ar"] == 1.0 and ar["quality"]["ar_agreement"] == 1.0
    assert len(ar["tokens_per_s"]["repeats"]) == 2
    # transformers generate on the same weights gives the same greedy tokens
    assert res["transformers b=1 fp32"]["quality"]["identical_to_ar"] == 2
    # self-speculation is lossless at greedy, and its acceptance lengths are recorded
    for L in (2, 4):
        spec = res[f"spec L={L} b=1 fp32"]
        assert spec["quality"]["identical_to_ar"] == 2
        assert spec["acceptance_length_histogram"] and max(map(int, spec["acceptance_length_histogram"])) <= L
    auto = res["spec L=auto b=1 fp32"]
    assert auto["block_length"] in (2, 4) and data["auto_block_length"]["chosen"] in (2, 4)
    assert {"bf16"} <= {r["config"]["dtype"] for r in data["results"]}
    assert {r["config"]["batch_size"] for r in data["results"]} == {1, 2}
    # SOL per block length, with the fraction each sampler reaches
    assert set(data["sol"]) == {"2", "4"}
    # seeded blocks: L tokens, L - 1 of them masked, so the serial oracle's TPF is L / (L - 1)
    assert all(v["oracle_tpf"] == int(L) / (int(L) - 1) and v["sol_tpf"] >= v["oracle_tpf"]
               for L, v in data["sol"].items())
    assert res["diffusion L=4 τ=0.9 b=1 fp32"]["sol_fraction"] > 0
    assert data["roofline"]["ar b=1 fp32"]["fraction"] > 0
    assert data["hotspots"]["fp32"]["top_ops"] and data["hotspots"]["fp32"]["by_pattern"]["causal"]["calls"] > 0
    assert data["hotspots"]["spec"]["by_pattern"]["block"]["calls"] > 0
    assert any(t["target"].startswith("AR batch 1 fp32") for t in data["targets"])
    md = (out / "bench.md").read_text()
    for heading in ("All modes side by side", "Speed of light", "block_length=\"auto\"", "Roofline", "Cost profile",
                    "Threshold sweep", "Batch size sweep", "dtype sweep"):
        assert heading in md
    assert rep["wall_time_s"] > 0


class FakeLlamaCpp:
    """Stands in for llama-cpp-python: greedy AR of the same tiny model, one token per call of ours."""

    made: list = []

    def __init__(self, model, gguf, quant, threads):
        self.model, self.quant = model, quant
        FakeLlamaCpp.made.append((gguf, quant, threads))

    def generate(self, prompt_ids, max_new_tokens, eos_token_id, ignore_eos):
        out = self.model.generate(prompt_ids, "ar", max_new_tokens=max_new_tokens, ignore_eos=ignore_eos,
                                  eos_token_id=eos_token_id)
        return out.ids, 0.01 * max(1, len(out.ids))


def test_llama_cpp_anchor_runs_each_format_with_a_fake_runner(tiny, monkeypatch):
    from tridlm.bench import llama_cpp
    from tridlm.bench.prompts import load_prompts
    from tridlm.bench.runner import run_configs

    FakeLlamaCpp.made.clear()
    monkeypatch.setattr(llama_cpp, "available", lambda: True)
    monkeypatch.setattr(llama_cpp, "make_runner", lambda gguf, quant, threads: FakeLlamaCpp(tiny, gguf, quant, threads))
    s = tiny_settings(modes=("ar",), hf_baseline=False, dtypes=("fp32",), batch_sizes=(1,), gguf="model.gguf",
                      llama_cpp_quants=("Q8_0", "BF16"))
    prompts = load_prompts(s.prompts, s.n_prompts)
    res = {r.config.label: r for r in run_configs(tiny, prompts, s, log=lambda *_: None)}
    assert [m[:2] for m in FakeLlamaCpp.made] == [("model.gguf", "Q8_0"), ("model.gguf", "BF16")]
    for quant in ("Q8_0", "BF16"):
        r = res[f"llama.cpp b=1 {quant}"]
        assert r.quality["identical_to_ar"] == len(prompts)  # judged against fp32 AR, the same weights
        assert r.generated_tokens == res["ar b=1 fp32"].generated_tokens
        assert r.tokens_per_s_median == pytest.approx(100.0)  # the fake's 10 ms per token


def test_llama_cpp_anchor_is_skipped_with_the_fix_named_when_absent(tiny, monkeypatch):
    from tridlm.bench import llama_cpp
    from tridlm.bench.prompts import load_prompts
    from tridlm.bench.runner import run_configs

    monkeypatch.setattr(llama_cpp, "available", lambda: False)
    s = tiny_settings(modes=("ar",), hf_baseline=False, dtypes=("fp32",), batch_sizes=(1,), gguf="model.gguf")
    lines = []
    res = run_configs(tiny, load_prompts(s.prompts, s.n_prompts), s, log=lines.append)
    assert all(r.config.mode != "llama.cpp" for r in res)
    assert any("llama-cpp-python is not installed" in x and "CMAKE_ARGS" in x for x in lines)


def test_llama_cpp_runner_on_the_real_package_when_installed(tmp_path, monkeypatch):
    from tridlm.bench import llama_cpp
    from tridlm.convert import ConvertError, smollm2_gguf_path

    if not llama_cpp.available():
        pytest.skip("llama-cpp-python is not installed (a bench extra)")
    try:
        gguf = smollm2_gguf_path()
    except ConvertError as e:
        pytest.skip(str(e))
    monkeypatch.setenv("TRIDLM_CACHE", str(tmp_path))
    runner = llama_cpp.make_runner(gguf, "Q4_1", threads=1)
    assert runner.path == gguf  # its own format: no copy
    ids, seconds = runner.generate([1, 4093, 198, 19161, 253], 5, eos_token_id=2, ignore_eos=True)
    assert len(ids) == 5 and seconds > 0


def test_compiled_rows_are_rated_against_compiled_ar(tiny, tmp_path, monkeypatch):
    """A compiled configuration's speedup is over AR with the same kernels, and its warm-up is recorded.
    compile_decode is replaced by its route without the compiler (what it compiles, run eagerly)."""
    from tridlm import TriModeLM

    def route_only(self, tokens=(1,), mode=None):
        self._compiled, self._compiled_tokens = self._forward_static, tuple(sorted(set(tokens)))
        self._compiled_for = self._graph_state()
        return self

    monkeypatch.setattr(TriModeLM, "compile_decode", route_only)
    monkeypatch.setenv("TRIDLM_CACHE", str(tmp_path / "cache"))
    s = tiny_settings(compiled=True, dtypes=("fp32",), block_lengths=(4,), thresholds=(0.9,), batch_sizes=(1,),
                      hf_baseline=False, llama_cpp=False)
    rep = run_bench(tiny, s, out_dir=tmp_path / "out", command="tridlm bench --test", log=lambda *_: None)
    res = {r["label"]: r for r in rep["results"]}
    ar, spec = res["ar b=1 fp32 compiled"], res["spec L=4 b=1 fp32 compiled"]
    assert ar["speedup_vs_ar"] == 1.0 and ar["warmup_s"] > 0 and spec["warmup_s"] > 0
    assert spec["speedup_vs_ar"] == pytest.approx(spec["tokens_per_s"]["median"] / ar["tokens_per_s"]["median"])
    assert res["ar b=1 fp32"]["warmup_s"] is None  # eager rows compile nothing
    assert spec["quality"]["identical_to_ar"] == 2  # the compiled layout keeps greedy self-speculation lossless
    assert "Untimed warm-up of each compiled configuration" in (tmp_path / "out" / "bench.md").read_text()


def test_the_bench_refuses_unknown_dtypes_and_modes_before_any_work():
    with pytest.raises(ValueError, match="unknown --dtypes bfloat16: choose from fp32, bf16, int8, int4"):
        BenchSettings(dtypes=("bfloat16",))
    with pytest.raises(ValueError, match="unknown --modes fast: choose from ar"):
        BenchSettings(modes=("ar", "fast"))
