"""Sampling controls in the library: what each does to a step's draw, temperature 0, ranges, both graphs.

The step draws are checked against `masked_log_probs` (which tests/test_reference.py checks against the
authors' formulas at the defaults), with a stand-in network whose log scores are fixed, so that the
distribution each control gives is known by hand.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import sedd_core
from sedd_core import sampling
from sedd_core.controls import SamplingControls
from sedd_core.generation import GenerationError, iterate, make_job
from sedd_core.graph import Absorbing, Uniform
from sedd_core.noise import LogLinearNoise

CORPUS = ("hello world!", "score ratios", "diffusion ok", "masked chars", "tiny dataset")  # tiny-five's


class FixedScores:
    """A stand-in network: the same log scores (V + 1,) at every position (absorbing graph), or every
    position's (V,) (uniform graph). Counts its passes."""

    def __init__(self, log_score: torch.Tensor):
        self.log_score = log_score
        self.passes = 0

    def log_score_at_index(self, x, sigma, index, out=None, row_of=None):
        self.passes += 1
        rows = self.log_score[None].expand(len(index), -1)
        return rows.clone() if out is None else out.copy_(rows)

    def __call__(self, x, sigma):
        self.passes += 1
        return self.log_score[None, None].expand(*x.shape, -1).clone()


# q over 8 tokens, by hand: the clean-token distribution at every masked position
Q = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005], dtype=torch.float64)


def _absorbing_setup(reveal: float = 0.5, positions: int = 40_000):
    """Graph, noise, a network with clean-token distribution Q, and a job factory: one row of `positions`
    masked positions at a step whose reveal probability r = coef * S' is `reveal` (S' set through the
    scores)."""
    graph, noise = Absorbing(len(Q)), LogLinearNoise()
    job_steps = 16
    probe = sampling.Job(x=torch.full((1, 1), graph.mask), steps=job_steps)
    coef = sampling.StepBatch.of(noise, [probe]).absorbing_coefficient().item()
    scores = torch.cat([(Q * reveal / coef).log().float(), torch.zeros(1)])  # S' = reveal / coef

    def job(seed: int, **controls):
        return sampling.Job(x=torch.full((1, positions), graph.mask), steps=job_steps,
                            generator=torch.Generator().manual_seed(seed),
                            controls=SamplingControls(**controls))

    return graph, noise, FixedScores(scores), job


def _kept(q: torch.Tensor, keep: list[int], power: float = 1.0) -> torch.Tensor:
    out = torch.zeros_like(q)
    out[keep] = q[keep] ** power
    return out / out.sum()


CONTROL_CASES = {  # controls -> q' by hand
    "defaults": ({}, Q),
    "temperature 0.5": ({"temperature": 0.5}, _kept(Q, list(range(8)), 2.0)),
    "temperature 2": ({"temperature": 2.0}, _kept(Q, list(range(8)), 0.5)),
    "top_k 3": ({"top_k": 3}, _kept(Q, [0, 1, 2])),
    "top_k 1": ({"top_k": 1}, _kept(Q, [0])),
    "top_p 0.65 (reached exactly by two tokens)": ({"top_p": 0.65}, _kept(Q, [0, 1])),
    "top_p 0.7": ({"top_p": 0.7}, _kept(Q, [0, 1, 2])),
    "min_p 0.3": ({"min_p": 0.3}, _kept(Q, [0, 1, 2])),  # >= 0.3 * 0.4 = 0.12
    "temperature 0.5, top_k 4, top_p 0.9": ({"temperature": 0.5, "top_k": 4, "top_p": 0.9},
                                             _kept(Q, [0, 1, 2], 2.0)),  # of .16 .0625 .0225 .01: 2nd + 3rd cross .9
}


