"""lm-evaluation-harness model "tridlm": one tri-mode model scored by lm-eval's tasks in any decoding mode.

    import lm_eval, tridlm.eval.harness                 # the import registers "tridlm" with lm-eval
    from tridlm.eval.lm_eval_tasks import TASKS_DIR     # tridlm's offline tasks
    results = lm_eval.simple_evaluate(model="tridlm", model_args="model=default,mode=spec,block_length=8",
                                      tasks=["tridlm_gsm8k_cot"], limit=20,
                                      task_manager=lm_eval.tasks.TaskManager(include_path=str(TASKS_DIR)))

Log-likelihoods (`loglikelihood`, `loglikelihood_rolling`) come from causal forwards -- the model's AR
distribution, the one AR decoding samples from (the mask token is never a prediction) -- whatever the
mode: a mode changes how text is generated, not what the model thinks of given text. `generate_until`
decodes in the chosen mode with tridlm's knobs (model args, or per task in its generation kwargs), and
counts every row's tokens, forwards and acceptance lengths per task: `generation_summary()`, also in
lm-eval's results under config.tridlm, so tokens per forward can be reported beside accuracy.

Text is encoded as `model.generate(text)` and the server's /v1/completions encode it (special tokens
added, none for SmolLM2), so a run here and one through `tridlm serve` see the same tokens.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import lm_eval.models  # noqa: F401  -- lm-eval's own models register first (its registry fills only when empty)
import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..decoding.params import AUTO, MODES, GenerationError, GenerationParams
from ..decoding.sampling import ban

# set per request from the task's generation kwargs (mode: the model's own argument), never as knobs
PER_REQUEST = ("max_new_tokens", "stop", "temperature", "mode")
KNOBS = tuple(n for n in GenerationParams.__dataclass_fields__ if n not in PER_REQUEST + ("resolved",))
LOGIT_BUDGET = 2048  # positions whose logits one scoring forward may hold (x vocabulary x 4 bytes)
DEFAULT_MAX_LENGTH = 2048  # context used for scoring and generation unless max_length says otherwise


def check_knobs(mode: str, knobs: dict) -> dict:
    """`knobs` as generate() takes them, each checked against its declared range; GenerationError if not."""
    if mode not in MODES:
        raise GenerationError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise GenerationError(f"unknown tridlm option {unknown[0]!r}; generation options are {', '.join(KNOBS)}")
    for name, value in knobs.items():
        if value is None or (name == "block_length" and value == AUTO):
            continue
        declared = GenerationParams.declared(name)
        if declared["ok"] or declared["choices"]:
            GenerationParams.check(name, value)
    return dict(knobs)


def model_dtype(name) -> torch.dtype:
    value = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return value


@dataclass
class GenerationTally:
    """What one task's generations cost: rows, tokens, decode forwards, acceptance lengths."""

    rows: int = 0
    generated_tokens: int = 0
    forwards: int = 0
    accepted: int = 0  # the acceptance lengths summed, over `verifications`
    verifications: int = 0

    def add(self, metrics) -> None:
        self.rows += 1
        self.generated_tokens += metrics.generated_tokens
        self.forwards += metrics.forwards
        self.accepted += sum(metrics.acceptance_lengths)
        self.verifications += len(metrics.acceptance_lengths)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "generated_tokens": self.generated_tokens, "forwards": self.forwards,
                "tokens_per_forward": self.generated_tokens / self.forwards if self.forwards else None,
                "acceptance_length_mean": self.accepted / self.verifications if self.verifications else None}


