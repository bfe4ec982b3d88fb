"""The HTTP server. What needs only requests and answers (shapes, seeds, validation errors, the API key,
CORS, the body limit, a full queue) runs in-process through httpx.ASGITransport on the session's
`tiny_client` or on one strict app; streams, batching across real clients, disconnects, the GPT-2 path
and a model that ends the process run against real uvicorn servers (`tiny_server`, `start_server`).
Both are fixtures of tests/conftest.py; `tiny_limits` are the limits of both tiny servers.
"""
from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import tomllib
from httpx_sse import connect_sse

from helpers import (
    MASK,
    TIMEOUT,
    metric,
    multi_row_passes,
    parse_metrics,
    post,
    scrape,
    stream,
    without_id_and_timing,
)

pytestmark = pytest.mark.timeout(180)


# ---- helpers ---------------------------------------------------------------------------------------
def check_stream(events: list[tuple[str, dict]], steps: int) -> dict:
    """Steps increase, masks only ever decrease, exactly one `done` comes last; returns its data."""
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and set(kinds[:-1]) <= {"step"}, kinds
    step_events = [data for kind, data in events if kind == "step"]
    assert step_events, "no step events"
    numbers = [data["step"] for data in step_events]
    assert numbers == sorted(set(numbers)) and 1 <= numbers[0] and numbers[-1] <= steps, numbers
    assert all(data["steps"] == steps for data in step_events)
    for i in range(len(step_events[0]["samples"])):
        masks = [data["samples"][i]["masks_left"] for data in step_events]
        assert masks == sorted(masks, reverse=True), masks
        assert all(data["samples"][i]["text"].count(MASK) == data["samples"][i]["masks_left"]
                   for data in step_events)
    return events[-1][1]


# ---- reading the server (in-process) ----------------------------------------------------------------
@pytest.mark.anyio
async def test_health_model_docs_and_page(tiny_client, tiny_limits):
    assert (await tiny_client.get("/health")).json() == {"status": "ok"}
    info = (await tiny_client.get("/v1/model")).json()
    assert info["name"] == "tiny-five" and info["tokenizer"] == "char" and info["length"] == 12
    assert info["device"] == "cpu" and info["graph"] == "absorb" and info["parameters"] > 0
    assert {k: info[k] for k in tiny_limits} == tiny_limits
    assert set(info["flash_attn"]) == {"available", "used"} and info["flash_attn"]["used"] is False
    schema = (await tiny_client.get("/openapi.json")).json()
    assert {"/sample", "/infill", "/health", "/v1/model", "/metrics"} <= set(schema["paths"])
    assert (await tiny_client.get("/docs")).status_code == 200
    page = await tiny_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    metrics = parse_metrics((await tiny_client.get("/metrics")).text)
    assert metric(metrics, "sedd_running_rows") == 0 and metric(metrics, "sedd_queue_depth") == 0


