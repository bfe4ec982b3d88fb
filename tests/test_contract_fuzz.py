"""Contract fuzzing: schemathesis generates requests from the running server's OpenAPI schema.

Every operation gets generated requests through hypothesis: schema-valid ones for all of them, and for
the POST endpoints (/sample, /infill, /v1/completions, /v1/score) also schema-invalid bodies (negative
mode), which must be refused with a documented 4xx. No answer may be a 5xx except the documented 503, and every answer must match the
schema: status code documented, content type declared, headers and bodies conforming, every SSE event
of a stream conforming to the event schema (`step`, `done`, `error` with their data's schemas). With an
API key set, schemathesis also checks that missing and wrong credentials get 401. The server runs with
small limits (8 steps, 2 samples) so that valid requests finish fast; the examples are derandomized,
so CI sees the same few hundred requests on every run. (schemathesis's pytest plugin does not support
pytest 9 yet, so the operations are driven through its Python API.)

The bounds the schema can state are this server's (steps, samples, the model's length); what it
cannot state is left out of the checks: whether a prefix and suffix or segments fit the canvas once
tokenized, whether the vocabulary holds their characters, whether a rewrite's spans lie inside its
text. Such requests get a documented 422 that names the problem, which schemathesis's
`positive_data_acceptance` check would report as "schema-valid data rejected"; that one check is
excluded, every other one runs. Random offsets almost never fall inside a random text, so the
positive /rewrite cases get one span over their whole text (and a gap that fits the model), and
their success answers are checked too; the negative ones are sent as drawn.
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

pytestmark = pytest.mark.timeout(120)
API_KEY = "fuzz-key"
# (operation, generation mode, examples): about 400 generated requests, plus the checks' own (auth).
PLAN = [
    ("POST /sample", GenerationMode.POSITIVE, 60),
    ("POST /sample", GenerationMode.NEGATIVE, 50),
    ("POST /infill", GenerationMode.POSITIVE, 60),
    ("POST /infill", GenerationMode.NEGATIVE, 50),
    ("POST /rewrite", GenerationMode.POSITIVE, 60),
    ("POST /rewrite", GenerationMode.NEGATIVE, 50),
    ("GET /v1/model", GenerationMode.POSITIVE, 15),
    ("POST /v1/completions", GenerationMode.POSITIVE, 50),
    ("POST /v1/completions", GenerationMode.NEGATIVE, 40),
    ("GET /v1/models", GenerationMode.POSITIVE, 5),
    ("GET /v1/models/{model}", GenerationMode.POSITIVE, 10),
    ("POST /v1/score", GenerationMode.POSITIVE, 30),
    ("POST /v1/score", GenerationMode.NEGATIVE, 30),
    ("GET /metrics", GenerationMode.POSITIVE, 15),
    ("GET /health", GenerationMode.POSITIVE, 15),
]


def spans_inside_the_text(case):
    """One span over the whole text, with a gap of at most the model's 12 tokens."""
    body = case.body
    if isinstance(body, dict) and body.get("text"):
        body["spans"] = [[0, len(body["text"])]]
        body["lengths"] = [1 + len(body["text"]) % 12]
    return case


@pytest.fixture(scope="module")
def fuzzed_server(start_server, tiny_five):
    with start_server(tiny_five, max_steps=8, max_samples=2, max_rows=8, max_queue=64, max_score_samples=16,
                        api_key=API_KEY) as url:
        yield url


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    schema = schemathesis.openapi.from_url(fuzzed_server + "/openapi.json")
    return {op.label: op for op in (result.ok() for result in schema.get_all_operations())}


def test_the_plan_covers_every_operation(api_schema):
    assert set(api_schema) == {label for label, _, _ in PLAN}


@pytest.mark.parametrize(("label", "mode", "examples"), PLAN, ids=[f"{label}-{mode.value}" for label, mode, _ in PLAN])
def test_operation_honours_its_schema(fuzzed_server, api_schema, label, mode, examples):
    operation = api_schema[label]
    statuses: list[tuple[GenerationMode, int]] = []

    strategy = operation.as_strategy(generation_mode=mode)
    if label == "POST /rewrite" and mode is GenerationMode.POSITIVE:
        strategy = strategy.map(spans_inside_the_text)

    @given(case=strategy)
    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call_and_validate(base_url=fuzzed_server, timeout=60,
                                          headers={"Authorization": f"Bearer {API_KEY}"},
                                          excluded_checks=[positive_data_acceptance])
        statuses.append((case.meta.generation.mode, response.status_code))
        assert response.status_code < 500 or response.status_code == 503, response.text

    check()
    # A negative strategy draws some valid cases too (where a part cannot be made invalid); the invalid
    # ones must all be refused (schemathesis's negative_data_rejection checks each; this checks the count).
    codes = {m: [code for mode_, code in statuses if mode_ is m] for m in GenerationMode}
    if mode is GenerationMode.NEGATIVE:
        assert len(codes[mode]) >= examples // 2 and all(400 <= code < 500 for code in codes[mode]), codes
    elif label.startswith("POST"):
        assert codes[mode].count(200) >= examples // 4, codes  # valid requests ran, not only refusals
    else:
        assert len(codes[mode]) >= 1, codes
