"""What `swiftkv-jax distill` and `eval` run, without the command line: the SwiftKV model to
train, its data (a file or a built-in ShareGPT corpus, with the held-out split), the K/V
initialisation, and the evaluation sets and prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..model.params import Params
from ..model.swiftkv import swiftkv_off, to_swiftkv
from . import data
from .evaluate import evaluate
from .settings import DataChoice

# Prompts whose greedy answers are shown teacher beside student after a run.
EXAMPLE_PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.",
                   "Explain what a hash table is in two sentences.")


def swiftkv_params(params: Params, num_key_value_layers: int | None, group_size: int) -> Params:
    """SwiftKV params: a plain Llama converted with (L, g) (default L = N/2), a SwiftKV one as is."""
    cfg = params.config
    if cfg.swiftkv:
        if num_key_value_layers not in (None, cfg.num_key_value_layers) or \
                group_size not in (1, cfg.key_value_group_size):
            raise ValueError(f"the model is already SwiftKV with L={cfg.num_key_value_layers}, "
                             f"g={cfg.key_value_group_size}; give its plain base model to change them")
        return params
    L = cfg.num_layers // 2 if num_key_value_layers is None else num_key_value_layers
    if L >= cfg.num_layers:
        raise ValueError(f"--num-key-value-layers {L} leaves no SwiftKV layer in a {cfg.num_layers}-"
                         f"layer model; give L in [1, {cfg.num_layers - 1}]")
    return to_swiftkv(params, L, group_size)


def examples(choice: DataChoice, params: Params, tokenizer: Any) -> tuple[list, list, str]:
    """(train, held-out) examples and a name for the data (see DataChoice)."""
    if choice.path:
        train, held = data.split_held_out(data.read_examples(choice.path), choice.held_out_percent)
        name = Path(choice.path).name
    else:
        answer = dict(max_new_tokens=choice.answer_tokens, batch_size=choice.generate_batch_size,
                      cache_dir=choice.cache_dir)
        teacher = swiftkv_off(params)
        train_prompts, held_prompts = data.split_prompts(data.sharegpt_prompts(choice.num_prompts),
                                                         choice.held_out_percent)
        held = data.teacher_answers(teacher, tokenizer, held_prompts, **answer)
        if choice.corpus == "teacher-answers":
            train = data.teacher_answers(teacher, tokenizer, train_prompts, **answer)
            name = f"sharegpt-teacher-answers-{len(train) + len(held)}"
        else:
            held_set = set(held_prompts)
            train = data.sharegpt_conversations(
                choice.num_conversations, max_chars=choice.conversation_chars,
                exclude=lambda p: p in held_set or data.is_held_out_prompt(p, choice.held_out_percent))
            name = f"sharegpt-conversations-{len(train)}"
    if not train or not held:
        raise ValueError(f"the data split into {len(train)} train and {len(held)} held-out "
                         f"examples; give more data or change --held-out-percent")
    return train, held, name


def initialise(params: Params, tokenizer: Any, train: list, kv_init: str, rows: int,
               seq_len: int) -> Params:
    """The SwiftKV K/V of `params` as the recipe has them (`mean`), or fitted by least squares on
    `rows` packed train rows (`lstsq`, kv_init.py)."""
    if kv_init != "lstsq":
        return params
    from .kv_init import fit_swiftkv_kv

    return fit_swiftkv_kv(params, data.pack(tokenizer, train, seq_len).tokens[:rows])


def eval_sets(tokenizer: Any, held: list, seq_len: int, text_chars: int | None) -> dict[str, Any]:
    """Packed held-out sets: the held-out examples (assistant tokens of chats) and, unless
    `text_chars` is None, that many characters of each English text."""
    chats = all("messages" in ex for ex in held)
    sets = {"held-out": data.pack(tokenizer, held, seq_len, assistant_only=chats)}
    if text_chars is not None:
        sets["english"] = data.pack(tokenizer, data.calibration_text(max_chars=text_chars), seq_len)
    return sets


def evaluate_all(params: Params, sets: dict[str, Any], batch_size: int) -> dict[str, dict[str, float]]:
    """evaluate() on every set: {set name: metrics}."""
    return {name: evaluate(params, packed, batch_size) for name, packed in sets.items()}
