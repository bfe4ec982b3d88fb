"""The DDiT network of SEDD, from token ids and noise level to the log score.

Read top to bottom in the order data flows: noise embedding, rotary positions, layer norm,
attention, block, output layer, model. This is the reference network: one forward path, the
authors' maths written plainly. Training runs it; inference runs `fast_model.FastSEDD`, which
shares its weights and computes the same function faster (tests/test_model_fast_paths.py).

State-dict keys and shapes match the authors' checkpoints exactly (their `SEDD` in
`model/transformer.py` of louaaron/Score-Entropy-Discrete-Diffusion), so `load_state_dict(strict=True)`
of their weights succeeds. Shapes: B rows, L positions, H hidden, h heads, d = H / h, V vocabulary
(with the mask for the absorbing graph), cond the conditioning width.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import SEDDConfig

FREQUENCY_EMBEDDING_SIZE = 256

_NO_CONTEXT = contextlib.nullcontext()


def no_autocast(device: torch.device):
    """Autocast off for float32 maths; free when autocast is not on in the first place."""
    if not torch.is_autocast_enabled(device.type):
        return _NO_CONTEXT
    return torch.autocast(device_type=device.type, enabled=False)


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
        args = sigma[:, None].float() * freqs[None]  # (B, 128)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        features = self.sinusoidal(sigma).to(self.mlp[0].weight.dtype)
        return self.mlp(features)  # (B, cond)


class Rotary(nn.Module):
    """Rotary position tables, cached per sequence length and device."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))  # (d/2,)
        self.register_buffer("inv_freq", inv_freq)  # stored in checkpoints
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of position x frequency, (L, d/2) float32 each: the authors' tables of width d
        (`model/rotary.py`) are these twice over, [angles, angles]."""
        key = (seq_len, str(device))
        if key not in self._cache:
            # normal tensors even when first asked for under inference_mode: training reuses them
            with torch.inference_mode(False):
                positions = torch.arange(seq_len, device=device, dtype=torch.float32)
                angles = torch.outer(positions, self.inv_freq.to(device=device, dtype=torch.float32))  # (L, d/2)
                self._cache[key] = (angles.cos(), angles.sin())
        return self._cache[key]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1], x1 and x2 the halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin. x (B, L, h, d); cos, sin (L, d/2) from `Rotary`."""
    cos = torch.cat([cos, cos], dim=-1).to(x.dtype)[:, None, :]  # (L, 1, d)
    sin = torch.cat([sin, sin], dim=-1).to(x.dtype)[:, None, :]
    return x * cos + rotate_half(x) * sin


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, normalised in float32 as the authors do."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with no_autocast(x.device):
            return F.layer_norm(x.float(), [self.dim], self.weight.float())


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, L, H) scaled and shifted per row; shift, scale (B, 1, H)."""
    return x * (1 + scale) + shift


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional softmax attention, scale 1/sqrt(d). q, k, v (B, L, h, d) -> (B, L, H)."""
    q, k, v = (rearrange(t, "b l h d -> b h l d") for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, d)
    return rearrange(out, "b h l d -> b l (h d)")


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

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], c: torch.Tensor) -> torch.Tensor:
        """x (B, L, H) float32; rotary the (cos, sin) of `Rotary`; c (B, cond)."""
        modulation = self.adaLN_modulation(c)[:, None]  # (B, 1, 6H)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=-1)  # (B, 1, H)

        # attention: the only place where positions mix
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, L, H)
        qkv = rearrange(self.attn_qkv(h), "b l (three h d) -> b l three h d", three=3, h=self.n_heads)
        q, k, v = qkv.unbind(dim=2)  # (B, L, h, d)
        with no_autocast(x.device):
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        x = x + gate_msa * self.dropout1(self.attn_out(attention(q, k, v)))  # (B, L, H)

        # MLP, position by position
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp * self.dropout2(self.mlp(h))  # (B, L, H)


class EmbeddingLayer(nn.Module):
    def __init__(self, vocab_size: int, hidden: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty(vocab_size, hidden))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding[tokens]  # (B, L, H)


