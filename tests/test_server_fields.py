"""The OpenAI fields evaluation and client tools send: logprobs and echo, penalties, logit_bias,
min_tokens, n and best_of, on a real `swiftkv-jax serve` process driven by the official `openai`
client and by lm-evaluation-harness itself.

References are independent of the code under test: transformers on the same weights (log_softmax
of its logits, and a NumPy loop of OpenAI's / vLLM's penalty formulas over its logits), separate
seeded requests for n, and our uncached forward pass for lm-eval's per-item log-likelihoods.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
import torch
from conftest import TINY_CONFIGS, make_hf_llama, penalised_greedy
from test_server import MODEL, SERVER_ARGS, start
from tiny_tokenizer import make_tokenizer

import swiftkv_jax as sk

TASKS = Path(__file__).resolve().parent / "lm_eval_task"
LONG = ("the water is hot and the day was long , how do you write a word for the people who were "
        "there when the sound of the water was up and the time was now , he said that they")  # > 2 blocks
TOL = 2e-4  # float32 logprobs against transformers in float64


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """server, hf (the torch model), params, tok, folder: the tiny GQA model with a word tokenizer."""
    folder = tmp_path_factory.mktemp("fields")
    hf = make_hf_llama(folder, **TINY_CONFIGS["gqa_tied"])
    make_tokenizer(folder)
    server = start(folder, *SERVER_ARGS, log=folder / "server.log")
    params, tok = sk.load(folder, progress=False)
    yield SimpleNamespace(server=server, hf=hf, params=params, tok=tok, folder=folder)
    assert server.stop() == 0, server.output()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served.server.url}/v1", api_key="unused", max_retries=0)


def hf_logprobs(hf, ids: list[int]) -> np.ndarray:
    """[T, V] float64 log_softmax of transformers' logits for `ids`."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([ids])).logits[0].double(), -1).numpy()


def ids_of(tokens: list[str]) -> list[int]:
    """Token ids from logprobs' tokens named as vLLM's return_tokens_as_token_ids names them."""
    return [int(t.removeprefix("token_id:")) for t in tokens]


AS_IDS = {"return_tokens_as_token_ids": True}


# -- logprobs and echo ---------------------------------------------------------------------------

def test_echo_logprobs_equal_transformers_for_prompt_and_output(served, client):
    tok = served.tok
    prompt = tok.encode("what is the number of people who")
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                    logprobs=5, extra_body={"ignore_eos": True, **AS_IDS}).choices[0]
    lp = got.logprobs
    ids = ids_of(lp.tokens)
    assert ids[:len(prompt)] == prompt and len(ids) == len(prompt) + 4
    assert got.text.startswith(tok.decode(prompt)) and got.text != tok.decode(prompt)
    ref = hf_logprobs(served.hf, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = [ref[j - 1, t] for j, t in enumerate(ids) if j > 0]
    np.testing.assert_allclose(lp.token_logprobs[1:], want, atol=TOL)
    for j in range(1, len(ids)):  # the 5 most likely tokens at every position, prompt and output
        best = np.argsort(-ref[j - 1])[:5]
        top = lp.top_logprobs[j]
        assert sorted(ids_of(list(top))) == sorted(best.tolist())
        np.testing.assert_allclose(sorted(top.values()), sorted(ref[j - 1, best]), atol=TOL)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # greedy output: each generated token is its position's most likely
    assert all(lp.token_logprobs[j] == max(lp.top_logprobs[j].values()) for j in range(len(prompt), len(ids)))


def test_echo_with_max_tokens_0_scores_the_prompt_only(served, client):
    tok = served.tok
    prompt = tok.encode("hello , how are you")
    got = client.completions.create(model=MODEL, prompt=[prompt, prompt[:3]], max_tokens=0, echo=True,
                                    logprobs=1, temperature=0, extra_body=AS_IDS).choices
    assert [c.finish_reason for c in got] == ["length", "length"]
    first = sorted(got, key=lambda c: c.index)[0]
    assert ids_of(first.logprobs.tokens) == prompt and first.text == tok.decode(prompt)
    ref = hf_logprobs(served.hf, prompt)
    np.testing.assert_allclose(first.logprobs.token_logprobs[1:],
                               [ref[j - 1, t] for j, t in enumerate(prompt) if j > 0], atol=TOL)


def test_echo_logprobs_are_the_same_with_a_prefix_cache_hit(served, client):
    def ask():
        return client.completions.create(model=MODEL, prompt=LONG, max_tokens=1, temperature=0, echo=True,
                                         logprobs=2, extra_body={"ignore_eos": True})
    first, second = ask(), ask()
    assert second.usage.prompt_tokens_details.cached_tokens >= 32  # the second read the prompt's blocks
    assert first.choices[0].logprobs.token_logprobs == second.choices[0].logprobs.token_logprobs
    assert first.choices[0].logprobs.top_logprobs == second.choices[0].logprobs.top_logprobs


def test_streamed_logprobs_equal_the_whole_answer(served, client):
    kw = dict(model=MODEL, prompt="it was hot and", max_tokens=6, temperature=0, echo=True, logprobs=2,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    joined = [x for c in chunks if c.logprobs for x in c.logprobs.token_logprobs]
    assert joined == whole.logprobs.token_logprobs
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == whole.logprobs.tokens
    assert "".join(c.text for c in chunks) == whole.text


def test_chat_logprobs_equal_transformers(served, client):
    messages = [{"role": "user", "content": "hello what is your name ?"}]
    ids = httpx.post(f"{served.server.url}/tokenize", json={"messages": messages}).json()["tokens"]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=3,
                                         extra_body={"ignore_eos": True, **AS_IDS})
    content = got.choices[0].logprobs.content
    out = ids_of([c.token for c in content])
    ref = hf_logprobs(served.hf, ids + out)
    np.testing.assert_allclose([c.logprob for c in content],
                               [ref[len(ids) - 1 + j, t] for j, t in enumerate(out)], atol=TOL)
    for j, c in enumerate(content):
        best = np.argsort(-ref[len(ids) - 1 + j])[:3]
        assert ids_of([t.token for t in c.top_logprobs]) == best.tolist()
        assert c.bytes == list(c.token.encode())
    named = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                           logprobs=True, extra_body={"ignore_eos": True})
    assert [c.token for c in named.choices[0].logprobs.content] == [served.tok.decode([t]) for t in out]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                            logprobs=True, top_logprobs=3, stream=True,
                                            extra_body={"ignore_eos": True})
    streamed = [x.logprob for ch in stream if ch.choices and ch.choices[0].logprobs
                for x in ch.choices[0].logprobs.content]
    assert streamed == [c.logprob for c in content]


