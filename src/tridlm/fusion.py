"""Projections that read the same input, computed as one matrix product at inference.

q/k/v read one normed input, gate/up another. `FusedProjections` lays the group's weights out as
rows of one tensor and turns the members' parameters into views of it, so the checkpoint keeps the
NLD names and nothing is stored twice. A LoRA drafter (tridlm.lora) is folded in the same way: its
A matrices become extra rows of that tensor (one product gives the base outputs and every x @ A.T),
its B matrices blocks of one block-diagonal matrix (one small product per group). A one-token
decoding step then runs 4 weight products per layer instead of 7, and a draft pass 8 instead of 21.
Tokens that are not drafts always get the base rows' own product (the same shapes as without a
drafter), so AR mode and verify tokens compute exactly what the base model computes.

With the model's weight format "int8" (TriModeLM.set_weight_format) the fused rows are also kept as
int8 with one scale per row, quantized once, and the products use torch's int8 weight-only kernel with
bf16 activations; the B matrices stay in bf16. With "int4" the base rows are kept as 4-bit codes with a
scale and an offset per group of 32 inputs (asymmetric, like GGUF's Q4_1, from which the default model's
weights come, so those are held almost exactly) for torch's int4 weight-only kernel; the drafter's A rows
stay in bf16 (a few rows, a separate small product).

Narrow forwards can instead take tridlm's own products (`tridlm.native`: bf16 weights, or the same int8
codes and per-row scales), on a packed copy of the fused rows made once; TriModeLM.set_weight_format
measures where they win on the machine at hand. Batch-invariant forwards (TriModeLM.set_batch_invariant)
give each weight one kernel at every width instead (`own_kernels`: the AVX-512 or the AMX product).

The layout is checked before each use (the members' storage pointers) and rebuilt when something
replaced a parameter -- `.to(dtype)`, `load_state_dict(assign=True)`, `deepcopy`, attaching a drafter
-- so the members always read and write the fused storage. Training (grad mode) uses the members
one by one: the same values, per-parameter gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .native import TILE_ROWS

INT4_GROUP = 32  # inputs per int4 scale/offset pair, as in GGUF's Q4_1 blocks
INT4_ROWS = 16  # the kernel's packing takes a multiple of this many output rows
QUANTIZED = ("int8", "int4")


def int4_available(device) -> bool:
    """Whether torch's int4 weight-only product (groups of 32, bf16 activations) runs on `device`."""
    if torch.device(device).type != "cpu":
        return False  # its packing differs off the CPU; not wired here
    try:
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros(INT4_ROWS, 64, dtype=torch.int32), 1)
        sz = torch.ones(64 // INT4_GROUP, INT4_ROWS, 2, dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.ones(1, 64, dtype=torch.bfloat16), w, INT4_GROUP, sz)
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    return True



INT8_INPUTS = 16  # torch's int8 weight-only CPU kernel crashes (SIGSEGV) on other input counts


def int8_misfit(config) -> str | None:
    """Why the model's products cannot take torch's int8 weight-only kernel (inputs a multiple of 16), or None."""
    c = config
    inputs = {"hidden_size": c.hidden_size, "heads x head_dim": c.num_attention_heads * c.head_dim,
              "intermediate_size": c.intermediate_size}
    bad = [f"{k} {v} (inputs: a multiple of {INT8_INPUTS})" for k, v in inputs.items() if v % INT8_INPUTS]
    return "; ".join(bad) or None


def int4_misfit(config) -> str | None:
    """Why the model's products cannot take int4 weights (inputs a multiple of 32, outputs of 16), or None."""
    c = config
    inputs = {"hidden_size": c.hidden_size, "heads x head_dim": c.num_attention_heads * c.head_dim,
              "intermediate_size": c.intermediate_size}
    outputs = {"q/k/v rows": (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim,
               "hidden_size": c.hidden_size, "2 x intermediate_size": 2 * c.intermediate_size,
               "vocab_size": c.vocab_size}
    bad = [f"{k} {v} (inputs: a multiple of {INT4_GROUP})" for k, v in inputs.items() if v % INT4_GROUP]
    bad += [f"{k} {v} (outputs: a multiple of {INT4_ROWS})" for k, v in outputs.items() if v % INT4_ROWS]
    return ", ".join(bad) or None


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, scales and offsets [K/32, N, 2]) of w [N, K]: per group of 32 inputs, the group's
    minimum and (max - min)/15 -- the kernel computes w = (q - 8) * scale + offset, so offset = min + 8 scale."""
    n, k = w.shape
    g = w.float().view(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).view(n, k)
    sz = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(w.dtype)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz


def _amx_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.tridlm.gemm_bf16_amx(x, packed)


def _native_product(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.tridlm.gemm_bf16(x, packed)


# tridlm's bf16 products on packed weights (tridlm.native): the AVX-512 one and the AMX one
OWN_PRODUCTS = {"native": _native_product, "amx": _amx_product}
# the same, adding s * row_scale * (x @ W.T) into y in place: (y, x, packed, row_scale or None, s)
OWN_PRODUCTS_ADD = {"native": lambda *a: torch.ops.tridlm.gemm_bf16_add_(*a),
                    "amx": lambda *a: torch.ops.tridlm.gemm_bf16_amx_add_(*a)}


def _kernel(native: bool | str) -> str | None:
    """The OWN_PRODUCTS kernel a call's `native` asks for: True is the AVX-512 one, a name that kernel."""
    return "native" if native is True else native or None


def int8_available(device) -> bool:
    """Whether torch's int8 weight-only product runs on `device` (CPU builds have it; not every GPU build)."""
    try:
        x = torch.ones(1, 32, dtype=torch.bfloat16, device=device)
        w = torch.ones(8, 32, dtype=torch.int8, device=device)
        torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(8, dtype=torch.bfloat16, device=device))
    except (RuntimeError, NotImplementedError):
        return False
    return True


