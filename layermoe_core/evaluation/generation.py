"""Greedy, batched text generation for evaluation: translations and continuations a person can read.

Why a helper: evaluation generates from dense and LayerMoE models alike, in batches of prompts
of different lengths. Prompts are left-padded so that every row's next token sits at the same
position, and decoding is greedy so that the same model and prompts always give the same text.
Every evaluator runs a model inside `model.inference.inference` (eval mode, no autograd).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import LayerMoEError
from ..model.inference import inference, input_device
from ..model.surgery import pinned_language


def context_length(model: nn.Module) -> int | None:
    """Positions the model can attend over (max_position_embeddings of its base config), if it says."""
    config = getattr(model, "config", None)
    config = getattr(config, "base_config", config)
    return getattr(config, "max_position_embeddings", None)


def encode_prompts(tokenizer: Any, prompts: Sequence[str]) -> list[list[int]]:
    encoded = [tokenizer.encode(prompt, add_special_tokens=True) for prompt in prompts]
    empty = [prompt for prompt, ids in zip(prompts, encoded) if not ids]
    if empty:
        raise LayerMoEError(f"the tokenizer turned the prompts {empty[:3]} into no tokens; give non-empty prompts")
    return encoded


class NewlineWritten(StoppingCriteria):
    """Per row: done once the generated text holds a newline (works for any tokenizer, byte-level or not)."""

    def __init__(self, tokenizer: Any, prompt_width: int):
        self.tokenizer, self.prompt_width = tokenizer, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        new = input_ids[:, self.prompt_width :].tolist()  # (B, generated so far)
        return torch.tensor(["\n" in self.tokenizer.decode(row, skip_special_tokens=True) for row in new], device=input_ids.device)


def greedy_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    first_line: bool = False,
    min_new_tokens: int = 0,
    language: str | None = None,
) -> list[str]:
    """The greedy continuation of each prompt (prompt excluded), decoded without special tokens.

    language: serve every prompt pinned to that language (`surgery.pinned_language`): exactly the
    version that learned it. None takes the classifier-routed model.

    first_line=True stops a row at its first newline and returns the text before it (a
    translation prompt's answer is one line). Generation also stops at EOS, except within the
    first `min_new_tokens` (a small model that ends every document early still shows text).
    Prompts longer than the model's context minus max_new_tokens are refused with their index.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise LayerMoEError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must both be at least 1")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise LayerMoEError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before generating")
    encoded = encode_prompts(tokenizer, prompts)
    limit = context_length(model)
    too_long = [i for i, ids in enumerate(encoded) if limit is not None and len(ids) + max_new_tokens > limit]
    if too_long:
        raise LayerMoEError(
            f"prompts {too_long[:5]} plus {max_new_tokens} new tokens exceed the model's context of {limit} positions; "
            "shorten them (fewer shots or shorter sentences) or lower max_new_tokens"
        )
    pin = pinned_language(model, language) if language is not None else contextlib.nullcontext()
    device = input_device(model)
    texts = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths share a batch: less padding
    with inference(model), pin:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # left-padded: (B, L)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(chunk):
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id,
                stopping_criteria=StoppingCriteriaList([NewlineWritten(tokenizer, width)]) if first_line else None,
            )  # (B, L + new)
            for row, i in enumerate(chunk):
                new = out[row, width:].tolist()
                if tokenizer.eos_token_id in new:  # what follows EOS is padding
                    new = new[: new.index(tokenizer.eos_token_id)]
                text = tokenizer.decode(new, skip_special_tokens=True)
                texts[i] = text.split("\n", 1)[0].strip() if first_line else text
    return texts
