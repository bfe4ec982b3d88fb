"""Segments over HTTP: `POST /infill` with `"segments"`, `POST /rewrite`, and the `spans` of every sample.

Answers and refusals run in-process (`tiny_client`, `app_client`); streams and the seeded request under
load run against the real server (`tiny_server`). tiny-five is a character model of length 12 (one
token per character), so a gap of N tokens is N characters of text.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from helpers import MASK, multi_row_passes, parse_metrics, post, stream, without_id_and_timing

pytestmark = pytest.mark.timeout(180)

SEGMENTS = ["h", 3, "o w", 4, "!"]  # 12 tokens: "h" + 3 generated + "o w" + 4 generated + "!"


# ---- helpers ---------------------------------------------------------------------------------------
def outside(text: str, spans) -> list[str]:
    """The pieces of `text` around `spans` ([start, end) ranges, in order), empty ones included."""
    pieces, at = [], 0
    for start, end in spans:
        pieces.append(text[at:start])
        at = end
    return pieces + [text[at:]]


def check_sample(sample: dict, segments: list) -> None:
    """`spans` hold the generated gaps: the text around them is the kept segments, in order, and each span
    is as long as its gap (tiny-five: one character per token) and holds no mask."""
    text, spans = sample["text"], sample["spans"]
    gaps = [item for item in segments if isinstance(item, int)]
    assert len(spans) == len(gaps), sample
    assert [end - start for start, end in spans] == gaps, sample
    kept, piece = [], ""
    for item in segments:  # the kept text between gaps, joined as the canvas joins it
        if isinstance(item, int):
            kept.append(piece)
            piece = ""
        else:
            piece += item
    assert outside(text, spans) == kept + [piece], sample
    assert MASK not in text


def requests_seen(values: dict) -> float:
    """Requests the engine finished, whatever their outcome."""
    return sum(v for (name, _), v in values.items() if name == "sedd_requests_total")


@pytest.fixture(scope="module")
async def quiet_client(app_client, tiny_five, tiny_limits):
    """An in-process app of its own, so that its request counts move only with this module's requests."""
    async with app_client(tiny_five, **tiny_limits) as client:
        yield client


