"""`FastSEDD`: the inference runner of a `model.SEDD`, the same function computed faster.

It shares the plain network's parameters (no copy, except the caches below, which follow any
change of the weights) and exposes the two calls the sampler makes, `runner(tokens, sigma)` and
`runner.log_score_at_index(...)`, plus `warm()` for the compiled trunk. The maths is the authors';
only the order of operations and the memory they touch change, so results agree with
`SEDD.forward` to float rounding (tests/test_model_fast_paths.py). Inference only: it runs under
`torch.inference_mode()` and never applies dropout.

The speed-ups:
- rows that share one sigma (every row of one request) share one conditioning row, so layer norm
  and modulation fuse into one affine layer norm (`modulated_norm`); every block's modulation
  comes from one matmul over their weights side by side (the stacked modulation cache);
- rotary writes q and k in one pass each (`rotary_qk`); on a CPU in float32, q and k come out of a
  copy of the qkv weight whose rows put each rotary pair side by side, so rotary is one complex
  multiplication (`pair_interleaving_order`, `rotary_qk_interleaved`);
- gated residuals are one `addcmul`; on a CPU the MLP's GELU runs in the matmul's epilogue (oneDNN,
  `linear_gelu`) where PyTorch offers it;
- `log_score_at_index` runs the last block past its attention and the vocabulary-wide output layer
  only at the positions asked for (keys and values still need every position), optionally into a
  caller's buffer;
- attention goes through the flash-attn package where it is installed and the card supports it
  (`flash_attn_usable`), else PyTorch's SDPA, except in the compiled bf16 step on a CPU, where the
  written-out attention that Inductor fuses is faster (`attend_unfused`);
- `compile=` runs the network through `torch.compile`: with "freeze" (Inductor, weights frozen in) the
  sampler's whole call is one graph, rows and masked positions dynamic sizes; with a torch.compile mode
  the trunk, per power-of-two row bucket.

Precision: the matmuls run in the dtype the weights are stored in (`SEDD.compute_dtype`: loading stores
them once, at load); the residual stream, layer norms, rotary tables and the output's vocabulary-wide
maths stay float32, as in the authors' mixed-precision code. Activations are cast to the weights' dtype
where a matmul reads them (explicitly, no autocast), so no pass casts a weight.
"""
from __future__ import annotations

import contextlib
import time
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .model import SEDD, DDiTBlock, LayerNorm

try:  # optional CUDA kernel; PyTorch SDPA is the fallback everywhere else
    from flash_attn.flash_attn_interface import flash_attn_func
except Exception:  # pragma: no cover - depends on the host
    flash_attn_func = None

FLASH_ATTN_AVAILABLE = flash_attn_func is not None
FLASH_ATTN_MIN_CAPABILITY = (8, 0)  # flash-attn 2 runs on Ampere and newer; older cards raise at the first call
_flash_attn_devices: dict[torch.device, bool] = {}

# `compile=`: "freeze" is Inductor with the weights frozen in as constants; the others are torch.compile modes
COMPILE_MODES = ("freeze", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


WRITTEN_OUT_ATTENTION_MAX_LENGTH = 256  # longer sequences keep SDPA: measured faster up to here in every run
POSITION_QUANTUM = 16  # the compiled step computes the masked positions in groups of this many (padded)
FUSED_LINEAR_GELU_MIN_ROWS = 64  # positions per sequence below which oneDNN's per-call setup costs more than the GELU pass
_FUSED_LINEAR_GELU: dict[torch.dtype, bool] = {}  # per dtype: whether oneDNN fuses Linear + GELU here


def flash_attn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """flash-attn is installed, and `dtype` is half-precision on a CUDA card that it supports
    (compute capability 8.0 or newer: A10, A100, H100, ...). Elsewhere attention goes through SDPA."""
    device = torch.device(device)
    if not (FLASH_ATTN_AVAILABLE and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)):
        return False
    if device not in _flash_attn_devices:
        _flash_attn_devices[device] = torch.cuda.get_device_capability(device) >= FLASH_ATTN_MIN_CAPABILITY
    return _flash_attn_devices[device]