class FusedProjections:
    """The members `names` of module `owner` (nn.Linear or tridlm.lora.LoRALinear), as one product."""

    def __init__(self, owner, names: tuple[str, ...]):
        self.owner, self.names = owner, names
        self._ptrs: tuple | None = None
        self._known: list | None = None  # [(name, module, [(parameter name, parameter, data_ptr)])] as fused
        self._weight = self._block_b = self._gate_src = None
        self._n_base, self._splits, self._scaling = 0, [], 1.0
        self._int8: tuple | None = None  # (int8 rows, per-row scales, the float weight's version)
        self._int4: tuple | None = None  # (packed base rows, scales and offsets, the float weight's version)
        self._native: dict = {}  # {format: (packed rows, fp32 scales or None, the float weight's version)}
        # {weight shape: rows}: torch's float products with that weight take at most so many rows a call
        # (none listed: any); set for batch invariance (TriModeLM.set_batch_invariant)
        self.row_chunks: dict[tuple[int, int], int] = {}
        # {weight shape: "native" or "amx"}: products with that weight take that one of tridlm's kernels
        # (OWN_PRODUCTS) at every width; set for batch invariance like row_chunks
        self.own_kernels: dict[tuple[int, int], str] = {}
        self.invariant = False  # batch invariance: a draft token's base outputs come from the base rows alone
        self._kernel_for_both: tuple | None = None  # (own_kernels, the fused weight, _own_kernel_for_both's answer)

    def members(self) -> list:
        return [getattr(self.owner, n) for n in self.names]

    def _params(self, members) -> list[torch.Tensor]:
        ps = [m.weight for m in members]
        ps += [m.lora_A for m in members if hasattr(m, "lora_A")]
        ps += [m.lora_B for m in members if hasattr(m, "lora_B")]
        return ps

    def _ensure(self) -> None:
        if self._known is not None and self._still_fused():
            return
        members = self.members()
        params = self._params(members)
        if self._ptrs == tuple(p.data_ptr() for p in params):
            self._remember(members)
            return
        inference = {p.is_inference() for p in params}  # a model loaded under torch.inference_mode
        if len(inference) > 1:
            raise RuntimeError(f"{self.names}: some parameters were made under torch.inference_mode and some "
                               "not; load the model and its drafter in the same mode")
        # the fused storage is made like the parameters it replaces, with no autograd history
        with torch.inference_mode(inference.pop()), torch.no_grad():
            self._fuse(members)
        self._ptrs = tuple(p.data_ptr() for p in self._params(members))
        self._remember(members)

    def _remember(self, members) -> None:
        """The member modules and their parameters as fused, for `_still_fused`."""
        self._known = [(name, m, [(k, p, p.data_ptr()) for k, p in m._parameters.items()
                                  if k in ("weight", "lora_A", "lora_B")])
                       for name, m in zip(self.names, members, strict=True)]

    def _still_fused(self) -> bool:
        """Whether the members and their parameters are the objects fused last time, over the same memory: what
        `_ensure` asks before every product, in a few dictionary reads (rebuilding the parameter list and
        reading every pointer took ~2 ms of a 20 ms one-token forward of the default model)."""
        modules = self.owner._modules
        for name, m, params in self._known:
            if modules.get(name) is not m:
                return False
            held = m._parameters
            for k, p, ptr in params:
                if held.get(k) is not p or p.data_ptr() != ptr:
                    return False
        return True

    def _fuse(self, members) -> None:
        w0 = members[0].weight
        lora = [m for m in members if hasattr(m, "lora_A")]
        self._splits = [m.weight.shape[0] for m in members]
        self._n_base = sum(self._splits)
        rows = self._n_base + sum(m.lora_A.shape[0] for m in lora)
        weight = torch.empty(rows, w0.shape[1], dtype=w0.dtype, device=w0.device)
        start = 0
        for p in [m.weight for m in members] + [m.lora_A for m in lora]:
            n = p.shape[0]
            weight[start:start + n].copy_(p)
            p.data = weight[start:start + n]
            start += n
        self._weight, self._block_b, self._gate_src, self._int8, self._int4 = weight, None, None, None, None
        self._native = {}
        if lora:
            scalings = {m.scaling for m in lora}
            if len(scalings) != 1:
                raise ValueError(f"fused projections {self.names} need one LoRA scaling, got {sorted(scalings)}")
            self._scaling = scalings.pop()
            block = torch.zeros(self._n_base, sum(m.lora_A.shape[0] for m in lora), dtype=w0.dtype, device=w0.device)
            out, r0 = 0, 0
            for m in members:
                if hasattr(m, "lora_B"):
                    r = m.lora_B.shape[1]
                    block[out:out + m.weight.shape[0], r0:r0 + r].copy_(m.lora_B)
                    m.lora_B.data = block[out:out + m.weight.shape[0], r0:r0 + r]
                    r0 += r
                out += m.weight.shape[0]
            self._block_b, self._gate_src = block, lora[0].gate

    def _quantized(self, fmt: str) -> tuple:
        """The fused weight in `fmt`, made once and kept while the float weight is unchanged (an in-place
        change bumps its version): int8, every row with one symmetric scale; int4, the base rows packed
        with per-group scales and offsets (quantize_int4); "native-bf16" / "native-int8", the bf16 rows
        or their int8 codes in tridlm.native's packed layout, with fp32 scales for int8."""
        w = self._weight
        cached = self._int8 if fmt == "int8" else self._int4 if fmt == "int4" else self._native.get(fmt)
        if torch.compiler.is_compiling():
            return cached[:2]
        if fmt == "native-b":
            w = self._block_b
        version = None if w.is_inference() else w._version  # inference tensors cannot change outside it
        if cached is None or cached[-1] != version:
            with torch.inference_mode(w.is_inference()), torch.no_grad():
                if fmt == "int8":
                    scales = (w.abs().amax(1).float() / 127).clamp(min=1e-12)
                    q = (w.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
                    cached = self._int8 = (q, scales.to(w.dtype), version)
                elif fmt == "int4":
                    cached = self._int4 = (*quantize_int4(w[:self._n_base]), version)
                else:
                    from . import native

                    if fmt == "native-int8":
                        q, scales = self._quantized("int8")
                        pad = scales.new_zeros(native.padded(len(scales)) - len(scales), dtype=torch.float32)
                        cached = (native.pack(q), torch.cat([scales.float(), pad]), version)
                    elif fmt == "native-b":  # the drafter's B blocks (their values live in _block_b)
                        cached = (native.pack(self._block_b), None, version)
                    else:
                        cached = (native.pack(w), None, version)
                    self._native[fmt] = cached
        return cached[:2]

    def native_fits(self) -> bool:
        """Whether tridlm.native's packed layout holds these rows (and the base/drafter split)."""
        from . import native

        self._ensure()
        b = self._block_b  # the base rows end on a tile: the drafter's rows start a packed tile of their own
        return (self._n_base % native.TILE_ROWS == 0 and native.fits(self._weight.shape[1])
                and (b is None or native.fits(b.shape[1])))

    def float_weights(self) -> list[torch.Tensor]:
        """Every weight the float products read: the base rows; with a drafter also its A rows and B blocks,
        and (unless batch-invariant) the base and A rows together."""
        self._ensure()
        w, n = self._weight, self._n_base
        if self._block_b is None:
            return [w[:n]]
        return [w[:n], w[n:], self._block_b] + ([] if self.invariant else [w])

    def _linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """torch's x @ w.T, at most `row_chunks[w.shape]` rows of x per call: within the widths where every
        row's result was measured the same whatever the call's row count (tridlm.kernels.invariant_rows)."""
        c = self.row_chunks.get(tuple(w.shape), 0)
        if not c or x.numel() <= c * x.shape[-1]:
            return F.linear(x, w)
        flat = x.reshape(-1, x.shape[-1])
        return torch.cat([F.linear(flat[i:i + c], w) for i in range(0, flat.shape[0], c)]).view(*x.shape[:-1], -1)

    def _own_kernel_for_both(self, quant: str | None) -> str | None:
        """The one of tridlm's kernels that both the base rows and the drafter's A rows take at every width
        (batch invariance), if they take the same: then one product over both gives the base rows' bits."""
        if quant is not None or not self.own_kernels:
            return None
        known = self._kernel_for_both  # worked out once per choice of kernels and fused weight, not per call
        if known is None or known[0] is not self.own_kernels or known[1] is not self._weight:
            n = self._n_base
            kernels = {self.own_kernels.get(tuple(w.shape)) for w in (self._weight[:n], self._weight[n:])}
            one = kernels.pop() if len(kernels) == 1 else None
            known = self._kernel_for_both = (self.own_kernels, self._weight, one)
        return known[2]

    def _drafter_kernel(self, native: bool | str) -> str | None:
        return self.own_kernels.get(tuple(self._block_b.shape), _kernel(native))

    def _drafter_product(self, xa: torch.Tensor, native: bool) -> torch.Tensor:
        """x @ A.T through the B blocks."""
        kernel = self._drafter_kernel(native)
        if kernel is None:
            return self._linear(xa, self._block_b)
        packed, _ = self._quantized("native-b")
        return OWN_PRODUCTS[kernel](xa.reshape(-1, xa.shape[-1]), packed).view(*xa.shape[:-1], -1)

    def _add_drafter(self, y: torch.Tensor, xa: torch.Tensor, gate, native: bool | str) -> torch.Tensor:
        """y + scaling * gate * (x @ A.T through the B blocks): with tridlm's products, in place and in one
        rounding (OWN_PRODUCTS_ADD; tokens whose gate is 0 keep y's bits); else as torch's ops."""
        kernel = self._drafter_kernel(native)
        if kernel is None or y.dtype != torch.bfloat16:
            delta = self._drafter_product(xa, native) * self._scaling
            return y + (delta if isinstance(gate, str) else delta * gate)
        packed, _ = self._quantized("native-b")
        ys, xs = y.view(-1, y.shape[-1]), xa.reshape(-1, xa.shape[-1])
        row_scale, rows = self._draft_span(gate)
        if rows is not None:
            ys, xs = ys[rows], xs[rows]
        OWN_PRODUCTS_ADD[kernel](ys, xs, packed, row_scale, self._scaling)
        return y

    def _draft_span(self, gate) -> tuple[torch.Tensor | None, slice | None]:
        """(the gate as one fp32 scale per token of the span, the span of tokens holding the drafts) for the
        delta: (None, None) when every token is a draft; outside the span every token's gate is 0."""
        if isinstance(gate, str):
            return None, None
        return self._gate_src.row_scale(), self._gate_src.rows

    def _drafted_product(self, x: torch.Tensor, gate) -> torch.Tensor:
        """The base outputs with the drafter's delta on the draft tokens in one AMX call (gemm_bf16_amx_drafted):
        the bits of the product over base and A rows followed by _add_drafter, without Python between them."""
        flat = x.reshape(-1, x.shape[-1])
        packed, _ = self._quantized("native-bf16")
        b, _ = self._quantized("native-b")
        row_scale, rows = self._draft_span(gate)
        start, stop = (0, flat.shape[0]) if rows is None else (rows.start, rows.stop)
        y = torch.ops.tridlm.gemm_bf16_amx_drafted(flat, packed, self._n_base, b, row_scale, start, stop,
                                                   self._scaling)
        return y.view(*x.shape[:-1], -1)

    def _int8_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._quantized("int8")

    def _int4_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._quantized("int4")

    def _product(self, x: torch.Tensor, rows: slice, quant: str | None, native: bool = False) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        kernel = _kernel(native)
        if self.own_kernels and quant is None:
            kernel = self.own_kernels.get(tuple(self._weight[rows].shape), kernel)
        if kernel:  # tridlm's products (bf16 or int8 rows); the base rows end on a tile (native_fits)
            packed, scales = self._quantized("native-int8" if quant else "native-bf16")
            start, stop = rows.start or 0, self._weight.shape[0] if rows.stop is None else rows.stop
            t0, t1 = start // packed.shape[2], -(-stop // packed.shape[2])  # the last tile may be padded
            tiles = packed[t0:t1]
            out = (torch.ops.tridlm.gemm_int8(flat, tiles, scales[t0 * packed.shape[2]:t1 * packed.shape[2]])
                   if quant else OWN_PRODUCTS[kernel](flat, tiles))
            return out[:, :stop - start].view(*x.shape[:-1], -1)
        if quant is None:
            return self._linear(x, self._weight[rows])
        if quant == "int4":
            if rows.start:  # the drafter's A rows only: kept in bf16
                return F.linear(x, self._weight[rows])
            packed, sz = self._int4_rows()
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat.contiguous(), packed, INT4_GROUP, sz)
            if rows.stop is None and self._weight.shape[0] > self._n_base:  # base and A rows together
                out = torch.cat([out, F.linear(flat, self._weight[self._n_base:])], dim=-1)
            return out.view(*x.shape[:-1], -1)
        q, scales = self._int8_rows()
        flat = torch.ops.aten._weight_int8pack_mm(flat, q[rows], scales[rows])
        return flat.view(*x.shape[:-1], -1)

    def prepare(self, quant: str | None, native: bool = False) -> None:
        """Lay out (and quantize) now, e.g. before a compiled graph captures the tensors."""
        self._ensure()
        if quant == "int8":
            self._int8_rows()
        elif quant == "int4":
            self._int4_rows()
        if native:
            self._quantized("native-int8" if quant else "native-bf16")
            if self._block_b is not None:
                self._quantized("native-b")

    def __call__(self, x: torch.Tensor, quant: str | None = None, native: bool = False) -> list[torch.Tensor]:
        """The members' outputs for input x; quant "int8" / "int4": weight-only products (bf16 activations);
        native: through tridlm.native's products (quant None or "int8"; the caller checked native_fits): True
        or "native" the AVX-512 one, "amx" the AMX one for bf16 weights (int8 always takes the AVX-512 one)."""
        if not torch.compiler.is_compiling():  # a compiled graph captured the prepared layout
            self._ensure()
        gate = self._gate_src.value if self._gate_src is not None else None
        base = slice(0, self._n_base)
        if gate is None:  # no draft token: the base rows only, exactly the base model's products
            y = self._product(x, base, quant, native)
        elif isinstance(gate, str) and not self.invariant:  # every token a draft: base and x @ A.T in one product
            both = self._product(x, slice(None), quant, native)
            y = self._add_drafter(both[..., :self._n_base], both[..., self._n_base:], gate, native)
        else:  # drafts among base tokens (or all, batch-invariant): base tokens keep the base model's products
            own = self._own_kernel_for_both(quant)
            if own == "amx" and self._drafter_kernel(native) == "amx" and x.dtype == torch.bfloat16 \
                    and (self._weight.shape[0] - self._n_base) % TILE_ROWS == 0:  # the A rows fill whole tiles
                y = self._drafted_product(x, gate)
                return list(y.split(self._splits, dim=-1)) if len(self._splits) > 1 else [y]
            if own:  # each of the kernel's output tiles is summed alone: one product, the base tiles' bits
                both = self._product(x, slice(None), None, own)
                y, xa = both[..., :self._n_base], both[..., self._n_base:]
            else:
                y = self._product(x, base, quant, native)
                xa = self._product(x, slice(self._n_base, None), quant, native)
            y = self._add_drafter(y, xa, gate, native)  # a draft's gate is 1: the same bits as "all"
        return list(y.split(self._splits, dim=-1)) if len(self._splits) > 1 else [y]
