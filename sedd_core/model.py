"""The DDiT network of SEDD, from token ids and noise level to the log score.

Read top to bottom in the order data flows: noise embedding, rotary positions,
layer norm, attention, block, output layer, model. State-dict keys match the
authors' checkpoints exactly (see ../shared/reference/checkpoint-keys.json).

Inference speed (the maths is the authors'; only the order of operations and
the memory they touch change, so results agree to float rounding):
- rows that share one sigma (every row of one request) share one conditioning
  row, so layer norm and modulation fuse into one affine layer norm; every
  block's modulation comes from one matmul over their weights side by side;
- rotary embedding writes q and k in one pass each, no unbind/stack copies; on a
  CPU in float32, q and k come out of a copy of the qkv weight whose rows put each
  rotary pair side by side, so rotary is one complex multiplication;
- gated residuals are one `addcmul`; on a CPU the MLP's GELU runs in the
  matmul's epilogue (oneDNN) where PyTorch offers it;
- `log_score_at` computes the vocabulary-wide output layer only at the
  positions asked for, optionally into a caller's buffer, and so does the
  last block after its attention (keys and values still need every position);
- `use_compiled_trunk()` (or SEDD_COMPILE=1) runs the embedding and blocks
  through `torch.compile` with one static graph per power-of-two row bucket
  (Inductor freezing: weights folded in as constants).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import SEDDConfig

try:  # optional CUDA kernel; PyTorch SDPA is the fallback everywhere else
    from flash_attn.flash_attn_interface import flash_attn_func
except Exception:  # pragma: no cover - depends on the host
    flash_attn_func = None

FLASH_ATTN_AVAILABLE = flash_attn_func is not None
FLASH_ATTN_MIN_CAPABILITY = (8, 0)  # flash-attn 2 runs on Ampere and newer; older cards raise at the first call
_flash_attn_devices: dict[torch.device, bool] = {}


def flash_attn_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """flash-attn is installed, and `dtype` is half-precision on a CUDA card that it supports
    (compute capability 8.0 or newer: A10, A100, H100, ...). Elsewhere attention goes through SDPA."""
    device = torch.device(device)
    if not (FLASH_ATTN_AVAILABLE and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)):
        return False
    if device not in _flash_attn_devices:
        _flash_attn_devices[device] = torch.cuda.get_device_capability(device) >= FLASH_ATTN_MIN_CAPABILITY
    return _flash_attn_devices[device]
FREQUENCY_EMBEDDING_SIZE = 256


_NO_CONTEXT = contextlib.nullcontext()


def _no_autocast(device: torch.device):
    """Autocast off for float32 maths; free when autocast is not on in the first place."""
    if not torch.is_autocast_enabled(device.type):
        return _NO_CONTEXT
    return torch.autocast(device_type=device.type, enabled=False)


def contents_key(tensors) -> tuple:
    """Changes whenever any of the tensors is replaced (`.to()`, a new Parameter) or written in place (an
    optimiser step, load_state_dict): the key of caches derived from weights."""
    return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)


def _inference(t: torch.Tensor) -> bool:
    """True where in-place and out= kernels are safe: no autograd graph, not being traced by torch.compile."""
    return not t.requires_grad and not torch.compiler.is_compiling()


class TimestepEmbedder(nn.Module):
    """sigma -> 256-wide sinusoidal features (cosines, then sines) -> MLP."""

    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(FREQUENCY_EMBEDDING_SIZE, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim)
        )

    @staticmethod
    def sinusoidal(sigma: torch.Tensor, dim: int = FREQUENCY_EMBEDDING_SIZE, max_period: float = 10000.0):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
        args = sigma[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        features = self.sinusoidal(sigma).to(self.mlp[0].weight.dtype)
        return self.mlp(features)


class Rotary(nn.Module):
    """Rotary position tables, cached per sequence length and device."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq)  # stored in checkpoints
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of position x frequency, (L, d/2) float32: the tables' two halves are equal."""
        key = (seq_len, str(device))
        if key not in self._cache:
            # normal tensors even when first asked for under inference_mode: training reuses them
            with torch.inference_mode(False):
                positions = torch.arange(seq_len, device=device, dtype=torch.float32)
                angles = torch.outer(positions, self.inv_freq.to(device=device, dtype=torch.float32))  # (L, d/2)
                self._cache[key] = (angles.cos(), angles.sin())
        return self._cache[key]

    def polar(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """cos + i sin of position x frequency, (L, d/2) complex64: rotary as one complex product."""
        key = ("polar", seq_len, str(device))
        if key not in self._cache:
            cos, sin = self(seq_len, device)
            with torch.inference_mode(False):
                self._cache[key] = (torch.complex(cos, sin),)
        return self._cache[key][0]


def rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k of qkv (B, L, 3, h, d) rotated: (B, L, h, d) each; cos and sin are (L, d/2).

    With x = [x1, x2] (halves) and the tables' halves equal, the SPEC's x cos + rotate_half(x) sin
    (rotate_half(x) = [-x2, x1]) is [x1 c - x2 s, x2 c + x1 s]; at inference that is written straight
    into one buffer."""
    with _no_autocast(qkv.device):
        qk = qkv[:, :, :2]  # (B, L, 2, h, d), a view
        x1, x2 = qk.chunk(2, dim=-1)
        c = cos.to(qk.dtype)[:, None, None, :]  # (L, 1, 1, d/2)
        s = sin.to(qk.dtype)[:, None, None, :]
        if _inference(qkv):
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


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, normalised in float32 as the authors do."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _no_autocast(x.device):
            return F.layer_norm(x.float(), [self.dim], self.weight.float())

    def modulated(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """modulate(norm(x), shift, scale) in float32. shift, scale broadcast against x (..., H).

        When they hold one row (all rows share a sigma) the whole thing is one affine layer norm
        with weight * (1 + scale) and bias shift; otherwise a plain norm and one addcmul."""
        with _no_autocast(x.device):
            weight = self.weight.float()
            gain = torch.addcmul(weight, weight, scale.float())  # weight * (1 + scale), one op
            if shift.numel() == self.dim:
                return F.layer_norm(x.float(), [self.dim], gain.reshape(self.dim), shift.float().reshape(self.dim))
            return torch.addcmul(shift.float(), F.layer_norm(x.float(), [self.dim]), gain)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional softmax attention, scale 1/sqrt(d). q, k, v: (B, L, h, d) -> (B, L, h*d)."""
    batch, seq_len = q.shape[0], q.shape[1]
    if flash_attn_usable(q.device, q.dtype):
        out = flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), 0.0, causal=False)  # (B, L, h, d)
        return out.reshape(batch, seq_len, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, h, L, d)
    return out.transpose(1, 2).reshape(batch, seq_len, -1)


