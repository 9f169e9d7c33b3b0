"""`swiftkv-jax chat`: each answer equals generate() on the conversation so far, rendered by
transformers' own apply_chat_template (not our template code), and later turns reuse the
earlier turns' blocks from the prefix cache."""

from __future__ import annotations

import io

import pytest

import swiftkv_jax as sk
from swiftkv_jax.cli.chat_session import ChatSession, run_chat
from swiftkv_jax.runtime.engine import Engine
from swiftkv_jax.runtime.request import SamplingOptions

MAX_LENGTH, NEW = 512, 12


def reference(params, tokenizer, messages) -> tuple[list[int], str]:
    """(prompt ids, greedy answer) of `messages` by transformers' template and generate()."""
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])
    out, _ = sk.generate(params, sk.init_cache(params, 1, MAX_LENGTH), ids, max_new_tokens=NEW)
    return ids, tokenizer.decode(out, skip_special_tokens=True).strip()


@pytest.mark.real_model
def test_chat_answers_like_generate_and_reuses_the_conversation():
    params, tokenizer = sk.load(progress=False)
    engine = Engine(params, max_slots=1, max_length=MAX_LENGTH, chunk_size=64)
    session = ChatSession(engine, tokenizer, SamplingOptions(max_tokens=NEW))
    long_message = "Summarise this: " + "the cat sat on the mat. " * 60
    out = io.StringIO()
    run_chat(session, ["What is the capital of France?", "/stats", "And of Italy?", "/stats",
                       long_message, "/stats", "/bogus", "/reset", "/quit", "never read"], out)
    text = out.getvalue()

    history: list[dict] = []
    answers = []
    for question in ["What is the capital of France?", "And of Italy?"]:
        history.append({"role": "user", "content": question})
        ids, answer = reference(params, tokenizer, history)
        answers.append((ids, answer))
        history.append({"role": "assistant", "content": answer})
        assert answer in text  # streamed to the terminal as generate() answers it
    assert "Paris" in answers[0][1]
    # Turn 2's prompt starts with turn 1's prompt and answer: their full blocks came from the cache.
    stats = [line for line in text.splitlines() if "prefix cache:" in line]
    assert len(stats) == 3 and "(0 from the cache)" in stats[0]
    first_prompt = len(answers[0][0])
    reused = int(stats[1].split("(")[1].split(" from")[0])
    assert reused >= first_prompt // 16 * 16 > 0

    # The long message does not fit beside both exchanges: the oldest one is dropped, and the
    # answer is generate()'s on what remains.
    assert "1 oldest exchanges dropped" in stats[2]
    kept = history[2:] + [{"role": "user", "content": long_message}]
    assert reference(params, tokenizer, kept)[1] in text
    assert "unknown command '/bogus'" in text and "[new conversation]" in text
    assert session.messages == []  # /reset, then /quit: "never read" was not answered
