"""Distillation data: file reading and its errors, chat template with assistant mask, packing,
the fixed held-out split, the ShareGPT reader and the cached self-distillation set."""

import json
import sys

import jax
import numpy as np
import pytest
from tiny_tokenizer import make_tokenizer

import swiftkv_jax as sk
from swiftkv_jax.config import ModelConfig
from swiftkv_jax.train import data
from swiftkv_jax.train.data import DataError

CHAT = {"messages": [{"role": "user", "content": "hello how are you ?"},
                     {"role": "assistant", "content": "hi the answer is water ."},
                     {"role": "user", "content": "what is the time ?"},
                     {"role": "assistant", "content": "it is one ."}]}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_missing_empty_and_folder_paths_are_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        data.read_examples(tmp_path / "empty.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no examples"):
        data.read_examples(tmp_path / "blank.jsonl")
    with pytest.raises(DataError, match="folder"):
        data.read_examples(tmp_path)


def test_malformed_line_is_named(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(CHAT), "", '{"text": "ok"', json.dumps(CHAT)])
    with pytest.raises(DataError, match=r"d\.jsonl:3: malformed JSON"):
        data.read_jsonl(path)
    path = write_lines(tmp_path / "e.jsonl", [json.dumps(CHAT), '{"messages": [{"role": "user"}]}'])
    with pytest.raises(DataError, match=r"e\.jsonl:2: every message needs"):
        data.read_jsonl(path)
    path = write_lines(tmp_path / "f.jsonl", ['{"prompt": "x"}'])
    with pytest.raises(DataError, match=r"f\.jsonl:1: expected an object"):
        data.read_jsonl(path)


def test_plain_text_file_is_one_text_example(tmp_path):
    (tmp_path / "t.txt").write_text("the water is hot\n")
    assert data.read_examples(tmp_path / "t.txt") == [{"text": "the water is hot\n"}]


def test_assistant_mask_covers_exactly_the_answers(tok):
    ids, flags = data.encode_chat(tok, CHAT["messages"])
    assert ids == tok.encode(tok.apply_chat_template(CHAT["messages"], tokenize=False), add_special_tokens=False)
    masked = tok.decode([i for i, f in zip(ids, flags) if f])
    assert masked == "hi the answer is water. <|im_end|> it is one. <|im_end|>"


def test_conversation_without_assistant_turn(tok):
    chat = {"messages": [{"role": "user", "content": "hello"}]}
    with pytest.raises(DataError, match="example 2: the conversation has no assistant turn"):
        data.pack(tok, [CHAT, chat], 16, assistant_only=True)
    assert data.pack(tok, [CHAT, chat], 16).num_supervised > 0  # fine when every token counts


