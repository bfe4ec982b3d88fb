"""POST /v1/completions and GET /v1/models through the official `openai` Python package, against a real
server on a loopback socket (tiny_server: tiny-five, whose canvas is 12 characters); the delta decoder
of the output layer on its own."""
from __future__ import annotations

import time

import openai
import pytest

from app.outputs import GapStream
from sedd_core.tokenizers import CharTokenizer, load_gpt2

from helpers import metric, scrape

MODEL = "tiny-five"
SETTINGS = {"steps": 16}  # diffusion settings go in extra_body, as any SDK user sends them


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_plain_completion_is_the_generated_part_of_the_canvas(client):
    answer = client.completions.create(model=MODEL, prompt="hello", seed=1, extra_body=SETTINGS)
    assert answer.object == "text_completion" and answer.model == MODEL and answer.id.startswith("cmpl-")
    (choice,) = answer.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.logprobs is None
    assert len(choice.text) == 12 - len("hello")  # default max_tokens: the rest of the canvas
    assert answer.usage.prompt_tokens == 5 and answer.usage.completion_tokens == 7
    assert answer.usage.total_tokens == 12


def test_suffix_max_tokens_and_n(client):
    answer = client.completions.create(model=MODEL, prompt="hel", suffix="!", max_tokens=4, n=3, seed=2,
                                       extra_body=SETTINGS)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(len(c.text) == 4 for c in answer.choices)  # neither prompt nor suffix, max_tokens characters
    assert answer.usage.completion_tokens == 12 and answer.usage.prompt_tokens == 4


def test_a_list_of_prompts_is_prompt_major(client):
    prompts = ["hello", "wor"]
    answer = client.completions.create(model=MODEL, prompt=prompts, n=2, seed=3, extra_body=SETTINGS)
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert [len(c.text) for c in answer.choices] == [7, 7, 9, 9]  # each prompt's own gap
    # prompt i's choices are the completions of prompt i: the same as asking for it alone with its seed
    alone = client.completions.create(model=MODEL, prompt="wor", n=2, seed=4, extra_body=SETTINGS)
    assert [c.text for c in answer.choices[2:]] == [c.text for c in alone.choices]


def test_stop_cuts_the_text_at_the_first_stop_string(client):
    full = client.completions.create(model=MODEL, prompt="h", seed=5, extra_body=SETTINGS).choices[0].text
    stop = full[3:5]
    cut = client.completions.create(model=MODEL, prompt="h", seed=5, stop=[stop, "\u00e9"], extra_body=SETTINGS)
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def _streamed(client, **request) -> tuple[list, list[str]]:
    chunks = list(client.completions.create(model=MODEL, stream=True, **request))
    return chunks, [chunk.choices for chunk in chunks]


@pytest.mark.parametrize("stop", [None, ["o w"]])
def test_streamed_deltas_join_to_the_answer_of_the_same_seed(client, stop):
    request = dict(prompt=["he", "wo"], n=2, seed=6, stop=stop, extra_body=SETTINGS)
    expected = client.completions.create(model=MODEL, **request).choices
    chunks, _ = _streamed(client, **request)
    assert all(chunk.object == "text_completion" and chunk.usage is None for chunk in chunks)
    joined = {c.index: "" for c in expected}
    finish = {}
    for chunk in chunks:
        for choice in chunk.choices:
            assert choice.index not in finish, "text after the choice finished"
            joined[choice.index] += choice.text
            if choice.finish_reason is not None:
                finish[choice.index] = choice.finish_reason
    assert joined == {c.index: c.text for c in expected}
    assert finish == {c.index: c.finish_reason for c in expected}
    # true deltas: the text arrives in more than one piece (tokens are revealed over the steps)
    assert sum(1 for chunk in chunks for choice in chunk.choices if choice.text) > len(expected)


def test_streamed_usage_comes_last_without_choices(client):
    chunks, _ = _streamed(client, prompt="hello", seed=7, stream_options={"include_usage": True},
                          extra_body=SETTINGS)
    *texts, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 7 and last.usage.total_tokens == 12
    assert all(chunk.usage is None for chunk in texts)


