"""Structured output on a real `swiftkv-jax serve`: OpenAI's response_format (json_object,
json_schema) and vLLM's guided_json / guided_regex / guided_choice. Every answer must parse and
validate with the independent `jsonschema` package (or match the pattern with `re`), end because
its grammar ended, and leave unconstrained requests running beside it exactly as they are alone.

A tiny random model with a byte-level tokenizer (any text is expressible) runs the suite fast; the
real SmolLM2-135M-Instruct answers the 20 schemas greedy and sampled (real_model)."""

from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import openai
import pytest
from conftest import TINY_CONFIGS, make_hf_llama
from test_server import MODEL, SERVER_ARGS, start
from tiny_tokenizer import make_byte_tokenizer

import swiftkv_jax as sk


def obj(required: dict, **extra) -> dict:
    """An object schema whose properties are all required and nothing else allowed (so a random
    model cannot add keys forever)."""
    return {"type": "object", "properties": required, "required": list(required),
            "additionalProperties": False, **extra}


WORD = {"type": "string", "maxLength": 12}
SCHEMAS = [  # nested objects, arrays, enums, numbers, strings with patterns; every size bounded
    obj({"name": WORD, "age": {"type": "integer", "minimum": 0, "maximum": 120}}),
    obj({"city": WORD, "country": WORD,
         "population": {"type": "integer", "minimum": 0, "maximum": 10 ** 8}}),
    obj({"answer": {"type": "boolean"}}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"mood": {"enum": ["happy", "sad", "calm"]},
         "score": {"type": "integer", "minimum": 1, "maximum": 5}}),
    obj({"tags": {"type": "array", "items": WORD, "minItems": 1, "maxItems": 3}}),
    obj({"point": obj({"x": {"type": "integer", "minimum": -99, "maximum": 99},
                       "y": {"type": "integer", "minimum": -99, "maximum": 99}})}),
    obj({"user": obj({"id": {"type": "integer", "minimum": 1, "maximum": 9999}, "email":
                      {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"}})}),
    obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}),
    obj({"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
         "state": {"type": "string", "pattern": "^[A-Z]{2}$"}}),
    obj({"items": {"type": "array", "maxItems": 3, "items": obj({"name": WORD, "qty": {
        "type": "integer", "minimum": 1, "maximum": 9}})}}),
    obj({"title": WORD, "done": {"type": "boolean"}, "priority": {"enum": ["low", "high"]}}),
    obj({"temperature": {"type": "number", "minimum": -50, "maximum": 50}}),
    obj({"values": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                    "maxItems": 4}}),
    obj({"first": WORD, "last": WORD, "nick": {"anyOf": [WORD, {"type": "null"}]}}),
    obj({"kind": {"const": "book"}, "pages": {"type": "integer", "minimum": 1, "maximum": 999}}),
    obj({"grid": {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2,
                                                            "items": {"type": "boolean"}}}}),
    obj({"pet": obj({"species": {"enum": ["cat", "dog"]}, "legs": {"type": "integer", "minimum": 0,
                                                                   "maximum": 4}, "name": WORD})}),
    obj({"version": {"type": "string", "pattern": "^[0-9]\\.[0-9]\\.[0-9]$"},
         "stable": {"type": "boolean"}}),
    obj({"rgb": {"type": "array", "minItems": 3, "maxItems": 3, "items": {"type": "integer", "minimum": 0,
                                                                          "maximum": 255}}}),
]
assert len(SCHEMAS) == 20