def test_pack_targets_weights_and_padding(tok):
    text = {"text": "the water is hot"}
    packed = data.pack(tok, [CHAT, text, CHAT], seq_len=8, assistant_only=True)
    n_chat = len(data.encode_chat(tok, CHAT["messages"])[0])
    stream = packed.tokens.reshape(-1)
    assert packed.tokens.shape[1] == 8 and packed.num_rows == -(-(2 * n_chat + 5) // 8)
    np.testing.assert_array_equal(packed.targets.reshape(-1)[:-1], stream[1:])
    weights = packed.weights.reshape(-1)
    _, flags = data.encode_chat(tok, CHAT["messages"])
    # Position t is supervised iff token t+1 is an answer token of the same example; plain text
    # counts whole (but not its first token, predicted from the previous example); padding never.
    expected = flags[1:] + [False] + [True] * 4 + [False] + flags[1:]
    np.testing.assert_array_equal(weights[:len(expected)], np.asarray(expected, np.float32))
    assert not weights[len(expected):].any()
    assert packed.rows(np.array([[0, 1]]))["tokens"].shape == (1, 2, 8)


def test_held_out_split_is_fixed_by_content():
    examples = [{"text": f"example {i}"} for i in range(400)]
    train, held = data.split_held_out(examples, 10)
    assert 20 <= len(held) <= 60 and len(train) + len(held) == 400
    train2, held2 = data.split_held_out(examples[::-1][:300], 10)
    assert {e["text"] for e in held2} == {e["text"] for e in held} & {e["text"] for e in held2}
    assert not {e["text"] for e in held2} & {e["text"] for e in train}


def test_a_tiny_set_still_holds_one_example_out():
    examples = [{"text": f"tiny {i}"} for i in range(5)]
    train, held = data.split_held_out(examples, 1)  # no hash is likely below 100 of 10000
    assert len(held) >= 1 and len(train) + len(held) == 5
    assert data.split_held_out(examples, 1) == (train, held)


def test_json_array_reader_stops_at_a_cut_off_record():
    records = [{"id": i, "conversations": [{"from": "human", "value": f"q {i}"}]} for i in range(3)]
    text = json.dumps(records, indent=1)
    assert list(data._iter_json_array(text)) == records
    assert list(data._iter_json_array(text[:text.rindex('"q 2"')])) == records[:2]


def test_english_filter():
    assert data.is_english("How do I add multiple new columns in Power Query?")
    assert not data.is_english("Как добавить несколько новых столбцов в Power Query?")
    assert not data.is_english("x = [1, 2, 3]; y = {a: 4} // 5 + 6 * 7 - 8")


def test_sharegpt_prompts_from_the_package():
    try:
        prompts = data.sharegpt_prompts(20)
    except DataError as e:
        pytest.fail(f"{e} (the README's test command installs it)")
    assert len(prompts) == 20 and len(set(prompts)) == 20
    assert all(20 <= len(p) <= 500 and data.is_english(p) for p in prompts)


def test_sharegpt_conversations_from_the_package():
    held = set(data.split_prompts(data.sharegpt_prompts(200), 10)[1])
    exclude = lambda p: p in held or data.is_held_out_prompt(p, 10)
    chats = data.sharegpt_conversations(300, max_chars=1500, exclude=exclude)
    assert len(chats) == 300
    for c in chats:
        roles = [m["role"] for m in c["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
        assert all(data.is_english(m["content"]) and m["content"] for m in c["messages"])
        assert sum(len(m["content"]) for m in c["messages"]) <= 1500
        assert not exclude(c["messages"][0]["content"])
    assert max(len(c["messages"]) for c in chats) > 2  # whole conversations, not first turns only
    # The held-out prompts' own conversations are in the file, and skipped.
    everything = data.sharegpt_conversations(300, max_chars=1500)
    assert {c["messages"][0]["content"] for c in everything} & held


def test_prompt_split_agrees_with_the_hash_rule():
    prompts = [f"question number {i}?" for i in range(300)]
    train, held = data.split_prompts(prompts, 10)
    assert 10 <= len(held) <= 50 and sorted(train + held) == sorted(prompts)
    assert all(data.is_held_out_prompt(p, 10) for p in held)
    assert not any(data.is_held_out_prompt(p, 10) for p in train)


def test_self_distillation_set_is_generated_once_and_resumed(tmp_path, tok, monkeypatch):
    cfg = ModelConfig(vocab_size=160, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, eos_token_ids=(2,))
    teacher = sk.init_params(cfg, jax.random.PRNGKey(0))
    prompts = ["hello how are you ?", "what is the time ?", "write a word .", "how long is it ?",
               "who can find water ?"]
    monkeypatch.setattr(data, "sharegpt_prompts", lambda n: prompts[:n])
    kwargs = dict(num_prompts=3, max_new_tokens=6, batch_size=2, cache_dir=tmp_path, progress=False)
    first = data.self_distillation_set(teacher, tok, **kwargs)
    assert [c["messages"][0]["content"] for c in first] == prompts[:3]
    assert all(c["messages"][1]["role"] == "assistant" for c in first)
    (path,) = tmp_path.glob("sharegpt_*.jsonl")
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2]) + "\n")  # as if interrupted after the first batch
    calls = []
    real_generate = sk.generate

    def counting_generate(params, cache, batch, **kw):
        calls.append(len(batch))
        return real_generate(params, cache, batch, **kw)

    monkeypatch.setattr(sys.modules["swiftkv_jax.runtime.generation"], "generate", counting_generate)
    again = data.self_distillation_set(teacher, tok, **kwargs)
    assert calls == [1]  # only the missing prompt is answered
    assert again[:2] == first[:2] and [c["messages"][0] for c in again] == [c["messages"][0] for c in first]
    assert data.self_distillation_set(teacher, tok, **kwargs) == again and calls == [1]
    # A smaller set is read from the same file; a larger one answers only the new prompts.
    assert data.self_distillation_set(teacher, tok, **dict(kwargs, num_prompts=2)) == again[:2]
    more = data.self_distillation_set(teacher, tok, **dict(kwargs, num_prompts=5))
    assert more[:3] == again and [c["messages"][0]["content"] for c in more] == prompts
    assert calls == [1, 2] and len(list(tmp_path.glob("sharegpt_*.jsonl"))) == 1
    # Any subset, in any order, is answered from the file.
    subset = data.teacher_answers(teacher, tok, prompts[::-2], **{k: v for k, v in kwargs.items()
                                                                 if k != "num_prompts"})
    assert subset == more[::-2] and calls == [1, 2]


def test_english_calibration_text():
    try:
        texts = data.calibration_text(max_chars=2000)
    except DataError as e:
        pytest.fail(f"{e} (the README's test command installs it)")
    assert len(texts) == 3 and all(len(t["text"]) > 1000 and "<doc" not in t["text"] for t in texts)


def test_both_builtin_corpora_hold_out_the_same_teacher_answers(tmp_path, tok):
    from swiftkv_jax.train.recipe import examples
    from swiftkv_jax.train.settings import DataChoice

    cfg = ModelConfig(vocab_size=160, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, eos_token_ids=(2,))
    teacher = sk.init_params(cfg, jax.random.PRNGKey(0))
    choice = dict(num_prompts=40, held_out_percent=10.0, answer_tokens=4, generate_batch_size=8,
                  cache_dir=tmp_path, num_conversations=30, conversation_chars=800)
    train_a, held_a, name_a = examples(DataChoice(**choice, corpus="teacher-answers"), teacher, tok)
    train_c, held_c, name_c = examples(DataChoice(**choice, corpus="sharegpt"), teacher, tok)
    assert held_a == held_c and held_a and all(c["messages"][1]["role"] == "assistant" for c in held_a)
    held_prompts = {c["messages"][0]["content"] for c in held_a}
    assert len(train_a) + len(held_a) == 40 and not held_prompts & {c["messages"][0]["content"] for c in train_a}
    assert len(train_c) == 30 and not held_prompts & {c["messages"][0]["content"] for c in train_c}
    assert name_a.startswith("sharegpt-teacher-answers") and name_c.startswith("sharegpt-conversations")

