"""fast_model.FastSEDD computes the same function as the plain network of model.py, faster."""
from __future__ import annotations

import pytest
import torch

from sedd_core import fast_model
from sedd_core.config import SEDDConfig
from sedd_core.fast_model import FastSEDD, pair_interleaving_order, rotary_qk, rotary_qk_interleaved
from sedd_core.generation import generate, iterate, make_job
from sedd_core.loading import load, load_network, to_precision
from sedd_core.model import SEDD, Rotary, apply_rotary
from sedd_core.sampling import denoising_step

CPU = torch.device("cpu")
MASK = 98  # the character vocabulary's mask id


def small_config(length: int = 12) -> SEDDConfig:
    """A 12-position character model (the shape of reference/tiny-five, wider), three blocks."""
    return SEDDConfig.from_dict({
        "tokens": 98, "graph": {"type": "absorb"}, "noise": {"type": "loglinear"},
        "model": {"hidden_size": 128, "cond_dim": 64, "length": length, "n_blocks": 3, "n_heads": 4,
                  "scale_by_sigma": True, "dropout": 0.0, "name": "fast-paths-test"},
    })


def small_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> SEDD:
    """Random weights (PyTorch's default init), stored in `dtype` as loading.build_model stores them."""
    torch.manual_seed(seed)
    return to_precision(SEDD(small_config()), CPU, dtype).eval()