def _onednn_linear_gelu_works() -> bool:
    """Whether this PyTorch build fuses Linear + tanh-GELU in one oneDNN matmul on the CPU (checked once)."""
    try:
        x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
        fused = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
        return torch.allclose(fused, F.gelu(F.linear(x, w, b), approximate="tanh"), atol=1e-5, rtol=1e-5)
    except Exception:
        return False


_FUSED_LINEAR_GELU: bool | None = None
FUSED_LINEAR_GELU_MIN_ROWS = 64  # below this oneDNN's per-call setup costs more than the GELU pass


def linear_gelu(x: torch.Tensor, linear: nn.Linear, fixed_shape: bool = True) -> torch.Tensor:
    """gelu_tanh(linear(x)); on a CPU in float32 the GELU runs inside oneDNN's matmul where available.

    oneDNN builds a kernel for each new number of rows (about a millisecond), so a caller whose row
    count changes from call to call (`fixed_shape=False`) gets the plain path."""
    global _FUSED_LINEAR_GELU
    if (fixed_shape and x.device.type == "cpu" and x.dtype == torch.float32 == linear.weight.dtype and _inference(x)
            and x.numel() >= FUSED_LINEAR_GELU_MIN_ROWS * x.shape[-1]):
        if _FUSED_LINEAR_GELU is None:
            _FUSED_LINEAR_GELU = _onednn_linear_gelu_works()
        if _FUSED_LINEAR_GELU:
            flat = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), linear.weight, linear.bias,
                                                      "gelu", [], "tanh")
            return flat.view(*x.shape[:-1], -1)
    return F.gelu(linear(x), approximate="tanh")