def contents_key(tensors) -> tuple:
    """Changes whenever any of the tensors is replaced (`.to()`, a new Parameter) or written in place (an
    optimiser step, load_state_dict): the key of caches derived from weights."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def _eager() -> bool:
    """Not being traced by torch.compile: out= kernels, weight caches and complex tensors are fine."""
    return not torch.compiler.is_compiling()


def shared_sigma(sigma: torch.Tensor) -> bool:
    """Every row at the same sigma (one request). Checked on the CPU only: on a GPU it would cost a sync."""
    return sigma.numel() == 1 or (sigma.device.type == "cpu" and bool((sigma == sigma[0]).all()))


def modulated_norm(norm: LayerNorm, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """modulate(norm(x), shift, scale) in float32. shift, scale broadcast against x (..., H).

    When they hold one row (all rows share a sigma) the whole thing is one affine layer norm
    with weight * (1 + scale) and bias shift; otherwise a plain norm and one addcmul. The norm's
    weight is float32 in every dtype (loading.to_precision)."""
    weight = norm.weight.float()
    gain = torch.addcmul(weight, weight, scale.float())  # weight * (1 + scale), one op
    if shift.numel() == norm.dim:
        return F.layer_norm(x.float(), [norm.dim], gain.reshape(norm.dim), shift.float().reshape(norm.dim))
    return torch.addcmul(shift.float(), F.layer_norm(x.float(), [norm.dim]), gain)


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) in the weights' dtype: x is cast to it first (a no-op in float32)."""
    return F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of qkv (B, L, 3, h, d) rotated: (B, L, h, d) each; cos and sin are (L, d/2), in qkv's
    dtype (the authors rotate in it).

    With x = [x1, x2] (halves), `model.apply_rotary` is [x1 c - x2 s, x2 c + x1 s]; outside a
    torch.compile trace that is written straight into one buffer."""
    qk = qkv[:, :, :2]  # (B, L, 2, h, d), a view
    x1, x2 = qk.chunk(2, dim=-1)
    c = cos.to(qk.dtype)[:, None, None, :]  # (L, 1, 1, d/2)
    s = sin.to(qk.dtype)[:, None, None, :]
    if _eager():
        rotated = torch.empty(qk.shape, dtype=qk.dtype, device=qk.device)
        out1, out2 = rotated.chunk(2, dim=-1)
        torch.mul(x1, c, out=out1).addcmul_(x2, s, value=-1)
        torch.mul(x2, c, out=out2).addcmul_(x1, s)
    else:
        rotated = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return rotated[:, :, 0], rotated[:, :, 1]


def pair_interleaving_order(hidden: int, n_heads: int) -> torch.Tensor:
    """A permutation of attn_qkv's 3H output channels: in each head of q and k, channel j and
    j + d/2 (the pair that rotary rotates together) become neighbours 2j, 2j + 1; v stays.

    q . k is unchanged when q and k are permuted alike, and with neighbouring pairs rotary is
    one complex multiplication (`rotary_qk_interleaved`)."""
    head_dim = hidden // n_heads
    half = torch.arange(head_dim // 2)
    in_head = torch.stack([half, half + head_dim // 2], dim=1).reshape(-1)  # 0, d/2, 1, d/2 + 1, ...
    heads = torch.arange(2 * n_heads)[:, None] * head_dim  # q heads, then k heads
    return torch.cat([(heads + in_head).reshape(-1), torch.arange(2 * hidden, 3 * hidden)])


def rotary_qk_interleaved(qkv: torch.Tensor, polar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_qk` for q and k whose rotary pairs are neighbours (see pair_interleaving_order):
    (x1 + i x2)(cos + i sin), one pass. qkv (B, L, 3, h, d) float32; polar (L, d/2) complex64."""
    qk = torch.view_as_complex(qkv[:, :, :2].unflatten(-1, (-1, 2)))  # (B, L, 2, h, d/2)
    rotated = torch.view_as_real(qk * polar[:, None, None, :]).flatten(-2)  # (B, L, 2, h, d)
    return rotated[:, :, 0], rotated[:, :, 1]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`model.attention` through flash-attn where usable, else SDPA; on a CPU in bf16 inside the compiled
    step, up to WRITTEN_OUT_ATTENTION_MAX_LENGTH positions, `attend_unfused`. q, k, v (B, L, h, d) -> (B, L, H)."""
    batch, seq_len = q.shape[0], q.shape[1]
    if flash_attn_usable(q.device, q.dtype):
        out = flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal=False)  # (B, L, h, d)
        return out.reshape(batch, seq_len, -1)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, h, L, d)
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and not _eager()
            and q.shape[-2] <= WRITTEN_OUT_ATTENTION_MAX_LENGTH):
        out = attend_unfused(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, seq_len, -1)


def attend_unfused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention written out, (B, h, L, d) -> (B, h, L, d): two batched bf16 matmuls with the
    softmax between them in float32. Inductor turns it into two oneDNN matmuls and one fused kernel,
    2.5x faster than PyTorch's CPU flash kernel at 8 rows of 128 positions in bf16 (docs/benchmarks.md);
    eagerly it is no faster, so only the compiled step uses it. The price: the scores are rounded to bf16
    by their matmul (the flash kernel keeps them in float32), which moves the network's log scores by about
    4% of their bf16 error, and the rows x heads x L x L float32 scores exist at once (2 MB for 8 rows
    of the bundled model). Longer sequences than WRITTEN_OUT_ATTENTION_MAX_LENGTH keep SDPA: at 512 and
    1024 positions it was faster in some runs and slower in others, and the scores grow with L^2."""
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q * scale, k.transpose(-1, -2))
    weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return torch.matmul(weights, v)


