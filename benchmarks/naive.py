"""The naive baseline: what the authors' sampling loop does, as a measuring stick for `sedd bench`.

Not library API: the library's sampler is sedd_core.sampling; tests compare the two step by step.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from sedd_core.graph import Graph
from sedd_core.model import SEDD
from sedd_core.noise import Noise
from sedd_core.sampling import FINAL_TIME


def authors_forward(model: SEDD, indices: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The authors' DDiT forward (model/transformer.py, model/rotary.py) over our module's weights.

    Same maths as `SEDD.forward`, in their structure: rotary on the packed qkv with an identity for v,
    layer norm then a separate weight multiply, modulate and gated residual as separate ops, full output
    at every position. flash-attn's packed varlen kernel is replaced by PyTorch SDPA (no flash-attn on a
    CPU). Baseline only."""
    x = model.vocab_embed.embedding[indices]
    c = F.silu(model.sigma_map(sigma))
    seq_len = x.shape[1]
    t = torch.arange(seq_len, device=x.device).type_as(model.rotary_emb.inv_freq)
    freqs = torch.einsum("i,j->ij", t, model.rotary_emb.inv_freq.clone())
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos()[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
    sin = emb.sin()[None, :, None, None, :].repeat(1, 1, 3, 1, 1)
    cos[:, :, 2].fill_(1.0)
    sin[:, :, 2].fill_(0.0)

    def layer_norm(norm, h):
        return F.layer_norm(h.float(), [norm.dim]) * norm.weight[None, None, :]

    def rotate_half(h):
        h1, h2 = h[..., : h.shape[-1] // 2], h[..., h.shape[-1] // 2:]
        return torch.cat((-h2, h1), dim=-1)

    autocast = model._autocast(x.device)
    with autocast:
        for block in model.blocks:
            batch = x.shape[0]
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
                block.adaLN_modulation(c)[:, None].chunk(6, dim=2))
            x_skip = x
            h = layer_norm(block.norm1, x) * (1 + scale_msa) + shift_msa
            qkv = rearrange(block.attn_qkv(h), "b s (three h d) -> b s three h d", three=3, h=block.n_heads)
            with torch.autocast(device_type=x.device.type, enabled=False):
                qkv = qkv * cos.to(qkv.dtype) + rotate_half(qkv) * sin.to(qkv.dtype)
            q, k, v = rearrange(qkv, "b s three h d -> three b h s d")
            h = rearrange(F.scaled_dot_product_attention(q, k, v), "b h s d -> b s (h d)", b=batch)
            x = x_skip + gate_msa * block.attn_out(h)
            h = layer_norm(block.norm2, x) * (1 + scale_mlp) + shift_mlp
            x = x + gate_mlp * block.mlp(h)
        out = model.output_layer
        shift, scale = out.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        x = out.linear(layer_norm(out.norm_final, x) * (1 + scale) + shift)
    if model.scale_by_sigma:
        esigm1_log = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1).log().to(x.dtype)[:, None, None]
        x = x - esigm1_log - math.log(x.shape[-1] - 1)
    return torch.scatter(x, -1, indices[..., None], torch.zeros_like(x[..., :1]))


def authors_sample_categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    return (probs / (1e-10 - (u + 1e-10).log())).argmax(dim=-1)


def naive_generate(model: SEDD, graph: Graph, noise: Noise, rows: int, length: int, steps: int,
                   generator: torch.Generator | None = None,
                   network: Callable[[SEDD, torch.Tensor, torch.Tensor], torch.Tensor] = authors_forward,
                   max_steps: int | None = None, on_probs: Callable | None = None) -> torch.Tensor:
    """The authors' pc_sampler, analytic predictor then final denoise: baseline only, not library API.

    Every step takes the network's full output, exponentiates it and applies the vocabulary-wide
    staggered-score x transposed-transition formula at every position. `max_steps` stops after that
    many predictor steps (to time a prefix of a long run); `on_probs(kind, x, probs)` sees each step."""
    device = model.output_layer.linear.weight.device
    x = graph.sample_limit(rows, length, device=device, generator=generator)
    timesteps = torch.linspace(1, FINAL_TIME, steps + 1, device=device)
    dt = (1 - FINAL_TIME) / steps
    with torch.inference_mode():
        for i in range(steps if max_steps is None else min(steps, max_steps)):
            t = timesteps[i] * torch.ones(x.shape[0], 1, device=device)
            curr_sigma = noise(t)[0]
            dsigma = curr_sigma - noise(t - dt)[0]
            score = network(model, x, curr_sigma.reshape(-1)).float().exp()
            probs = graph.staggered_score(score, dsigma) * graph.transp_transition(x, dsigma)
            if on_probs is not None:
                on_probs("analytic", x, probs)
            x = authors_sample_categorical(probs, generator)
        if max_steps is None or max_steps >= steps:
            t = timesteps[-1] * torch.ones(x.shape[0], 1, device=device)
            sigma = noise(t)[0]
            score = network(model, x, sigma.reshape(-1)).float().exp()
            probs = (graph.staggered_score(score, sigma) * graph.transp_transition(x, sigma))[..., :-1]
            if on_probs is not None:
                on_probs("denoise", x, probs)
            x = authors_sample_categorical(probs, generator)
    return x


