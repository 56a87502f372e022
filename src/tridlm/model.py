"""The tri-mode transformer: a Ministral3/Llama decoder whose attention pattern is chosen per call.

Parameter names are those of the released NLD checkpoints (`encoder.*`, `diffusion_head.weight`),
so a released checkpoint loads with no renaming. The model knows nothing about decoding modes: a
caller gives token ids, their absolute positions, an optional KV cache, and a pattern.

Logit conventions (spec §2.1): with the ``block``/``dual``-noisy patterns the logits at position i
predict token i; with ``causal`` they predict token i+1.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fusion
from .cache import KVCache
from .config import ModelConfig, RopeParameters, llama4_query_scale
from .fusion import FusedProjections
from .machine import cache_root
from .masks import full_mask, new_token_mask


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(rp: RopeParameters, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim/2] and the cos/sin scale ("attention factor") for a rope type."""
    base, dim = rp.rope_theta, head_dim
    # always built on the CPU in float64, even under a meta-device context; cast at use
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)
    inv_freq = 1.0 / pos_freqs
    if rp.rope_type == "default":
        return inv_freq.float(), 1.0
    if rp.rope_type == "linear":
        return (inv_freq / rp.factor).float(), 1.0
    # YaRN: interpolate low frequencies, extrapolate high ones, with a linear ramp between.
    f = rp.factor
    orig = rp.original_max_position_embeddings
    if orig is None:
        raise ValueError("yarn rope needs original_max_position_embeddings")

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rp.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rp.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq / f) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    if rp.mscale and rp.mscale_all_dim:
        attention_factor = _yarn_mscale(f, rp.mscale) / _yarn_mscale(f, rp.mscale_all_dim)
    else:
        attention_factor = _yarn_mscale(f)
    return inv_freq.float(), attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