def test_masked_log_probs_give_each_control_its_distribution_worked_out_by_hand():
    graph, noise, network, job = _absorbing_setup(reveal=0.5, positions=1)
    for name, (controls, q) in CONTROL_CASES.items():
        probs = sampling.masked_log_probs(network, graph, noise, [job(0, **controls)]).double().exp()[0]
        assert probs[-1].item() == pytest.approx(0.5, rel=1e-6), name  # the reveal rate is the controls' own
        torch.testing.assert_close(probs[:-1] / 0.5, q, rtol=1e-5, atol=1e-9, msg=name)


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square for counts against probs (outcomes of probability 0 left out)."""
    seen = probs > 0
    expected = counts.sum() * probs[seen]
    stat = ((counts[seen] - expected) ** 2 / expected).sum()
    dof = int(seen.sum()) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2).item()


def test_jobs_with_different_controls_share_one_pass_and_each_draws_its_own_distribution():
    graph, noise, network, job = _absorbing_setup(reveal=0.5)
    jobs = [job(seed, **controls) for seed, (controls, _) in enumerate(CONTROL_CASES.values())]
    expected = [sampling.masked_log_probs(network, graph, noise, [j]).double().exp()[0] for j in jobs]
    network.passes = 0
    sampling.denoising_step(network, graph, noise, jobs)
    assert network.passes == 1
    for name, j, probs in zip(CONTROL_CASES, jobs, expected):
        counts = torch.bincount(j.x[0], minlength=graph.dim).double()
        assert (counts[probs == 0] == 0).all(), name  # a token the controls remove is never drawn
        assert _chi_square_p(counts, probs) > 1e-4, (name, counts.tolist(), (probs * counts.sum()).tolist())


def test_the_uniform_graph_draws_its_formula_and_the_controls_reshape_where_a_position_moves():
    """Uniform graph: "move or stay" follows the faithful formula (`graph.analytic_probs`); the controls
    reshape only the token a position moves to."""
    tokens, positions = 8, 40_000
    graph, noise = Uniform(tokens), LogLinearNoise()
    score = (Q * 3).float()
    network = FixedScores(score.log())
    start = torch.arange(positions) % tokens  # every current token equally often

    def run(seed: int, **controls) -> tuple[torch.Tensor, sampling.StepBatch]:
        job = sampling.Job(x=start[None].clone(), steps=4, generator=torch.Generator().manual_seed(seed),
                           controls=SamplingControls(**controls))
        batch = sampling.StepBatch.of(noise, [job])
        sampling.denoising_step(network, graph, noise, [job])
        return job.x[0], batch

    for name, controls in {"defaults": {}, "top_k 2": {"top_k": 2}, "temperature 0.5": {"temperature": 0.5}}.items():
        after, batch = run(1, **controls)
        for current in (0, 3, 7):
            probs = graph.analytic_probs(torch.tensor([[current]]), score[None, None], batch.ds[:1, None])[0, 0]
            probs = probs.double().clamp_min(0)
            probs /= probs.sum()
            moves = probs.clone()
            moves[current] = 0
            keep = moves.argsort(descending=True)[: controls.get("top_k", tokens - 1)].tolist()
            expected = (1 - probs[current]) * _kept(moves, keep, 1 / controls.get("temperature", 1.0))
            expected[current] = probs[current]
            counts = torch.bincount(after[start == current], minlength=tokens).double()
            assert (counts[expected == 0] == 0).all(), (name, current)
            assert _chi_square_p(counts, expected) > 1e-4, (name, current, counts.tolist(),
                                                             (expected * counts.sum()).tolist())


# ---- through make_job and generate, on the tiny model --------------------------------------------------

def test_explicit_defaults_are_the_default_request(lm):
    plain = sedd_core.generate(lm, num_samples=4, steps=16, seed=7)
    explicit = sedd_core.generate(lm, num_samples=4, steps=16, seed=7, temperature=1.0, top_p=1.0, top_k=0,
                                  min_p=0.0)
    assert plain == explicit
    assert make_job(lm, temperature=1, top_p=1, top_k=0).controls == SamplingControls()


@pytest.mark.parametrize("canvas", [{}, {"prefix": "di"}, {"suffix": "ok"}, {"segments": [3, "ed ch", 4]}],
                         ids=["unconditional", "prefix", "suffix", "segments"])
def test_temperature_0_is_one_text_for_any_seed_and_every_choice(lm, canvas):
    texts = [sedd_core.generate(lm, num_samples=3, steps=12, seed=seed, temperature=0, **canvas)
             for seed in (1, 2, None)]
    assert all(t == texts[0] for t in texts) and len(set(texts[0])) == 1
    for fixed in ("prefix", "suffix"):
        if fixed in canvas:
            assert texts[0][0].startswith(canvas[fixed]) if fixed == "prefix" else texts[0][0].endswith(canvas[fixed])
    if "segments" in canvas:
        assert texts[0][0][3:8] == "ed ch"


def test_temperature_0_is_the_same_alone_and_among_batch_neighbours(lm):
    """The engine's situation: one pass over rows of other requests (random, reshaped, greedy at other
    steps); every step of the greedy job equals its run alone."""
    def greedy():
        return make_job(lm, num_samples=2, steps=12, seed=1, temperature=0, prefix="s")

    alone = [state.x.clone() for state in iterate(lm, greedy())]
    job = greedy()
    neighbours = [make_job(lm, num_samples=5, steps=20, seed=3),
                  make_job(lm, num_samples=2, steps=7, seed=4, temperature=0.7, top_k=3),
                  make_job(lm, num_samples=1, steps=30, temperature=0, suffix="!")]
    for _ in range(3):  # the neighbours are at other points of their grids
        sampling.denoising_step(lm.runner, lm.graph, lm.noise, neighbours)
    together = []
    while not job.done:
        sampling.denoising_step(lm.runner, lm.graph, lm.noise,
                                [job] + [n for n in neighbours if not n.done])
        together.append(job.x.clone())
    assert len(together) == len(alone) and all(torch.equal(a, b) for a, b in zip(alone, together))


def test_temperature_0_reveals_as_many_positions_per_step_as_the_schedule(lm):
    steps = 10
    job = make_job(lm, num_samples=1, steps=steps, temperature=0, prefix="ab")  # 10 free positions
    left = [int(state.masks_left[0]) for state in iterate(lm, job)]
    share = [float(-torch.expm1(-lm.noise.total(torch.tensor(t, dtype=torch.float64))))
             for t in sampling.time_grid(steps).double().tolist()]
    expected = [math.floor(10 * s / share[0] + 0.5) for s in share[1:]] + [0]
    assert left == expected


@pytest.mark.slow
def test_top_k_1_and_a_narrow_top_p_concentrate_samples_on_the_training_strings(lm):
    """tiny-five was trained on five strings; keeping only each position's most likely tokens makes more
    samples one of them (and fewer distinct texts) than the model's own distribution at the same seed."""
    def run(**controls):
        texts = sedd_core.generate(lm, num_samples=200, steps=64, seed=3, **controls)
        return sum(t in CORPUS for t in texts) / len(texts), len(Counter(texts))

    base_share, base_distinct = run()
    for controls in ({"top_k": 1}, {"top_p": 0.1}):
        share, distinct = run(**controls)
        assert share >= base_share + 0.08 and distinct < base_distinct, (controls, share, base_share)


