"""A tiny word-level tokenizer with a ChatML chat template, saved next to tiny test models."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}")
WORDS = ("the a is of to and in it you that he was for on are with as his they be at one have this "
         "from or had by hot word but what some we can out other were all there when up use your "
         "how said an each she which do their time if will way about many then them write would "
         "like so these her long make thing see him two has look more day could go come did number "
         "sound no most people my over know water than call first who may down side been now find "
         "user assistant system hello hi answer question ? . ,").split()


def make_tokenizer(folder: Path | None = None, vocab_size: int = 160):
    """A PreTrainedTokenizerFast over WORDS (ids < vocab_size); saved into `folder` if given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>"]  # eos id 2, as the tiny models say
    vocab = {w: i for i, w in enumerate(special + list(dict.fromkeys(WORDS)))}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def make_byte_tokenizer(folder: Path | None = None):
    """A byte-level tokenizer (ids 0-2 special, <|im_end|> = 2 the eos; ids 3-258 one byte each, no
    merges): any text is expressible, so grammar-constrained JSON can be drawn by a tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(special + sorted(ByteLevel.alphabet(), key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="<|im_end|>")
    if folder is not None:
        fast.save_pretrained(folder)
    return fast
