"""Streamed text: pieces join to the tokenizer's own decode and never split a UTF-8 character;
stop strings split across pieces are cut where they begin and never half-sent."""

from __future__ import annotations

import numpy as np
import pytest

from swiftkv_jax.text.detokenizer import REPLACEMENT, IncrementalDetokenizer, StopStrings

TEXT = ("Grüße aus Köln! naïve café, 東京タワー and 🎉🚀 emoji; ¿qué tal? Ωμέγα — “quotes” … "
        "the quick brown fox jumps over the lazy dog 12345 ") * 3


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE tokenizer (GPT-2 / SmolLM2 style) trained on TEXT: multi-byte characters
    are split over several tokens, as real tokenizers split rare ones."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def stream(tokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    detok, pieces, i = IncrementalDetokenizer(tokenizer), [], 0
    for n in sizes:
        pieces.append(detok.add(ids[i:i + n]))
        i += n
    return pieces + [detok.flush()]


def test_pieces_join_to_decode_and_hold_whole_characters(byte_bpe):
    ids = byte_bpe.encode(TEXT)
    split = [t for t in ids if REPLACEMENT in byte_bpe.decode([t])]
    assert split, "the test needs tokens that hold part of a character"
    pieces = stream(byte_bpe, ids, [1] * len(ids))
    assert "".join(pieces) == byte_bpe.decode(ids)
    assert not any(REPLACEMENT in p for p in pieces)
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 4, size=len(ids)).tolist()
    assert "".join(stream(byte_bpe, ids, sizes)) == byte_bpe.decode(ids)


def test_special_tokens_are_skipped_and_random_ids_still_join(byte_bpe):
    eos = byte_bpe.convert_tokens_to_ids("<eos>")
    ids = byte_bpe.encode("café 🎉") + [eos] + byte_bpe.encode(" done")
    assert "".join(stream(byte_bpe, ids, [1] * len(ids))) == "café 🎉 done"
    rng = np.random.default_rng(1)
    ids = rng.integers(0, len(byte_bpe), size=200).tolist()  # invalid byte runs included
    assert "".join(stream(byte_bpe, ids, [1] * len(ids))) == byte_bpe.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("pieces,stops,want,hit", [
    (["Hello wor", "ld, STO", "P here"], ["STOP"], "Hello world, ", True),
    (["ab", "c", "d"], ["x", "cd"], "ab", True),
    (["no stop", " at all"], ["STOP"], "no stop at all", False),
    (["ST", "ON", "E"], ["STOP"], "STONE", False),
    (["a\n", "\nb"], ["\n\n"], "a", True),
])
def test_stop_strings_across_pieces(pieces, stops, want, hit):
    s = StopStrings(stops)
    sent = [s.push(p) for p in pieces]
    out = "".join(sent) + s.flush()
    assert out == want and s.hit == hit
    if hit:  # nothing after the stop string's start is ever sent
        assert all(stops[0] not in x for x in sent)