# ---- ranges and graphs ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "value", "words"), [
    ("temperature", -0.1, "must be a number of at least 0"), ("temperature", float("nan"), "must be a number of at least 0"),
    ("temperature", float("inf"), "at least 0"), ("top_p", 0.0, "must be a number greater than 0 and at most 1"),
    ("top_p", 1.5, "greater than 0 and at most 1"), ("top_k", -1, "must be an integer of at least 0"),
    ("top_k", 2.5, "must be an integer"), ("top_k", True, "must be an integer"),
    ("min_p", -0.5, "must be a number between 0 and 1"), ("min_p", 1.01, "between 0 and 1"),
])
def test_out_of_range_controls_are_refused_naming_the_field_and_range(lm, field, value, words):
    with pytest.raises(GenerationError, match=words) as refused:
        make_job(lm, **{field: value})
    assert refused.value.field == field and str(refused.value).startswith(field)


def test_uniform_graph_takes_the_controls_and_refuses_temperature_0(tmp_path, tiny_config, write_oxen_folder):
    folder = write_oxen_folder(tmp_path / "uniform", tiny_config(tokens=98, graph="uniform", length=16))
    lm = sedd_core.load(folder, device="cpu")
    texts = sedd_core.generate(lm, num_samples=2, steps=4, seed=5, temperature=0.5, top_p=0.9, top_k=20, min_p=0.01,
                               prefix="ab")
    assert all(t.startswith("ab") for t in texts)
    with pytest.raises(GenerationError, match="temperature 0 .* absorbing-graph model") as refused:
        make_job(lm, temperature=0)
    assert refused.value.field == "temperature"
