"""POST /v1/score: the shared estimator (sedd_core.evaluate) behind HTTP, run on the engine's thread."""
from __future__ import annotations

import asyncio
import math
import random
import threading

import pytest

import sedd_core
from sedd_core.evaluate import TextScores, score_texts

TRAINING_STRINGS = ["hello world!", "diffusion ok", "masked chars", "score ratios", "tiny dataset"]
FIELDS = {"text", "tokens", "nll_nats", "stderr_nats", "bits_per_token", "perplexity_bound"}


async def _score(client, **body) -> list[dict]:
    answer = await client.post("/v1/score", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == "tiny-five"
    return answer.json()["results"]


@pytest.fixture(scope="module")
def served_lm(tiny_five):
    """tiny-five as the test servers load it (dtype auto: bf16 on a CPU with native bf16), so that the library
    computes what they do."""
    return sedd_core.load(str(tiny_five), device="cpu")


@pytest.mark.anyio
async def test_http_agrees_with_the_library_for_the_same_seed(tiny_client, served_lm):
    texts = ["hello world!", "hello", "score ratios, tiny dataset"]  # whole, short, two windows
    results = await _score(tiny_client, text=texts, samples=32, seed=5)
    assert [set(r) for r in results] == [FIELDS] * 3
    library = score_texts(served_lm, texts, samples=32, seed=5)
    for ours, theirs in zip(results, library):
        assert ours["text"] == theirs.text and ours["tokens"] == theirs.tokens
        for field in ("nll_nats", "stderr_nats", "bits_per_token", "perplexity_bound"):
            assert ours[field] == pytest.approx(getattr(theirs, field), rel=1e-5), field
    (single,) = await _score(tiny_client, text="hello world!", samples=32, seed=5)  # a string, not a list
    assert single["nll_nats"] == pytest.approx(results[0]["nll_nats"], rel=1e-5)
    other_seed = await _score(tiny_client, text=texts, samples=32, seed=6)
    assert other_seed[0]["nll_nats"] != results[0]["nll_nats"]


@pytest.mark.anyio
async def test_training_strings_rank_far_below_random_strings(tiny_client):
    rng = random.Random(1)
    noise = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz !") for _ in range(12)) for _ in range(4)]
    known = await _score(tiny_client, text=TRAINING_STRINGS[:4], samples=64)
    unknown = await _score(tiny_client, text=noise, samples=64)
    assert max(r["nll_nats"] for r in known) * 4 < min(r["nll_nats"] for r in unknown)
    assert max(r["bits_per_token"] for r in known) < 1 < 4 < min(r["bits_per_token"] for r in unknown)


@pytest.mark.anyio
async def test_standard_error_shrinks_as_samples_grow(tiny_client):
    async def pooled(samples: int) -> float:
        results = await _score(tiny_client, text=TRAINING_STRINGS[:4], samples=samples)
        return math.sqrt(sum(r["stderr_nats"] ** 2 for r in results))

    assert 2 < await pooled(16) / await pooled(256) < 8  # 16x the draws: about a quarter


@pytest.mark.anyio
async def test_one_sample_has_no_standard_error(tiny_client):
    (result,) = await _score(tiny_client, text="hello world!", samples=1)
    assert result["stderr_nats"] is None and result["nll_nats"] >= 0


@pytest.mark.anyio
@pytest.mark.parametrize(("body", "param", "words"), [
    ({"text": "hello", "samples": 65}, "samples", "SEDD_MAX_SCORE_SAMPLES"),
    ({"text": ["a"] * 5}, "text", "SEDD_MAX_SAMPLES"),
    ({"text": []}, "text", "at least one"),
    ({"text": ""}, "text", "empty"),
    ({"text": "snow\u2603"}, "text", "cannot encode"),
    ({"text": "hello", "samples": 0}, "samples", "greater than or equal to 1"),
    ({"text": "hello", "windows": 3}, "windows", "unknown field"),
    ({"samples": 4}, "text", "Field required"),
])
async def test_bad_input_is_a_400_saying_what_to_change(app_client, tiny_five, body, param, words):
    async with app_client(tiny_five, max_samples=4, max_score_samples=64) as client:
        answer = await client.post("/v1/score", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.anyio
async def test_the_api_key_guards_scoring(app_client, tiny_five):
    async with app_client(tiny_five, api_key="sesame") as client:
        refused = await client.post("/v1/score", json={"text": "hello"})
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        allowed = await client.post("/v1/score", json={"text": "hello", "samples": 2},
                                    headers={"Authorization": "Bearer sesame"})
        assert allowed.status_code == 200


@pytest.mark.anyio
async def test_scoring_runs_on_the_engine_thread_while_sampling_flows(app_client, tiny_five, monkeypatch, served_lm):
    """A long scoring request (4 texts x 1024 draws, 16 rows a chunk) and /sample requests at once: the
    chunks run on the engine's thread, the samples finish before the scoring does and are the same as
    when run alone, and the scores are the library's."""
    threads = set()

    class Recorded(TextScores):
        def step(self, *args, **kwargs):
            threads.add(threading.current_thread().name)
            return super().step(*args, **kwargs)

    monkeypatch.setattr("app.routes.score.TextScores", Recorded)
    sample = {"num_samples": 2, "steps": 8, "seed": 11}
    async with app_client(tiny_five, max_rows=16, max_samples=4) as client:
        alone = (await client.post("/sample", json=sample)).json()["samples"]
        finished: list[str] = []

        async def scoring():
            answer = await client.post("/v1/score", json={"text": TRAINING_STRINGS[:4], "samples": 1024})
            finished.append("score")
            return answer

        async def sampling():
            await asyncio.sleep(0.05)  # the scoring is under way
            answers = await asyncio.gather(*(client.post("/sample", json=sample) for _ in range(3)))
            finished.append("sample")
            return answers

        scored, sampled = await asyncio.gather(scoring(), sampling())
    assert threads == {"sedd-engine"}
    assert finished == ["sample", "score"]
    assert all(a.status_code == 200 and a.json()["samples"] == alone for a in sampled)
    library = score_texts(served_lm, TRAINING_STRINGS[:4], samples=1024)
    assert [r["nll_nats"] for r in scored.json()["results"]] == pytest.approx([r.nll_nats for r in library],
                                                                              rel=1e-5)


@pytest.mark.anyio
async def test_a_full_queue_is_a_503_with_retry_after(app_client, tiny_five):
    """Scoring and completions share the engine's queue limit (here: no room at all)."""
    async with app_client(tiny_five, max_queue=0) as client:
        for path, body in (("/v1/score", {"text": "hello"}), ("/v1/completions", {"model": "tiny-five", "prompt": "he"})):
            answer = await client.post(path, json=body)
            assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
            assert answer.json()["error"]["type"] == "server_error" and "busy" in answer.json()["error"]["message"]
