"""Likelihood scoring: the ELBO bound of texts, checked against the authors' loss on tiny-five."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

import sedd_core
from sedd_cli.main import main as sedd_main
from sedd_core.elbo import ElboDraws, ScoreError, elbo_draws, elbo_rows
from sedd_core.evaluate import ScoreResult, TextScores, score_texts
from sedd_core.losses import score_entropy_loss

TRAINING_STRINGS = ["hello world!", "diffusion ok", "masked chars", "score ratios", "tiny dataset"]


@pytest.fixture(scope="module")
def authors(reference) -> dict:
    """The authors' loss on tiny-five's strings (tests/data/reference/tiny-five-score/README.md)."""
    return json.loads((reference / "tiny-five-score" / "authors_loss.json").read_text())


def test_each_draw_equals_the_authors_loss_at_the_same_noise(lm, authors):
    """Rows where the authors' get_loss_fn(train=False) was given t and x_t: ours gives the same loss."""
    for text, ref in authors["strings"].items():
        rows = ref["rows"]
        x0 = torch.tensor([lm.tokenizer.encode(text)] * len(rows["t"]))
        with torch.inference_mode():
            ours = elbo_rows(lm.model, lm.graph, lm.noise, x0, torch.tensor(rows["t"]), torch.tensor(rows["perturbed"]))
        theirs = torch.tensor(rows["loss_nats"], dtype=torch.float64)
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5), text


@pytest.mark.slow
def test_bound_agrees_with_the_mean_of_the_authors_loss(lm, authors):
    """Within 3 combined standard errors for each of the five training strings (~10 s)."""
    results = score_texts(lm, TRAINING_STRINGS, samples=2048, seed=0)
    for result in results:
        ref = authors["strings"][result.text]
        combined = math.hypot(result.stderr_nats, ref["stderr_nats"])
        assert abs(result.nll_nats - ref["mean_nats"]) < 3 * combined, (result, ref)


def test_training_strings_rank_far_below_random_strings(lm):
    rng = random.Random(0)
    alphabet = "abcdefghijklmnopqrstuvwxyz !"
    noise = ["".join(rng.choice(alphabet) for _ in range(12)) for _ in range(5)]
    known = score_texts(lm, TRAINING_STRINGS, samples=64)
    unknown = score_texts(lm, noise, samples=64)
    assert all(r.tokens == 12 for r in known + unknown)
    assert max(r.nll_nats for r in known) * 4 < min(r.nll_nats for r in unknown)
    assert max(r.bits_per_token for r in known) < 1 < 4 < min(r.bits_per_token for r in unknown)


def test_a_result_in_bits_and_perplexity_worked_by_hand():
    """4 tokens, 8 ln 2 = 5.545177 nats, variance 0.25: 8 ln 2 / 4 = 2 ln 2 nats a token, which is 2 bits a
    token and a perplexity of e^(2 ln 2) = 4; the standard error is sqrt(0.25) = 0.5."""
    result = ScoreResult.from_estimate("abcd", tokens=4, nll_nats=5.545177444479562, variance=0.25)
    assert result.bits_per_token == pytest.approx(2.0)
    assert result.perplexity_bound == pytest.approx(4.0)
    assert result.stderr_nats == 0.5


def test_standard_error_shrinks_as_samples_grow(lm):
    """16x the draws: about a quarter of the standard error. Single draws are heavy-tailed (most near
    zero, rare large ones near t = 1), so the comparison pools the five strings."""
    def pooled(samples: int) -> float:
        return math.sqrt(sum(r.stderr_nats**2 for r in score_texts(lm, TRAINING_STRINGS, samples=samples)))

    assert 2 < pooled(16) / pooled(256) < 8


def test_windows_of_a_long_text_add_up(lm):
    """'hello world!' + 'diffusion ok' + 'tiny': two full windows and a short one; each window's draws
    depend only on its tokens and the seed, so the sums agree to float rounding."""
    parts = ["hello world!", "diffusion ok", "tiny"]
    whole, *alone = score_texts(lm, ["".join(parts), *parts], samples=32, seed=3)
    assert whole.tokens == 28
    assert whole.nll_nats == pytest.approx(sum(r.nll_nats for r in alone), rel=1e-4)
    assert whole.stderr_nats**2 == pytest.approx(sum(r.stderr_nats**2 for r in alone), rel=1e-4)


def test_repeated_windows_get_independent_draws(lm):
    twice, once = score_texts(lm, ["hello world!" * 2, "hello world!"], samples=32)
    assert twice.nll_nats != pytest.approx(2 * once.nll_nats)  # the same draws twice would give exactly 2x


def test_padding_masks_do_not_count(lm):
    """A 4-token text on a 12-position canvas: the loss is the score entropy at its 4 positions only."""
    mask = lm.graph.mask
    x0 = torch.tensor([lm.tokenizer.encode("tiny") + [mask] * 8] * 3)
    x_t = x0.clone()
    x_t[0, 1] = x_t[1, :4] = mask  # row 2: nothing of the text masked
    t = torch.tensor([0.3, 0.9, 0.5])
    with torch.inference_mode():
        ours = elbo_rows(lm.model, lm.graph, lm.noise, x0, t, x_t)
        sigma, dsigma = lm.noise(t)
        entropy = lm.graph.score_entropy(lm.model(x_t, sigma), sigma[:, None], x_t, x0)
        naive = score_entropy_loss(lm.model, lm.graph, lm.noise, x0, t=t, perturbed=x_t)
    text_only = (dsigma[:, None] * entropy[:, :4]).sum(dim=-1).double()
    assert torch.allclose(ours, text_only, rtol=1e-4, atol=1e-6)
    assert ours[2] == 0
    assert ((naive.double() - ours).abs() > 0.1).all()  # in the plain loss the padding would have counted