def test_denoising_stream_carries_the_whole_canvas(client):
    chunks, _ = _streamed(client, prompt="hel", suffix="!", seed=8, extra_body={"steps": 8, "denoising": True})
    texts = [chunk.choices[0].text for chunk in chunks]
    assert len(texts) == 9  # one chunk per step and the finished canvas
    assert all(len(text) == 12 and text.startswith("hel") and text.endswith("!") for text in texts)
    assert "\u2591" in texts[0] and "\u2591" not in texts[-1]  # masks drawn as today, none at the end
    final = client.completions.create(model=MODEL, prompt="hel", suffix="!", seed=8, extra_body={"steps": 8})
    assert texts[-1] == "hel" + final.choices[0].text + "!"
    assert [c.choices[0].finish_reason for c in chunks] == [None] * 8 + ["length"]


def _cancelled(base_url: str) -> float:
    return metric(scrape(base_url), "sedd_requests_total", outcome="cancelled")


def test_a_client_that_leaves_a_stream_cancels_every_prompt(client, tiny_server, tiny_limits):
    before = _cancelled(tiny_server)
    stream = client.completions.create(model=MODEL, prompt=["he", "wo"], n=2, stream=True,
                                       extra_body={"steps": tiny_limits["max_steps"]})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20
    while _cancelled(tiny_server) < before + 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _cancelled(tiny_server) == before + 2  # both prompts' jobs left the engine unfinished


@pytest.mark.parametrize(("field", "value"), [("logprobs", 2),
                                              ("echo", True), ("best_of", 3), ("frequency_penalty", 0.1),
                                              ("presence_penalty", -1.0), ("logit_bias", {"7": 10})])
def test_parameters_we_cannot_honour_are_refused_by_name(client, field, value):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="he", **{field: value})
    assert refused.value.param == field and refused.value.code == "unsupported_parameter"
    assert field in refused.value.message


def test_their_no_op_values_are_accepted(client):
    answer = client.completions.create(model=MODEL, prompt="he", temperature=1, top_p=1, best_of=1, echo=False,
                                       frequency_penalty=0, presence_penalty=0, logit_bias={}, user="someone",
                                       extra_body=SETTINGS)
    assert len(answer.choices) == 1


def test_validation_errors_have_openais_shape(client, tiny_limits):
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=MODEL, prompt="hello", suffix="!", max_tokens=7)
    assert too_long.value.param == "max_tokens" and "model's length of 12" in too_long.value.message
    with pytest.raises(openai.BadRequestError) as too_many:
        client.completions.create(model=MODEL, prompt=["a", "b", "c"], n=2)
    assert too_many.value.param == "n" and "SEDD_MAX_SAMPLES" in too_many.value.message
    with pytest.raises(openai.BadRequestError) as steps:
        client.completions.create(model=MODEL, prompt="a", extra_body={"steps": tiny_limits["max_steps"] + 1})
    assert steps.value.param == "steps" and "SEDD_MAX_STEPS" in steps.value.message
    with pytest.raises(openai.BadRequestError) as unknown:
        client.completions.create(model=MODEL, prompt="a", extra_body={"guidance": 2})
    assert unknown.value.param == "guidance" and unknown.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as characters:
        client.completions.create(model=MODEL, prompt="he\u2603")
    assert characters.value.param == "prompt" and "\u2603" in characters.value.message
    with pytest.raises(openai.NotFoundError) as model:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="a")
    assert model.value.param == "model" and model.value.code == "model_not_found"


@pytest.mark.anyio
@pytest.mark.parametrize("max_tokens", [None, 4])
async def test_prompt_and_suffix_are_tokenized_once(tiny_client, monkeypatch, max_tokens):
    """In-process (tiny_client): the job keeps the tokens the route counted, for usage and the gap's size."""
    encoded = []
    encode = CharTokenizer.encode
    monkeypatch.setattr(CharTokenizer, "encode", lambda self, text: encoded.append(text) or encode(self, text))
    body = {"model": MODEL, "prompt": "hel", "suffix": "!", "max_tokens": max_tokens, "steps": 4}
    answer = await tiny_client.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == 4
    assert sorted(encoded) == ["!", "hel"]


def test_the_api_key(start_server, tiny_five):
    with start_server(tiny_five, max_steps=8, SEDD_API_KEY="sesame") as url:
        right = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
        assert len(right.completions.create(model=MODEL, prompt="he").choices) == 1
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="open up", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as refused:
            wrong.completions.create(model=MODEL, prompt="he")
        assert refused.value.body["type"] == "authentication_error" and "API key" in refused.value.message
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


# ---- the delta decoder on its own ----------------------------------------------------------------
MASK = -1