def json_schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def validated(choice, schema: dict) -> object:
    """The answer's JSON, checked: it ended by its grammar, parses, and matches `schema`."""
    assert choice.finish_reason == "stop", choice
    value = json.loads(choice.text if hasattr(choice, "text") else choice.message.content)
    jsonschema.validate(value, schema)
    return value


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, params, tokenizer): a tiny model over a byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("structured")
    make_hf_llama(folder, **{**TINY_CONFIGS["gqa_tied"], "vocab_size": 264})
    make_byte_tokenizer(folder)
    server = start(folder, *SERVER_ARGS, log=folder / "server.log")
    params, tokenizer = sk.load(folder, progress=False)
    yield server, params, tokenizer
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0].url}/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_schema_gives_json_that_validates(client, temperature):
    schemas = SCHEMAS[::2] if temperature else SCHEMAS[1::2]  # 10 each, all 20 across the two

    def one(i: int, schema: dict) -> None:
        got = client.completions.create(model=MODEL, prompt="data:", max_tokens=400, temperature=temperature,
                                        seed=i, extra_body={"response_format": json_schema_format(schema)})
        results[i] = got.choices[0]

    results: dict[int, object] = {}
    threads = [threading.Thread(target=one, args=(i, s)) for i, s in enumerate(schemas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i, schema in enumerate(schemas):
        validated(results[i], schema)


def test_guided_choice_regex_and_json(client):
    kw = dict(model=MODEL, prompt="pick:", max_tokens=60, temperature=1.0)
    for seed in range(3):
        got = client.completions.create(**kw, seed=seed,
                                        extra_body={"guided_choice": ["yes", "no", "maybe so"]})
        assert got.choices[0].text in {"yes", "no", "maybe so"} and got.choices[0].finish_reason == "stop"
        got = client.completions.create(**kw, seed=seed, extra_body={"guided_regex": "[a-c]{2,4}-[0-9]{3}"})
        assert re.fullmatch("[a-c]{2,4}-[0-9]{3}", got.choices[0].text), got.choices[0].text
    schema = SCHEMAS[0]
    got = client.completions.create(**{**kw, "max_tokens": 200}, extra_body={"guided_json": schema})
    validated(got.choices[0], schema)


def test_constrained_and_unconstrained_requests_side_by_side(served, client):
    """Constrained requests (one token per step) beside unconstrained ones (multi-token loops):
    the unconstrained answers equal generate() token for token."""
    _, params, tokenizer = served
    prompts = ["the weather", "once upon", "a b c d"]
    wants = {p: tokenizer.decode(sk.generate(params, None, tokenizer.encode(p), max_new_tokens=40,
                                             stop_ids=())[0]) for p in prompts}
    results: dict[str, str] = {}
    constrained: list = []

    def plain(p: str) -> None:
        results[p] = client.completions.create(model=MODEL, prompt=p, max_tokens=40, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].text

    def shaped(seed: int) -> None:
        constrained.append((seed, client.completions.create(
            model=MODEL, prompt="json:", max_tokens=400, temperature=1.0, seed=seed,
            extra_body={"response_format": json_schema_format(SCHEMAS[5])}).choices[0]))

    threads = [threading.Thread(target=shaped, args=(s,)) for s in range(3)]
    threads += [threading.Thread(target=plain, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == wants
    assert len(constrained) == 3
    for _, choice in constrained:
        validated(choice, SCHEMAS[5])


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": json_schema_format({"type": "strange"})}, "response_format"),
    ({"guided_regex": "[a-z+"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
])
def test_a_bad_grammar_gets_400_naming_the_field(served, extra, param):
    r = httpx.post(f"{served[0].url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 4,
                                                              **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.real_model
def test_real_model_answers_twenty_schemas_greedy_and_sampled(tmp_path):
    """SmolLM2-135M-Instruct through the chat endpoint: 20 schemas x (greedy, sampled), 8 at a time."""
    server = start(None, "--served-model-name", MODEL, "--max-slots", "8", "--max-length", "512",
                   log=tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        jobs = [(i, t) for i in range(len(SCHEMAS)) for t in (0.0, 0.8)]
        results: dict = {}

        def one(i: int, temperature: float) -> None:
            ask = f"Describe something as JSON with the fields {', '.join(SCHEMAS[i]['properties'])}."
            results[i, temperature] = client.chat.completions.create(
                model=MODEL, temperature=temperature, seed=i, max_tokens=300,
                messages=[{"role": "user", "content": ask}],
                response_format=json_schema_format(SCHEMAS[i])).choices[0]

        for start_at in range(0, len(jobs), 8):
            threads = [threading.Thread(target=one, args=job) for job in jobs[start_at:start_at + 8]]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        for (i, _), choice in results.items():
            validated(choice, SCHEMAS[i])
        assert len(results) == 40
    finally:
        server.stop()