@register_model("tridlm")
class TridlmLM(LM):
    """model: 'default', 'smollm2', a checkpoint folder, or a loaded TriModeLM; mode: ar, diffusion, spec or
    spec-quadratic; any other generation knob of `model.generate` (block_length, threshold, steps, ...)
    as a keyword. batch_size: rows per forward; max_length: context tokens at most (default 2048, at most
    the model's window); max_gen_toks: new tokens when a task does not say."""

    def __init__(self, model="default", mode: str = "ar", dtype="float32", batch_size=8, max_length=None,
                 max_gen_toks: int = 256, add_special_tokens: bool = True, draft_adapter: bool = True,
                 device=None, max_batch_size=None, **knobs):
        super().__init__()
        self.mode, self.knobs = mode, check_knobs(mode, knobs)  # a typo fails before any weight loads
        auto = batch_size is None or str(batch_size).startswith("auto")  # lm-eval's "auto[:N]": no search here
        self.batch_size = 8 if auto else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if str(device or "").startswith("cuda") and not torch.cuda.is_available():
            device = None  # lm-eval's command line asks for cuda unless told otherwise: the CPU, as its own models do
        if isinstance(model, str | Path):
            from ..default_model import resolve_model

            self.name = str(model)
            model = resolve_model(self.name, dtype=model_dtype(dtype), device=device, draft_adapter=draft_adapter)
        else:
            self.name = "model"
        if model.tokenizer is None:
            raise ValueError("lm-eval works on text: the model has no tokenizer")
        self.model, self.tok = model, model.tokenizer
        self._device = model.device
        window = model.config.max_position_embeddings
        self.max_length = min(int(max_length or DEFAULT_MAX_LENGTH), window)
        self.max_gen_toks, self.add_special_tokens = int(max_gen_toks), bool(add_special_tokens)
        self.tallies: dict[str, GenerationTally] = defaultdict(GenerationTally)

    # -- text and tokens ------------------------------------------------------------------------------------
    @property
    def prefix_token_id(self) -> int:
        """What an empty context conditions on."""
        c = self.model.config
        return c.bos_token_id if c.bos_token_id is not None else c.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return f"tridlm:{self.name}"

    def chat_template(self, chat_template=False) -> str:
        return self.tok.chat_template or ""

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=self.add_special_tokens)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's own models split them: the context's trailing spaces
        go to the continuation, and the continuation is what encoding both adds to the context alone."""
        if not context:
            return [self.prefix_token_id], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    # -- log-likelihoods ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """Per (context ids, continuation ids): the continuation's summed log-prob given the context, and whether
        greedy AR decoding gives it; from causal forwards over at most max_length + 1 tokens (the context cut on
        the left), longest rows batched together."""
        rows = []
        for ctx, cont in pairs:
            seq = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append((seq, min(len(cont), len(seq) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list = [None] * len(rows)
        bar = tqdm(total=len(rows), desc="tridlm log-likelihoods", disable=disable_tqdm)
        start = 0
        while start < len(order):
            widest = max(1, rows[order[start]][1])
            chunk = order[start:start + max(1, min(self.batch_size, LOGIT_BUDGET // widest))]
            for i, result in zip(chunk, self._score_batch([rows[i] for i in chunk]), strict=True):
                out[i] = result
            start += len(chunk)
            bar.update(len(chunk))
        bar.close()
        return out

    def _score_batch(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """rows: (tokens, k): score the last k tokens of each, one forward for all."""
        dev = self.model.device
        T, K = max(1, max(len(seq) - 1 for seq, _ in rows)), max(max(1, k) for _, k in rows)
        # right padding: under the causal pattern no real token sees what comes after it
        x = torch.tensor([seq[:-1] + [self.prefix_token_id] * (T - len(seq) + 1) for seq, _ in rows], device=dev)
        # the logits at input position j predict token j + 1: those of the last k tokens
        at = torch.tensor([list(range(len(seq) - 1 - k, len(seq) - 1)) + [0] * (K - k) for seq, k in rows],
                          device=dev)
        logits = self.model(x, torch.arange(T, device=dev)[None].expand(len(rows), T), pattern="causal",
                            write_cache=False, logits_at=at)
        results = []
        for r, (seq, k) in enumerate(rows):
            if k == 0:
                results.append((0.0, True))
                continue
            targets = torch.tensor(seq[len(seq) - k:], device=dev)
            logp = F.log_softmax(ban(logits[r, :k], self.model.config.mask_token_id), dim=-1)
            picked = logp.gather(-1, targets[:, None])[:, 0]
            results.append((float(picked.double().sum()), bool((logp.argmax(-1) == targets).all())))
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        scores = self.score([self.encode_pair(*r.args[:2]) for r in requests], disable_tqdm)
        for r, s in zip(requests, scores, strict=True):
            self.cache_hook.add_partial("loglikelihood", r.args, s)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood, in disjoint windows of max_length tokens (lm-eval's rolling scheme:
        the first window conditions on the prefix token, later ones on the tokens before them)."""
        windows, owner = [], []
        for i, r in enumerate(requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.encode(r.args[0]), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.score(windows, disable_tqdm), strict=True):
            totals[i] += logprob
        for r, t in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, t)
        return totals

    # -- generation -----------------------------------------------------------------------------------------
    def generation_kwargs(self, gen_kwargs: dict) -> tuple[str, dict]:
        """(mode, generate() keywords) for one request's lm-eval generation kwargs over the model args: until,
        max_gen_toks, do_sample, temperature, top_p, top_k, seed and any tridlm knob (mode included)."""
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new = kw.pop("max_gen_toks", kw.pop("max_new_tokens", self.max_gen_toks))
        sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        mode = kw.pop("mode", self.mode)
        knobs = {**self.knobs, **check_knobs(mode, kw)}
        knobs["temperature"] = temperature if sample else 0.0  # lm-eval: no sampling means greedy
        return mode, {**knobs, "max_new_tokens": int(max_new), "stop": tuple(until)}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of rows with the same generation kwargs, longest prompts first; each output ends before the
        first stop string (until) or at EOS."""
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[json.dumps(r.args[1], sort_keys=True, default=str)].append(i)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="tridlm generate", disable=disable_tqdm)
        for idx in groups.values():
            mode, kw = self.generation_kwargs(requests[idx[0]].args[1])
            room = max(1, self.max_length - kw["max_new_tokens"])  # the prompt is cut on the left to fit
            prompts = {i: self.encode(requests[i].args[0])[-room:] or [self.prefix_token_id] for i in idx}
            idx.sort(key=lambda i: -len(prompts[i]))
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                result = self.model.generate([prompts[i] for i in chunk], mode, **kw)
                for i, row in zip(chunk, result.rows, strict=True):
                    text = row.text
                    for s in kw["stop"]:  # generate() ends there already; cut as lm-eval's own models do
                        text = text.split(s)[0]
                    out[i] = text
                    self.tallies[requests[i].task_name or ""].add(row.metrics)
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out

    def generation_summary(self) -> dict:
        """Per task: rows, generated tokens, decode forwards, tokens per forward, mean acceptance length."""
        return {task: t.to_dict() for task, t in sorted(self.tallies.items())}

    def get_model_info(self) -> dict:
        """lm-eval puts this in results["config"] (after the run, so the tallies are complete)."""
        return {"tridlm": {"model": self.name, "mode": self.mode, "knobs": self.knobs,
                           "dtype": str(self.model.dtype).removeprefix("torch."), "max_length": self.max_length,
                           "batch_size": self.batch_size, "generation": self.generation_summary()}}


# -- running tasks: what `tridlm eval lm-eval` does ---------------------------------------------------------
LM_OPTIONS = ("max_length", "max_gen_toks", "add_special_tokens")  # TridlmLM's own, beside dtype and the knobs


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def parse_model_args(text: str) -> tuple[torch.dtype, dict]:
    """`--model-args k=v,...` (lm-eval's syntax) as (dtype, TridlmLM keywords), checked before any model loads;
    model, mode and batch_size have options of their own."""
    from lm_eval.utils import simple_parse_args_string

    args = simple_parse_args_string(text)
    for own, option in (("model", "MODEL"), ("mode", "--mode or --modes"), ("batch_size", "--batch")):
        if own in args:
            raise ValueError(f"--model-args: give {own} as {option}")
    dtype = model_dtype(args.pop("dtype", "float32"))
    unknown = sorted(set(args) - set(LM_OPTIONS) - set(KNOBS))
    if unknown:
        raise ValueError(f"--model-args: unknown argument {unknown[0]!r}; give dtype, "
                         f"{', '.join(LM_OPTIONS)} or a generation knob ({', '.join(KNOBS)})")
    check_knobs("ar", {k: v for k, v in args.items() if k in KNOBS})
    return dtype, args


def evaluate_modes(model, runs, tasks: list[str], limit=None, gen_kwargs: dict | None = None, batch_size: int = 8,
                   model_args: dict | None = None, log=print) -> dict[str, dict]:
    """`evaluate` once per `tridlm.eval.modes.ModeRun` (its mode, block length and diffusion threshold; model_args
    over them) with the one loaded `model`: {run label: lm-eval results}."""
    manager = task_manager(tasks)
    out = {}
    for run in runs:
        knobs = {"block_length": run.block_length} if run.block_length else {}
        if run.threshold is not None:
            knobs["commit_threshold"] = run.threshold
        log(f"{run.label}: {', '.join(tasks)}")
        lm = TridlmLM(model, mode=run.mode, batch_size=batch_size, **{**knobs, **(model_args or {})})
        out[run.label] = evaluate(lm, tasks, limit, gen_kwargs, manager)
    return out


def unknown_tasks(tasks: list[str]) -> list[str]:
    """The names among `tasks` that are neither tridlm's tasks nor lm-eval's own. A tridlm_ name must be one of
    tridlm's; lm-eval's index is read only for other names (it takes some seconds)."""
    from .lm_eval_tasks import TASKS

    unknown = [t for t in tasks if t.startswith("tridlm_") and t not in TASKS]
    others = [t for t in tasks if not t.startswith("tridlm_")]
    if others and not unknown:
        from lm_eval.tasks import TaskManager

        index = set(TaskManager(include_defaults=True).all_tasks)
        unknown = [t for t in others if t not in index]
    return unknown


def task_manager(tasks: list[str]):
    """lm-eval's task index over tridlm's tasks, and lm-eval's own only when a task needs them."""
    from lm_eval.tasks import TaskManager

    from .lm_eval_tasks import TASKS, TASKS_DIR

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=any(t not in TASKS for t in tasks))


