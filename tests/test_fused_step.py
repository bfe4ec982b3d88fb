"""The fused step (sampling.masked_stats compiled, denoising_step(fused=True)) against the in-place maths.

The in-place path is the reference: the same per-position max and sum of exponentials (to float32
rounding) and the same token choices for the same random draws, with euler, analytic and denoise rows in
one batch.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.presets import synthetic_model
from sedd_core import sampling
from sedd_core.generation import make_job


def _scores(n: int = 9, vocab: int = 99, seed: int = 0) -> sampling.MaskedScores:
    """Log scores at n masked positions of one row (the mask column last, 0 as the network gives it)."""
    gen = torch.Generator().manual_seed(seed)
    log_score = torch.randn(n, vocab, generator=gen) * 3 - 4
    log_score[:, -1] = 0
    log_score[0, 5] = -torch.inf  # a token with no probability
    return sampling.MaskedScores(log_score, torch.rand(n, generator=gen) * 0.05, torch.ones(n, dtype=torch.bool),
                                 torch.arange(n), [n], torch.zeros(n, dtype=torch.long))


def test_fused_stats_equal_the_in_place_maths():
    scores = _scores()
    with torch.inference_mode():  # as in a step: the reused buffers are made there
        peak, mass = sampling._masked_stats_in_place(scores, torch.device("cpu"))
    fused_peak, fused_mass = sampling.masked_stats(scores.log_score)
    assert torch.equal(fused_peak, peak)
    torch.testing.assert_close(fused_mass, mass, rtol=1e-6, atol=0)
    real = scores.real.double()
    torch.testing.assert_close(mass.double() * peak.double().exp(), real.exp().sum(dim=1), rtol=1e-6, atol=0)  # S'


def _mixed_jobs(lm, **controls):
    """Three jobs at different points of their grids: analytic mid-run, euler mid-run, one at its final denoise."""
    jobs = []
    for seed, predictor, step_index in ((1, "analytic", 3), (2, "euler", 5), (3, "analytic", 8)):
        job = make_job(lm, num_samples=2, steps=8, predictor=predictor, seed=seed, **controls)
        keep = torch.rand(job.x.shape, generator=torch.Generator().manual_seed(seed)) < 0.4
        job.x = torch.where(keep, torch.randint(0, lm.mask_id, job.x.shape, generator=torch.Generator()), job.x)
        job.step_index = step_index
        jobs.append(job)
    return jobs


def _one_step(lm, fused: bool, **controls) -> torch.Tensor:
    jobs = _mixed_jobs(lm, **controls)
    sampling.denoising_step(lm.model, lm.graph, lm.noise, jobs, fused=fused)
    return torch.cat([job.x for job in jobs])


@pytest.fixture(scope="module")
def short12():
    return synthetic_model("short12", torch.device("cpu"), torch.float32, seed=3)


@pytest.mark.parametrize("controls", [{}, {"temperature": 0.7, "top_p": 0.9}, {"temperature": 0}],
                         ids=["defaults", "reshaped", "greedy"])
def test_fused_step_with_the_eager_maths_draws_what_the_in_place_step_draws(short12, monkeypatch, controls):
    unfused = _one_step(short12, fused=False, **controls)
    monkeypatch.setattr(sampling, "compiled_masked_stats", sampling.masked_stats)
    fused = _one_step(short12, fused=True, **controls)
    assert (unfused != short12.mask_id).any() and torch.equal(fused, unfused)


@pytest.mark.slow
def test_compiled_fused_step_equals_the_in_place_maths(short12, torch_compile):
    for n in (9, 1, 30):  # one compile: n is dynamic, and a single position is padded
        scores = _scores(n=n, seed=n)
        with torch.inference_mode():
            peak, mass = sampling._masked_stats_in_place(scores, torch.device("cpu"))
            fused_peak, fused_mass = sampling.compiled_masked_stats(scores.log_score)
        assert torch.equal(fused_peak, peak)
        torch.testing.assert_close(fused_mass, mass, rtol=1e-6, atol=0)
    unfused = _one_step(short12, fused=False)
    assert torch.equal(_one_step(short12, fused=True), unfused)
