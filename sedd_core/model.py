"""The DDiT network of SEDD, from token ids and noise level to the log score.

Read top to bottom in the order data flows: noise embedding, rotary positions,
layer norm, block, output layer, model. State-dict keys match the authors'
checkpoints exactly (see ../shared/reference/checkpoint-keys.json).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import SEDDConfig

try:  # optional CUDA kernel; PyTorch SDPA is the fallback everywhere else
    from flash_attn.flash_attn_interface import flash_attn_varlen_qkvpacked_func
except Exception:  # pragma: no cover - depends on the host
    flash_attn_varlen_qkvpacked_func = None

FLASH_ATTN_AVAILABLE = flash_attn_varlen_qkvpacked_func is not None
FREQUENCY_EMBEDDING_SIZE = 256


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


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
        key = (seq_len, str(device))
        if key not in self._cache:
            positions = torch.arange(seq_len, device=device, dtype=torch.float32)
            angles = torch.outer(positions, self.inv_freq.to(device=device, dtype=torch.float32))
            emb = torch.cat([angles, angles], dim=-1)  # (L, d)
            self._cache[key] = (emb.cos()[None, :, None, :], emb.sin()[None, :, None, :])  # (1, L, 1, d)
        return self._cache[key]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias, normalised in float32 as the authors do."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.layer_norm(x.float(), [self.dim])
        return x * self.weight.float()[None, None, :]


def attention(qkv: torch.Tensor) -> torch.Tensor:
    """Bidirectional softmax attention. qkv: (B, L, 3, h, d) -> (B, L, h*d)."""
    batch, seq_len = qkv.shape[0], qkv.shape[1]
    if FLASH_ATTN_AVAILABLE and qkv.is_cuda and qkv.dtype in (torch.float16, torch.bfloat16):
        packed = rearrange(qkv, "b s three h d -> (b s) three h d")
        cu_seqlens = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=qkv.device)
        out = flash_attn_varlen_qkvpacked_func(packed, cu_seqlens, seq_len, 0.0, causal=False)
        return rearrange(out, "(b s) h d -> b s (h d)", b=batch)
    q, k, v = rearrange(qkv, "b s three h d -> three b h s d")
    out = F.scaled_dot_product_attention(q, k, v)  # (B, h, L, d)
    return rearrange(out, "b h s d -> b s (h d)")


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
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)[:, None].chunk(6, dim=2)

        h = modulate(self.norm1(x), shift_msa, scale_msa)
        qkv = rearrange(self.attn_qkv(h), "b s (three h d) -> b s three h d", three=3, h=self.n_heads)
        cos, sin = rotary
        q, k, v = qkv.unbind(dim=2)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = apply_rotary(q, cos.to(q.dtype), sin.to(q.dtype))
            k = apply_rotary(k, cos.to(k.dtype), sin.to(k.dtype))
        qkv = torch.stack([q, k, v], dim=2)  # (B, L, 3, h, d)
        x = x + gate_msa * self.dropout1(self.attn_out(attention(qkv)))

        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        return x + gate_mlp * self.dropout2(self.mlp(h))


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
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.modulated(x, c))


def log_expm1(sigma: torch.Tensor) -> torch.Tensor:
    """log(e^sigma - 1), accurate for small sigma."""
    return torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log()


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

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.output_layer.linear.weight.dtype

    def _autocast(self, device: torch.device):
        dtype = self.compute_dtype
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def trunk(self, tokens: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding and blocks: (hidden states (B, L, H) before the output layer, conditioning c (B, cond))."""
        x = self.vocab_embed(tokens).float()
        c = F.silu(self.sigma_map(sigma))
        rotary = self.rotary_emb(tokens.shape[1], tokens.device)
        with self._autocast(tokens.device):
            for block in self.blocks:
                x = block(x, rotary, c)
        return x, c

    def _finish(self, logits: torch.Tensor, sigma: torch.Tensor, own_tokens: torch.Tensor) -> torch.Tensor:
        """Scale by sigma and zero the entry at each position's own token. sigma broadcasts over logits[..., 0]."""
        if self.scale_by_sigma:
            logits = logits - log_expm1(sigma).to(logits.dtype)[..., None] - math.log(logits.shape[-1] - 1)
        return torch.scatter(logits, -1, own_tokens[..., None], torch.zeros_like(logits[..., :1]))

    def forward(self, tokens: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x, c = self.trunk(tokens, sigma)
        with self._autocast(tokens.device):
            logits = self.output_layer(x, c)
        return self._finish(logits, sigma[:, None], tokens)

    def log_score_at(self, tokens: torch.Tensor, sigma: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The log score only where `positions` (bool, (B, L)) is set: (N, V), rows in row-major order.

        The vocabulary-wide output layer is the dominant cost for GPT-2 models; with the
        absorbing graph only masked positions need it (see SPEC section 4).
        """
        x, c = self.trunk(tokens, sigma)
        with self._autocast(tokens.device):
            h = self.output_layer.modulated(x, c)[positions]  # (N, H)
            logits = self.output_layer.linear(h)
        row_of = positions.nonzero()[:, 0]
        return self._finish(logits, sigma[row_of], tokens[positions])