# -- penalties, logit_bias, min_tokens ------------------------------------------------------------

@pytest.mark.parametrize("rules", [
    dict(frequency=1.5), dict(presence=1.2), dict(repetition=3.0),
    dict(frequency=0.7, presence=0.5, repetition=1.6, bias={20: 4.0, 31: -100.0})])
def test_penalties_and_logit_bias_equal_a_numpy_reference(served, client, rules):
    tok, n = served.tok, 10
    prompt = tok.encode("the water is hot and the water is")
    want = penalised_greedy(served.hf, prompt, n, **rules)
    assert want != penalised_greedy(served.hf, prompt, n), "the rules must change this answer"
    body = {"frequency_penalty": rules.get("frequency", 0), "presence_penalty": rules.get("presence", 0),
            "logit_bias": {str(t): b for t, b in rules.get("bias", {}).items()}}
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True, **AS_IDS,
                                                "repetition_penalty": rules.get("repetition", 1.0)}, **body)
    assert ids_of(got.choices[0].logprobs.tokens) == want


def test_min_tokens_holds_back_the_stop_ids(served, client):
    eos = served.params.config.eos_token_ids[0]
    kw = dict(model=MODEL, prompt="hello you are", max_tokens=12, temperature=0, logit_bias={str(eos): 100})
    early = client.completions.create(**kw).choices[0]
    assert (early.text, early.finish_reason) == ("", "stop")
    held = client.completions.create(**kw, logprobs=0, extra_body={"min_tokens": 5, **AS_IDS}).choices[0]
    assert held.finish_reason == "stop" and held.text != ""
    listed = ids_of(held.logprobs.tokens)  # 5 tokens, then the stop id (listed as vLLM lists it)
    assert len(listed) == 6 and eos not in listed[:5] and listed[5] == eos


# -- n and best_of ------------------------------------------------------------------------------