class DDiTBlock(nn.Module):
    def __init__(self, hidden: int, n_heads: int, cond_dim: int, mlp_ratio: int = 4, dropout: float = 0.1):
        super().__init__()
        self.n_heads = n_heads
        self.norm1 = LayerNorm(hidden)
        self.attn_qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.dropout1 = nn.Dropout(dropout)
        self.norm2 = LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, mlp_ratio * hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_ratio * hidden, hidden)
        )
        self.dropout2 = nn.Dropout(dropout)
        self.adaLN_modulation = nn.Linear(cond_dim, 6 * hidden)
        self._interleaved_qkv: tuple | None = None  # (contents key, weight copy): _pair_interleaved_qkv_weight

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, ...], c: torch.Tensor,
                mod: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, H) float32; rotary (cos, sin, polar) of `Rotary`; c (B, cond), or (1, cond) when every
        row shares one sigma; mod as in `attention_half`."""
        mod, attended = self.attention_half(x, rotary, c, mod)
        return self.position_half(x, attended, mod)

    def attention_half(self, x: torch.Tensor, rotary: tuple[torch.Tensor, ...], c: torch.Tensor,
                       mod: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(modulation (B or 1, 1, 6H), attention output before its projection (B, L, H)): the part of
        the block that mixes positions. Everything after it (`position_half`) is position by position.
        `mod`, when given, is this block's adaLN_modulation(c), already computed (`SEDD._modulations`)."""
        mod = (self.adaLN_modulation(c) if mod is None else mod)[:, None]
        shift_msa, scale_msa = mod[..., : 2 * x.shape[-1]].chunk(2, dim=-1)
        return mod, self._attend(x, rotary, shift_msa, scale_msa)

    def position_half(self, x: torch.Tensor, attended: torch.Tensor, mod: torch.Tensor,
                      fixed_shape: bool = True) -> torch.Tensor:
        """Attention projection, gated residual, MLP, gated residual: x and attended (..., H), mod (..., 6H)
        broadcasting against them. Positions can be gathered first (`at_positions`)."""
        _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        out = self.attn_out(attended)
        x = torch.addcmul(x, gate_msa, self.dropout1(out) if self.training else out)  # x + gate * out
        h = self.norm2.modulated(x, shift_mlp, scale_mlp)
        out = self.mlp[2](linear_gelu(h, self.mlp[0], fixed_shape))
        return torch.addcmul(x, gate_mlp, self.dropout2(out) if self.training else out)

    def at_positions(self, x: torch.Tensor, attended: torch.Tensor, mod: torch.Tensor, index: torch.Tensor,
                     row_of: torch.Tensor) -> torch.Tensor:
        """`position_half` at the flat positions `index` only (row row_of[i]): (N, H). Keys and values
        needed every position, but after attention each position is on its own."""
        width = x.shape[-1]
        mod = mod[:, 0]  # (B or 1, 6H)
        per_position = mod[row_of] if mod.shape[0] > 1 else mod  # (N or 1, 6H)
        return self.position_half(x.reshape(-1, width).index_select(0, index),
                                  attended.reshape(-1, width).index_select(0, index), per_position,
                                  fixed_shape=False)  # N changes from step to step

    def _attend(self, x, rotary, shift, scale):
        h = self.norm1.modulated(x, shift, scale)
        if h.device.type == "cpu" and h.dtype == torch.float32 == self.attn_qkv.weight.dtype and _inference(h):
            qkv = F.linear(h, self._pair_interleaved_qkv_weight())
            qkv = rearrange(qkv, "b s (three h d) -> b s three h d", three=3, h=self.n_heads)
            q, k = rotary_qk_interleaved(qkv, rotary[2])
        else:
            qkv = rearrange(self.attn_qkv(h), "b s (three h d) -> b s three h d", three=3, h=self.n_heads)
            q, k = rotary_qk(qkv, rotary[0], rotary[1])
        return attend(q, k, qkv[:, :, 2])  # (B, L, H)

    def _pair_interleaved_qkv_weight(self) -> torch.Tensor:
        """attn_qkv's weight, rows in `pair_interleaving_order`: a copy kept while the weight is unchanged
        (CPU float32 inference, where rotary as a complex product saves three passes over q and k)."""
        weight = self.attn_qkv.weight
        key = contents_key([weight])
        cached = self._interleaved_qkv
        if cached is None or cached[0] != key:
            order = pair_interleaving_order(weight.shape[1], self.n_heads).to(weight.device)
            cached = self._interleaved_qkv = (key, weight.detach().index_select(0, order))
        return cached[1]