def _onednn_linear_gelu_works(dtype: torch.dtype) -> bool:
    """Whether this PyTorch build fuses Linear + tanh-GELU in one oneDNN matmul on the CPU in `dtype`
    (checked once per dtype)."""
    try:
        x, w, b = (t.to(dtype) for t in (torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)))
        fused = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        return fused.dtype == dtype and torch.allclose(fused.float(), F.gelu(F.linear(x, w, b), approximate="tanh")
                                                       .float(), atol=tolerance, rtol=tolerance)
    except Exception:
        return False


def linear_gelu(x: torch.Tensor, layer: nn.Linear, fixed_shape: bool = True) -> torch.Tensor:
    """gelu_tanh(layer(x)) in the weights' dtype; on a CPU (float32 or bfloat16) the GELU runs inside
    oneDNN's matmul where available.

    oneDNN builds a kernel for each new number of rows (about a millisecond), so a caller whose row
    count changes from call to call (`fixed_shape=False`) gets the plain path. The choice depends on the
    sequence length (x's second-last size), never on how many sequences share the pass: the two paths
    round differently in bf16 (the fused one once, the plain one before and after the GELU), and a row
    must compute the same alone and in a batch."""
    dtype = layer.weight.dtype
    if (fixed_shape and x.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and _eager()
            and x.shape[-2] >= FUSED_LINEAR_GELU_MIN_ROWS):
        if dtype not in _FUSED_LINEAR_GELU:
            _FUSED_LINEAR_GELU[dtype] = _onednn_linear_gelu_works(dtype)
        if _FUSED_LINEAR_GELU[dtype]:
            flat = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).to(dtype), layer.weight, layer.bias,
                                                      "gelu", [], "tanh")
            return flat.view(*x.shape[:-1], -1)
    return F.gelu(linear(layer, x), approximate="tanh")


