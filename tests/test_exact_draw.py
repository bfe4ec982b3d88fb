"""Exact draws: outcomes of tiny probability are drawn at their rate, at any step count.

One masked position of a GPT-2-sized vocabulary (50,257 tokens) that stays masked with probability
1 - 1e-3 (an early step of a long run) and whose token probabilities follow a long tail (Zipf: the
k-th most likely token has probability proportional to 1/k). Over 3,000,000 draws of the sampler's own
step draw (`sampling._absorbing_choice`), the revealed positions fall in each probability decile of the
tail (the 10% most likely tokens, the next 10%, ...) at that decile's share.

The float32 Gumbel-max draw (the authors' `sample_categorical`, and this sampler's draw before) cannot
pass the same test: a token whose probability is below about 2.6e-9 (1e-3 times a tail share under
2.6e-6: the lowest three deciles here) loses to "stay masked" even with the most favourable float32
uniforms, so its counts there stay 0 whatever the number of draws.
"""
from __future__ import annotations

import torch

from sedd_core import sampling
from sedd_core.graph import Absorbing
from sedd_core.noise import LogLinearNoise

VOCAB = 50257
REVEAL = 1e-3  # the probability of leaving the mask
DRAWS, CHUNK = 3_000_000, 100_000
CHI2_9DOF_P1E4 = 33.72  # P(chi-square with 9 degrees of freedom > 33.72) = 1e-4


def _long_tail() -> tuple[torch.Tensor, torch.Tensor]:
    """(log scores (V + 1,) float32 of a position whose S' is 1, each token's probability decile 0-9).
    Token ids are shuffled so that a decile is not a run of ids."""
    rank = torch.arange(1, VOCAB + 1, dtype=torch.float64)
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    q = torch.empty(VOCAB, dtype=torch.float64)
    q[perm] = (1 / rank) / (1 / rank).sum()
    decile = torch.empty(VOCAB, dtype=torch.long)
    decile[perm] = torch.div((rank.long() - 1) * 10, VOCAB, rounding_mode="floor")
    return torch.cat([q.log().float(), torch.zeros(1)]), decile


def _draw(log_score: torch.Tensor, seed: int) -> torch.Tensor:
    """DRAWS draws of the step's choice at this position (the mask id where it stays), in chunks."""
    graph, noise = Absorbing(VOCAB), LogLinearNoise()
    peak, mass = sampling.masked_stats(log_score[None])
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(DRAWS // CHUNK):
        job = sampling.Job(x=torch.full((1, CHUNK), graph.mask), steps=1024, generator=generator)
        scores = sampling.MaskedScores(log_score[None].expand(CHUNK, -1), torch.full((CHUNK,), REVEAL),
                                       torch.ones(CHUNK, dtype=torch.bool), torch.arange(CHUNK), [CHUNK],
                                       torch.zeros(CHUNK, dtype=torch.long))
        choice = sampling._absorbing_choice(graph, sampling.StepBatch.of(noise, [job]), scores,
                                            peak.expand(CHUNK), mass.expand(CHUNK))
        out.append(choice[choice != graph.mask])
    return torch.cat(out)


def test_every_decile_of_a_long_tail_is_drawn_at_its_rate_where_float32_gumbel_max_cannot():
    log_score, decile = _long_tail()
    q = log_score[:-1].double().exp()  # what the draw sees: the float32 log scores
    assert abs(q.sum().item() - 1) < 1e-5
    share = torch.zeros(10, dtype=torch.float64).index_add_(0, decile, q) / q.sum()
    assert share[-1] > 0.005  # the lowest decile still carries mass worth testing

    tokens = _draw(log_score, seed=1)
    revealed = len(tokens)
    sd = (DRAWS * REVEAL * (1 - REVEAL)) ** 0.5
    assert abs(revealed - DRAWS * REVEAL) < 5 * sd, revealed  # reveal or stay: binomial, 5 sd
    counts = torch.bincount(decile[tokens], minlength=10).double()
    expected = revealed * share
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < CHI2_9DOF_P1E4, (chi2, counts.tolist(), expected.tolist())
    assert (counts > 0).all()

    # The float32 Gumbel-max draw: argmax of p / E with E = 1e-10 - log(u + 1e-10), u float32 uniforms in
    # [0, 1). A token's best case is u just below 1 (the smallest E); staying masked's worst case is u = 0
    # (the largest E). Where a token's best stays below the mask's worst it can never be drawn.
    probs = torch.cat([REVEAL * q, torch.tensor([1 - REVEAL], dtype=torch.float64)]).float()
    u_top, u_zero = torch.tensor(1 - 2**-24, dtype=torch.float32), torch.tensor(0.0)
    token_best = probs[:-1] / (1e-10 - torch.log(u_top + 1e-10))
    mask_worst = probs[-1] / (1e-10 - torch.log(u_zero + 1e-10))
    never = token_best < mask_worst
    assert never[decile >= 7].all() and not never[decile == 0].all()
    # its counts in deciles 7-9 stay 0, so its chi-square at this test's reveal count is at least theirs
    assert expected[7:].sum().item() > CHI2_9DOF_P1E4
