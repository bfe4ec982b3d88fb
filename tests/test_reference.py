"""Our model, noise, samplers and loss against vectors written by the authors' code (float32, CPU)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sedd_core.fast_model import FastSEDD
from sedd_core.graph import graph_from_config
from sedd_core.loading import load_network
from sedd_core.losses import score_entropy_loss
from sedd_core.sampling import ANALYTIC, DENOISE, EULER, Job, masked_log_probs

RTOL = 1e-5
CASES = [(name, layout) for name in ("absorb-a", "uniform-a") for layout in ("oxen-layout", "hf-layout")]
RUNNERS = ["plain", "fast"]  # model.SEDD itself, and fast_model.FastSEDD over it


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Relative to the reference's scale: max |ours - theirs| <= 1e-5 * max |theirs|."""
    assert ours.shape == theirs.shape
    scale = theirs.abs().max().clamp_min(1e-30)
    assert ((ours - theirs).abs().max() / scale).item() <= RTOL


def load_reference(folder, runner: str = "plain"):
    """The network (plain, or the fast runner over it), graph and noise of a reference folder (they have
    no tokenizer: ids only)."""
    from sedd_core.noise import noise_from_config

    model, config, _ = load_network(folder, torch.device("cpu"), torch.float32)
    return SimpleNamespace(model=FastSEDD(model) if runner == "fast" else model, graph=graph_from_config(config),
                           noise=noise_from_config(config), mask_id=config.mask_id)


@pytest.fixture(scope="module", params=[(*c, r) for c in CASES for r in RUNNERS],
                ids=["/".join((*c, r)) for c in CASES for r in RUNNERS])
def case(request, reference):
    name, layout, runner = request.param
    ref = torch.load(reference / name / "reference.pt", weights_only=True)
    lm = load_reference(reference / name / layout, runner)
    return lm, ref


def test_network_output(case):
    lm, ref = case
    with torch.no_grad():
        assert_close(lm.model(ref["x"], ref["sigma"]), ref["log_score"])


def test_noise_schedule(case):
    lm, ref = case
    assert_close(lm.noise.total(ref["noise_t"]), ref["noise_total"])
    assert_close(lm.noise.rate(ref["noise_t"]), ref["noise_rate"])
    sigma, rate = lm.noise(ref["step_t"])
    assert_close(sigma, ref["step_sigma"])
    assert_close(rate, ref["step_dsigma_rate"])


def _score(lm, x, sigma):
    with torch.no_grad():
        return lm.model(x, sigma).exp()


def test_euler_probs(case):
    lm, ref = case
    t, dt = ref["step_t"][:, None], ref["step_dt"]
    sigma, rate = lm.noise(t)
    probs = lm.graph.euler_probs(ref["x"], _score(lm, ref["x"], sigma[:, 0]), dt.expand_as(t), rate)
    assert_close(probs, ref["euler_probs"])


def test_analytic_probs(case):
    lm, ref = case
    t, dt = ref["step_t"][:, None], ref["step_dt"]
    sigma = lm.noise.total(t)
    dsigma = sigma - lm.noise.total(t - dt)
    probs = lm.graph.analytic_probs(ref["x"], _score(lm, ref["x"], sigma[:, 0]), dsigma)
    assert_close(probs, ref["analytic_probs"])


def test_denoise_probs(case):
    lm, ref = case
    sigma = lm.noise.total(ref["denoise_t"][:, None])
    probs = lm.graph.denoise_probs(ref["x"], _score(lm, ref["x"], sigma[:, 0]), sigma)
    assert_close(probs, ref["denoise_probs"])


def test_loss(case):
    lm, ref = case
    assert_close(lm.noise.total(ref["loss_t"]), ref["loss_sigma"])
    assert_close(lm.noise.rate(ref["loss_t"]), ref["loss_dsigma"])
    with torch.no_grad():
        log_score = lm.model(ref["loss_xt"], ref["loss_sigma"])
        entropy = lm.graph.score_entropy(log_score, ref["loss_sigma"][:, None], ref["loss_xt"], ref["loss_x0"])
        per_sequence = score_entropy_loss(lm.model, lm.graph, lm.noise, ref["loss_x0"], t=ref["loss_t"],
                                          perturbed=ref["loss_xt"])
    assert_close(entropy, ref["loss_token_entropy"])
    assert_close(per_sequence, ref["loss_per_sequence"])


def _masked_log_probs(lm, ref, kind):
    """The fast absorbing path's per-row log probs at masked positions, for rows at the reference's times."""
    jobs = []
    for row, t in zip(ref["x"], ref["step_t"].tolist()):
        steps = 16  # dt = (1 - 1e-5) / 16 ~ the reference's 0.0625 only up to eps; set the grid by hand below
        job = Job(x=row[None].clone(), steps=steps, predictor="euler" if kind == EULER else "analytic")
        job.grid = [t] * (steps + 1)
        job.step_index = steps if kind == DENOISE else 0
        jobs.append(job)
    return masked_log_probs(lm.model, lm.graph, lm.noise, jobs), jobs[0].steps


@pytest.mark.parametrize("runner", RUNNERS)
def test_fast_absorbing_path_matches_vocabulary_wide_formulas(reference, runner):
    """At masked positions the shared (euler | analytic | denoise) update equals the faithful formulas."""
    lm = load_reference(reference / "absorb-a" / "oxen-layout", runner)
    ref = torch.load(reference / "absorb-a" / "reference.pt", weights_only=True)
    masked = ref["x"] == lm.mask_id
    for kind in (EULER, ANALYTIC, DENOISE):
        logits, steps = _masked_log_probs(lm, ref, kind)
        t = ref["step_t"][:, None]
        dt = torch.full_like(t, (1 - 1e-5) / steps)
        if kind == DENOISE:
            sigma = lm.noise.total(t)
            probs = lm.graph.denoise_probs(ref["x"], _score(lm, ref["x"], sigma[:, 0]), sigma)
            probs = torch.cat([probs, torch.zeros_like(probs[..., :1])], dim=-1)
        elif kind == EULER:
            sigma, rate = lm.noise(t)
            probs = lm.graph.euler_probs(ref["x"], _score(lm, ref["x"], sigma[:, 0]), dt, rate)
        else:
            sigma = lm.noise.total(t)
            probs = lm.graph.analytic_probs(ref["x"], _score(lm, ref["x"], sigma[:, 0]),
                                            sigma - lm.noise.total(t - dt))
        expected = probs[masked]
        ours = logits.exp()
        assert ours.shape == expected.shape
        assert torch.allclose(ours, expected.clamp_min(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("shared_sigma", [True, False], ids=["one-sigma", "sigma-per-row"])
def test_score_at_masked_positions_equals_the_full_network(reference, shared_sigma, runner):
    """log_score_at_index (for the fast runner: the last block and the output layer only at masked
    positions) = the plain forward, there."""
    lm = load_reference(reference / "absorb-a" / "oxen-layout", runner)
    plain = lm.model.model if runner == "fast" else lm.model
    ref = torch.load(reference / "absorb-a" / "reference.pt", weights_only=True)
    x = ref["x"]
    sigma = ref["sigma"][:1].expand(x.shape[0]).clone() if shared_sigma else ref["sigma"]
    masked = x == lm.mask_id
    assert masked.any() and not masked.all()
    with torch.no_grad():
        full = plain(x, sigma)[masked]
        at_masked = lm.model.log_score_at_index(x, sigma, masked.reshape(-1).nonzero().squeeze(1))
    assert_close(at_masked, full)