class EmbeddingLayer(nn.Module):
    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, hidden))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding[tokens]


class DDitFinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden)

    def modulated(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.norm_final.modulated(x, shift, scale)

    def modulated_rows(self, h: torch.Tensor, c: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
        """`modulated` for selected positions: h (N, H), each from row row_of[i] of the batch."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B or 1, H)
        if c.shape[0] > 1:
            shift, scale = shift[row_of], scale[row_of]
        return self.norm_final.modulated(h, shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.modulated(x, c))


def log_expm1(sigma: torch.Tensor) -> torch.Tensor:
    """log(e^sigma - 1), accurate for small sigma."""
    return torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log()


def _shared_sigma(sigma: torch.Tensor) -> bool:
    """Every row at the same sigma (one request). Checked on the CPU only: on a GPU it would cost a sync."""
    return sigma.numel() == 1 or (sigma.device.type == "cpu" and bool((sigma == sigma[0]).all()))


class SEDD(nn.Module):
    """DDiT: `model(tokens, sigma)` -> log score [B, L, V]."""

    def __init__(self, config: SEDDConfig):
        super().__init__()
        m = config.model
        self.config = config
        self.absorb = config.absorb
        self.scale_by_sigma = m.scale_by_sigma
        vocab = config.vocab_size
        self.vocab_embed = EmbeddingLayer(vocab, m.hidden_size)
        self.sigma_map = TimestepEmbedder(m.cond_dim)
        self.rotary_emb = Rotary(m.head_dim)
        self.blocks = nn.ModuleList(
            DDiTBlock(m.hidden_size, m.n_heads, m.cond_dim, dropout=m.dropout) for _ in range(m.n_blocks)
        )
        self.output_layer = DDitFinalLayer(m.hidden_size, vocab, m.cond_dim)
        if self.scale_by_sigma and not self.absorb:
            raise ValueError("scale_by_sigma is only defined for the absorbing graph")
        self._compiled_trunk = None
        self._compiled_weights = None
        self._stacked_modulation = None
        compile_env = os.environ.get("SEDD_COMPILE", "").lower()
        if compile_env and compile_env not in ("0", "false", "no"):
            self.use_compiled_trunk(True, None if compile_env in ("1", "true", "yes") else compile_env)

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.output_layer.linear.weight.dtype

    def _autocast(self, device: torch.device):
        dtype = self.compute_dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    # ---- trunk: embedding and blocks ---------------------------------------------------------
    def use_compiled_trunk(self, enabled: bool = True, mode: str | None = None) -> None:
        """Opt in (or out) of running the trunk through torch.compile at inference (all of it but the
        last block's position-by-position half, which runs eagerly at the positions asked for).

        One static graph (dynamic=False) per power-of-two bucket of rows and per length: a batch is
        padded up to its bucket, so a server sees at most log2(max_rows) + 1 compilations per length.
        `mode` is torch.compile's (e.g. "reduce-overhead": CUDA graphs on a GPU). Without a mode the
        graphs are compiled with Inductor's freezing: the weights become constants (prepacked for the
        CPU's matmul kernels, folded where possible), which is for serving fixed weights; if they change
        afterwards the trunk runs eagerly again (with a warning) rather than with stale constants.
        SEDD_COMPILE=1 turns it on at construction; SEDD_COMPILE=<mode> picks the mode too."""
        self._compiled_weights = None
        if not enabled:
            self._compiled_trunk = None
            return
        import torch._dynamo

        config = torch._dynamo.config
        limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, limit, max(getattr(config, limit), 64))  # one graph per bucket and length
        if mode is None:
            self._compiled_trunk = torch.compile(self._trunk_head, dynamic=False, options={"freezing": True})
        else:
            self._compiled_trunk = torch.compile(self._trunk_head, dynamic=False, mode=mode)

    def warm_compiled_trunk(self, max_rows: int, length: int) -> list[tuple[int, float]]:
        """Compile every row bucket up to `max_rows` at `length` now, rather than at the first batch of
        each size (a compilation takes seconds to a minute). Returns (bucket, seconds) per bucket."""
        if self._compiled_trunk is None:
            return []
        device = self.output_layer.linear.weight.device
        timings, bucket = [], 1
        while True:
            start = time.perf_counter()
            with torch.inference_mode():
                self.trunk(torch.zeros(bucket, length, dtype=torch.long, device=device),
                           torch.ones(bucket, device=device))
            timings.append((bucket, time.perf_counter() - start))
            if bucket >= max_rows:
                return timings
            bucket *= 2

    def _compiled_trunk_usable(self) -> bool:
        """Compiled trunk on, at inference, and the weights still those it was first compiled with."""
        if self._compiled_trunk is None or torch.is_grad_enabled():
            return False
        key = contents_key(self.parameters())
        if self._compiled_weights is None:
            self._compiled_weights = key
        elif key != self._compiled_weights:
            warnings.warn("the model's weights changed after the trunk was compiled; running it eagerly "
                          "(call use_compiled_trunk() again to recompile)", stacklevel=3)
            self._compiled_trunk = None
            return False
        return True

    def _trunk_head(self, tokens: torch.Tensor, sigma: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    shared: bool) -> tuple[torch.Tensor, ...]:
        """Embedding, every block but the last, and the last block's attention half:
        (x entering the last block, its attention output, its modulation, c). Static shapes (compiled)."""
        x = self.vocab_embed(tokens).float()
        c = F.silu(self.sigma_map(sigma[:1] if shared else sigma))
        polar = None if torch.compiler.is_compiling() else self.rotary_emb.polar(tokens.shape[1], tokens.device)
        rotary = (cos, sin, polar)
        with self._autocast(tokens.device):
            mods = self._modulations(c)
            for block, mod in zip(self.blocks[:-1], mods):
                x = block(x, rotary, c, mod)
            mod, attended = self.blocks[-1].attention_half(x, rotary, c, mods[-1])
        return x, attended, mod, c

    def _modulations(self, c: torch.Tensor) -> list[torch.Tensor | None]:
        """Every block's adaLN_modulation(c), from one matmul over their weights side by side (at inference:
        one kernel instead of one per block); Nones (each block computes its own) when training or compiling."""
        if not _inference(c):
            return [None] * len(self.blocks)
        layers = [block.adaLN_modulation for block in self.blocks]
        key = contents_key(t for layer in layers for t in (layer.weight, layer.bias))
        if self._stacked_modulation is None or self._stacked_modulation[0] != key:
            weight = torch.cat([layer.weight.detach() for layer in layers])
            bias = torch.cat([layer.bias.detach() for layer in layers])
            self._stacked_modulation = (key, weight, bias)
        _, weight, bias = self._stacked_modulation
        return list(F.linear(c, weight, bias).split(layers[0].out_features, dim=-1))

    def _head(self, tokens: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cos, sin = self.rotary_emb(tokens.shape[1], tokens.device)
        if not self._compiled_trunk_usable():
            return self._trunk_head(tokens, sigma, cos, sin, _shared_sigma(sigma))
        rows = tokens.shape[0]
        bucket = 1 << (rows - 1).bit_length()
        if bucket != rows:  # pad to the bucket with copies of the last row; rows never mix
            pad = bucket - rows
            tokens = torch.cat([tokens, tokens[-1:].expand(pad, -1)])
            sigma = torch.cat([sigma, sigma[-1:].expand(pad)])
        return tuple(t[:rows] for t in self._compiled_trunk(tokens, sigma, cos, sin, False))

    def trunk(self, tokens: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding and blocks: (hidden states (B, L, H) before the output layer, conditioning c).

        c is (B, cond), or (1, cond) when every row has the same sigma: it broadcasts either way."""
        x, attended, mod, c = self._head(tokens, sigma)
        with self._autocast(tokens.device):
            return self.blocks[-1].position_half(x, attended, mod), c

    def trunk_at(self, tokens: torch.Tensor, sigma: torch.Tensor, index: torch.Tensor,
                 row_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`trunk`'s hidden states at the flat positions `index` only (row row_of[i]): ((N, H), c).

        The last block runs past its attention only there (`DDiTBlock.at_positions`)."""
        x, attended, mod, c = self._head(tokens, sigma)
        with self._autocast(tokens.device):
            return self.blocks[-1].at_positions(x, attended, mod, index, row_of), c

    # ---- output --------------------------------------------------------------------------------
    def _offset(self, sigma: torch.Tensor, vocab: int) -> torch.Tensor:
        """What scale_by_sigma subtracts: log(e^sigma - 1) + log(V - 1)."""
        return log_expm1(sigma) + math.log(vocab - 1)

    def forward(self, tokens: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x, c = self.trunk(tokens, sigma)
        with self._autocast(tokens.device):
            logits = self.output_layer(x, c)
        if self.scale_by_sigma:
            logits = logits - self._offset(sigma, logits.shape[-1]).to(logits.dtype)[:, None, None]
        # zero at each position's own token; in place is safe (no backward needs these values)
        return logits.scatter_(-1, tokens[..., None], 0.0)

    def log_score_at(self, tokens: torch.Tensor, sigma: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The log score only where `positions` (bool, (B, L)) is set: (N, V), rows in row-major order.

        The vocabulary-wide output layer is the dominant cost for GPT-2 models; with the
        absorbing graph only masked positions need it (see SPEC section 4).
        """
        return self.log_score_at_index(tokens, sigma, positions.reshape(-1).nonzero().squeeze(1))

    def log_score_at_index(self, tokens: torch.Tensor, sigma: torch.Tensor, index: torch.Tensor,
                           out: torch.Tensor | None = None, row_of: torch.Tensor | None = None) -> torch.Tensor:
        """`log_score_at` for flat positions `index` (into tokens.reshape(-1), ascending): (N, V).

        `out` (N, V), float32 and contiguous, receives the result when given (a reused buffer
        avoids fresh memory every step on a CPU); it is used when the model computes in float32.
        `row_of` (index // L, each position's row) may be passed by a caller that has it already."""
        if row_of is None:
            row_of = torch.div(index, tokens.shape[1], rounding_mode="floor")
        h, c = self.trunk_at(tokens, sigma, index, row_of)  # (N, H)
        linear = self.output_layer.linear
        with self._autocast(tokens.device):
            h = self.output_layer.modulated_rows(h, c, row_of)
            if out is not None and out.dtype == linear.weight.dtype == h.dtype and _inference(h):
                logits = torch.addmm(linear.bias, h, linear.weight.t(), out=out)
            else:
                logits = linear(h)
        if self.scale_by_sigma:
            offset = self._offset(sigma.float(), logits.shape[-1])
            offset = (offset[row_of] if offset.numel() > 1 else offset)[:, None]
            # in place on a float32 result; a bf16 one is promoted to float32 by the same subtraction
            logits = logits.sub_(offset) if logits.dtype == torch.float32 else logits - offset
        logits = logits.float()
        own = tokens.reshape(-1).index_select(0, index)
        return logits.scatter_(-1, own[:, None], 0.0)