def evaluate(lm: TridlmLM, tasks: list[str], limit=None, gen_kwargs: dict | None = None, manager=None,
             log_samples: bool = False) -> dict:
    """lm-eval's `simple_evaluate` over `tasks` with `lm`: the chat tasks in a second pass with the chat template,
    both merged into one results object (results, configs, versions, n-shot, ...; config.tridlm holds the
    generation counts of every task). tridlm's HumanEval runs model-written code in tridlm's sandbox, so it is
    confirmed here."""
    from lm_eval import simple_evaluate

    from .lm_eval_tasks import CHAT_TASKS

    manager = manager or task_manager(tasks)
    merged: dict = {}
    for names, chat in (([t for t in tasks if t not in CHAT_TASKS], False), ([t for t in tasks if t in CHAT_TASKS],
                                                                              True)):
        if not names:
            continue
        r = simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager, gen_kwargs=gen_kwargs or None,
                            apply_chat_template=chat, confirm_run_unsafe_code=True, log_samples=log_samples)
        for key, value in r.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "config":
                merged[key].update(value)
            else:
                merged[key] = value  # config: the last pass's, whose counts include the first's
    return merged


def primary_metric(results: dict, task: str) -> tuple[str, float | None]:
    """(name, value) of a task's first declared metric, as lm-eval reports it (filter 'none' or the first)."""
    metrics = results.get("configs", {}).get(task, {}).get("metric_list") or []
    scores = results["results"].get(task, {})
    names = [m["metric"] for m in metrics if isinstance(m.get("metric"), str)]
    names += [k.split(",")[0] for k in scores if "," in k and "_stderr" not in k]
    for name in names:
        key = next((k for k in scores if k.split(",")[0] == name and isinstance(scores[k], int | float)), None)
        if key is not None:
            return name, float(scores[key])
    return (names[0] if names else "?"), None


