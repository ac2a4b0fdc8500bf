"""The demo's base model: a byte-level BPE tokenizer and a small Qwen2 config, built here.

Why: with no hub, the demo trains its own "pretrained" multilingual base. Like a real one,
its tokenizer is trained on every demo language (old and new), so later rounds teach the
model languages its vocabulary already covers. Training the base is `training.train_causal_lm`'s
job, and `checkpoints.init_model` initialises it; this module only makes the tokenizer and the config.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config

from layermoe_core.errors import LayerMoEError

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|endoftext|>", "<|pad|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]  # ids 0, 1, 2

# "demo": about 2.7k tokens per CPU-second of training at sequence 128, batch 16, vocab 8000
# (1.8M parameters), so base training and two rounds fit in minutes on 2 cores; "tiny": tests.
DEMO_SIZES = {
    "demo": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    ),
    "tiny": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128
    ),
}


def train_demo_tokenizer(
    corpus: Mapping[str, str | Path] | Iterable[str],
    vocab_size: int,
    output_dir: str | Path,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on all demo languages and save it (tokenizer.json) to output_dir.

    `corpus` is {language: jsonl path with a "text" field} or the texts themselves. Byte-level,
    so any script round-trips even where merges are few. The special tokens are <|pad|> (0),
    <|bos|> (1) and <|endoftext|> (2, eos); nothing is added to encoded text automatically,
    the data packing appends eos between documents. The same texts give the same tokenizer.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise LayerMoEError(
            f"vocab_size={vocab_size} cannot hold the 256 byte tokens and {len(SPECIAL_TOKENS)} special tokens. "
            "Fix: use at least 259, e.g. 8000."
        )
    texts = list(_corpus_texts(corpus))
    if not texts:
        raise LayerMoEError("The tokenizer corpus is empty. Fix: pass jsonl files with a 'text' field, or a list of texts.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    fast.save_pretrained(str(output_dir))
    return fast


def demo_base_config(vocab_size: int, size: str = "demo", **overrides) -> Qwen2Config:
    """A small Qwen2 config; `overrides` replace any field (e.g. the special token ids)."""
    if size not in DEMO_SIZES:
        raise LayerMoEError(f"size={size!r} is not a demo base size. Fix: use one of {sorted(DEMO_SIZES)}.")
    if vocab_size < 1:
        raise LayerMoEError(f"vocab_size={vocab_size} must be positive. Fix: pass len(tokenizer).")
    defaults = dict(
        vocab_size=vocab_size,
        tie_word_embeddings=True,  # at this size the embedding is most of the model
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
    )
    return Qwen2Config(**{**defaults, **DEMO_SIZES[size], **overrides})


def _corpus_texts(corpus: Mapping[str, str | Path] | Iterable[str]) -> Iterator[str]:
    if isinstance(corpus, str):
        raise LayerMoEError("corpus is a single string. Fix: pass {language: jsonl path} or a list of texts.")
    if not isinstance(corpus, Mapping):
        yield from corpus
        return
    for language, path in sorted(corpus.items()):
        path = Path(path)
        if not path.is_file():
            raise LayerMoEError(
                f"Tokenizer corpus for {language!r} not found: {path}. "
                "Fix: build it with offline_corpus.build_gettext_corpus or pass an existing jsonl."
            )
        with path.open(encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]
