"""The sampling controls over HTTP (in process, tiny-five): /sample, /infill, /rewrite and /v1/completions.

Explicit defaults are the default request; temperature 0 is one text whatever the seed, the number of
samples and the requests that share its passes; the controls compose with fixed text and streams; a
uniform-graph model refuses temperature 0 by name. Ranges: tests/test_server.py (BAD_INPUTS) and
tests/test_openai.py."""
from __future__ import annotations

import asyncio
import json

import pytest
from httpx_sse import aconnect_sse

from helpers import MASK, without_id_and_timing

pytestmark = pytest.mark.anyio

DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


async def _post(client, path: str, body: dict) -> dict:
    response = await client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def _texts(client, path: str, body: dict) -> list[str]:
    return [sample["text"] for sample in (await _post(client, path, body))["samples"]]


@pytest.mark.parametrize(("path", "body"), [
    ("/sample", {"num_samples": 3, "steps": 8, "seed": 5}),
    ("/infill", {"prefix": "di", "steps": 8, "seed": 6, "num_samples": 2}),
    ("/rewrite", {"text": "hello world!", "spans": [[2, 7]], "steps": 8, "seed": 7}),
])
async def test_explicit_defaults_are_the_default_request(tiny_client, path, body):
    plain = await _post(tiny_client, path, body)
    explicit = await _post(tiny_client, path, {**body, **DEFAULTS})
    assert without_id_and_timing(plain) == without_id_and_timing(explicit)
    assert {name: plain[name] for name in DEFAULTS} == DEFAULTS  # the answer says which controls it used


@pytest.mark.parametrize(("path", "body", "kept"), [
    ("/sample", {}, None),
    ("/infill", {"prefix": "sc", "suffix": "os"}, ("sc", "os")),
    ("/infill", {"segments": [2, "sk", 8]}, ("", "")),
    ("/rewrite", {"text": "diffusion ok", "spans": [[3, 9]]}, ("dif", " ok")),
])
async def test_temperature_0_is_one_text_for_every_seed_and_sample(tiny_client, path, body, kept):
    runs = [await _texts(tiny_client, path, {**body, "steps": 10, "num_samples": 3, "temperature": 0, **seed})
            for seed in ({"seed": 1}, {"seed": 2}, {})]
    assert runs[0] == runs[1] == runs[2] and len(set(runs[0])) == 1
    text = runs[0][0]
    if kept is not None:
        assert text.startswith(kept[0]) and text.endswith(kept[1])
    if "segments" in body:
        assert text[2:4] == "sk"


async def test_temperature_0_is_the_same_text_among_other_requests(tiny_client):
    """Requests with other controls (and other greedy ones) running at once share its passes; only the
    draw differs per row."""
    body = {"prefix": "m", "steps": 12, "num_samples": 2, "temperature": 0}
    alone = await _texts(tiny_client, "/infill", body)
    others = [{"num_samples": 4, "steps": 16, "seed": 1}, {"num_samples": 3, "steps": 12, "temperature": 0.5},
              {"num_samples": 2, "steps": 9, "top_k": 2, "top_p": 0.8, "min_p": 0.1},
              {"num_samples": 1, "steps": 30, "temperature": 0}]
    together = await asyncio.gather(_texts(tiny_client, "/infill", body),
                                    *(_texts(tiny_client, "/sample", other) for other in others))
    assert together[0] == alone


async def test_controls_compose_with_streamed_canvases(tiny_client):
    """A greedy stream: masks only decrease, the kept text is in every canvas, and its final text is the JSON
    answer's; a reshaped stream ends as its JSON twin does."""
    for controls in ({"temperature": 0}, {"temperature": 0.6, "top_k": 3, "seed": 4}):
        body = {"prefix": "he", "steps": 8, "stream_every": 1, **controls}
        events = []
        async with aconnect_sse(tiny_client, "POST", "/infill", json={**body, "stream": True}) as source:
            async for event in source.aiter_sse():
                events.append((event.event, json.loads(event.data)))
        steps = [data for name, data in events if name == "step"]
        left = [data["samples"][0]["masks_left"] for data in steps]
        assert left == sorted(left, reverse=True) and all(d["samples"][0]["text"].startswith("he") for d in steps)
        assert MASK in steps[0]["samples"][0]["text"] and events[-1][0] == "done"
        done = events[-1][1]
        assert done["samples"] == (await _post(tiny_client, "/infill", body))["samples"]
        assert {name: done[name] for name in controls if name != "seed"} == \
            {name: value for name, value in controls.items() if name != "seed"}


async def test_v1_completions_takes_the_controls(tiny_client):
    base = {"model": "tiny-five", "prompt": "sc", "steps": 10, "n": 2}
    plain = await _post(tiny_client, "/v1/completions", {**base, "seed": 3})
    explicit = await _post(tiny_client, "/v1/completions", {**base, "seed": 3, "temperature": 1, "top_p": 1,
                                                            "top_k": 0, "min_p": 0})
    assert [c["text"] for c in plain["choices"]] == [c["text"] for c in explicit["choices"]]
    greedy = [[c["text"] for c in (await _post(tiny_client, "/v1/completions",
                                               {**base, "temperature": 0, **seed}))["choices"]]
              for seed in ({"seed": 1}, {"seed": 9}, {})]
    assert greedy[0] == greedy[1] == greedy[2] and len(set(greedy[0])) == 1
    reshaped = await _post(tiny_client, "/v1/completions", {**base, "temperature": 0.7, "top_p": 0.9, "top_k": 5,
                                                            "min_p": 0.05})
    assert all(len(c["text"]) == 10 for c in reshaped["choices"])


@pytest.mark.parametrize(("field", "value", "words"), [
    ("temperature", -1, "at least 0"), ("top_p", 0, "greater than 0 and at most 1"),
    ("top_p", 1.01, "greater than 0 and at most 1"), ("top_k", -1, "integer of at least 0"),
    ("min_p", 1.5, "between 0 and 1"),
])
async def test_v1_out_of_range_is_400_naming_the_field_and_range(tiny_client, field, value, words):
    response = await tiny_client.post("/v1/completions", json={"model": "tiny-five", "prompt": "a", field: value})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == field and words in error["message"] and error["type"] == "invalid_request_error"


async def test_a_uniform_graph_model_refuses_temperature_0_by_name(app_client, tmp_path, tiny_config,
                                                                    write_oxen_folder):
    folder = write_oxen_folder(tmp_path / "uniform", tiny_config(tokens=98, graph="uniform", length=12))
    async with app_client(folder, max_steps=8) as client:
        response = await client.post("/sample", json={"temperature": 0})
        assert response.status_code == 422 and "temperature 0" in response.json()["detail"]
        assert "absorbing-graph" in response.json()["detail"]
        v1 = await client.post("/v1/completions", json={"model": "tiny-test", "prompt": "a", "temperature": 0})
        assert v1.status_code == 400 and v1.json()["error"]["param"] == "temperature", v1.text
        fine = await _post(client, "/sample", {"temperature": 0.5, "top_p": 0.9, "num_samples": 2})
        assert len(fine["samples"]) == 2
