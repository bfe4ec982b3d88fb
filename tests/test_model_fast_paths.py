"""The inference shortcuts of sedd_core/model.py compute the same function as the plain network."""
from __future__ import annotations

import torch

from sedd_core.bench import synthetic_model
from sedd_core.model import pair_interleaving_order, rotary_qk, rotary_qk_interleaved


def test_interleaved_rotary_is_the_rotary_of_permuted_channels():
    hidden, heads, length = 128, 4, 10  # short12's attention shape
    rotary = synthetic_model("short12", torch.device("cpu"), torch.float32).model.rotary_emb
    rotary_tables = (rotary(length, torch.device("cpu")), rotary.polar(length, torch.device("cpu")))
    qkv = torch.randn(2, length, 3 * hidden)
    order = pair_interleaving_order(hidden, heads)
    assert sorted(order.tolist()) == list(range(3 * hidden))
    q, k = rotary_qk(qkv.view(2, length, 3, heads, -1), *rotary_tables[0])
    q_fast, k_fast = rotary_qk_interleaved(qkv[..., order].view(2, length, 3, heads, -1), rotary_tables[1])
    within_head = order[: hidden // heads]  # the same permutation in every head of q and k
    assert torch.allclose(q_fast, q[..., within_head], atol=1e-6)
    assert torch.allclose(k_fast, k[..., within_head], atol=1e-6)
    # attention scores are what rotary is for: equal under the shared permutation
    assert torch.allclose(q_fast @ k_fast.transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-5)


def _outputs(model, x, sigma):
    with torch.inference_mode():
        fast = model(x, sigma)  # inference: interleaved qkv weight, complex rotary
    with torch.enable_grad():
        plain = model(x, sigma).detach()  # autograd on: the plain path
    return fast, plain


def test_inference_path_follows_the_weights_when_they_change():
    lm = synthetic_model("short12", torch.device("cpu"), torch.float32)
    model = lm.model.eval()
    x = torch.randint(0, lm.mask_id, (2, 12), generator=torch.Generator().manual_seed(0))
    x[:, ::2] = lm.mask_id
    sigma = torch.tensor([0.3, 2.0])
    fast, plain = _outputs(model, x, sigma)
    assert torch.allclose(fast, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # what an optimiser step or load_state_dict does: the weights change in place
        for block in model.blocks:
            block.attn_qkv.weight.mul_(1.5)  # cached as a pair-interleaved copy
            block.adaLN_modulation.bias.add_(0.1)  # cached stacked with the other blocks' modulation
    fast_after, plain_after = _outputs(model, x, sigma)
    assert not torch.allclose(plain_after, plain, atol=1e-3)  # the change matters
    assert torch.allclose(fast_after, plain_after, rtol=1e-5, atol=1e-5)  # and the cached copy followed it


def test_training_works_after_inference_in_the_same_process():
    """Cached rotary tables first built under inference_mode must not poison a later backward pass."""
    lm = synthetic_model("short12", torch.device("cpu"), torch.float32)
    model = lm.model
    x = torch.randint(0, lm.mask_id, (2, 12), generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 2.0])
    with torch.inference_mode():
        model(x, sigma)
    model.train().requires_grad_(True)
    model(x, sigma).sum().backward()
    assert all(p.grad is not None for p in model.blocks[0].attn_qkv.parameters())


def test_flash_attn_is_used_only_on_cards_that_support_it(monkeypatch):
    """flash-attn 2 raises on pre-Ampere cards (T4, V100): those, CPUs and float32 go through SDPA."""
    from sedd_core import model as model_module

    monkeypatch.setattr(model_module, "FLASH_ATTN_AVAILABLE", True)
    monkeypatch.setattr(model_module, "_flash_attn_devices", {})
    capability = {torch.device("cuda:0"): (7, 5), torch.device("cuda:1"): (8, 6)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[device])

    usable = model_module.flash_attn_usable
    assert not usable("cuda:0", torch.bfloat16)  # a T4
    assert usable("cuda:1", torch.bfloat16)  # an A10
    assert not usable("cuda:1", torch.float32)
    assert not usable("cpu", torch.bfloat16)


def test_bfloat16_path_agrees_with_float32_at_masked_positions(reference):
    """The GPU's precision path (autocast, bf16 weights, float32 norms and output maths) through the
    masked-only last block and output layer, run on the CPU: equal to float32 within bf16 rounding."""
    from sedd_core.loading import load_network

    folder = reference / "absorb-a" / "oxen-layout"
    ref = torch.load(reference / "absorb-a" / "reference.pt", weights_only=True)
    full, _, _ = load_network(folder, torch.device("cpu"), torch.float32)
    half, config, _ = load_network(folder, torch.device("cpu"), torch.bfloat16)
    x, sigma = ref["x"], ref["sigma"]
    masked = x == config.mask_id
    with torch.inference_mode():
        expected = full(x, sigma)[masked]
        ours = half.log_score_at(x, sigma, masked)
    assert ours.dtype == torch.float32  # the vocabulary maths run in float32 whatever the weights
    scale = expected.abs().max()
    assert ((ours - expected).abs().max() / scale).item() < 1e-2  # measured 1.3e-3