COMPILED_CACHE_BUCKET = 256  # with compiled graphs, KV caches hold a power of two >= this many positions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.native = False  # tridlm.native's one-pass kernel at bf16 inference (TriModeLM.set_weight_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native and x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled():
            return torch.ops.tridlm.rms_norm_bf16(x, self.weight, self.eps)
        return self.torch_forward(x)

    def torch_forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)
        self.qkv = FusedProjections(self, ("q_proj", "k_proj", "v_proj"))
        self.out = FusedProjections(self, ("o_proj",))
        self.native_rope = False  # tridlm.native's rotary kernel at bf16 inference (TriModeLM.set_weight_format)

    def forward(self, x, cos, sin, q_scale, layer: int, ctx: _AttnContext | _JointContext) -> torch.Tensor:
        q, k, v = self.qkv(x, ctx.quant, ctx.native) if ctx.fused else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        joint = isinstance(ctx, _JointContext)  # x is every part's tokens, [1, N, H]: attention part by part
        parts = ctx.parts if joint else [_Part(x.shape[0], x.shape[1], cos, sin, q_scale, ctx)]
        if all(self.in_one_call(p, q) for p in parts):
            out = self.attend_parts(q, k, v, parts, layer)
        elif joint:
            out = torch.cat([self.attend(q[:, p.span], k[:, p.span], v[:, p.span], p, layer).view(1, p.span_len, -1)
                             for p in parts], dim=1)
        else:
            out = self.attend(q, k, v, parts[0], layer)
        return self.out(out, ctx.quant, ctx.native)[0] if ctx.fused else self.o_proj(out)

    def in_one_call(self, part: _Part, q: torch.Tensor) -> bool:
        """Whether tridlm.native's attend_part_bf16 takes this part: its rotary embedding, cache write and attention
        in one call, with the bits of the rotary formula (rope_bf16's), kv_write and attend_bf16 -- wherever
        attend_native would serve it (bf16 inference: `_part` decided), outside compiled graphs and without
        Llama-4 query scaling."""
        ctx = part.ctx
        return ctx.native_attention and not ctx.static and part.q_scale is None and not torch.compiler.is_compiling()

    def attend_parts(self, q, k, v, parts: list[_Part], layer: int) -> torch.Tensor:
        """Every part's attention through attend_part_bf16, each writing its span of one output [.., T, heads x dim]
        (no concatenation)."""
        n = q.shape[0] * q.shape[1]
        q, k, v = q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1)
        out = q.new_empty(n, self.n_heads * self.head_dim)
        scale = self.head_dim ** -0.5
        for p in parts:
            c, at = p.ctx.cache, p.span if p.span is not None else slice(None)
            torch.ops.tridlm.attend_part_bf16(q[at], k[at], v[at], out[at], p.cos, p.sin, c.k[layer], c.v[layer],
                                              c.lengths, p.ctx.new_mask, scale, p.ctx.write)
        return out.view(1, n, -1) if parts[0].span is not None else out.view(parts[0].B, parts[0].T, -1)

    def rotate(self, q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding of q and k [B, heads, T, D]: tridlm.native's one call where set_weight_format chose
        it (the formula's bits), else `torch_rotate`."""
        if self.native_rope and q.dtype == torch.bfloat16 and cos.shape[0] == q.shape[0] \
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return torch.ops.tridlm.rope_bf16(q, k, cos, sin)
        return self.torch_rotate(q, k, cos, sin)

    @staticmethod
    def torch_rotate(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def attend(self, q, k, v, part: _Part, layer: int) -> torch.Tensor:
        """Rotary embedding and attention for one part's projections ([B, T, *] in, [B, T, heads x dim] out)."""
        B, T, cos, sin, q_scale, ctx = part.B, part.T, part.cos, part.sin, part.q_scale, part.ctx
        q = q.reshape(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.reshape(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.rotate(q, k, cos, sin)
        if q_scale is not None:  # Llama-4 scaling, applied after RoPE
            q = q * q_scale
        if ctx.native_attention:  # tridlm.native's kernel: cache and new tokens in one softmax
            out = ctx.attend_native(layer, q, k, v)
        elif ctx.static:
            out = ctx.attend_static(layer, q, k, v)
        else:
            keys, values = ctx.keys_values(layer, k, v)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.mask,
                                                 enable_gqa=self.n_kv != self.n_heads)
        return out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)
        self.gate_up = FusedProjections(self, ("gate_proj", "up_proj"))
        self.down = FusedProjections(self, ("down_proj",))

    def forward(self, x: torch.Tensor, fused: bool = False, quant: str | None = None,
                native: bool = False) -> torch.Tensor:
        if fused:
            gate, up = self.gate_up(x, quant, native)
            return self.down(F.silu(gate) * up, quant, native)[0]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, q_scale, layer: int, ctx: _AttnContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, q_scale, layer, ctx)
        return x + self.mlp(self.post_attention_layernorm(x), ctx.fused, ctx.quant, ctx.native)


class Encoder(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


def _cache_attention(q, k, v, bias):
    """(softmax(q k^T / sqrt(D) + bias) v, its log-sum-exp in fp32): torch's fused CPU kernel, which
    accumulates in fp32 and returns both; the same math elsewhere."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=bias)
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5 + bias.float()
    return torch.softmax(s, dim=-1) @ v.float(), torch.logsumexp(s, dim=-1)


class _AttnContext:
    """What every layer of one forward shares: the key-space mask and how to get keys/values."""

    def __init__(self, cache: KVCache | None, write: bool, mask: torch.Tensor | None, uniform: int | None):
        self.cache, self.write, self.mask, self.uniform = cache, write, mask, uniform
        self.key_len = 0
        self.fused = False  # fused projections (tridlm.fusion): at inference, not when gradients flow
        self.quant = None  # "int8" / "int4": weight-only products (TriModeLM.weight_format)
        self.native = False  # tridlm.native's products (TriModeLM.native_max_tokens)
        self.native_attention = False  # tridlm.native's attention (TriModeLM.native_attention_max_tokens)
        self.new_mask: torch.Tensor | None = None  # the new tokens' own mask, [B, T, T], for it
        self.static = False  # fixed-shape layout of a compiled decode graph (TriModeLM.compile_decode)
        # static: `mask` is among the new tokens only, [B, 1, T, T]; the cache's visible slots are
        # `cache_bias` (0 / -inf, [B, 1, 1, S]); each layer's new keys/values are kept in `new_kv`
        self.cache_bias = self.cache_empty = None
        self.new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attend_static(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of a compiled graph: over the whole cache, which the graph only reads (writing a
        graph input makes Inductor copy the cache every layer), and over the new tokens, the two
        softmaxes merged by their log-sum-exps. The new keys/values are kept for the caller to store
        after the graph. A kv head's G query heads attend as G x T query rows (no repeated keys)."""
        self.new_kv.append((k, v))
        B, H, T, D = q.shape
        n_kv = k.shape[1]
        G = H // n_kv
        qg = q.reshape(B, n_kv, G * T, D)  # row g*T + t: query head kv*G + g at token t
        bias = self.cache_bias.expand(B, 1, G * T, self.cache_bias.shape[-1])
        o_c, lse_c = _cache_attention(qg, self.cache.k[layer], self.cache.v[layer], bias)
        lse_c = lse_c.masked_fill(self.cache_empty, float("-inf"))  # an empty cache adds nothing
        s_n = (qg.float() @ k.float().transpose(-1, -2)) * D ** -0.5  # [B, n_kv, G*T, T]
        s_n = s_n.masked_fill(~self.mask.repeat(1, 1, G, 1), float("-inf"))
        lse_n = torch.logsumexp(s_n, dim=-1)  # finite: every new token sees itself
        o_n = torch.softmax(s_n, dim=-1) @ v.float()
        lse = torch.logaddexp(lse_c, lse_n)
        o_c = torch.where(self.cache_empty[..., None], 0.0, o_c.float())
        out = o_c * (lse_c - lse).exp()[..., None] + o_n * (lse_n - lse).exp()[..., None]
        return out.to(q.dtype).view(B, n_kv, G, T, D).reshape(B, H, T, D)

    def attend_native(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The new tokens over each row's valid cache slots and each other (`new_mask`), read in place: the
        same attention as the other paths, one kernel call a layer. Keys/values are stored as those do."""
        c = self.cache
        out = torch.ops.tridlm.attend_bf16(q, c.k[layer], c.v[layer], c.lengths, k, v, self.new_mask,
                                           q.shape[-1] ** -0.5)  # [B, T, H, D]
        if self.static:
            self.new_kv.append((k, v))
        elif self.write:
            c.write(layer, k, v, self.uniform)
        return out.transpose(1, 2)

    def keys_values(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        c = self.cache
        if c is None:
            return k, v
        if self.write:
            c.write(layer, k, v, self.uniform)
            return c.k[layer, :, :, :self.key_len], c.v[layer, :, :, :self.key_len]
        n_prefix = self.key_len - k.shape[2]
        if self.key_len <= c.max_len:
            # read-only pass: the new keys go to slots past every row's length (garbage by the cache's
            # contract), so attention reads one slice instead of a per-layer copy of the whole prefix
            c.k[layer, :, :, n_prefix:self.key_len] = k
            c.v[layer, :, :, n_prefix:self.key_len] = v
            return c.k[layer, :, :, :self.key_len], c.v[layer, :, :, :self.key_len]
        return (torch.cat([c.k[layer, :, :, :n_prefix], k], dim=2),  # no room past the rows: a copy
                torch.cat([c.v[layer, :, :, :n_prefix], v], dim=2))


@dataclass
class _Part:
    """One forward's share of a joint forward (`TriModeLM.forward_many`): its rows and tokens, rotary
    tables, attention context, and where its tokens lie among all of them (`span`)."""

    B: int
    T: int
    cos: torch.Tensor
    sin: torch.Tensor
    q_scale: torch.Tensor | None
    ctx: _AttnContext
    span: slice | None = None  # set in a joint forward
    logits_at: torch.Tensor | None = None
    return_hidden: bool = False
    advance: torch.Tensor | int | None = None  # what the cache's lengths move on by after the layers

    @property
    def span_len(self) -> int:
        return self.B * self.T


class _JointContext:
    """What the layers of a joint forward share: the product settings (chosen for all N tokens, as one
    forward of that width would) and the parts, each attending over its own cache."""

    def __init__(self, parts: list[_Part], fused: bool, quant: str | None, native):
        self.parts, self.fused, self.quant, self.native = parts, fused, quant, native


class TriModeLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.diffusion_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.diffusion_head.weight = self.encoder.embed_tokens.weight
        # a plain attribute, not a buffer: `.to(bfloat16)` must not round the frequencies
        self.inv_freq, self.attention_factor = rope_frequencies(config.rope_parameters, config.head_dim)
        self.tokenizer = None  # attached by tridlm.load when the folder has one
        self.draft_adapter: dict | None = None  # set by tridlm.lora.attach (a LoRA drafter)
        self._draft_gate = None
        self.fuse_projections = True  # tridlm.fusion at inference; the trainer turns it off
        self.weight_format = "float"  # or "int8" / "int4": see set_weight_format
        self.quant_max_tokens = 0  # quantized products for forwards of at most this many tokens (batch x tokens)
        self.native_max_tokens = 0  # tridlm.native's products for forwards of at most this many tokens
        self.native_kernel = "native"  # which of them for bf16 weights: "native" (AVX-512) or "amx"
        self.native_unavailable: str | None = "not chosen (set_weight_format chooses)"
        self.native_attention_max_tokens = 0  # tridlm.native's attention for forwards over a cache this narrow
        self.native_attention_unavailable: str | None = "not chosen (set_weight_format chooses)"
        self.head = FusedProjections(self, ("diffusion_head",))
        self.batch_invariant = False  # see set_batch_invariant
        self._compiled, self._compiled_tokens = None, ()  # compile_decode's graphs and the widths they serve
        self._compiled_for: tuple = ()  # the _graph_state they were compiled in

    # -- helpers ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.diffusion_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.diffusion_head.weight.dtype

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        if self._compiled is not None:  # compiled graphs are per cache length: a few lengths, not one per request
            max_len = max(COMPILED_CACHE_BUCKET, 1 << (max_len - 1).bit_length())
        return KVCache.for_model(self, batch_size, max_len)

    def _rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # [B, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos = (emb.cos() * self.attention_factor).to(dtype)[:, None]
        sin = (emb.sin() * self.attention_factor).to(dtype)[:, None]
        rp = self.config.rope_parameters
        q_scale = None
        if rp.llama_4_scaling_beta is not None:
            orig = rp.original_max_position_embeddings or self.config.max_position_embeddings
            if int(positions.max()) >= orig:  # the scale is exactly 1 below `orig`: skip the multiply
                q_scale = llama4_query_scale(positions, rp.llama_4_scaling_beta, orig).to(dtype)[:, None, :, None]
        return cos, sin, q_scale

    # -- the one forward -------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        pattern="causal",
        write_cache: bool | None = None,
        block_size: int | None = None,
        valid: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        return_hidden: bool = False,
        draft: bool | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for `input_ids` [B, T] at absolute `positions` [B, T].

        cache: prefix KV; its rows' lengths say how much of it each row sees.
        pattern: "causal" | "block" | "dual" | bool tensor [T, T] / [B, T, T] among the new tokens.
        write_cache: store the new keys/values (default: True for causal, False otherwise).
        valid: [B, T] bool, False for padding among the new tokens (their cache slots are written
            but the row's length advances only by its valid count).
        logits_at: [B, K] indices into T; only those positions get logits ([B, K, V]).
        draft: which tokens are drafts, for a LoRA drafter (tridlm.lora): bool or [B, T] bool.
            Default: every token of a "block" forward, the noisy half of a "dual" one, none otherwise.
        """
        args = self._inputs(input_ids, positions, cache, pattern, write_cache, block_size, valid, logits_at,
                            return_hidden, draft)
        B, T = input_ids.shape
        write_cache = args[4]  # with its default filled in
        if self._compiled is not None and cache is not None and T in self._compiled_tokens and B == 1 \
                and not torch.is_grad_enabled():
            if self._graph_state() != self._compiled_for:
                raise RuntimeError(f"the model changed since compile_decode ({self._compiled_for} -> "
                                   f"{self._graph_state()}): its graphs hold the old weights; call "
                                   "compile_decode again")
            if write_cache:
                cache.check_room(T)
            try:
                out, new_k, new_v = self._compiled(*args)
            except torch._dynamo.exc.FailOnRecompileLimitHit:  # too many shapes: the rest run eager
                self._compiled = None
            else:
                if write_cache:  # after the graph, which only reads the cache
                    cache.write_layers(new_k, new_v)
                    cache.advance(valid.sum(1) if valid is not None else T)
                return out
        return self._forward(*args)

    def _forward_static(self, *args):
        return self._forward(*args, static=True)

    def _inputs(self, input_ids, positions=None, cache=None, pattern="causal", write_cache=None, block_size=None,
                valid=None, logits_at=None, return_hidden=False, draft=None) -> tuple:
        """`forward`'s arguments with its defaults filled in, and the draft gate in place of `draft`."""
        B, T = input_ids.shape
        dev = input_ids.device
        if positions is None:
            start = cache.lengths[:, None] if cache is not None else 0
            positions = start + torch.arange(T, device=dev)[None, :].expand(B, T)
        if write_cache is None:
            write_cache = isinstance(pattern, str) and pattern == "causal"
        if pattern == "dual" and cache is not None:
            raise ValueError("the dual (training) pattern does not use a KV cache")
        # which tokens are drafts, decided here (it may read tensor values: not inside a compiled graph)
        gate = self._draft_gate_value(draft, pattern, B, T, self.dtype, dev) if self._draft_gate is not None else None
        return input_ids, positions, cache, pattern, write_cache, block_size, valid, logits_at, return_hidden, gate

    def _products(self, n_tokens: int) -> tuple[bool, str | None, str | bool]:
        """How a forward of n tokens runs its products: fused (tridlm.fusion: at inference, not when gradients
        flow), weight-only quantized ("int8" / "int4" / None), and through which of tridlm.native's kernels
        ("native" / "amx" / False). set_weight_format keeps the ranges inside the forwards it measured; a later
        .to(dtype) leaves torch's products."""
        fused = self._fused()
        quant = self.weight_format if (fused and self.weight_format in fusion.QUANTIZED
                                       and n_tokens <= self.quant_max_tokens) else None
        native = fused and n_tokens <= self.native_max_tokens and self.dtype == torch.bfloat16 and self.native_kernel
        return fused, quant, native

    def logits(self, hidden: torch.Tensor, products: tuple | None = None) -> torch.Tensor:
        """The head on final hidden states [..., H], through `products` (`_products`' answer for the forward
        they come from; default: what a forward of that many tokens takes). What a forward with return_hidden
        leaves out gets here the bits the forward's own head would give where products are row-invariant
        (set_batch_invariant)."""
        fused, quant, native = products or self._products(hidden.numel() // hidden.shape[-1])
        return self.head(hidden, quant, native)[0] if fused else self.diffusion_head(hidden)

    def _fused(self) -> bool:
        """Projections fused (tridlm.fusion) and tridlm's kernels allowed: at inference, not when gradients flow."""
        return self.fuse_projections and not torch.is_grad_enabled()

    def _part(self, x, positions, pattern, block_size, cache, write, valid, static=False) -> _Part:
        """A forward's rotary tables and attention context; x is its embedded tokens [B, T, H]."""
        B, T = x.shape[:2]
        cos, sin, q_scale = self._rope(positions, x.dtype)
        ctx = self._attention_context(B, T, pattern, block_size, cache, write, valid, x.device, static)
        ctx.native_attention = (self._fused() and cache is not None
                                and B * T <= self.native_attention_max_tokens and self.dtype == torch.bfloat16)
        advance = (valid.sum(1) if valid is not None else T) if cache is not None and write and not static else None
        return _Part(B, T, cos, sin, q_scale, ctx, advance=advance)

    def _forward(self, input_ids, positions, cache, pattern, write_cache, block_size, valid, logits_at, return_hidden,
                 gate, static: bool = False):
        x = self.encoder.embed_tokens(input_ids)
        part = self._part(x, positions, pattern, block_size, cache, write_cache, valid, static)
        ctx = part.ctx
        ctx.fused, ctx.quant, ctx.native = self._products(x.shape[0] * x.shape[1])
        x = self._layers(x, part.cos, part.sin, part.q_scale, ctx, gate)
        if part.advance is not None:
            cache.advance(part.advance)
        x = self.encoder.norm(x)
        if logits_at is not None:
            x = torch.gather(x, 1, logits_at[..., None].expand(-1, -1, x.shape[-1]))
        out = x if return_hidden else self.logits(x, (ctx.fused, ctx.quant, ctx.native))
        if ctx.static:  # the new keys/values, [layers, B, H, T, D], for the caller to store
            return out, torch.stack([k for k, _ in ctx.new_kv]), torch.stack([v for _, v in ctx.new_kv])
        return out

    def _layers(self, x, cos, sin, q_scale, ctx, gate, draft_rows: slice | None = None):
        if self._draft_gate is not None:
            self._draft_gate.value, self._draft_gate.rows = gate, draft_rows
        try:
            for i, layer in enumerate(self.encoder.layers):
                x = layer(x, cos, sin, q_scale, i, ctx)
        finally:
            if self._draft_gate is not None:
                self._draft_gate.value = self._draft_gate.rows = None
        return x

    def forward_many(self, calls: list[dict]) -> list[torch.Tensor]:
        """Several forwards as one: for each call (a dict of `forward`'s arguments) what `forward(**call)`
        returns, with the tokens of all of them through the same products -- one pass over the weights and
        one set of per-layer ops, norms, MLP and head for all -- and each call's rows attending over its own
        cache with its own pattern. Batches of different widths step together this way
        (`tridlm.decoding.step_together`) instead of padding narrow rows to the widest. Inference only,
        eager (compiled graphs serve single forwards). A row's result is the one it gets alone as far as the
        products are row-invariant (`set_batch_invariant`); otherwise it differs as in any wider forward."""
        if len(calls) == 1:
            return [self(**calls[0])]
        if torch.is_grad_enabled():
            raise RuntimeError("forward_many is for inference: call it under torch.no_grad() or "
                               "torch.inference_mode()")
        parts, xs, gates, start = [], [], [], 0
        for call in calls:
            ids, positions, cache, pattern, write, block_size, valid, logits_at, hidden, gate = self._inputs(**call)
            x = self.encoder.embed_tokens(ids)
            p = self._part(x, positions, pattern, block_size, cache, write, valid)
            p.span, p.logits_at, p.return_hidden = slice(start, start + p.span_len), logits_at, hidden
            start += p.span_len
            parts.append(p)
            xs.append(x.reshape(1, p.span_len, -1))
            gates.append(gate)
        ctx = _JointContext(parts, *self._products(start))
        x = self._layers(torch.cat(xs, dim=1), None, None, None, ctx, self._joint_gate(parts, gates),
                         self._draft_rows(parts, gates))
        for p in parts:
            if p.advance is not None:
                p.ctx.cache.advance(p.advance)
        x = self.encoder.norm(x)
        picked = []  # each part's positions that get logits (or hidden states), [B, K, H]
        for p in parts:
            h = x[:, p.span].reshape(p.B, p.T, -1)
            if p.logits_at is not None:
                h = torch.gather(h, 1, p.logits_at[..., None].expand(-1, -1, h.shape[-1]))
            picked.append(h)
        heads = [h for h, p in zip(picked, parts, strict=True) if not p.return_hidden]
        if heads:  # one head product for every part that wants logits
            flat = torch.cat([h.reshape(1, -1, h.shape[-1]) for h in heads], dim=1)
            logits = self.logits(flat, (ctx.fused, ctx.quant, ctx.native))[0]
            logits = iter(logits.split([h.shape[0] * h.shape[1] for h in heads]))
        return [h if p.return_hidden else next(logits).view(h.shape[0], h.shape[1], -1)
                for h, p in zip(picked, parts, strict=True)]

    def _joint_gate(self, parts: list[_Part], gates: list) -> torch.Tensor | str | None:
        """The parts' draft gates (None, "all" or [B, T, 1]) as one over all their tokens: [1, N, 1], "all" or None."""
        if all(g is None for g in gates):
            return None
        if all(isinstance(g, str) for g in gates):
            return "all"
        flat = [g.reshape(-1) if isinstance(g, torch.Tensor) else
                torch.full((p.span_len,), float(g == "all"), dtype=self.dtype, device=self.device)
                for g, p in zip(gates, parts, strict=True)]
        return torch.cat(flat)[None, :, None]

    @staticmethod
    def _draft_rows(parts: list[_Part], gates: list) -> slice | None:
        """The span of a joint forward's tokens from the first part with drafts to the last: the drafter's
        delta is added there only (AR rows beside a diffusion batch hold none)."""
        spans = [p.span for g, p in zip(gates, parts, strict=True) if g is not None]
        return slice(spans[0].start, spans[-1].stop) if spans else None

    @staticmethod
    def _draft_gate_value(draft, pattern, B, T, dtype, device):
        if draft is None:
            if isinstance(pattern, str) and pattern == "block":
                return "all"
            if isinstance(pattern, str) and pattern == "dual":
                draft = torch.zeros(B, T, dtype=torch.bool, device=device)
                draft[:, : T // 2] = True
            else:
                return None
        if isinstance(draft, bool):
            return "all" if draft else None
        if bool(draft.all()):
            return "all"
        if not bool(draft.any()):
            return None
        return draft.to(device=device, dtype=dtype)[..., None]

    def _attention_context(self, B, T, pattern, block_size, cache, write, valid, dev, static=False) -> _AttnContext:
        nm = new_token_mask(pattern, T, block_size, dev)
        if static and cache is not None:
            # fixed shapes for a compiled graph: attention spans the whole cache, then the new tokens;
            # the mask hides cache slots past each row's length
            S = cache.k.shape[3]  # not cache.max_len: a graph may keep this size symbolic
            prefix = torch.arange(S, device=dev)[None, :] < cache.lengths[:, None]  # [B, S]
            new = nm.expand(B, T, T)
            if valid is not None:  # padding is seen by no one and sees only itself
                new = (new & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)
            ctx = _AttnContext(cache, write, new[:, None], None)
            ctx.new_mask = new
            zero = torch.zeros((), dtype=cache.k.dtype, device=dev)
            ctx.cache_bias = torch.where(prefix, zero, float("-inf"))[:, None, None]  # [B, 1, 1, S]
            ctx.cache_empty = (cache.lengths == 0)[:, None, None]
            ctx.key_len, ctx.static = S + T, True
            return ctx
        if cache is None:
            mask = None if (isinstance(pattern, str) and pattern == "block" and valid is None) else nm
            if mask is not None and valid is not None:
                zeros = torch.zeros(B, dtype=torch.long, device=dev)
                mask = full_mask(nm, zeros, zeros, T, valid)
            elif mask is not None:
                mask = mask[None, None] if mask.dim() == 2 else mask[:, None]
            return _AttnContext(None, False, mask, None)
        if write:
            cache.check_room(T)
        uniform = cache.uniform_length()
        prefix_lens = cache.lengths
        if uniform is not None:
            key_len = uniform + T
            offsets = prefix_lens
        elif write:
            key_len = int(prefix_lens.max()) + T
            offsets = prefix_lens
        else:
            key_len = int(prefix_lens.max()) + T
            offsets = torch.full_like(prefix_lens, key_len - T)
        all_new_visible = isinstance(pattern, str) and pattern == "block"
        if uniform is not None and valid is None and (all_new_visible or T == 1):
            mask = None  # every key is visible: let SDPA skip masking
        else:
            mask = full_mask(nm, prefix_lens, offsets, key_len, valid)
        ctx = _AttnContext(cache, write, mask, uniform)
        ctx.key_len = key_len
        new = nm.expand(B, T, T)
        if valid is not None:  # as in the static layout: padding is seen by no one and sees itself
            new = (new & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=dev)
        ctx.new_mask = new.contiguous()  # read by every layer's native attention
        return ctx

    def set_weight_format(self, fmt: str, max_tokens: int | None = None, native_max_tokens: int | None = None,
                          native_attention_max_tokens: int | None = None) -> TriModeLM:
        """"int8": inference products read int8 weights with one scale per output row (weight-only, A16W8:
        activations stay bf16); "int4": 4-bit codes with a scale and an offset per group of 32 inputs
        (A16W4, like GGUF's Q4_1). Quantized once from the bf16 weights, which stay the parameters
        (training, saving and gradients use them). Needs a bf16 model; "float" goes back. Opt-in: it
        changes outputs. Forwards wider than `max_tokens` (batch x tokens; default: measured on this
        machine, see tridlm.kernels) use the bf16 weights, faster there: prefills, typically.

        Forwards of at most `native_max_tokens` tokens take tridlm's own products (tridlm.native) for bf16
        weights ("float" on a bf16 model: the AVX-512 or, where it measured faster, the AMX one --
        `native_kernel`) and int8 ones; default: measured here for bf16 weights, 0 where
        they cannot run (`native_unavailable` says why), and 0 for int8, where torch's int8 kernel as
        Inductor compiles it beat them on draft and verify blocks (BENCHMARKS.md) -- an eager timing cannot
        see that; pass a width to use them. 0 turns them off. They form the same products as torch's, summed
        in another order: results agree within the documented tolerance (README, What is exact).
        `native_attention_max_tokens` is the same for tridlm's attention over a KV cache (bf16 models, head
        sizes 32-128; measured against torch's, whatever the weight format)."""
        if fmt not in ("float", *fusion.QUANTIZED):
            raise ValueError(f"unknown weight format {fmt!r}; use 'float', 'int8' or 'int4'")
        if fmt in fusion.QUANTIZED:
            if self.dtype != torch.bfloat16:
                raise ValueError(f"{fmt} weights need bf16 activations; the model is {self.dtype}: call "
                                 f".to(torch.bfloat16) first (torch's {fmt} weight-only kernel is fast with bf16)")
            available = fusion.int8_available if fmt == "int8" else fusion.int4_available
            if not available(self.device):
                raise ValueError(f"{fmt} weight-only products are not available on {self.device} in torch "
                                 f"{torch.__version__}; use bfloat16 there")
            misfit = (fusion.int4_misfit if fmt == "int4" else fusion.int8_misfit)(self.config)
            if misfit:
                fix = "use int8" if fmt == "int4" else "use bfloat16"
                raise ValueError(f"{fmt} weights do not fit this model's shapes: {misfit}; {fix}")
            if max_tokens is None:
                from .kernels import quant_max_tokens

                max_tokens = quant_max_tokens(self, fmt)
        self.weight_format, self.quant_max_tokens = fmt, max_tokens or 0
        if native_max_tokens is None and fmt == "int8":
            native_max_tokens = 0  # see the docstring: measured slower than compiled torch int8 at 8 tokens
        self.native_unavailable = self._native_misfit() if native_max_tokens != 0 else "turned off (width 0)"
        if native_max_tokens and self.native_unavailable:
            raise ValueError(f"tridlm's own products cannot run here: {self.native_unavailable}; "
                             "pass native_max_tokens=0 (torch's products)")
        self.native_kernel = "native"
        if fmt == "float" and not self.native_unavailable:
            from .kernels import native_kernel

            self.native_kernel = native_kernel(self)
        if native_max_tokens is None:
            from .kernels import native_max_tokens as measured

            native_max_tokens = 0 if self.native_unavailable else measured(self, fmt)
        if fmt == "int8":  # wider int8 forwards take bf16 weights, which these products were not measured for
            native_max_tokens = min(native_max_tokens, self.quant_max_tokens)
        self.native_max_tokens = native_max_tokens
        self.native_attention_unavailable = (self._native_attention_misfit() if native_attention_max_tokens != 0
                                             else "turned off (width 0)")
        if native_attention_max_tokens and self.native_attention_unavailable:
            raise ValueError(f"tridlm's own attention cannot run here: {self.native_attention_unavailable}; "
                             "pass native_attention_max_tokens=0 (torch's attention)")
        if native_attention_max_tokens is None:
            from .kernels import native_attention_max_tokens as measured

            native_attention_max_tokens = 0 if self.native_attention_unavailable else measured(self)
        self.native_attention_max_tokens = native_attention_max_tokens
        from .kernels import native_norm, native_rope

        on, rope = native_norm(self), native_rope(self)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.native = on
            elif isinstance(m, Attention):
                m.native_rope = rope
        return self

    def set_batch_invariant(self, on: bool = True) -> TriModeLM:
        """Forwards in which every row gets the bits it gets alone, whatever shares its forward: other rows,
        padding, a wider verify block. Greedy results are then the same solo and in any batch, and greedy
        self-speculation gives AR's exact output, in bf16, where rounding otherwise flips near ties (fp32
        GEMMs are not row-invariant either, but their rounding rarely flips one). Needs a bf16 model on a
        CPU where tridlm.native's attention runs. Every forward over a KV cache takes that attention
        (each query sums its visible keys in order, so padding and hidden slots change nothing). Products
        take, per weight shape and at every width, whichever measured best of torch's, split into pieces of
        at most as many rows as were measured to give every row its solo bits (tridlm.kernels.invariant_rows),
        and tridlm's AVX-512 and AMX products, whose sums have one order at every width: about 10 s of
        measuring for the default model on 2 cores, once per machine (tridlm.kernels.invariant_choices).
        "on=False" goes back to the measured choice of
        kernels (set_weight_format)."""
        groups = self._fused_groups()
        if not on:
            for g in groups:
                g.row_chunks, g.own_kernels, g.invariant = {}, {}, False
            self.batch_invariant = False
            return self.set_weight_format(self.weight_format)
        if self.dtype != torch.bfloat16 or self.device.type != "cpu":
            raise ValueError(f"batch-invariant forwards need a bf16 model on a CPU, not {self.dtype} on "
                             f"{self.device}: call .to(torch.bfloat16) first (--dtype bfloat16)")
        if self.weight_format != "float":
            raise ValueError(f"batch-invariant forwards take bf16 weights, not {self.weight_format}: "
                             "call set_weight_format('float') first (--dtype bfloat16)")
        if self._compiled is not None:
            raise ValueError("batch-invariant forwards are eager: compiled decode graphs take other kernels "
                             "at batch 1 (use --kernels eager)")
        misfit = self._native_attention_misfit()
        if misfit:
            raise ValueError(f"batch-invariant forwards need tridlm's attention, which cannot run here: {misfit}")
        from .kernels import invariant_choices

        self.set_weight_format("float", native_max_tokens=0, native_attention_max_tokens=sys.maxsize)
        for g in groups:
            g.invariant = True
        choices = invariant_choices(self)
        for g in groups:
            fits = g.native_fits()
            shapes = {tuple(w.shape) for w in g.float_weights()}
            g.row_chunks = {shape: choices[(*shape, fits)][0] for shape in shapes}
            g.own_kernels = {shape: choices[(*shape, fits)][1] for shape in shapes
                             if choices[(*shape, fits)][1] != "torch"}
        self.batch_invariant = True
        return self

    def _native_attention_misfit(self) -> str | None:
        """Why tridlm.native's attention cannot serve this model, or None."""
        from . import native

        if self.dtype != torch.bfloat16 or self.device.type != "cpu":
            return f"it takes bf16 keys and values on a CPU, not {self.dtype} on {self.device}"
        if self.config.head_dim % 32 or self.config.head_dim > 128:
            return f"it takes head sizes 32, 64, 96 or 128, not {self.config.head_dim}"
        return native.unavailable()

    def _native_misfit(self) -> str | None:
        """Why tridlm.native's products cannot serve this model's current format, or None."""
        from . import native

        if self.weight_format not in ("float", "int8") or self.dtype != torch.bfloat16:
            return f"they take bf16 or int8 weights with bf16 activations, not {self.weight_format} {self.dtype}"
        if self.device.type != "cpu":
            return f"they run on CPUs, not {self.device}"
        if not all(g.native_fits() for g in self._fused_groups()):
            return (f"the model's projections need outputs in multiples of {native.TILE_ROWS} and an even number "
                    "of inputs")
        return native.unavailable()

    def compile_decode(self, tokens=(1,), mode: str = "max-autotune-no-cudagraphs") -> TriModeLM:
        """Run batch-1 decode forwards of `tokens` new tokens (1: AR; a block length L: self-speculation's
        draft and verify passes) through a KV cache, without gradients, as Inductor graphs with the
        current weights frozen in: one graph per shape (tokens, pattern, cache length -- caches are then
        made a power of two long), compiled on first use (about a minute each for the 135M default model
        on 2 CPU cores; torch's caches, under tridlm's cache folder, let later processes load them).
        Attention spans the cache's whole length under a mask and only reads it (the new keys/values are
        stored after the graph), so shapes stay fixed while rows grow. Prefills, batches and other widths
        stay eager. The weights are baked in: call it again after changing them (a changed dtype, weight
        format or drafter is refused; changed values are not detected). It resets torch's compiled graphs
        in this process (torch._dynamo.reset), and Inductor's freezing stays on for later compiles."""
        if self.batch_invariant:
            raise ValueError("compiled decode graphs take other kernels than batch-invariant forwards: call "
                             "set_batch_invariant(False) first")
        tokens = tuple(sorted({int(t) for t in tokens}))
        if not tokens or tokens[0] < 1:
            raise ValueError(f"compile_decode needs token counts >= 1, got {tokens}")
        import torch._inductor.config as inductor_config

        # torch's compile caches (graphs, autotuning) beside tridlm's, so a machine compiles once, not once a boot
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
        inductor_config.freezing = True  # weights as constants: what lets Inductor pick its packed GEMMs
        with torch.no_grad():
            for group in self._fused_groups():
                quant = self.weight_format if self.weight_format in fusion.QUANTIZED else None
                group.prepare(quant, native=self.native_max_tokens > 0)
        torch._dynamo.reset()
        # the weights are frozen into the graphs anyway: guarding the modules would only cost time per call
        options = {**torch._inductor.list_mode_options(mode),
                   "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self._compiled = torch.compile(self._forward_static, fullgraph=True, dynamic=False, options=options)
        self._compiled_tokens, self._compiled_for = tokens, self._graph_state()
        return self

    def _graph_state(self) -> tuple:
        """What compiled graphs bake in besides the weights' values."""
        return (str(self.device), self.dtype, self.weight_format, self.quant_max_tokens, self.native_max_tokens,
                self.native_kernel, self.native_attention_max_tokens, self.draft_adapter is not None,
                self.fuse_projections, self.batch_invariant)

    def _fused_groups(self) -> list[FusedProjections]:
        groups = [self.head]
        for layer in self.encoder.layers:
            groups += [layer.self_attn.qkv, layer.self_attn.out, layer.mlp.gate_up, layer.mlp.down]
        return groups

    def num_parameters(self) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        return n

    # -- a Hugging Face-like API over the modules above this one (imported on call: they import this one)
    def save(self, path, tokenizer=None, **kwargs) -> None:
        """Write this model as a checkpoint folder (`tridlm.checkpoint.save`)."""
        from .checkpoint import save

        save(self, path, tokenizer=tokenizer or self.tokenizer, **kwargs)

    def generate(self, prompt, mode: str = "ar", **kwargs):
        """`tridlm.generate(self, prompt, mode, ...)`: see there for the parameters."""
        from .generate import generate

        return generate(self, prompt, mode, **kwargs)

    def infill(self, prefix=None, suffix=None, **kwargs):
        """`tridlm.infill(self, prefix, suffix, ...)`: see there for the parameters."""
        from .edit import infill

        return infill(self, prefix, suffix, **kwargs)

    def revise(self, text, **kwargs):
        """`tridlm.revise(self, text, ...)`: see there for the parameters."""
        from .edit import revise

        return revise(self, text, **kwargs)
