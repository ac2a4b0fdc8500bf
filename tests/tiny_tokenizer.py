"""A character-level tokenizer built offline, small enough for the tiny test models (vocab 97)."""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<eos>", "<pad>"]
CHARACTERS = " " + string.ascii_letters + string.digits + ".,;:!?'-()"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; anything outside CHARACTERS is <unk>. 76 tokens, within the tiny models' vocabulary of 97."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