def half_masked_input(rows: int = 6, seed: int = 0) -> torch.Tensor:
    """rows x 12 tokens, every other position masked: 72 positions, enough for oneDNN's fused GELU."""
    x = torch.randint(0, MASK, (rows, 12), generator=torch.Generator().manual_seed(seed))
    x[:, ::2] = MASK
    return x


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def test_interleaved_rotary_is_the_rotary_of_permuted_channels():
    hidden, heads, length = 128, 4, 10
    cos, sin = Rotary(hidden // heads)(length, CPU)
    qkv = torch.randn(2, length, 3 * hidden)
    order = pair_interleaving_order(hidden, heads)
    assert sorted(order.tolist()) == list(range(3 * hidden))
    q, k = rotary_qk(qkv.view(2, length, 3, heads, -1), cos, sin)
    q_fast, k_fast = rotary_qk_interleaved(qkv[..., order].view(2, length, 3, heads, -1), torch.complex(cos, sin))
    within_head = order[: hidden // heads]  # the same permutation in every head of q and k
    assert torch.allclose(q_fast, q[..., within_head], atol=1e-6)
    assert torch.allclose(k_fast, k[..., within_head], atol=1e-6)
    # attention scores are what rotary is for: equal under the shared permutation
    assert torch.allclose(q_fast @ k_fast.transpose(-1, -2), q @ k.transpose(-1, -2), atol=1e-5)


def test_one_buffer_rotary_is_the_plain_rotary():
    cos, sin = Rotary(32)(10, CPU)
    qkv = torch.randn(2, 10, 3, 4, 32)
    q, k = rotary_qk(qkv, cos, sin)
    assert torch.allclose(q, apply_rotary(qkv[:, :, 0], cos, sin), atol=1e-6)
    assert torch.allclose(k, apply_rotary(qkv[:, :, 1], cos, sin), atol=1e-6)


# float32: the same maths in another order, so rounding only; bf16: both round to bf16 in different
# places (the plain path multiplies gates in bf16, the fast one in float32), measured up to 6.4e-3
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("one_sigma", [True, False], ids=["one-sigma", "sigma-per-row"])
def test_fast_runner_equals_the_plain_network(dtype, one_sigma):
    model = small_model(dtype)
    runner = FastSEDD(model)
    x = half_masked_input()
    sigma = torch.full((6,), 0.7) if one_sigma else torch.linspace(0.05, 3.0, 6)
    index = (x == MASK).reshape(-1).nonzero().squeeze(1)
    with torch.no_grad():
        plain = model(x, sigma)  # (B, L, V)
        plain_at = model.log_score_at_index(x, sigma, index)
    fast = runner(x, sigma)
    fast_at = runner.log_score_at_index(x, sigma, index)
    out = torch.empty(index.numel(), model.config.vocab_size)
    fast_into = runner.log_score_at_index(x, sigma, index, out=out, row_of=index // 12)
    assert fast.shape == plain.shape == (6, 12, 99) and fast_at.shape == (index.numel(), 99)
    assert fast.dtype == plain.dtype and fast_at.dtype == plain_at.dtype == torch.float32
    assert torch.equal(plain_at, plain.float().reshape(-1, 99)[index])  # the plain gather is the definition
    assert relative_error(fast, plain) <= TOLERANCE[dtype]
    assert relative_error(fast_at, plain_at) <= TOLERANCE[dtype]
    assert torch.equal(fast_into, fast_at)
    if dtype == torch.float32:
        assert fast_into.data_ptr() == out.data_ptr()  # the caller's buffer was written, not a copy


def test_fast_runner_follows_the_weights_when_they_change():
    model = small_model()
    runner = FastSEDD(model)  # caches: pair-interleaved qkv weights, stacked modulation
    x, sigma = half_masked_input(2), torch.tensor([0.3, 2.0])
    with torch.no_grad():
        before = model(x, sigma)
    assert relative_error(runner(x, sigma), before) <= 1e-5
    with torch.no_grad():  # what an optimiser step or load_state_dict does: the weights change in place
        for block in model.blocks:
            block.attn_qkv.weight.mul_(1.5)
            block.adaLN_modulation.bias.add_(0.1)
        after = model(x, sigma)
    assert not torch.allclose(after, before, atol=1e-3)  # the change matters
    assert relative_error(runner(x, sigma), after) <= 1e-5  # and the cached copies followed it


def test_training_works_after_inference_in_the_same_process():
    """Cached rotary tables first built under inference_mode must not poison a later backward pass."""
    model = small_model()
    x, sigma = half_masked_input(2, seed=1), torch.tensor([0.3, 2.0])
    FastSEDD(model)(x, sigma)  # runs under inference_mode
    model.train().requires_grad_(True)
    model(x, sigma).sum().backward()
    assert all(p.grad is not None for p in model.blocks[0].attn_qkv.parameters())


def test_flash_attn_is_used_only_on_cards_that_support_it(monkeypatch):
    """flash-attn 2 raises on pre-Ampere cards (T4, V100): those, CPUs and float32 go through SDPA."""
    monkeypatch.setattr(fast_model, "FLASH_ATTN_AVAILABLE", True)
    monkeypatch.setattr(fast_model, "_flash_attn_devices", {})
    capability = {torch.device("cuda:0"): (7, 5), torch.device("cuda:1"): (8, 6)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[device])

    usable = fast_model.flash_attn_usable
    assert not usable("cuda:0", torch.bfloat16)  # a T4
    assert usable("cuda:1", torch.bfloat16)  # an A10
    assert not usable("cuda:1", torch.float32)
    assert not usable("cpu", torch.bfloat16)


def test_compile_takes_a_known_mode_only():
    with pytest.raises(ValueError, match="reduce-overhead"):
        FastSEDD(small_model(), compile="1")
    with pytest.raises(ValueError, match="fast=True"):
        load("default", device="cpu", fast=False, compile="freeze")


def test_bfloat16_path_agrees_with_float32_at_masked_positions(reference):
    """The bf16 path (bf16 weights, float32 residual stream, norms and output maths) through the
    masked-only last block and output layer: equal to float32 within bf16 rounding."""
    folder = reference / "absorb-a" / "oxen-layout"
    ref = torch.load(reference / "absorb-a" / "reference.pt", weights_only=True)
    full, _, _ = load_network(folder, CPU, torch.float32)
    half, config, _ = load_network(folder, CPU, torch.bfloat16)
    x, sigma = ref["x"], ref["sigma"]
    masked = x == config.mask_id
    with torch.no_grad():
        expected = full(x, sigma)[masked]
    ours = FastSEDD(half).log_score_at_index(x, sigma, masked.reshape(-1).nonzero().squeeze(1))
    assert ours.dtype == torch.float32  # the vocabulary maths run in float32 whatever the weights
    assert relative_error(ours, expected) < 1e-2  # measured 1.3e-3


def test_plain_and_fast_loads_sample_the_same_tokens():
    """`load(fast=False)` samples through the plain network: for one seed, the same texts. Both compute
    the log score to float32 rounding (~1e-6 relative); a draw could only differ where a uniform number
    falls within that of a category boundary, which these seeds do not hit."""
    fast = load("default", device="cpu", dtype="float32")
    plain = load("default", device="cpu", dtype="float32", fast=False)
    assert isinstance(fast.runner, FastSEDD) and fast.runner.model is fast.model and plain.runner is plain.model
    for seed, prefix in ((0, ""), (1, "The ")):
        texts = generate(fast, num_samples=2, steps=16, length=48, seed=seed, prefix=prefix)
        assert generate(plain, num_samples=2, steps=16, length=48, seed=seed, prefix=prefix) == texts


@pytest.mark.slow
def test_compiled_trunk_gives_the_same_tokens_as_eager(torch_compile):
    lm = load("default", device="cpu", dtype="float32")

    def sample():
        job = make_job(lm, num_samples=3, steps=8, length=12, seed=5)  # 3 rows: the dynamic-size graph
        for _ in iterate(lm, job):
            pass
        return job.x

    eager = sample()
    lm.runner = FastSEDD(lm.model, compile="freeze")
    assert [rows for rows, _ in lm.runner.warm(3, 12)] == [1, 2]  # one row, and two or more (dynamic)
    compiled = sample()
    with torch.no_grad():  # the compiled graphs hold the weights as constants (freezing) ...
        lm.model.blocks[0].mlp[0].weight.mul_(-1)
    with pytest.warns(UserWarning, match="weights changed"):
        after_change = sample()  # ... so a change sends the trunk back to eager, never to stale weights
    assert not lm.runner.compiled
    assert torch.equal(eager, compiled)
    assert torch.equal(after_change, sample())
    assert not torch.equal(after_change, eager)


# ---- the bfloat16 inference path (CPUs with native bf16, and CUDA) ------------------------------------

def _reference_input(config, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """4 rows, every other position masked (absorbing graph), at three noise levels."""
    x = torch.randint(0, config.tokens, (3, config.model.length), generator=torch.Generator().manual_seed(seed))
    if config.mask_id is not None:
        x[:, ::2] = config.mask_id
    return x, torch.tensor([0.05, 1.0, 5.0])


@pytest.mark.parametrize("name", ["absorb-a", "uniform-a"])
def test_bfloat16_log_scores_are_as_close_to_float32_as_the_authors_bf16_recipe(reference, name):
    """Tolerance: bf16 keeps 8 significant bits, so every weight and every matmul input carries a relative
    rounding error of up to u = 2^-8 = 3.9e-3; the log scores come out of several of them in a row. The
    yardstick is the authors' own bf16 recipe (float32 weights and norms, matmuls under bf16 autocast,
    here the plain network run in bf16): ours must stay within 1.5x its error, and within 3u = 1.2e-2 of
    the largest log score (measured: 4.0e-3 to 5.4e-3 for both, on these models and on the bundled one)."""
    folder = reference / name / "oxen-layout"
    full, config, _ = load_network(folder, CPU, torch.float32)
    half, _, _ = load_network(folder, CPU, torch.bfloat16)
    x, sigma = _reference_input(config)
    with torch.no_grad():
        expected = full(x, sigma)
        authors = half(x, sigma)  # model.SEDD in bf16: bf16 autocast around the blocks
    ours = FastSEDD(half)(x, sigma)
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(ours), finite)
    ours_error = relative_error(ours[finite], expected[finite])
    assert ours_error <= 3 * 2**-8
    assert ours_error <= 1.5 * relative_error(authors[finite], expected[finite])
    if config.mask_id is not None:  # the sampler's call: float32 log scores at the masked positions only
        index = (x == config.mask_id).reshape(-1).nonzero().squeeze(1)
        at = FastSEDD(half).log_score_at_index(x, sigma, index)
        assert at.dtype == torch.float32
        assert relative_error(at, expected.float().reshape(-1, config.vocab_size)[index]) <= 3 * 2**-8


class WeightCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every dtype conversion (aten.to, aten._to_copy, and copy_ between dtypes; under inference
    mode the dispatcher shows `to` itself) whose source is a parameter of `model` (it shares a parameter's
    storage), and counts all conversions."""

    CASTS = {torch.ops.aten.to, torch.ops.aten._to_copy, torch.ops.aten.copy_}

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.storages = {p.untyped_storage().data_ptr(): name for name, p in model.named_parameters()}
        self.of_weights: list[str] = []
        self.all = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in self.CASTS:
            source = args[1] if func.overloadpacket is torch.ops.aten.copy_ else args[0]
            target_dtype = out.dtype
            if source.dtype != target_dtype:
                self.all += 1
                name = self.storages.get(source.untyped_storage().data_ptr())
                if name is not None:
                    self.of_weights.append(f"{name}: {source.dtype} -> {target_dtype}")
        return out


def test_bfloat16_passes_never_cast_a_weight():
    """Weights are stored in bf16 once, at load; a pass converts activations only (into the matmuls'
    dtype and back), never a weight. Traced at the dispatcher, where every conversion shows."""
    lm = load("default", device="cpu", dtype="bfloat16")
    x = torch.full((2, lm.length), lm.mask_id)
    x[:, ::3] = 5
    sigma, index = torch.tensor([0.7, 2.0]), (x == lm.mask_id).reshape(-1).nonzero().squeeze(1)
    out = torch.empty(index.numel(), lm.config.vocab_size)
    lm.runner.log_score_at_index(x, sigma, index, out=out)  # first calls build the caches (stacked modulation)
    lm.runner(x[:1], sigma[:1])
    with torch.inference_mode(), WeightCasts(lm.model) as trace:
        lm.runner.log_score_at_index(x, sigma, index, out=out)  # rows at two sigmas
        lm.runner.log_score_at_index(x, sigma[:1].expand(2), index)  # one sigma: the fused norm path
        lm.runner(x, sigma)
        generate(lm, num_samples=1, steps=2, seed=0)
    assert trace.all > 0  # the trace sees conversions (activations into bf16 and back) ...
    assert trace.of_weights == []  # ... and none of them is a weight's
    with WeightCasts(lm.model) as check:  # and it would see one
        lm.model.blocks[0].attn_qkv.weight.float()
    assert check.of_weights == ["blocks.0.attn_qkv.weight: torch.bfloat16 -> torch.float32"]


def _alone_and_in_a_full_batch(lm, steps: int = 10) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A seeded 2-sample request run alone, and again as 2 of the 8 rows of every pass beside requests
    at other times, with other predictors and fixed text. (tokens alone, tokens batched, rows in a pass)."""
    def target():
        return make_job(lm, num_samples=2, steps=steps, seed=1234)

    alone = target()
    while not alone.done:
        denoising_step(lm.runner, lm.graph, lm.noise, [alone])
    early = make_job(lm, num_samples=3, steps=steps + 6, seed=7)
    for _ in range(3):  # three steps ahead: its rows sit at other noise levels
        denoising_step(lm.runner, lm.graph, lm.noise, [early])
    batched = target()
    jobs = [early, make_job(lm, steps=steps + 2, predictor="euler", seed=8), batched,
            make_job(lm, num_samples=2, steps=steps, seed=9, prefix="ROMEO. ")]
    rows = sum(job.rows for job in jobs)
    while not batched.done:
        denoising_step(lm.runner, lm.graph, lm.noise, [job for job in jobs if not job.done])
    return alone.x, batched.x, rows


@pytest.mark.parametrize("model", ["default", "tiny-five"])
def test_seeded_bfloat16_request_is_the_same_alone_and_in_a_full_batch(model, tiny_five):
    """The bundled model (128 positions) and tiny-five (12: one row alone is below the size where the MLP's
    GELU runs inside oneDNN's matmul, 8 rows are above it; the choice must not depend on the rows)."""
    lm = load("default" if model == "default" else str(tiny_five), device="cpu", dtype="bfloat16")
    alone, batched, rows = _alone_and_in_a_full_batch(lm)
    assert rows == 8
    assert torch.equal(alone, batched)


@pytest.mark.slow
def test_written_out_attention_is_softmax_attention_with_bf16_rounded_scores():
    """`attend_unfused` (the compiled CPU bf16 step's attention): exact softmax attention in float32, and in
    bf16 within the rounding of its inputs, scores and weights (each up to u = 2^-8, relative) of float32
    attention on the same bf16 inputs."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (1.5 * torch.randn(3, 4, 32, 16, generator=generator) for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert relative_error(fast_model.attend_unfused(q, k, v), expected) <= 1e-5
    q, k, v = (t.bfloat16() for t in (q, k, v))
    on_bf16_inputs = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    ours = fast_model.attend_unfused(q, k, v)
    assert ours.dtype == torch.bfloat16
    assert relative_error(ours, on_bf16_inputs) <= 3 * 2**-8


def test_compiled_bfloat16_step_matches_eager_and_is_batch_invariant(torch_compile):
    """The compiled trunk in bf16 (Inductor, weights frozen in and prepacked): log scores within bf16
    rounding of the eager bf16 path (fusion changes where activations round), and a seeded request the
    same alone and in a full batch."""
    lm = load("default", device="cpu", dtype="bfloat16")
    x = torch.full((3, lm.length), lm.mask_id)
    x[:, ::3] = 5
    sigma, index = torch.tensor([0.3, 1.0, 4.0]), (x == lm.mask_id).reshape(-1).nonzero().squeeze(1)
    eager = lm.runner.log_score_at_index(x, sigma, index)
    lm.runner = FastSEDD(lm.model, compile="freeze")
    assert [rows for rows, _ in lm.runner.warm(8, lm.length)] == [1, 2]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = lm.runner.log_score_at_index(x, sigma, index)
    assert lm.runner.compiled
    assert relative_error(compiled, eager) <= 3 * 2**-8
    alone, batched, rows = _alone_and_in_a_full_batch(lm)
    assert rows == 8
    assert torch.equal(alone, batched)
    # positions are computed in padded groups of POSITION_QUANTUM: a position's scores do not depend on
    # how many others were asked for, or on the padding
    many = index[: fast_model.POSITION_QUANTUM + 1]
    assert many.numel() == fast_model.POSITION_QUANTUM + 1
    all_of_them = lm.runner.log_score_at_index(x, sigma, many)
    for count in (1, 5, fast_model.POSITION_QUANTUM):
        assert torch.equal(lm.runner.log_score_at_index(x, sigma, many[:count]), all_of_them[:count])
    # every call above (1 to 8 rows, any number of masked positions) used the two warmed graphs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