class DDitFinalLayer(nn.Module):
    def __init__(self, hidden: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Linear(cond_dim, 2 * hidden)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # (B, 1, H) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, L, V)


def log_expm1(sigma: torch.Tensor) -> torch.Tensor:
    """log(e^sigma - 1), accurate for small sigma."""
    return torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log()


class SEDD(nn.Module):
    """DDiT: `model(tokens, sigma)` -> log score (B, L, V)."""

    def __init__(self, config: SEDDConfig):
        super().__init__()
        m = config.model
        self.config = config
        self.absorb = config.absorb
        self.scale_by_sigma = m.scale_by_sigma
        if self.scale_by_sigma and not self.absorb:
            raise ValueError("scale_by_sigma is only defined for the absorbing graph")
        vocab = config.vocab_size
        self.vocab_embed = EmbeddingLayer(vocab, m.hidden_size)
        self.sigma_map = TimestepEmbedder(m.cond_dim)
        self.rotary_emb = Rotary(m.head_dim)
        self.blocks = nn.ModuleList(
            DDiTBlock(m.hidden_size, m.n_heads, m.cond_dim, dropout=m.dropout) for _ in range(m.n_blocks)
        )
        self.output_layer = DDitFinalLayer(m.hidden_size, vocab, m.cond_dim)

    @torch.no_grad()
    def authors_init(self) -> SEDD:
        """The authors' initialisation over PyTorch's defaults, for training from scratch (adaLN-Zero, as in
        DiT): every adaLN modulation and the output projection start at zero, so each block starts as the
        identity and the first log score is the sigma scaling alone."""
        for layer in (*(block.adaLN_modulation for block in self.blocks), self.output_layer.adaLN_modulation,
                      self.output_layer.linear):
            layer.weight.zero_()
            layer.bias.zero_()
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.output_layer.linear.weight.dtype

    def _autocast(self, device: torch.device):
        """Matmuls in the weights' dtype (bf16 / fp16 on a GPU); norms and rotary turn it off for float32."""
        if self.compute_dtype == torch.float32:
            return _NO_CONTEXT
        return torch.autocast(device_type=device.type, dtype=self.compute_dtype)

    def sigma_offset(self, sigma: torch.Tensor, vocab: int) -> torch.Tensor:
        """What scale_by_sigma subtracts from the output: log(e^sigma - 1) + log(V - 1), (B,)."""
        return log_expm1(sigma) + math.log(vocab - 1)

    def forward(self, tokens: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) long, sigma (B,) -> log score (B, L, V)."""
        x = self.vocab_embed(tokens).float()  # (B, L, H); the residual stream stays float32
        c = F.silu(self.sigma_map(sigma))  # (B, cond)
        rotary = self.rotary_emb(tokens.shape[1], tokens.device)  # (L, d/2) twice
        with self._autocast(tokens.device):
            for block in self.blocks:
                x = block(x, rotary, c)  # (B, L, H)
            log_score = self.output_layer(x, c)  # (B, L, V)
        if self.scale_by_sigma:
            log_score = log_score - self.sigma_offset(sigma, log_score.shape[-1]).to(log_score.dtype)[:, None, None]
        # 0 at each position's own token; in place is safe (no backward needs these values)
        return log_score.scatter_(-1, tokens[..., None], 0.0)

    def log_score_at_index(self, tokens: torch.Tensor, sigma: torch.Tensor, index: torch.Tensor,
                           out: torch.Tensor | None = None, row_of: torch.Tensor | None = None) -> torch.Tensor:
        """The log score at the flat positions `index` (into tokens.reshape(-1), row-major): (N, V) float32.

        The whole forward, then a gather: the definition that `FastSEDD.log_score_at_index` computes
        faster. `out` ((N, V) float32), when given, receives the result; `row_of` (index // L) is
        accepted for the same signature and not needed here."""
        log_score = self(tokens, sigma).float().reshape(-1, self.config.vocab_size)  # (B*L, V)
        if out is None:
            return log_score.index_select(0, index)
        return torch.index_select(log_score, 0, index, out=out)  # (N, V)
