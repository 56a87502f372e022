"""Training recipes: a YAML or TOML file, overridden key by key from the command line, validated whole.

A recipe is the only way a run is configured. Every key has a type; an unknown key or a value of the
wrong type is an error that names the key, raised before anything is built.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class RecipeError(ValueError):
    """A recipe that cannot describe a run; the message names the key or file at fault."""


@dataclass
class ModelSection:
    """Architecture of a model trained from scratch (ignored when `init_from` is set)."""

    hidden_size: int = 256
    intermediate_size: int = 704
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    block_size: int = 16


@dataclass
class TokenizerSection:
    path: str | None = None  # a folder with tokenizer.json; default: init_from's, else one trained here
    vocab_size: int = 2048  # when training one: byte-level BPE on the training split
    min_frequency: int = 2
    max_train_chars: int = 20_000_000  # BPE training reads at most this much text


@dataclass
class DataSection:
    sources: list[str] = field(default_factory=lambda: ["shakespeare"])
    seq_len: int = 256
    val_fraction: float = 0.05
    cache_dir: str | None = None  # default: <out_dir>/data


@dataclass
class ObjectiveSection:
    alpha: float = 0.3  # L = L_AR + alpha * L_diff; 0 = the AR-only stage (the noisy stream is skipped)
    block_size: int | None = None  # default: the model's block_size
    eps: float = 1e-3
    # self-distillation: + distill * KL(causal prediction of token i || diffusion prediction at i) on
    # masked positions; the causal teacher is the same forward's clean stream, detached. It trains the
    # drafts toward what the verifier will accept.
    distill: float = 0.0
    # infilling examples (tridlm.training.fim): rows rewritten in FIM order, and rows whose diffusion
    # mask is one contiguous hole per block -- what the infiller and the block denoiser meet at run time
    fim_rate: float = 0.0
    hole_rate: float = 0.0


@dataclass
class DrafterSection:
    """A LoRA drafter (tridlm.lora): low-rank deltas on draft tokens only, base weights frozen.

    With rank > 0 the base model -- every causal pass, so AR mode and the verifier -- is unchanged
    and only the diffusion (noisy-stream) predictions are trained: how an AR model becomes a
    tri-mode one cheaply. The checkpoint stores the adapter in `linear_spec_lora/`.
    """

    rank: int = 0  # 0 = off: train every weight
    alpha: float = 32.0
    # start from a trained adapter instead of a fresh one: a peft-layout folder, or "default" (the
    # default model's shipped drafter); its rank must equal `rank`. A resumed run ignores it.
    init: str | None = None
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])


@dataclass
class TrainSection:
    steps: int = 1000
    global_batch: int = 16  # sequences per optimizer step, over all ranks and accumulation steps
    micro_batch: int = 8  # sequences per forward on one rank
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 = off
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda
    parallel: str = "ddp"  # ddp | fsdp (when launched with torchrun)
    threads: int = 0  # torch CPU threads per process; 0 = leave torch's default


@dataclass
class EvalSection:
    every: int = 100  # steps; 0 = only at the end
    sequences: int = 32  # held-out sequences scored (split across ranks)
    at_start: bool = True


@dataclass
class CheckpointSection:
    every: int = 100  # steps; 0 = only at the end
    keep: int = 3


@dataclass
class LogSection:
    progress: bool = True
    plot: bool = True


@dataclass
class Recipe:
    out_dir: str = "runs/default"
    seed: int = 0
    init_from: str | None = None  # a checkpoint folder (continued training or SFT), or "smollm2" (default_model)
    resume: bool = True  # continue from the newest checkpoint in out_dir/checkpoints, if any
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    drafter: DrafterSection = field(default_factory=DrafterSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# typed construction
# ---------------------------------------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """`value` as type `tp`, or RecipeError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single source is a list of one
        if not isinstance(value, list):
            raise RecipeError(f"recipe key {key!r}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise RecipeError(f"recipe key {key!r}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise RecipeError(f"recipe key {prefix.rstrip('.') or '(top level)'!r}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RecipeError(f"unknown recipe key {prefix + unknown[0]!r}; known keys"
                          f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, key + ".")
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def _set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        sub = d.setdefault(p, {})
        if not isinstance(sub, dict):
            raise RecipeError(f"recipe key {key!r}: {p!r} is not a section")
        d = sub
    d[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--train.lr", "3e-4", "--seed=1"]`` -> {"train.lr": "3e-4", "seed": "1"}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise RecipeError(f"expected --key value after the recipe, got {a!r}")
        if "=" in a:
            k, v = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise RecipeError(f"recipe key {a[2:]!r} has no value on the command line")
            k, v = a[2:], args[i + 1]
            i += 2
        out[k.replace("-", "_")] = v
    return out


def _override_value(raw: str):
    """Command-line values are YAML scalars or flow lists (`[a, b]`); types are checked later."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def read_recipe_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise RecipeError(f"recipe file {path}: use .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, ValueError) as e:
        if isinstance(e, RecipeError):
            raise
        raise RecipeError(f"recipe file {path} cannot be parsed: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file {path}: the top level must be a mapping of keys")
    return data


def load_recipe(path=None, overrides: dict | list | None = None, base: dict | None = None) -> Recipe:
    """A validated Recipe from a file (or `base` dict) with dotted-key overrides applied.

    Relative paths in the recipe resolve against the current directory.
    """
    data = read_recipe_file(path) if path is not None else {}
    data = _merge(copy.deepcopy(base or {}), data)  # overrides must never write into the caller's dict
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for k, v in (overrides or {}).items():
        _set_dotted(data, k, _override_value(v) if isinstance(v, str) else v)
    recipe = _build(Recipe, data)
    validate(recipe)
    return recipe


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise RecipeError(f"recipe key {key!r}: {msg}")


def validate(r: Recipe) -> None:
    """Value checks that need no file access (files are checked when the run is prepared)."""
    t = r.train
    _require(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _require(t.micro_batch >= 1, "train.micro_batch", f"must be >= 1, got {t.micro_batch}")
    _require(t.global_batch >= t.micro_batch, "train.global_batch",
             f"must be >= train.micro_batch ({t.micro_batch}), got {t.global_batch}")
    _require(t.schedule in ("cosine", "wsd", "constant"), "train.schedule",
             f"must be cosine, wsd or constant, got {t.schedule!r}")
    _require(0 <= t.decay_fraction <= 1, "train.decay_fraction", f"must be in [0, 1], got {t.decay_fraction}")
    _require(t.precision in ("fp32", "bf16"), "train.precision", f"must be fp32 or bf16, got {t.precision!r}")
    _require(t.device in ("auto", "cpu", "cuda"), "train.device", f"must be auto, cpu or cuda, got {t.device!r}")
    _require(t.parallel in ("ddp", "fsdp"), "train.parallel", f"must be ddp or fsdp, got {t.parallel!r}")
    _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _require(0 <= t.min_lr <= t.lr, "train.min_lr", f"must be in [0, train.lr], got {t.min_lr}")
    _require(r.objective.alpha >= 0, "objective.alpha", f"must be >= 0, got {r.objective.alpha}")
    _require(0 < r.objective.eps < 1, "objective.eps", f"must be in (0, 1), got {r.objective.eps}")
    for name in ("fim_rate", "hole_rate"):
        v = getattr(r.objective, name)
        _require(0 <= v <= 1, f"objective.{name}", f"is a fraction of rows: must be in [0, 1], got {v}")
    _require(r.data.seq_len >= 2, "data.seq_len", f"must be >= 2, got {r.data.seq_len}")
    _require(0 <= r.data.val_fraction < 1, "data.val_fraction", f"must be in [0, 1), got {r.data.val_fraction}")
    _require(len(r.data.sources) > 0, "data.sources", "needs at least one source")
    _require(r.checkpoint.keep >= 1, "checkpoint.keep", f"must be >= 1, got {r.checkpoint.keep}")
    bs = r.objective.block_size or r.model.block_size
    _require(bs >= 1, "objective.block_size", f"must be >= 1, got {bs}")
