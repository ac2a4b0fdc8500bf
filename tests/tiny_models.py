"""Tiny seeded models built from a config (no hub), for tests and for the probes that run in a fresh process."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=97,
    max_position_embeddings=64,
)


def tiny_model(family: str = "qwen2", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**{**TINY, **overrides}))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    else:
        raise ValueError(family)
    return model.eval()