@pytest.mark.anyio
async def test_the_pages_modules_are_served_as_javascript_and_packaged(tiny_client, repo_root):
    """The page is native ES modules: a browser runs one only when it comes with a JavaScript type, and a
    wheel without one of them serves a dead page."""
    page = (await tiny_client.get("/")).text
    pending = re.findall(r'<script type="module" src="static/([\w.-]+)"', page)
    assert pending == ["main.js"], page
    served = set()
    while pending:
        name = pending.pop()
        served.add(name)
        module = await tiny_client.get(f"/static/{name}")
        assert module.status_code == 200, name
        assert module.headers["content-type"].startswith("text/javascript"), (name, module.headers["content-type"])
        pending += [found for found in re.findall(r'^import .* from "\./([\w.-]+)";$', module.text, re.M)
                    if found not in served]
    assert len(served) > 1  # main.js imports the others
    globs = tomllib.loads((repo_root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["app"]
    packaged = {path for glob in globs for path in (repo_root / "app").glob(glob) if path.is_file()}
    static = {path for path in (repo_root / "app" / "static").rglob("*") if path.is_file()}
    assert static <= packaged, sorted(str(path) for path in static - packaged)


# ---- JSON (in-process) and SSE (tiny_server) for both endpoints -------------------------------------
@pytest.mark.anyio
async def test_sample_json_reports_a_reproducible_seed(tiny_client):
    answer = (await tiny_client.post("/sample", json={"num_samples": 2, "steps": 32})).json()
    assert set(answer) == {"id", "model", "samples", "num_samples", "steps", "predictor", "temperature", "top_p",
                           "top_k", "min_p", "length", "seed", "timing"}
    assert answer["model"] == "tiny-five" and answer["num_samples"] == 2 and answer["steps"] == 32
    assert answer["predictor"] == "analytic" and answer["length"] == 12
    assert 0 <= answer["seed"] < 2**53  # exact in JavaScript too
    assert set(answer["timing"]) == {"queued_s", "run_s", "total_s"}
    texts = [s["text"] for s in answer["samples"]]
    assert len(texts) == 2 and all(len(t) == 12 and MASK not in t for t in texts)
    again = (await tiny_client.post("/sample", json={"num_samples": 2, "steps": 32, "seed": answer["seed"]})).json()
    assert again["samples"] == answer["samples"] and again["id"] != answer["id"]


def test_sample_stream_done_equals_json_answer(tiny_server):
    body = {"num_samples": 2, "steps": 24, "seed": 11, "predictor": "euler"}
    answer = post(tiny_server, "/sample", body).json()
    events = stream(tiny_server, "/sample", {**body, "stream": True, "stream_every": 1})
    done = check_stream(events, steps=24)
    assert without_id_and_timing(done) == without_id_and_timing(answer)
    assert set(done) == set(answer)


def test_infill_keeps_prefix_and_suffix_in_json_and_stream(tiny_server):
    body = {"prefix": "di", "suffix": "ok", "num_samples": 3, "steps": 32, "seed": 5}
    answer = post(tiny_server, "/infill", body).json()
    assert answer["prefix"] == "di" and answer["suffix"] == "ok"
    texts = [s["text"] for s in answer["samples"]]
    assert len(texts) == 3 and all(t.startswith("di") and t.endswith("ok") and len(t) == 12 for t in texts), texts
    # Accept: text/event-stream streams without `stream: true`; pieces come with each step.
    events = stream(tiny_server, "/infill", {**body, "stream_every": 4, "pieces": True},
                    headers={"Accept": "text/event-stream"})
    done = check_stream(events, steps=32)
    assert without_id_and_timing(done) == without_id_and_timing(answer)
    for _kind, data in events[:-1]:
        assert data["prefix_tokens"] == 2 and data["suffix_tokens"] == 2
        for sample in data["samples"]:
            assert sample["text"].startswith("di") and sample["text"].endswith("ok")
            assert len(sample["pieces"]) == 12 and "".join(sample["pieces"]) == sample["text"]


def test_short_canvas_and_stream_every(tiny_server):
    events = stream(tiny_server, "/infill", {"prefix": "h", "length": 5, "steps": 20, "stream": True,
                                             "stream_every": 5, "seed": 3})
    done = check_stream(events, steps=20)
    assert [data["step"] for kind, data in events if kind == "step"] == [5, 10, 15, 20]
    assert done["length"] == 5 and all(len(s["text"]) == 5 and s["text"][0] == "h" for s in done["samples"])


# ---- batching across clients -----------------------------------------------------------------------
def test_concurrent_clients_share_passes_and_match_their_answers_alone(tiny_server):
    seeds = list(range(100, 108))
    bodies = [{"steps": 48, "seed": seed, "predictor": "analytic" if i % 2 else "euler"}
              for i, seed in enumerate(seeds)]
    alone = [post(tiny_server, "/sample", body).json()["samples"] for body in bodies]
    before = scrape(tiny_server)
    barrier = threading.Barrier(len(bodies))

    def client(i: int):
        barrier.wait()
        if i % 2:  # half of the clients stream, half wait for JSON
            return check_stream(stream(tiny_server, "/sample", {**bodies[i], "stream": True}), steps=48)["samples"]
        response = post(tiny_server, "/sample", bodies[i])
        assert response.status_code == 200, response.text
        return response.json()["samples"]

    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(client, range(len(bodies))))
    after = scrape(tiny_server)
    assert together == alone
    # Every request has one row, so a pass of more than one row held several clients.
    assert multi_row_passes(after) > multi_row_passes(before)
    assert metric(after, "sedd_requests_total", outcome="ok") >= metric(before, "sedd_requests_total",
                                                                        outcome="ok") + len(bodies)


# ---- clients that leave ----------------------------------------------------------------------------
def wait_for_cancellation(base: str, cancelled_before: float, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        values = scrape(base)
        if (metric(values, "sedd_running_rows") == 0
                and metric(values, "sedd_requests_total", outcome="cancelled") > cancelled_before):
            return values
        time.sleep(0.05)
    raise AssertionError(f"rows were not freed within {timeout} s: {values}")


def test_disconnected_clients_free_their_rows(tiny_server, tiny_limits):
    cancelled = metric(scrape(tiny_server), "sedd_requests_total", outcome="cancelled")
    body = {"steps": tiny_limits["max_steps"], "num_samples": 2, "stream": True, "stream_every": 1}
    with httpx.Client(timeout=TIMEOUT) as client, \
            connect_sse(client, "POST", tiny_server + "/sample", json=body) as source:
        events = source.iter_sse()
        assert [next(events).event, next(events).event] == ["step", "step"]
    values = wait_for_cancellation(tiny_server, cancelled)  # ... long before 1024 steps could finish
    cancelled = metric(values, "sedd_requests_total", outcome="cancelled")
    # A JSON client that gives up is noticed too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(tiny_server + "/sample", json={"steps": tiny_limits["max_steps"]}, timeout=0.5)
    wait_for_cancellation(tiny_server, cancelled)


# ---- bad input -------------------------------------------------------------------------------------
# A body may be a function of the server's limits (tiny_limits), and a word may name one: "{max_steps}".
BAD_INPUTS = [
    ("/sample", {"steps": 0}, ["steps"]),
    ("/sample", lambda limits: {"steps": limits["max_steps"] + 1}, ["steps", "{max_steps}"]),
    ("/sample", {"steps": "many"}, ["steps"]),
    ("/sample", {"num_samples": 0}, ["num_samples"]),
    ("/sample", lambda limits: {"num_samples": limits["max_samples"] + 1}, ["num_samples", "{max_samples}"]),
    ("/sample", {"length": 0}, ["length"]),
    ("/sample", {"length": 13}, ["length", "12"]),
    ("/sample", {"stream_every": 0}, ["stream_every"]),
    ("/sample", {"predictor": "ddim"}, ["predictor", "analytic", "euler"]),
    ("/sample", {"seed": -1}, ["seed"]),
    ("/sample", {"temprature": 0.7}, ["temprature", "unknown field"]),
    ("/sample", {"temperature": -0.5}, ["temperature", "at least 0", "-0.5"]),
    ("/sample", {"top_p": 1.5}, ["top_p", "greater than 0 and at most 1", "1.5"]),
    ("/sample", {"top_p": 0}, ["top_p", "greater than 0 and at most 1"]),
    ("/infill", {"top_k": -1}, ["top_k", "integer of at least 0"]),
    ("/infill", {"top_k": 1.5}, ["top_k", "integer"]),
    ("/sample", {"min_p": 2}, ["min_p", "between 0 and 1"]),
    ("/sample", {"temperature": "hot"}, ["temperature", "number"]),
    ("/sample", {"prefix": "di"}, ["prefix", "unknown field"]),
    ("/infill", {"prefix": "hello world!", "suffix": "x"}, ["prefix", "suffix", "12"]),
    ("/infill", {"prefix": "caf\u00e9!"}, ["prefix", "\u00e9"]),
    ("/infill", {"prefix": "di", "suffix": "\u65e5\u672c ok"}, ["suffix", "\u65e5", "\u672c"]),
    ("/infill", b'{"prefix": "di",', ["not valid JSON"]),
    ("/sample", b"[1, 2]", ["JSON object"]),
    ("/sample", b"", ["body is missing"]),
]


def request_body(body, limits: dict) -> bytes:
    body = body(limits) if callable(body) else body
    return body if isinstance(body, bytes) else json.dumps(body).encode()


@pytest.mark.parametrize(("path", "body", "words"), BAD_INPUTS,
                         ids=[f"{p}-{i}" for i, (p, _, _) in enumerate(BAD_INPUTS)])
@pytest.mark.anyio
async def test_bad_input_is_a_4xx_that_names_the_problem(tiny_client, tiny_limits, path, body, words):
    response = await tiny_client.post(path, content=request_body(body, tiny_limits),
                                      headers={"Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    for word in words:
        assert word.format(**tiny_limits) in detail, (word, detail)


def test_bad_input_hurts_nobody(tiny_server, tiny_limits):
    """A burst of bad requests beside a good stream: the stream finishes, the server stays ready."""
    good = ThreadPoolExecutor(1).submit(stream, tiny_server, "/sample", {"steps": 64, "stream": True, "seed": 1})
    for path, body, _ in BAD_INPUTS:
        content = request_body(body, tiny_limits)
        httpx.post(tiny_server + path, content=content, headers={"Content-Type": "application/json"})
    check_stream(good.result(timeout=60), steps=64)
    assert httpx.get(tiny_server + "/health").status_code == 200


# ---- API key, CORS, body limit, full queue (in-process) ---------------------------------------------
API_KEY = "s3cret-token"
ORIGIN = "https://demo.example"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
async def strict_client(app_client, tiny_five: Path):
    """One row per pass (max_samples follows) and one waiting request, an API key, one CORS origin and a
    1 KiB body limit."""
    async with app_client(tiny_five, max_rows=1, max_queue=1, max_steps=1024, api_key=API_KEY,
                          cors_origins=f"{ORIGIN}, https://other.example", max_body_bytes=1024,
                          warmup=False) as client:
        yield client


@pytest.mark.anyio
async def test_api_key(strict_client):
    http = strict_client
    assert (await http.get("/health")).status_code == 200
    assert (await http.get("/")).status_code == 200
    for path in ("/sample", "/infill"):
        missing = await http.post(path, json={"steps": 4})
        assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["detail"]
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await http.post(path, json={"steps": 4}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "invalid API key" in wrong.json()["detail"]
        assert (await http.post(path, json={"steps": 4}, headers=AUTH)).status_code == 200
    for path in ("/v1/model", "/metrics"):
        assert (await http.get(path)).status_code == 401
        assert (await http.get(path, headers={"Authorization": "Bearer " + API_KEY[:-1]})).status_code == 401
        assert (await http.get(path, headers=AUTH)).status_code == 200
    assert (await http.get("/v1/model", headers=AUTH)).json()["max_samples"] == 1


@pytest.mark.anyio
async def test_cors_only_for_configured_origins(strict_client, tiny_client):
    http = strict_client
    allowed = await http.post("/sample", json={"steps": 2}, headers={**AUTH, "Origin": ORIGIN})
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    denied = await http.post("/sample", json={"steps": 2}, headers={**AUTH, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in denied.headers
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    ok = await http.options("/sample", headers=preflight)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    refused = await http.options("/sample", headers={**preflight, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in refused.headers
    # A server without SEDD_CORS_ORIGINS sends no CORS headers at all.
    plain = await tiny_client.post("/sample", json={"steps": 2}, headers={"Origin": ORIGIN})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers


@pytest.mark.anyio
async def test_body_too_large(strict_client):
    big = {"prefix": "a" * 2000, "steps": 4}
    response = await strict_client.post("/infill", json=big, headers=AUTH)
    assert response.status_code == 413 and "1024 bytes" in response.json()["detail"]

    async def chunks():  # no Content-Length: the server counts what arrives
        yield json.dumps(big).encode()

    chunked = await strict_client.post("/infill", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413


@pytest.mark.anyio
async def test_full_queue_answers_503_with_retry_after(strict_client):
    """One row runs and one request waits; the rest of a burst is turned away, and the server recovers."""
    import anyio

    responses: list[httpx.Response] = []

    async def client():
        responses.append(await strict_client.post("/sample", json={"steps": 200}, headers=AUTH))

    async with anyio.create_task_group() as burst:
        for _ in range(6):
            burst.start_soon(client)
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) == {200, 503}, codes
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) >= 1
            assert "busy" in response.json()["detail"]
    metrics = parse_metrics((await strict_client.get("/metrics", headers=AUTH)).text)
    assert metric(metrics, "sedd_requests_total", outcome="rejected") >= codes.count(503)
    assert (await strict_client.post("/sample", json={"steps": 4}, headers=AUTH)).status_code == 200


# ---- GPT-2 vocabulary --------------------------------------------------------------------------------
def test_gpt2_infill_keeps_prefix_and_suffix_text(tmp_path, gpt2_vocab, write_tiny_gpt2_model, start_server):
    folder = write_tiny_gpt2_model(tmp_path / "tiny-gpt2")
    with start_server(folder, SEDD_GPT2_VOCAB=str(gpt2_vocab), max_rows=4, max_samples=2) as base:
        info = httpx.get(base + "/v1/model").json()
        assert info["tokenizer"] == "gpt2" and info["vocab_size"] == 50258 and info["length"] == 24
        body = {"prefix": "Hello", "suffix": " world.", "num_samples": 2, "steps": 8, "seed": 3}
        answer = post(base, "/infill", body).json()
        texts = [s["text"] for s in answer["samples"]]
        assert len(texts) == 2 and all(t.startswith("Hello") and t.endswith(" world.") for t in texts), texts
        done = check_stream(stream(base, "/infill", {**body, "stream": True, "pieces": True}), steps=8)
        assert without_id_and_timing(done) == without_id_and_timing(answer)


# ---- a model that does not load --------------------------------------------------------------------
def test_a_model_that_does_not_load_ends_the_server(tmp_path, spawn_server):
    """The process exits (so Docker's restart policy tries again) and its log says why."""
    missing = tmp_path / "no-such-model"
    with spawn_server(missing, wait=False) as server:
        returncode = server.proc.wait(timeout=120)
        log = server.log(limit=20_000)
    assert returncode != 0, log
    assert "could not be loaded" in log and "no-such-model" in log, log


def test_torch_threads_default_to_every_core_the_process_may_use(monkeypatch):
    """On a CPU the server gives torch every core of its affinity (a container's cpuset narrows it), unless
    SEDD_TORCH_THREADS says otherwise; on CUDA it leaves torch's own choice."""
    from app.settings import Settings
    from app.state import torch_threads

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 2, 5}, raising=False)
    assert torch_threads(Settings(device="cpu")) == 3
    assert torch_threads(Settings(device="cpu", torch_threads=1)) == 1
    monkeypatch.setattr("app.state.resolve_device", lambda device: __import__("torch").device("cuda"))
    assert torch_threads(Settings(device="cuda")) is None