def _reveal(stream: GapStream, tokens: list[int], order: list[int]) -> list[str]:
    """Deltas while the tokens of a gap (the whole row) are revealed in `order`."""
    row, deltas = [MASK] * len(tokens), []
    for position in order:
        row[position] = tokens[position]
        deltas.append(stream.update(row, final=MASK not in row))
    return deltas


def test_multi_byte_characters_are_never_split(gpt2_vocab):
    tokenizer = load_gpt2(vocab=gpt2_vocab)
    text = "naïve café 🎉 日本語"
    tokens = tokenizer.encode(text)
    singles = [t for t in tokens if not tokenizer.encoding.decode_single_token_bytes(t).decode("utf-8", "ignore")]
    assert singles, "the text should hold tokens that end inside a character"
    stream = GapStream(tokenizer, (0, len(tokens)), MASK, [])
    deltas = _reveal(stream, tokens, list(range(len(tokens))))  # one token at a time, left to right
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)
    for delta in deltas:
        delta.encode("utf-8")  # whole characters only: a lone surrogate or split character would fail


def test_deltas_wait_for_the_left_end_and_for_possible_stop_strings():
    tokenizer = CharTokenizer("abcdefgh ")
    tokens = tokenizer.encode("abc defg")
    stream = GapStream(tokenizer, (0, len(tokens)), MASK, ["de", "fx"])
    deltas = _reveal(stream, tokens, [2, 1, 0, 3, 4, 5, 6, 7])
    # "c" waits for "a" and "b"; " " is sent at once; "d" waits ("de" may follow) and is cut with it
    assert deltas == ["", "", "abc", " ", "", "", "", ""]
    assert stream.finish_reason == "stop" and stream.text.startswith("abc de")


def test_the_sdk_reaches_scoring_too(client):
    """/v1/score is no OpenAI endpoint, but the SDK's generic `post` reaches it with its key and errors."""
    answer = client.post("/score", body={"text": ["hello world!"], "samples": 8}, cast_to=object)
    assert answer["model"] == MODEL and answer["results"][0]["tokens"] == 12
    with pytest.raises(openai.BadRequestError) as refused:
        client.post("/score", body={"text": "hello", "samples": 0}, cast_to=object)
    assert refused.value.param == "samples"


def _joined_deltas(client, **request) -> dict[int, str]:
    joined: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **request):
        for choice in chunk.choices:
            joined[choice.index] = joined.get(choice.index, "") + choice.text
    return joined


def test_gpt2_deltas_never_split_a_character(tmp_path, write_tiny_gpt2_model, start_server):
    """A random GPT-2-vocabulary model writes tokens that hold only part of a UTF-8 character: the deltas
    still join to the non-streamed text, with no replacement character the answer does not have."""
    folder = write_tiny_gpt2_model(tmp_path / "tiny-gpt2")
    with start_server(folder, max_samples=8, max_rows=8) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        request = dict(model="tiny-gpt2", prompt=["Caf\u00e9", "na\u00efve"], suffix=" end", n=4, seed=3,
                       extra_body={"steps": 8})
        expected = {c.index: c.text for c in client.completions.create(**request).choices}
        assert _joined_deltas(client, **request) == expected
    # the case holds tokens that are part of a character: bytes no later token completes show as U+FFFD
    assert any("\ufffd" in text for text in expected.values())


def test_a_uniform_graph_model_streams_its_final_text(tmp_path, tiny_config, write_oxen_folder, start_server):
    folder = write_oxen_folder(tmp_path / "uniform", tiny_config(tokens=98, graph="uniform", length=8))
    with start_server(folder) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        request = dict(model="tiny-test", prompt="ab", n=2, seed=4, extra_body={"steps": 8})
        expected = client.completions.create(**request).choices
        chunks = list(client.completions.create(stream=True, **request))
        assert [[(c.index, c.text, c.finish_reason) for c in chunk.choices] for chunk in chunks] == [
            [(c.index, c.text, "length") for c in expected]]  # one chunk: every choice's whole text
        canvases = list(client.completions.create(stream=True, **{**request, "extra_body": {
            "steps": 8, "denoising": True}}))
        # 8 positions each ([PAD], which a random model may draw, decodes to nothing), the prompt kept
        assert len(canvases) == 9 and all(len(chunk.choices[0].text) <= 8 and chunk.choices[0].text.startswith("ab")
                                          for chunk in canvases)