def _score(value: float | None, metric: str) -> str:
    if value is None:
        return ""
    return f"{value:.1%}" if metric in ("exact_match", "acc", "acc_norm", "pass@1", "pass@10") else f"{value:.3f}"


def _generation(results: dict) -> dict:
    return results.get("config", {}).get("tridlm", {}).get("generation", {})


def modes_markdown(runs: dict[str, dict], tasks: list[str], command: str, description: str, meta: str) -> str:
    """One table: a row per task, each mode's score with its tokens per forward beside it (log-likelihood
    tasks generate nothing: no TPF); then each self-speculation's mean acceptance length per task."""
    labels = list(runs)
    lines = [f"Model: {description}. {meta}", "", f"Command: `{command}`", "",
             "| task | metric | " + " | ".join(f"{label} | TPF" for label in labels) + " |",
             "|---|---|" + "---:|---:|" * len(labels)]
    for task in tasks:
        cells, metric = [], None
        for label in labels:
            metric, value = primary_metric(runs[label], task)
            tpf = _generation(runs[label]).get(task, {}).get("tokens_per_forward")
            cells += [_score(value, metric), "" if tpf is None else f"{tpf:.2f}"]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    accepted = []
    for label in labels:
        per_task = [f"{task} {g['acceptance_length_mean']:.2f}" for task, g in _generation(runs[label]).items()
                    if task in tasks and g.get("acceptance_length_mean") is not None]
        if per_task:
            accepted.append(f"{label}: {', '.join(per_task)}")
    if accepted:
        lines += ["", "Mean acceptance length (tokens one verification emits): " + "; ".join(accepted) + "."]
    lines += ["", "Log-likelihood tasks score with causal (AR) forwards in every mode; TPF = generated tokens / "
              "decode forwards, summed over a task's rows."]
    return "\n".join(lines) + "\n"