class FastBlock:
    """One `DDiTBlock` at inference, split where positions stop mixing: `attention_half` needs every
    position (keys and values), `position_half` works position by position, so the last block can run
    it at the positions asked for only (`at_positions`)."""

    def __init__(self, block: DDiTBlock):
        self.block = block
        self._interleaved_qkv: tuple | None = None  # (contents key, weight copy): _pair_interleaved_qkv_weight

    def __call__(self, x: torch.Tensor, rotary: tuple, c: torch.Tensor, mod: torch.Tensor | None = None):
        """x (B, L, H) float32; rotary (cos, sin, polar or None), cos and sin in the weights' dtype; c
        (B, cond), or (1, cond) when every row shares one sigma; mod as in `attention_half`. -> (B, L, H)"""
        mod, attended = self.attention_half(x, rotary, c, mod)
        return self.position_half(x, attended, mod)

    def attention_half(self, x: torch.Tensor, rotary: tuple, c: torch.Tensor,
                       mod: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(modulation (B or 1, 1, 6H), attention output before its projection (B, L, H)).
        `mod`, when given, is this block's adaLN_modulation(c), already computed (stacked modulation)."""
        block = self.block
        mod = (linear(block.adaLN_modulation, c) if mod is None else mod)[:, None]
        shift_msa, scale_msa = mod[..., : 2 * x.shape[-1]].chunk(2, dim=-1)
        h = modulated_norm(block.norm1, x, shift_msa, scale_msa)  # (B, L, H) float32
        if h.device.type == "cpu" and block.attn_qkv.weight.dtype == torch.float32 and _eager():
            qkv = F.linear(h, self._pair_interleaved_qkv_weight())
            qkv = rearrange(qkv, "b l (three h d) -> b l three h d", three=3, h=block.n_heads)
            q, k = rotary_qk_interleaved(qkv, rotary[2])
        else:
            qkv = rearrange(linear(block.attn_qkv, h), "b l (three h d) -> b l three h d", three=3, h=block.n_heads)
            q, k = rotary_qk(qkv, rotary[0], rotary[1])
        return mod, attend(q, k, qkv[:, :, 2])  # (B, L, H) in the weights' dtype

    def position_half(self, x: torch.Tensor, attended: torch.Tensor, mod: torch.Tensor,
                      fixed_shape: bool = True) -> torch.Tensor:
        """Attention projection, gated residual, MLP, gated residual: x and attended (..., H), mod (..., 6H)
        broadcasting against them."""
        block = self.block
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = torch.addcmul(x, gate_msa, linear(block.attn_out, attended))  # x + gate * out, float32
        h = modulated_norm(block.norm2, x, shift_mlp, scale_mlp)
        return torch.addcmul(x, gate_mlp, linear(block.mlp[2], linear_gelu(h, block.mlp[0], fixed_shape)))

    def at_positions(self, x: torch.Tensor, attended: torch.Tensor, mod: torch.Tensor, index: torch.Tensor,
                     row_of: torch.Tensor) -> torch.Tensor:
        """`position_half` at the flat positions `index` only (row row_of[i]): (N, H)."""
        width = x.shape[-1]
        mod = mod[:, 0]  # (B or 1, 6H)
        per_position = mod[row_of] if mod.shape[0] > 1 else mod  # (N or 1, 6H)
        return self.position_half(x.reshape(-1, width).index_select(0, index),
                                  attended.reshape(-1, width).index_select(0, index), per_position,
                                  fixed_shape=False)  # N changes from step to step

    def _pair_interleaved_qkv_weight(self) -> torch.Tensor:
        """attn_qkv's weight, rows in `pair_interleaving_order`: a copy kept while the weight is unchanged
        (CPU float32 inference, where rotary as a complex product saves three passes over q and k)."""
        weight = self.block.attn_qkv.weight
        key = contents_key([weight])
        cached = self._interleaved_qkv
        if cached is None or cached[0] != key:
            order = pair_interleaving_order(weight.shape[1], self.block.n_heads).to(weight.device)
            cached = self._interleaved_qkv = (key, weight.detach().index_select(0, order))
        return cached[1]


class FastSEDD:
    """Runs a `SEDD` at inference: `runner(tokens, sigma)` = `model(tokens, sigma)` and
    `runner.log_score_at_index(...)` = `model.log_score_at_index(...)`, to float rounding, faster.

    `compile`: None (eager), "freeze" (torch.compile with Inductor freezing: the weights become
    constants, prepacked for the CPU's matmul kernels) or a torch.compile mode such as
    "reduce-overhead" (CUDA graphs on a GPU).
    - "freeze": `log_score_at_index` is one graph (trunk, the last block at the positions asked for, the
      output layer, sigma's offset) whose numbers of rows and of positions are dynamic sizes, so that two
      compilations per length serve every batch: one row, and two or more. `__call__` compiles its trunk
      the same way.
    - the modes: the trunk only (the rest depends on how many positions are masked), one static graph
      per power-of-two bucket of rows and per length, a batch padded up to its bucket (CUDA graphs record
      one graph per shape).
    `warm` compiles them up front. If the weights change after compiling, the network runs eagerly
    again with a warning rather than with stale constants."""

    def __init__(self, model: SEDD, compile: str | None = None):
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: use None (no compilation) or one of {', '.join(COMPILE_MODES)}")
        self.model = model
        self.blocks = [FastBlock(block) for block in model.blocks]
        self._rotary: dict[tuple, tuple[torch.Tensor, ...]] = {}  # (length, device, dtype): _rotary_tables
        self._stacked_modulation: tuple | None = None  # (contents key, weight, bias): _modulations
        self._compiled: dict | None = None  # "trunk", and with "freeze" "scores": the compiled graphs
        self._compiled_weights: tuple | None = None  # weights_key() when first compiled
        self._params = list(model.parameters())
        self._inductor = {"freezing": True} if compile == "freeze" else {}
        if compile is not None and next(model.parameters()).device.type == "cpu":
            self._inductor["cpp_wrapper"] = True  # the graph's calls from C++, not Python: less per-pass overhead
        if compile is not None:
            self._compiled = {"trunk": _compile(self._trunk_graph, compile)}
            if compile == "freeze":
                self._compiled["scores"] = _compile(self._scores_graph, compile)

    @property
    def compiled(self) -> bool:
        """The compiled graphs are in use (False without `compile`, or after the weights changed)."""
        return self._compiled is not None

    @property
    def dynamic_rows(self) -> bool:
        """The compiled graphs take any number of rows ("freeze": one graph for one row, one for two or
        more) rather than one graph per power-of-two bucket."""
        return self._compiled is not None and "scores" in self._compiled

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the matmuls run in: the one the weights are stored in."""
        return self.model.compute_dtype

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """`SEDD.forward`: tokens (B, L) long, sigma (B,) -> log score (B, L, V), in the weights' dtype
        (as the plain network)."""
        model = self.model
        x, attended, mod, c = self.trunk(tokens, sigma)
        x = self.blocks[-1].position_half(x, attended, mod)  # (B, L, H)
        shift, scale = linear(model.output_layer.adaLN_modulation, c)[:, None].chunk(2, dim=-1)
        log_score = linear(model.output_layer.linear, modulated_norm(model.output_layer.norm_final, x, shift, scale))
        if model.scale_by_sigma:
            offset = model.sigma_offset(sigma, log_score.shape[-1])
            log_score = log_score - offset.to(log_score.dtype)[:, None, None]
        return log_score.scatter_(-1, tokens[..., None], 0.0)  # (B, L, V)

    @torch.inference_mode()
    def log_score_at_index(self, tokens: torch.Tensor, sigma: torch.Tensor, index: torch.Tensor,
                           out: torch.Tensor | None = None, row_of: torch.Tensor | None = None) -> torch.Tensor:
        """`SEDD.log_score_at_index`: the log score at flat positions `index` (ascending), (N, V) float32.

        The last block past its attention and the vocabulary-wide output layer run at those positions
        only (with the absorbing graph only masked positions need them: the authors' sampler computes
        and then ignores the rest). `out` (N, V), float32 and contiguous, receives the result (a reused
        buffer avoids fresh memory every step on a CPU); in bfloat16 the output layer's result becomes
        float32 there, in the pass that subtracts sigma's offset. `row_of` (index // L) may be passed by
        a caller that has it already."""
        if row_of is None:
            row_of = torch.div(index, tokens.shape[1], rounding_mode="floor")
        if self._compiled_usable() and self.dynamic_rows:
            return self._compiled_scores(tokens, sigma, index, row_of, out)
        return self._tail(tokens, sigma, index, row_of, *self.trunk(tokens, sigma), out=out)

    def warm(self, max_rows: int, length: int) -> list[tuple[int, float]]:
        """Compile now rather than at the first batches, at `length`: with "freeze" the graphs for one row and
        for two or more (up to `max_rows`, a dynamic size), with a mode every bucket up to `max_rows`; a
        compilation takes seconds to a minute. Returns (rows, seconds) per compilation; [] when nothing is
        compiled."""
        if self._compiled is None:
            return []
        device = self.model.output_layer.linear.weight.device
        if self.dynamic_rows:
            sizes = sorted({1, min(2, max_rows)})
        else:
            sizes = [1 << i for i in range((max(max_rows, 1) - 1).bit_length() + 1)]
        timings = []
        for rows in sizes:
            start = time.perf_counter()
            with torch.inference_mode():  # inference tensors, as the sampler's: torch.compile guards on it
                tokens = torch.zeros(rows, length, dtype=torch.long, device=device)
                sigma = torch.ones(rows, device=device)
                if self.model.absorb:  # the sampler's call; with the uniform graph it is the full forward
                    tokens.fill_(self.model.config.mask_id)
                    self.log_score_at_index(tokens, sigma, torch.arange(2, device=device))
                else:
                    self(tokens, sigma)
            timings.append((rows, time.perf_counter() - start))
        return timings

    # ---- the trunk: embedding, every block but the last, the last block's attention half -------------
    def trunk(self, tokens: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Everything before the position-by-position half of the last block, compiled when `compile` was
        given: (x entering the last block (B, L, H) float32, its attention output (B, L, H) in the weights'
        dtype, its modulation (B or 1, 1, 6H), c (B or 1, cond))."""
        cos, sin, polar = self._rotary_tables(tokens.shape[1], tokens.device)
        if not self._compiled_usable():
            return self._trunk_graph(tokens, sigma, cos, sin, polar, shared_sigma(sigma))
        rows = tokens.shape[0]
        if self.dynamic_rows:  # "freeze": rows are a dynamic size
            tokens, sigma = _inference(tokens, sigma)
            _mark_dynamic(rows=(tokens, sigma))
        else:  # a mode: static shapes, padded to the bucket with copies of the last row (rows never mix)
            pad = (1 << (rows - 1).bit_length()) - rows
            if pad:
                tokens = torch.cat([tokens, tokens[-1:].expand(pad, -1)])
                sigma = torch.cat([sigma, sigma[-1:].expand(pad)])
        with _inductor_config(self._inductor):  # Inductor reads it when it compiles
            found = self._compiled["trunk"](tokens, sigma, cos, sin, None, False)
        return found if found[0].shape[0] == rows else tuple(t[:rows] for t in found)

    def _trunk_graph(self, tokens: torch.Tensor, sigma: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     polar: torch.Tensor | None, shared: bool) -> tuple[torch.Tensor, ...]:
        """`trunk` as a function of tensors: what gets compiled. `shared`: every row at sigma[0]."""
        model = self.model
        x = model.vocab_embed(tokens).float()
        c = F.silu(model.sigma_map(sigma[:1] if shared else sigma))
        rotary = (cos, sin, polar)
        mods = self._modulations(c)
        for block, mod in zip(self.blocks[:-1], mods):
            x = block(x, rotary, c, mod)
        mod, attended = self.blocks[-1].attention_half(x, rotary, c, mods[-1])
        return x, attended, mod, c

    # ---- after the trunk: the last block and the output layer where they are needed --------------------
    def _scores_graph(self, tokens: torch.Tensor, sigma: torch.Tensor, index: torch.Tensor, row_of: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """`log_score_at_index` as one function of tensors: what gets compiled (a conditioning row per
        row, so that a row computes the same alone and in a batch)."""
        trunk = self._trunk_graph(tokens, sigma, cos, sin, None, False)
        return self._tail(tokens, sigma, index, row_of, *trunk)

    def _tail(self, tokens: torch.Tensor, sigma: torch.Tensor, index: torch.Tensor, row_of: torch.Tensor,
              x: torch.Tensor, attended: torch.Tensor, mod: torch.Tensor, c: torch.Tensor,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """From the trunk to the float32 log score at `index`: the last block's position-by-position half
        and the output layer at those positions, sigma's offset, 0 at each position's own token."""
        model = self.model
        layer = model.output_layer.linear
        h = self.blocks[-1].at_positions(x, attended, mod, index, row_of)  # (N, H) float32
        shift, scale = linear(model.output_layer.adaLN_modulation, c).chunk(2, dim=1)  # (B or 1, H)
        if c.shape[0] > 1:
            shift, scale = shift[row_of], scale[row_of]  # (N, H)
        h = modulated_norm(model.output_layer.norm_final, h, shift, scale)
        into = out is not None and out.dtype == torch.float32 and out.is_contiguous() and _eager()
        if into and layer.weight.dtype == torch.float32:
            log_score = torch.addmm(layer.bias, h, layer.weight.t(), out=out)  # (N, V)
        else:
            log_score = linear(layer, h)  # (N, V) in the weights' dtype
        if model.scale_by_sigma:
            offset = model.sigma_offset(sigma.float(), log_score.shape[-1])
            offset = (offset[row_of] if offset.numel() > 1 else offset)[:, None]
            if log_score.dtype == torch.float32:
                log_score = log_score.sub_(offset)
            else:  # bf16 minus float32 is float32: one pass rounds up and subtracts, into `out` when given
                log_score = torch.sub(log_score, offset, out=out) if into else log_score - offset
        if log_score.dtype != torch.float32:
            log_score = out.copy_(log_score) if into else log_score.float()
        own = tokens.reshape(-1).index_select(0, index)
        return log_score.scatter_(-1, own[:, None], 0.0)

    def _compiled_scores(self, tokens: torch.Tensor, sigma: torch.Tensor, index: torch.Tensor,
                         row_of: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """`log_score_at_index` through the compiled graph. Rows (from two on) and positions are dynamic
        sizes; one row gets a graph of its own (torch.compile always specialises a size of 1). The positions
        are padded, with copies of the last one, to a multiple of POSITION_QUANTUM: the matmuls past the
        last attention then see few distinct sizes, and oneDNN sets each size up once (about 0.5 ms a
        matmul on the CPU) instead of at almost every step of a fresh server. A single position needs no
        graph of its own either."""
        count = index.numel()
        pad = -count % POSITION_QUANTUM
        if pad:
            index = torch.cat([index, index[-1:].expand(pad)])
            row_of = torch.cat([row_of, row_of[-1:].expand(pad)])
        tokens, sigma, index, row_of = _inference(tokens, sigma, index, row_of)
        _mark_dynamic(index, row_of, rows=(tokens, sigma))
        cos, sin, _ = self._rotary_tables(tokens.shape[1], tokens.device)
        with _inductor_config(self._inductor):
            scores = self._compiled["scores"](tokens, sigma, index, row_of, cos, sin)
        scores = scores[:count]
        return out.copy_(scores) if out is not None and out.shape == scores.shape else scores

    # ---- what the passes share ------------------------------------------------------------------------
    def _rotary_tables(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """cos and sin (L, d/2) in the weights' dtype (rotary runs in it), and on a CPU in float32 cos + i sin
        as complex64 (rotary as one complex product: `rotary_qk_interleaved`), else None. Made once per
        length, so that no pass converts them."""
        dtype = self.dtype
        key = (seq_len, str(device), dtype)
        if key not in self._rotary:
            cos, sin = self.model.rotary_emb(seq_len, device)  # float32
            polar = torch.complex(cos, sin) if device.type == "cpu" and dtype == torch.float32 else None
            self._rotary[key] = (cos.to(dtype), sin.to(dtype), polar)
        return self._rotary[key]

    def _modulations(self, c: torch.Tensor) -> list[torch.Tensor]:
        """Every block's adaLN_modulation(c), from one matmul over their weights side by side (one kernel
        instead of one per block). Eagerly the stacked weights are kept while the weights are unchanged;
        in a compiled graph the concatenation is traced (Inductor's freezing folds it into a constant)."""
        layers = [block.adaLN_modulation for block in self.model.blocks]
        if not _eager():
            weight = torch.cat([layer.weight for layer in layers])
            bias = torch.cat([layer.bias for layer in layers])
        else:
            key = contents_key(t for layer in layers for t in (layer.weight, layer.bias))
            if self._stacked_modulation is None or self._stacked_modulation[0] != key:
                self._stacked_modulation = (key, torch.cat([layer.weight.detach() for layer in layers]),
                                            torch.cat([layer.bias.detach() for layer in layers]))
            _, weight, bias = self._stacked_modulation
        return list(F.linear(c.to(weight.dtype), weight, bias).split(layers[0].out_features, dim=-1))

    def weights_key(self) -> tuple:
        """Changes whenever a weight is written in place (an optimiser step, load_state_dict into it) or moved
        (`.to()`): the versions and addresses of the parameters the runner was made with (about 10 us; walking
        the modules for them would cost ten times that on every pass). Parameters replaced by new objects need
        a new FastSEDD."""
        return tuple(p._version for p in self._params), tuple(map(torch.Tensor.data_ptr, self._params))

    def _compiled_usable(self) -> bool:
        """Compiled graphs on, and the weights still those they were first compiled with."""
        if self._compiled is None:
            return False
        key = self.weights_key()
        if self._compiled_weights is None:
            self._compiled_weights = key
        elif key != self._compiled_weights:
            warnings.warn("the model's weights changed after the network was compiled; running it eagerly "
                          "(make a new FastSEDD to compile again)", stacklevel=4)
            self._compiled = None
            return False
        return True


def _inference(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors as inference tensors under inference mode (a copy of those that are not): the sampler's
    are, and torch.compile guards on it, so a caller's ordinary tensors would otherwise compile anew."""
    if not torch.is_inference_mode_enabled():
        return tensors
    return tuple(t if t.is_inference() else t.clone() for t in tensors)


def _mark_dynamic(*sizes: torch.Tensor, rows: tuple[torch.Tensor, ...] = ()) -> None:
    """Dim 0 of each of `sizes`, and of `rows` when they hold two or more, is a dynamic size for
    torch.compile (a size of 1 would be specialised anyway)."""
    import torch._dynamo

    for tensor in (*sizes, *(rows if rows and rows[0].shape[0] > 1 else ())):
        torch._dynamo.mark_dynamic(tensor, 0)


def _inductor_config(options: dict):
    """Inductor's settings while a compiled call may compile. Freezing (weights become constants, prepacked
    for oneDNN): `torch.compile(options={"freezing": True})` does not reach the pass that freezes (PyTorch
    2.13: the weights stay graph inputs and every matmul an unpacked addmm), the config setting does.
    cpp_wrapper: on a CPU the graph's kernel calls are made from generated C++ instead of Python."""
    if not options:
        return contextlib.nullcontext()
    import torch._inductor.config as inductor_config

    return inductor_config.patch(**options)


def _compile(graph, mode: str):
    import torch._dynamo

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))  # two graphs per length, or a bucket's each
    if mode == "freeze":
        return torch.compile(graph)  # sizes marked dynamic where they are (_mark_dynamic)
    return torch.compile(graph, dynamic=False, mode=mode)
