"""The clients people already use, against a real server on a loopback socket: the official `openai` SDK,
LangChain's `OpenAI` LLM with its default settings (temperature 0.7, top_p 1, the penalties at 0,
max_tokens 256) and LiteLLM's `text_completion`, each plain and streamed.

The model is a random character model of 320 positions, so that LangChain's default max_tokens fits its
canvas; the server's SEDD_MAX_STEPS of 4 makes that the default step count, since these clients send none.
Texts are up to max_tokens characters long: [PAD], which a random model may draw, decodes to nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import openai
import pytest

MODEL = "tiny-test"  # tiny_config's name
PROMPT = "To be"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_config, write_oxen_folder, start_server):
    folder = write_oxen_folder(tmp_path_factory.mktemp("clients") / "char-320", tiny_config(tokens=98, length=320))
    with start_server(folder, max_steps=4) as url:
        yield url + "/v1"


def test_openai_sdk_with_sampling_controls(server):
    client = openai.OpenAI(base_url=server, api_key="unused", max_retries=0)
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0.7, top_p=0.9,
                                       extra_body={"top_k": 20, "min_p": 0.01})
    assert 0 < len(answer.choices[0].text) <= 40
    deltas = [chunk.choices[0].text for chunk in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0, stream=True) if chunk.choices]
    assert "".join(deltas) == client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40,
                                                        temperature=0).choices[0].text


def test_langchain_openai_llm_with_its_defaults(server):
    from langchain_openai import OpenAI

    # a seed (LangChain's own field) makes the streamed answer comparable with the plain one
    llm = OpenAI(model=MODEL, base_url=server, api_key="unused", max_retries=0, seed=11)
    assert llm.temperature == 0.7 and llm.max_tokens == 256  # the defaults this test is about
    text = llm.invoke(PROMPT)
    assert isinstance(text, str) and 200 < len(text) <= 256
    streamed = list(llm.stream(PROMPT))
    assert streamed and "".join(streamed) == text  # the deltas add up to the same seed's plain answer


LITELLM_SCRIPT = """
import json, sys
import litellm
litellm.telemetry = False
kwargs = dict(model="text-completion-openai/" + sys.argv[2], api_base=sys.argv[1], api_key="unused",
              prompt="To be", max_tokens=30, temperature=0.7, seed=11)
plain = litellm.text_completion(**kwargs).choices[0].text
streamed = [chunk.choices[0].text or "" for chunk in litellm.text_completion(stream=True, **kwargs) if chunk.choices]
print(json.dumps({"plain": plain, "streamed": streamed}))
"""


def test_litellm_text_completion(server):
    """In a subprocess: importing litellm sets variables of its own (TIKTOKEN_CACHE_DIR) for the whole process;
    LITELLM_LOCAL_MODEL_COST_MAP keeps it from downloading its model-cost map."""
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    out = subprocess.run([sys.executable, "-c", LITELLM_SCRIPT, server, MODEL], capture_output=True, text=True,
                         timeout=180, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert 20 < len(answer["plain"]) <= 30
    assert answer["streamed"] and "".join(answer["streamed"]) == answer["plain"]  # same seed, deltas add up
