"""The training loop: joint AR + diffusion objective, AdamW, schedules, DDP/FSDP, checkpoints, exact resume.

Loss normalisation (spec §3.1 "global loss averaging", §3.3): the loss of one optimizer step is

    (sum of AR CE + alpha * sum of masked CE / p) / (AR-scored tokens + masked tokens)

where both sums and the count run over the whole global batch: every rank and every accumulation
micro-batch. The count is known before any forward (it depends only on the data and the noise), so
it is all-reduced first; each micro-batch then back-propagates its summed loss times
world_size / global_count, and DDP's gradient averaging (division by world_size) leaves exactly the
gradient of the global mean. With alpha = 0 the masked tokens do not contribute and are not counted.

Determinism: the sample order depends on (seed, samples consumed) and the noise on (seed, step,
global sample index), so a run resumed from a checkpoint, or split over a different number of
processes with the same global batch, sees the same data and the same masks.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import lora
from ..checkpoint import CheckpointError, atomic_folder_write
from ..config import ModelConfig, RopeParameters
from ..loader import load
from ..model import TriModeLM
from ..tokenizer import Tokenizer, fim_tokens
from . import distributed, state
from .bpe import train_bpe
from .corpora import resolve_source, split_documents
from .fim import FimConfig, transform_batch
from .metrics import MetricsLog, plot_losses
from .objective import LossSums, contributing_tokens, corrupt, draw_noise, joint_loss_sums
from .packing import build_split, open_split
from .recipe import Recipe, RecipeError
from .sampler import SampleOrder
from .schedule import lr_at

EVAL_NOISE_STEP = -1  # the validation noise is the same at every evaluation, so curves compare


@dataclass
class TrainResult:
    out_dir: Path
    final_model: Path
    steps: int
    is_main: bool = True  # rank 0 (the process that wrote the files)
    history: list[dict] = field(default_factory=list)  # this process's metrics records


# ---------------------------------------------------------------------------------------------
# checks that need files, all made before anything is built
# ---------------------------------------------------------------------------------------------
def _tokenizer_folder(r: Recipe) -> Path | None:
    if r.tokenizer.path:
        return Path(r.tokenizer.path).expanduser()
    if r.init_from:
        return Path(r.init_from).expanduser()
    return None


def check_tokenizer(tok: Tokenizer, where) -> None:
    if tok.mask_id is None:
        raise RecipeError(f"tokenizer {where} has no mask token: the diffusion objective needs one "
                          "(set 'mask_token' in tokenizer_config.json, or add the token '<|mask|>')")
    if tok.eos_id is None:
        raise RecipeError(f"tokenizer {where} has no end-of-text token (set 'eos_token' in tokenizer_config.json)")


def drafter_init_dir(init: str) -> Path:
    """The adapter folder a recipe's drafter.init names ("default": the default model's drafter)."""
    if init == "default":
        from ..default_model import adapter_dir

        return adapter_dir()
    return Path(init).expanduser()


def preflight(r: Recipe, world: int) -> None:
    """File and consistency checks: a missing file or a bad combination fails here, naming it."""
    t = r.train
    per_step = t.micro_batch * world
    if t.global_batch % per_step:
        raise RecipeError(f"recipe key 'train.global_batch' ({t.global_batch}) must be a multiple of "
                          f"train.micro_batch x processes ({t.micro_batch} x {world} = {per_step})")
    if r.init_from and not Path(r.init_from).expanduser().is_dir():
        raise RecipeError(f"recipe key 'init_from': checkpoint folder {r.init_from} does not exist")
    if r.drafter.init:
        if r.drafter.rank <= 0:
            raise RecipeError("recipe key 'drafter.init' needs drafter.rank > 0 (the adapter's rank)")
        folder = drafter_init_dir(r.drafter.init)
        cfg = folder / lora.ADAPTER_CONFIG
        if not cfg.is_file():
            raise RecipeError(f"recipe key 'drafter.init': {cfg} does not exist; name a peft adapter folder or "
                              "'default'")
        rank = json.loads(cfg.read_text()).get("r")
        if rank != r.drafter.rank:
            raise RecipeError(f"recipe key 'drafter.init': the adapter's rank is {rank} but drafter.rank is "
                              f"{r.drafter.rank}; set drafter.rank: {rank}")
    for s in r.data.sources:
        resolve_source(s)  # raises DataError naming a missing file
    folder = _tokenizer_folder(r)
    if folder is not None:
        if not (folder / "tokenizer.json").is_file():
            key = "tokenizer.path" if r.tokenizer.path else "init_from"
            raise RecipeError(f"recipe key {key!r}: tokenizer file {folder / 'tokenizer.json'} does not exist")
        check_tokenizer(Tokenizer.from_folder(folder), folder / "tokenizer.json")


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, recipe: Recipe):
        self.r = recipe
        self.out = Path(recipe.out_dir).expanduser()
        self.ckpt_root = self.out / "checkpoints"
        self.history: list[dict] = []

    # -- set-up ------------------------------------------------------------------------------
    def _prepare_tokenizer_and_data(self) -> None:
        r, d = self.r, self.d
        tok_dir = self.out / "tokenizer"
        data_dir = Path(r.data.cache_dir).expanduser() if r.data.cache_dir else self.out / "data"
        given = _tokenizer_folder(r)
        if d.is_main:
            train_docs, val_docs = split_documents(r.data.sources, r.data.val_fraction)
            if given is not None:
                tok = Tokenizer.from_folder(given)
            elif (tok_dir / "tokenizer.json").is_file():
                tok = Tokenizer.from_folder(tok_dir)  # a resumed or repeated run reuses its tokenizer
            else:
                tok = train_bpe(_bpe_texts(train_docs, r.tokenizer.max_train_chars), r.tokenizer.vocab_size,
                                r.tokenizer.min_frequency)
                atomic_folder_write(tok_dir, tok.save)  # a kill never leaves half a tokenizer
            check_tokenizer(tok, given or tok_dir)
            if r.objective.fim_rate > 0 and fim_tokens(tok) is None:  # before any data is packed
                raise RecipeError("objective.fim_rate > 0 needs the tokens <fim_prefix>, <fim_suffix>, <fim_middle> "
                                  "in the tokenizer, which lacks them: set objective.fim_rate: 0 or use a tokenizer "
                                  "that has them (tridlm.tokenizer.add_fim_tokens)")
            build_split(data_dir, "train", train_docs, tok, r.data.seq_len)
            build_split(data_dir, "val", val_docs, tok, r.data.seq_len)
        d.barrier()
        self.tokenizer = Tokenizer.from_folder(given or tok_dir)
        self.train_split = open_split(data_dir, "train")
        self.val_split = open_split(data_dir, "val")
        self.order = SampleOrder(self.train_split, r.seed)

    def _model_config(self) -> ModelConfig:
        m, tok = self.r.model, self.tokenizer
        return ModelConfig(vocab_size=tok.vocab_size, hidden_size=m.hidden_size,
                           intermediate_size=m.intermediate_size, num_hidden_layers=m.num_hidden_layers,
                           num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_key_value_heads,
                           max_position_embeddings=m.max_position_embeddings,
                           rope_parameters=RopeParameters(rope_theta=m.rope_theta),
                           tie_word_embeddings=m.tie_word_embeddings, mask_token_id=tok.mask_id,
                           bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                           block_size=m.block_size, dlm_loss_weight=self.r.objective.alpha)

    def _build_model(self, resume_from: Path | None) -> TriModeLM:
        r = self.r
        torch.manual_seed(r.seed)
        if resume_from is not None or r.init_from:
            src = resume_from or Path(r.init_from).expanduser()
            try:
                model = load(src, load_tokenizer=False)
            except CheckpointError as e:
                raise RecipeError(f"recipe key 'init_from': {e}") from None
        else:
            model = TriModeLM(self._model_config())
        cfg = model.config
        if cfg.mask_token_id != self.tokenizer.mask_id:
            raise RecipeError(f"the model's mask_token_id ({cfg.mask_token_id}) differs from the tokenizer's mask "
                              f"token id ({self.tokenizer.mask_id})")
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise RecipeError(f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocabulary "
                              f"only {cfg.vocab_size}")
        if r.data.seq_len > cfg.max_position_embeddings:
            raise RecipeError(f"recipe key 'data.seq_len' ({r.data.seq_len}) exceeds the model's "
                              f"max_position_embeddings ({cfg.max_position_embeddings})")
        if r.drafter.rank > 0:
            self._prepare_drafter(model)
        return model.to(self.d.device).train()

    def _prepare_drafter(self, model: TriModeLM) -> None:
        """Attach the LoRA drafter (a resumed checkpoint already carries it) and freeze the base."""
        dr = self.r.drafter
        if model.draft_adapter is None and dr.init:
            lora.load(model, drafter_init_dir(dr.init))
        elif model.draft_adapter is None:
            torch.manual_seed(self.r.seed)
            lora.attach(model, dr.rank, dr.alpha, dr.targets)
        if model.draft_adapter["r"] != dr.rank:
            raise RecipeError(f"recipe key 'drafter.rank' ({dr.rank}) differs from the checkpoint's adapter "
                              f"rank ({model.draft_adapter['r']})")
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name)

    def _wrap(self, model: TriModeLM):
        d, t = self.d, self.r.train
        if not d.enabled:
            return model
        if t.parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in model.encoder.layers:
                fully_shard(layer)
            return fully_shard(model)
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)

    def _optimizer(self) -> torch.optim.Optimizer:
        t = self.r.train
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:  # a LoRA drafter trains its adapter only
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))

    def setup(self) -> None:
        r = self.r
        if r.train.threads > 0:
            torch.set_num_threads(r.train.threads)
        self.d = distributed.setup(r.train.device)
        preflight(r, self.d.world)
        self.out.mkdir(parents=True, exist_ok=True)
        self._prepare_tokenizer_and_data()
        if self.d.is_main:
            state.remove_stale_temporaries(self.ckpt_root)
            (self.out / "recipe.json").write_text(json.dumps(r.to_dict(), indent=2))
        ckpts = state.list_checkpoints(self.ckpt_root) if r.resume else []
        resume_from = ckpts[-1][1] if ckpts else None
        self.base_model = self._build_model(resume_from)
        # fusion re-lays parameters out in memory (tridlm.fusion): never under DDP/FSDP's bookkeeping
        self.base_model.fuse_projections = False
        self.config = self.base_model.config
        self.block_size = r.objective.block_size or self.config.block_size
        self.fim = FimConfig(r.objective.fim_rate, r.objective.hole_rate)
        self.fim_tokens = fim_tokens(self.tokenizer)
        self.model = self._wrap(self.base_model)
        self.opt = self._optimizer()
        self.step, self.samples_seen = 0, 0
        if resume_from is not None:
            self._restore(resume_from)
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        if self.d.is_main:
            self.metrics.truncate_after(self.step if resume_from is not None else -1)
        self.d.barrier()

    def _restore(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        ts = state.load_trainer_state(folder)
        set_optimizer_state_dict(self.model, self.opt, optim_state_dict=ts["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        state.set_rng_state(ts["rng"])
        self.step, self.samples_seen = int(ts["step"]), int(ts["samples_seen"])
        if self.d.is_main:
            print(f"resuming from {folder} (step {self.step})", flush=True)

    # -- one optimizer step --------------------------------------------------------------------
    def _autocast(self):
        if self.r.train.precision == "bf16":
            return torch.autocast(device_type=self.d.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _no_sync(self, last: bool):
        if last or not self.d.enabled:
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync"):  # DDP
            return self.model.no_sync()
        return _fsdp_no_sync(self.model)

    def _micro_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, object]]:
        r, d = self.r, self.d
        mb = r.train.micro_batch
        accum = r.train.global_batch // (mb * d.world)
        base = self.samples_seen + d.rank * accum * mb
        out = []
        for m in range(accum):
            idx = list(range(base + m * mb, base + (m + 1) * mb))
            ids, lm = self.order.batch(idx)
            noise = draw_noise(r.seed, step, idx, ids.shape[1]) if r.objective.alpha > 0 else None
            if self.fim.enabled:
                ids, lm, noise = transform_batch(ids, lm, noise, self.fim, self.fim_tokens, self.tokenizer.eos_id,
                                                 self.block_size, r.seed, step, idx)
            ids, lm = ids.to(d.device), lm.to(d.device)
            c = None
            if noise is not None:
                c = corrupt(ids, lm, noise, self.config.mask_token_id, r.objective.eps)
            out.append((ids, lm, c))
        return out

    def train_step(self, step: int) -> dict:
        r, d = self.r, self.d
        alpha, distill = r.objective.alpha, r.objective.distill
        lr = lr_at(step, steps=r.train.steps, lr=r.train.lr, min_lr=r.train.min_lr,
                   warmup_steps=r.train.warmup_steps, schedule=r.train.schedule,
                   decay_fraction=r.train.decay_fraction)
        for g in self.opt.param_groups:
            g["lr"] = lr
        micro = self._micro_batches(step)
        local_count = sum(contributing_tokens(lm, c) for _, lm, c in micro)
        (global_count,) = d.sum([local_count])
        scale = d.world / max(global_count, 1.0)
        totals = _Totals()
        for m, (ids, lm, c) in enumerate(micro):
            with self._no_sync(m == len(micro) - 1):  # gradients are reduced once, after the last micro-batch
                with self._autocast():
                    sums: LossSums = joint_loss_sums(self.model, ids, lm, c, self.block_size, distill)
                (sums.total(alpha, distill) * scale).backward()
            totals.add(sums)
        grad_norm = None
        if r.train.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.train.grad_clip))
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.samples_seen += r.train.global_batch
        t = totals.reduced(d)
        return {"kind": "train", "step": step + 1,
                "loss": (t.ar_sum + (alpha * t.diff_sum if alpha else 0.0) + distill * t.distill_sum)
                / max(global_count, 1.0),
                **t.losses(), "lr": lr, "grad_norm": grad_norm, "tokens": self.samples_seen * r.data.seq_len}

    # -- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict | None:
        r, d = self.r, self.d
        n = min(r.eval.sequences, len(self.val_split)) // d.world * d.world
        if n == 0:
            return None
        rows = list(range(d.rank, n, d.world))
        self.model.eval()
        totals = _Totals()
        mb = r.train.micro_batch
        for start in range(0, len(rows), mb):
            idx = rows[start:start + mb]
            ids = torch.from_numpy(self.val_split.tokens[idx].astype("int64")).to(d.device)
            lm = torch.from_numpy(self.val_split.loss_mask[idx].astype("int64")).to(d.device)
            noise = draw_noise(r.seed, EVAL_NOISE_STEP, idx, ids.shape[1])
            c = corrupt(ids, lm, noise, self.config.mask_token_id, r.objective.eps)
            with self._autocast():
                totals.add(joint_loss_sums(self.model, ids, lm, c, self.block_size, r.objective.distill))
        self.model.train()
        losses = totals.reduced(d).losses()
        return {"kind": "val", "step": self.step, **losses, "ar_ppl": math.exp(min(losses["ar_loss"], 50.0)),
                "sequences": n}

    # -- checkpoints --------------------------------------------------------------------------
    def _full_model_copy(self) -> TriModeLM | None:
        """A CPU TriModeLM with the full weights on rank 0 (a collective under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.d.is_main:
            return None
        with torch.device("meta"):
            copy = TriModeLM(self.config)
        copy = copy.to_empty(device="cpu")
        if self.config.tie_word_embeddings:
            copy.diffusion_head.weight = copy.encoder.embed_tokens.weight
        adapter = self.base_model.draft_adapter
        if adapter is not None:  # same LoRA layout, so the adapter's tensors have somewhere to go
            lora.attach(copy, adapter["r"], adapter["lora_alpha"], adapter["target_modules"])
        copy.load_state_dict({k: v.detach().cpu() for k, v in sd.items()}, strict=False)
        return copy.eval()

    def save_checkpoint(self) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        copy = self._full_model_copy()
        optim = get_optimizer_state_dict(self.model, self.opt,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.d.is_main:
            ts = {"format": 1, "step": self.step, "samples_seen": self.samples_seen, "optimizer": optim,
                  "rng": state.rng_state(), "world_size": self.d.world, "recipe": json.dumps(self.r.to_dict())}
            state.save_checkpoint(state.step_dir(self.ckpt_root, self.step), copy, self.tokenizer, ts)
            state.prune(self.ckpt_root, self.r.checkpoint.keep)
        self.d.barrier()

    def save_final(self) -> Path:
        path = self.out / "model"
        copy = self._full_model_copy()
        if self.d.is_main:
            copy.save(path, tokenizer=self.tokenizer)
        self.d.barrier()
        return path

    # -- the loop -----------------------------------------------------------------------------
    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        if self.d.is_main:
            self.metrics.write(rec)

    def _plot(self) -> None:
        if self.d.is_main and self.r.log.plot:
            plot_losses(self.metrics.path, self.out / "loss.png")

    def run(self) -> TrainResult:
        r, d = self.r, self.d
        steps = r.train.steps
        if self.step == 0 and r.eval.at_start:
            rec = self.evaluate()
            if rec:
                self._log(rec)
        bar = _progress(steps, self.step, enabled=d.is_main and r.log.progress)
        tokens_per_step = r.train.global_batch * r.data.seq_len
        while self.step < steps:
            t0 = time.perf_counter()
            rec = self.train_step(self.step)
            self.step += 1
            dt = time.perf_counter() - t0
            rec["tok_per_s"] = tokens_per_step / dt if dt > 0 else None
            self._log(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"ar {rec['ar_loss']:.3f} diff {_fmt(rec['diff_loss'])} lr {rec['lr']:.2e} "
                                    f"{rec['tok_per_s'] or 0:,.0f} tok/s")
            last = self.step == steps
            if (r.eval.every and self.step % r.eval.every == 0) or last:
                val = self.evaluate()
                if val:
                    self._log(val)
                    if bar is not None:
                        bar.write(f"step {self.step}: val AR loss {val['ar_loss']:.3f} (ppl {val['ar_ppl']:.1f}), "
                                  f"diffusion loss {_fmt(val['diff_loss'])}")
                self._plot()
            if (r.checkpoint.every and self.step % r.checkpoint.every == 0) or last:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        final = self.save_final()
        self._plot()
        return TrainResult(self.out, final, self.step, self.d.is_main, self.history)


@dataclass
class _Totals:
    """Loss sums and counts accumulated over micro-batches, then summed over ranks."""

    ar_sum: float = 0.0
    diff_sum: float = 0.0
    diff_ce_sum: float = 0.0
    n_ar: float = 0.0
    n_masked: float = 0.0
    distill_sum: float = 0.0

    def add(self, s: LossSums) -> None:
        if s.distill_sum is not None:
            self.distill_sum += float(s.distill_sum.detach())
        self.ar_sum += float(s.ar_sum.detach())
        self.diff_sum += float(s.diff_sum.detach())
        self.diff_ce_sum += s.diff_ce_sum
        self.n_ar += s.n_ar
        self.n_masked += s.n_masked

    def reduced(self, d) -> _Totals:
        return _Totals(*d.sum([self.ar_sum, self.diff_sum, self.diff_ce_sum, self.n_ar, self.n_masked,
                               self.distill_sum]))

    def losses(self) -> dict:
        """Mean AR CE per scored token; mean 1/p-weighted and plain CE per masked token."""
        m = self.n_masked
        return {"ar_loss": self.ar_sum / max(self.n_ar, 1.0), "diff_loss": self.diff_sum / m if m else None,
                "diff_ce": self.diff_ce_sum / m if m else None,
                **({"distill_kl": self.distill_sum / m} if self.distill_sum and m else {})}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _bpe_texts(docs, max_chars: int):
    """Training text for the BPE, capped at `max_chars`; chats are rendered as plain text."""
    used = 0
    for doc in docs:
        text = doc.text if not doc.is_chat else "\n".join(m.get("content", "") for m in doc.messages)
        yield text
        used += len(text)
        if used >= max_chars:
            return


def train(recipe: Recipe) -> TrainResult:
    """Run a recipe to the end (resuming from out_dir's newest checkpoint when there is one)."""
    if recipe.init_from:  # a folder, or a name the model resolver knows ("smollm2": converted and cached)
        from ..default_model import locate_model

        try:
            recipe.init_from = str(locate_model(os.path.expanduser(recipe.init_from), draft_adapter=False).folder)
        except (FileNotFoundError, ValueError) as e:
            raise RecipeError(f"recipe key 'init_from': {e}") from None
    trainer = Trainer(recipe)
    threads = torch.get_num_threads()  # train.threads applies to this run only
    try:
        trainer.setup()
        return trainer.run()
    finally:
        torch.set_num_threads(threads)
        if getattr(trainer, "d", None) is not None:
            distributed.teardown(trainer.d)