def test_n_choices_equal_separately_seeded_requests_and_best_of_picks_the_likeliest(served, client):
    kw = dict(model=MODEL, prompt="how do you write a", max_tokens=8, temperature=1.0,
              extra_body={"ignore_eos": True})
    many = client.completions.create(n=3, seed=11, **kw)
    texts = [c.text for c in sorted(many.choices, key=lambda c: c.index)]
    alone = [client.completions.create(seed=11 + j, logprobs=0, **kw).choices[0] for j in range(3)]
    assert texts == [a.text for a in alone] and len(set(texts)) > 1
    assert many.usage.completion_tokens == 24
    best = client.completions.create(n=1, best_of=3, seed=11, **kw).choices
    likeliest = max(alone, key=lambda a: sum(a.logprobs.token_logprobs))
    assert len(best) == 1 and best[0].index == 0 and best[0].text == likeliest.text
    fresh = " ".join(reversed(LONG.split()))  # never sent before: only the copies can share its blocks
    shared = client.completions.create(model=MODEL, prompt=fresh, n=3, max_tokens=2, temperature=1.0,
                                       extra_body={"ignore_eos": True})
    assert shared.usage.prompt_tokens_details.cached_tokens >= 2 * 32  # copies 2 and 3 reuse the blocks
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                          n=2, seed=3, max_tokens=4, temperature=1.0,
                                          extra_body={"ignore_eos": True})
    assert sorted(c.index for c in chat.choices) == [0, 1]


@pytest.mark.parametrize("change, param", [
    (dict(n=0), "n"), (dict(n=17), "n"), (dict(logprobs=21), "logprobs"),
    (dict(frequency_penalty=2.5), "frequency_penalty"), (dict(presence_penalty=-3), "presence_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(logit_bias={"hot": 1}), "logit_bias"),
    (dict(logit_bias={"99999": 1}), "logit_bias"), (dict(logit_bias={"5": 500}), "logit_bias"),
    (dict(best_of=2, stream=True), "best_of"), (dict(n=3, best_of=2), "best_of"),
    (dict(max_tokens=0), "max_tokens"), (dict(min_tokens=9, max_tokens=4), "min_tokens"),
    (dict(suffix="x"), "suffix")])
def test_bad_field_values_get_400_naming_the_field(served, change, param):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, **change}
    r = httpx.post(f"{served.server.url}/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_chat_top_logprobs_without_logprobs_is_refused(served):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}
    r = httpx.post(f"{served.server.url}/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"


# -- lm-evaluation-harness, run as a user runs it --------------------------------------------------

def lm_eval(served, tmp_path: Path, model: str, task: str, endpoint: str, *extra: str) -> list[dict]:
    """Runs `lm-eval run` against the server on a task in tests/lm_eval_task; returns its samples."""
    args = (f"model={MODEL},base_url={served.server.url}/v1/{endpoint},tokenizer_backend=huggingface,"
            f"tokenizer={served.folder},num_concurrent=2,max_retries=1,timeout=120")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "unused",
           "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", args, "--tasks", task,
           "--include_path", str(TASKS), "--output_path", str(tmp_path / "out"), "--log_samples", *extra]
    run = subprocess.run(cmd, cwd=TASKS, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    (samples,) = list((tmp_path / "out").rglob(f"samples_{task}_*.jsonl"))
    return [json.loads(line) for line in samples.read_text().splitlines()]


def test_lm_eval_scores_multiple_choice_through_local_completions(served, tmp_path):
    samples = lm_eval(served, tmp_path, "local-completions", "swiftkv_tiny_choice", "completions",
                      "--batch_size", "4")
    docs = [json.loads(line) for line in (TASKS / "tiny_choice.jsonl").read_text().splitlines()]
    assert len(samples) == len(docs)
    tok, params = served.tok, served.params
    for sample in samples:
        doc = docs[sample["doc_id"]]
        context = tok.encode(doc["question"])
        for choice, resp in zip(doc["choices"], sample["resps"]):
            ids = tok.encode(doc["question"] + " " + choice)
            logits, _ = sk.forward(params, None, jnp.asarray([ids]), all_logits=True)
            logp = np.asarray(jax.nn.log_softmax(logits[0], axis=-1))
            want = sum(logp[j - 1, ids[j]] for j in range(len(context), len(ids)))
            assert abs(float(resp[0][0]) - want) < 1e-3, (doc, choice, resp, want)


def test_lm_eval_generates_through_local_chat_completions(served, tmp_path):
    samples = lm_eval(served, tmp_path, "local-chat-completions", "swiftkv_tiny_words", "chat/completions",
                      "--apply_chat_template")
    tok, params = served.tok, served.params
    docs = [json.loads(line) for line in (TASKS / "tiny_choice.jsonl").read_text().splitlines()]
    for sample in samples:
        messages = [{"role": "user", "content": docs[sample["doc_id"]]["question"]}]
        ids = httpx.post(f"{served.server.url}/tokenize", json={"messages": messages}).json()["tokens"]
        out, _ = sk.generate(params, None, ids, max_new_tokens=6)
        want = tok.decode(out, skip_special_tokens=True).split("?")[0]
        assert sample["resps"][0][0] == want, (sample["resps"], want)