def test_chunks_do_not_change_the_result_and_restore_the_model_mode(lm):
    texts = ["hello world!", "diffusion ok tiny"]
    in_one = score_texts(lm, texts, samples=8, seed=5, batch_size=64)
    scores = TextScores(lm, texts, samples=8, seed=5)
    lm.model.train()
    try:
        sizes = []
        while not scores.done:
            sizes.append(scores.step(lm.model, lm.graph, lm.noise, 5))
        assert lm.model.training
    finally:
        lm.model.eval()
    assert sizes == [5, 5, 5, 5, 4] and scores.total_rows == 24
    for chunked, whole in zip(scores.results(), in_one):  # the same draws; sums differ by float rounding
        assert chunked.nll_nats == pytest.approx(whole.nll_nats, rel=1e-4)
        assert chunked.stderr_nats == pytest.approx(whole.stderr_nats, rel=1e-4)


def test_elbo_draws_takes_a_plain_module_and_windows(lm):
    """Whole windows: the draws are those the texts get, so their means are the texts' bounds."""
    ids = torch.tensor([lm.tokenizer.encode(s) for s in TRAINING_STRINGS[:2]])
    draws = elbo_draws(lm.model, lm.graph, lm.noise, ids, samples=16, seed=0, batch_size=7)
    by_text = score_texts(lm, TRAINING_STRINGS[:2], samples=16, seed=0)
    assert draws.shape == (2, 16) and draws.dtype == torch.float64
    assert draws.mean(dim=1).tolist() == pytest.approx([r.nll_nats for r in by_text], rel=1e-4)
    with pytest.raises(ScoreError, match=r"token ids must lie in \[0, 99\)"):
        elbo_draws(lm.model, lm.graph, lm.noise, ids + 200, samples=4)


@pytest.mark.parametrize("texts, samples, message", [
    ([""], 8, "text is empty"),
    (["ok", ""], 8, "text 1 is empty"),
    ([], 8, "no text to score"),
    (["héllo wörld"], 8, "cannot encode: 'é', 'ö'"),
    (["hello"], 0, "samples must be a whole number of at least 1, got 0"),
    (["hello"], 2.5, "samples must be"),
    ([7], 8, "must be a string"),
])
def test_bad_input_is_refused_with_a_clear_message(lm, texts, samples, message):
    with pytest.raises(ScoreError, match=message):
        TextScores(lm, texts, samples=samples)


def test_uniform_graph_scores_whole_windows_and_refuses_short_ones(tmp_path, tiny_config, write_oxen_folder):
    folder = write_oxen_folder(tmp_path / "uniform", tiny_config(tokens=98, graph="uniform", length=6))
    lm = sedd_core.load(folder, device="cpu")
    [result] = score_texts(lm, "abcdefghijkl", samples=4)
    assert result.tokens == 12 and math.isfinite(result.nll_nats) and result.nll_nats > 0
    with pytest.raises(ScoreError, match="uniform graph.*multiple of 6 tokens"):
        score_texts(lm, "abcde", samples=4)


def test_single_draw_has_no_standard_error(lm):
    [result] = score_texts(lm, "hello", samples=1)
    assert math.isnan(result.stderr_nats) and math.isfinite(result.nll_nats)


def test_cli_prints_the_fields(tiny_five, capsys):
    assert sedd_main(["score", "--model", str(tiny_five), "--samples", "8", "--json", "hello world!", "xq"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["text"] for line in lines] == ["hello world!", "xq"]
    for line in lines:
        assert {"tokens", "nll_nats", "stderr_nats", "bits_per_token", "perplexity_bound"} <= line.keys()
        assert line["samples"] == 8 and line["seed"] == 0
    assert lines[0]["nll_nats"] == pytest.approx(score_texts(sedd_core.load(tiny_five, device="cpu"),
                                                             "hello world!", samples=8)[0].nll_nats)
    assert sedd_main(["score", "--model", str(tiny_five), "hello world!", "--samples", "2"]) == 0
    assert "12 tokens, nll <= " in capsys.readouterr().out


def test_cli_refuses_bad_input_with_status_2(tiny_five, capsys):
    assert sedd_main(["score", "--model", str(tiny_five), "--samples", "0", "hello"]) == 2
    assert "samples must be" in capsys.readouterr().err
    assert sedd_main(["score", "--model", str(tiny_five), "héllo"]) == 2
    assert "cannot encode: 'é'" in capsys.readouterr().err


def test_elbo_draws_needs_a_draw(lm):
    with pytest.raises(ScoreError, match="samples must be"):
        ElboDraws(torch.zeros(1, 12, dtype=torch.long), samples=0)
