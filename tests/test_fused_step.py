"""The fused step (sampling.gumbel_max_choice, denoising_step(fused=True)) against the in-place maths.

The in-place path is the reference: same log probabilities (to float32 rounding) and the same token
choices for the same random draws, with euler, analytic and denoise rows in one batch.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.presets import synthetic_model
from sedd_core import sampling
from sedd_core.generation import make_job


def _step_inputs(n: int = 9, vocab: int = 99, seed: int = 0):
    """Log scores at n masked positions and per-position coefficients of euler, analytic and denoise rows."""
    gen = torch.Generator().manual_seed(seed)
    log_score = torch.randn(n, vocab, generator=gen) * 3 - 4
    log_score[0, 5] = -torch.inf  # a token with no probability
    kind = torch.tensor([sampling.EULER, sampling.ANALYTIC, sampling.DENOISE])[torch.arange(n) % 3]
    coef = torch.rand(n, generator=gen) * 0.05
    coef[min(1, n - 1)] = 50.0  # p_mask = 1 - coef * S' below zero: the mask column gets -inf
    mask_allowed = kind != sampling.DENOISE
    return log_score, coef, mask_allowed


def _reference_choice(log_score, coef, mask_allowed, noise_log):
    logits = sampling._log_probs_in_place(log_score.clone(), coef, mask_allowed, torch.empty_like(log_score))
    return torch.argmax(logits.sub_(noise_log), dim=-1)


def test_fused_log_probs_equal_the_in_place_maths():
    log_score, coef, mask_allowed = _step_inputs()
    expected = sampling._log_probs_in_place(log_score.clone(), coef, mask_allowed, torch.empty_like(log_score))
    fused = sampling.step_log_probs(log_score, coef, mask_allowed)
    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-6)
    assert torch.isneginf(fused[~mask_allowed, -1]).all()  # denoise rows never stay masked
    assert torch.isneginf(fused[1, -1])  # coef 50


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform draws (CPU)", "exponential draws (GPU)"])
def test_fused_choice_equals_the_in_place_choice_for_the_same_draws(uniform):
    log_score, coef, mask_allowed = _step_inputs(n=64, seed=1)
    gen = torch.Generator().manual_seed(2)
    draws = torch.rand(log_score.shape, generator=gen) if uniform else torch.empty(log_score.shape).exponential_(
        generator=gen)
    noise_log = torch.log(1e-10 - torch.log(draws + 1e-10)) if uniform else draws.log()
    expected = _reference_choice(log_score, coef, mask_allowed, noise_log)
    assert torch.equal(sampling.gumbel_max_choice(log_score, coef, mask_allowed, draws, uniform), expected)


def _mixed_jobs(lm):
    """Three jobs at different points of their grids: analytic mid-run, euler mid-run, one at its final denoise."""
    jobs = []
    for seed, predictor, step_index in ((1, "analytic", 3), (2, "euler", 5), (3, "analytic", 8)):
        job = make_job(lm, num_samples=2, steps=8, predictor=predictor, seed=seed)
        keep = torch.rand(job.x.shape, generator=torch.Generator().manual_seed(seed)) < 0.4
        job.x = torch.where(keep, torch.randint(0, lm.mask_id, job.x.shape, generator=torch.Generator()), job.x)
        job.step_index = step_index
        jobs.append(job)
    return jobs


def _one_step(lm, fused: bool) -> torch.Tensor:
    jobs = _mixed_jobs(lm)
    sampling.denoising_step(lm.model, lm.graph, lm.noise, jobs, fused=fused)
    return torch.cat([job.x for job in jobs])


@pytest.fixture(scope="module")
def short12():
    return synthetic_model("short12", torch.device("cpu"), torch.float32, seed=3)


def test_fused_step_with_the_eager_maths_draws_what_the_in_place_step_draws(short12, monkeypatch):
    unfused = _one_step(short12, fused=False)
    monkeypatch.setattr(sampling, "compiled_gumbel_max_choice", sampling.gumbel_max_choice)
    fused = _one_step(short12, fused=True)
    assert (unfused != short12.mask_id).any() and torch.equal(fused, unfused)


@pytest.mark.slow
def test_compiled_fused_step_equals_the_in_place_maths(short12, torch_compile):
    for n in (9, 1, 30):  # one compile: n is dynamic, and a single position is padded
        log_score, coef, mask_allowed = _step_inputs(n=n, seed=n)
        draws = torch.rand(log_score.shape, generator=torch.Generator().manual_seed(n))
        noise_log = torch.log(1e-10 - torch.log(draws + 1e-10))
        expected = _reference_choice(log_score, coef, mask_allowed, noise_log)
        assert torch.equal(sampling.compiled_gumbel_max_choice(log_score, coef, mask_allowed, draws, True), expected)
    unfused = _one_step(short12, fused=False)
    assert torch.equal(_one_step(short12, fused=True), unfused)