# ---- /infill with segments (in-process) ---------------------------------------------------------------
@pytest.mark.anyio
async def test_segments_keep_their_text_and_spans_locate_the_gaps(tiny_client):
    body = {"segments": SEGMENTS, "num_samples": 3, "steps": 16, "seed": 5}
    response = await tiny_client.post("/infill", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["segments"] == SEGMENTS and "prefix" not in answer and "suffix" not in answer
    assert answer["length"] == 12 and answer["num_samples"] == 3 and answer["seed"] == 5
    for sample in answer["samples"]:
        check_sample(sample, SEGMENTS)
    again = (await tiny_client.post("/infill", json=body)).json()
    assert again["samples"] == answer["samples"]


@pytest.mark.anyio
async def test_short_canvas_and_adjacent_gaps(tiny_client):
    segments = [2, 3, "d", 1]  # two gaps side by side, a canvas shorter than the model's
    answer = (await tiny_client.post("/infill", json={"segments": segments, "steps": 8, "seed": 1})).json()
    assert answer["length"] == 7
    sample = answer["samples"][0]
    check_sample(sample, segments)
    assert sample["spans"][:2] == [[0, 2], [2, 5]] and sample["text"][5] == "d"


@pytest.mark.anyio
async def test_prefix_suffix_and_sample_answers_have_spans_too(tiny_client):
    infill = (await tiny_client.post("/infill", json={"prefix": "di", "suffix": "ok", "steps": 8})).json()
    assert infill["prefix"] == "di" and infill["suffix"] == "ok" and "segments" not in infill
    assert infill["samples"][0]["spans"] == [[2, 10]]
    sample = (await tiny_client.post("/sample", json={"steps": 8, "length": 5})).json()
    assert sample["samples"][0]["spans"] == [[0, 5]]


@pytest.mark.parametrize("given", [{"prefix": "di"}, {"suffix": ""}, {"length": 12}])
@pytest.mark.anyio
async def test_segments_with_prefix_suffix_or_length_is_refused(tiny_client, given):
    response = await tiny_client.post("/infill", json={"segments": SEGMENTS, **given})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "either segments or" in detail and next(iter(given)) in detail and "not both" in detail, detail


BAD_SEGMENTS = [
    ([], ["segments is empty"]),
    (["di", 0, "ok"], ["segment 1", "gap of 0"]),
    (["di", -3], ["segment 1", "gap of -3"]),
    (["hello", 4, "world!"], ["segment 2", "12"]),  # 15 tokens on a 12-token model
    (["caf\u00e9", 2], ["segment 0", "\u00e9"]),
    (["ok", 2, "\u65e5"], ["segment 2", "\u65e5"]),
    (["a", 1] * 32 + ["b"], ["segment 64", "64"]),
    (["di", True], ["segments.1", "string", "whole number"]),
    (["di", 2.5], ["segments.1", "2.5"]),
    (["di"], ["no gap"]),
    ("di 3", ["segments", "list"]),
]


@pytest.mark.parametrize(("segments", "words"), BAD_SEGMENTS, ids=[str(i) for i in range(len(BAD_SEGMENTS))])
@pytest.mark.anyio
async def test_bad_segments_are_a_422_that_names_the_segment_and_reach_no_engine(quiet_client, segments, words):
    await assert_refused_before_the_engine(quiet_client, "/infill", {"segments": segments, "steps": 4}, words)


async def assert_refused_before_the_engine(client, path: str, body: dict, words: list[str]) -> None:
    """A 422 whose detail holds every one of `words`, and no request counted by the engine's metrics."""
    before = requests_seen(parse_metrics((await client.get("/metrics")).text))
    response = await client.post(path, json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    for word in words:
        assert word in detail, (word, detail)
    assert requests_seen(parse_metrics((await client.get("/metrics")).text)) == before


# ---- /rewrite (in-process) ----------------------------------------------------------------------------
@pytest.mark.anyio
async def test_rewrite_keeps_every_character_outside_the_spans(tiny_client):
    text, spans = "hello world!", [[1, 4], [6, 9]]
    body = {"text": text, "spans": spans, "num_samples": 3, "steps": 16, "seed": 11}
    response = await tiny_client.post("/rewrite", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["text"] == text and answer["spans"] == spans and "lengths" not in answer
    assert answer["length"] == 12
    for sample in answer["samples"]:
        assert outside(sample["text"], sample["spans"]) == outside(text, spans), sample
        assert [e - s for s, e in sample["spans"]] == [3, 3] and MASK not in sample["text"]
    # `lengths` sizes the gaps: the kept text stays, the canvas changes length.
    resized = (await tiny_client.post("/rewrite", json={**body, "lengths": [1, 5]})).json()
    assert resized["lengths"] == [1, 5] and resized["length"] == 12 - 6 + 6
    for sample in resized["samples"]:
        assert outside(sample["text"], sample["spans"]) == outside(text, spans), sample
        assert [e - s for s, e in sample["spans"]] == [1, 5]


REWRITE_ERRORS = [
    ({"text": "hello", "spans": [[2, 9]]}, ["span 0", "out of range", "5"]),
    ({"text": "hello", "spans": [[3, 3]]}, ["span 0", "out of range"]),
    ({"text": "hello world!", "spans": [[0, 4], [3, 6]]}, ["span 1", "overlaps"]),
    ({"text": "hello world!", "spans": [[6, 8], [1, 3]]}, ["span 1"]),
    ({"text": "h\u00e9llo world", "spans": [[6, 8]]}, ["before span 0", "\u00e9"]),
    ({"text": "hello w\u00f6rld", "spans": [[0, 2]]}, ["after span 0", "\u00f6"]),
    ({"text": "hello", "spans": []}, ["spans", "non-empty"]),
    ({"text": "hello", "spans": [[1, 2, 3]]}, ["spans.0"]),
    ({"text": "hello", "spans": [[1, 2]], "lengths": [1, 2]}, ["lengths", "2 entries", "1 spans"]),
    ({"text": "hello", "spans": [[1, 2]], "lengths": [0]}, ["lengths[0]"]),
    ({"text": "hello", "spans": [[1, 2]], "lengths": [9]}, ["12"]),  # the canvas outgrows the model
    ({"text": "hello", "spans": [[1, 2]], "prefix": "h"}, ["prefix", "unknown field"]),
]


@pytest.mark.parametrize(("body", "words"), REWRITE_ERRORS, ids=[str(i) for i in range(len(REWRITE_ERRORS))])
@pytest.mark.anyio
async def test_rewrite_errors_name_the_span(quiet_client, body, words):
    await assert_refused_before_the_engine(quiet_client, "/rewrite", {**body, "steps": 4}, words)


@pytest.mark.anyio
async def test_rewrite_needs_the_api_key(app_client, tiny_five):
    async with app_client(tiny_five, api_key="segments-key") as client:
        body = {"text": "hello", "spans": [[1, 3]], "steps": 4}
        assert (await client.post("/rewrite", json=body)).status_code == 401
        assert (await client.post("/rewrite", json=body, headers={"Authorization": "Bearer nope"})).status_code == 401
        ok = await client.post("/rewrite", json=body, headers={"Authorization": "Bearer segments-key"})
        assert ok.status_code == 200 and ok.json()["samples"][0]["text"][::4] == "ho"


@pytest.mark.anyio
async def test_gpt2_segments_keep_their_text_where_the_list_puts_it(tmp_path, write_tiny_gpt2_model, app_client):
    """A GPT-2 vocabulary: kept text in the middle decodes to itself at its place; random weights draw any
    bytes, so gaps may hold U+FFFD, and the spans still cut the text exactly around the kept pieces."""
    segments = ["Hello", 4, " big ", 3, " world."]
    async with app_client(write_tiny_gpt2_model(tmp_path / "gpt2"), max_samples=4) as client:
        answer = (await client.post("/infill", json={"segments": segments, "num_samples": 4, "steps": 6,
                                                     "seed": 2})).json()
        assert answer["segments"] == segments
        for sample in answer["samples"]:
            assert outside(sample["text"], sample["spans"]) == ["Hello", " big ", " world."], sample
        text = "Hello big world."
        rewritten = (await client.post("/rewrite", json={"text": text, "spans": [[6, 9]], "steps": 6})).json()
        sample = rewritten["samples"][0]
        assert outside(sample["text"], sample["spans"]) == ["Hello ", " world."], sample


@pytest.mark.anyio
async def test_openapi_documents_segments_and_rewrite(tiny_client):
    schema = (await tiny_client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]
    segments = components["InfillRequest"]["properties"]["segments"]
    assert segments["examples"] == [["ROMEO. ", 40, " and JULIET ", 30, "."]]
    array = next(option for option in segments["anyOf"] if option.get("type") == "array")
    assert array["maxItems"] == 64 and array["minItems"] == 1
    assert any("segments" in example for example in components["InfillRequest"]["examples"])
    assert "/rewrite" in schema["paths"]
    rewrite = components["RewriteRequest"]
    assert set(rewrite["required"]) == {"text", "spans"} and rewrite["examples"]
    assert rewrite["properties"]["steps"]["maximum"] == 1024  # the server's limits, as for the others
    assert "spans" in components["Sample"]["properties"]


# ---- streams and batching (real server) ----------------------------------------------------------------
def test_segments_and_rewrite_stream_like_infill(tiny_server):
    body = {"segments": SEGMENTS, "num_samples": 2, "steps": 12, "seed": 9}
    answer = post(tiny_server, "/infill", body).json()
    events = stream(tiny_server, "/infill", {**body, "stream": True, "stream_every": 3, "pieces": True})
    kinds = [kind for kind, _ in events]
    assert kinds == ["step"] * 4 + ["done"], kinds
    kept = [i for i, ok in enumerate([True] + [False] * 3 + [True] * 3 + [False] * 4 + [True]) if ok]
    for _, data in events[:-1]:
        assert data["fixed"] == [i in kept for i in range(12)]
        for sample in data["samples"]:
            assert all(sample["text"][i] == "ho w!"[kept.index(i)] for i in kept), sample
            assert "".join(sample["pieces"]) == sample["text"]
    done = events[-1][1]
    assert without_id_and_timing(done) == without_id_and_timing(answer)
    assert done["segments"] == SEGMENTS

    text = answer["samples"][0]["text"]
    rewrite = {"text": text, "spans": [[4, 7]], "steps": 8, "seed": 3}
    events = stream(tiny_server, "/rewrite", {**rewrite, "stream": True, "pieces": True})
    assert [kind for kind, _ in events] == ["step"] * 8 + ["done"]
    for _, data in events[:-1]:
        assert data["fixed"] == [not 4 <= i < 7 for i in range(12)]
        assert data["samples"][0]["text"][:4] == text[:4] and data["samples"][0]["text"][7:] == text[7:]
    done = events[-1][1]
    assert without_id_and_timing(done) == without_id_and_timing(post(tiny_server, "/rewrite", rewrite).json())
    assert done["samples"][0]["spans"] == [[4, 7]]


def test_a_seeded_template_gives_the_same_text_alone_and_under_load(tiny_server):
    template = {"segments": ["d", 5, " o", 4], "num_samples": 2, "steps": 40, "seed": 77}
    alone = post(tiny_server, "/infill", template).json()["samples"]
    before = parse_metrics(httpx.get(tiny_server + "/metrics").text)
    others = [{"steps": 40, "seed": seed} for seed in range(6)] + [{"prefix": "sc", "steps": 40, "seed": 6}]
    barrier = threading.Barrier(len(others) + 1)

    def client(i: int):
        barrier.wait()
        if i == len(others):
            return post(tiny_server, "/infill", template).json()["samples"]
        return post(tiny_server, "/infill" if "prefix" in others[i] else "/sample", others[i]).json()

    with ThreadPoolExecutor(len(others) + 1) as pool:
        answers = list(pool.map(client, range(len(others) + 1)))
    after = parse_metrics(httpx.get(tiny_server + "/metrics").text)
    assert answers[-1] == alone
    # Every other request has one row and the template two: a pass of more than two rows held several.
    assert multi_row_passes(after) > multi_row_passes(before)
    bucket = ("sedd_rows_per_pass_bucket", (("le", "2.0"),))
    assert after[("sedd_rows_per_pass_count", ())] - after[bucket] > \
        before[("sedd_rows_per_pass_count", ())] - before[bucket]
