"""Throughput of the similarity pass against a plain forward pass of the same model on the same tokens.

    .venv/bin/python bench/similarity.py                     # CPU, fp32: small and mid
    python bench/similarity.py --device cuda --sizes small mid large

The similarity pass runs the decoder stack with MLP-input hooks and no LM head, so it is
compared twice: with the full model forward (what a user would otherwise run; target
ratio >= 0.9) and with the decoder stack alone (the cost of the hooks by themselves).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path from a checkout, installed or not
from layermoe_core.analysis.similarity import mean_unit_vectors  # noqa: E402

# name: (hidden, layers, tokens); heads of 64 dims, MLP 8/3 * hidden as in Llama/Qwen.
SIZES = {"small": (128, 4, 4096), "mid": (512, 8, 16384), "large": (2048, 24, 131072)}
VOCAB, SEQ_LEN, BATCH = 32000, 512, 8


def median_seconds(passes: dict[str, Callable[[], None]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median wall seconds of each pass, after one warm-up. The passes take turns within each
    repeat, so a change in machine load (a shared CPU) hits all of them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in passes}
    for repeat in range(repeats + 1):
        for name, run in passes.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:  # repeat 0 is the warm-up
                seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


@torch.inference_mode()
def forward_all(module: torch.nn.Module, tokens: torch.Tensor) -> None:
    for start in range(0, tokens.shape[0], BATCH):
        module(input_ids=tokens[start : start + BATCH], use_cache=False)


def bench(name: str, device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    hidden, layers, num_tokens = SIZES[name]
    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        vocab_size=VOCAB,
        max_position_embeddings=SEQ_LEN,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()
    tokens = torch.randint(0, VOCAB, (num_tokens // SEQ_LEN, SEQ_LEN), device=device)

    passes = {
        "model forward": lambda: forward_all(model, tokens),
        "decoder stack forward": lambda: forward_all(model.model, tokens),
        "similarity pass": lambda: mean_unit_vectors(model, tokens, batch_size=BATCH),
    }
    seconds = median_seconds(passes, device, repeats)
    rate = {what: num_tokens / s for what, s in seconds.items()}
    print(f"\n{name}: hidden {hidden}, {layers} layers, vocab {VOCAB}, {num_tokens} tokens ({SEQ_LEN}/row, batch {BATCH}), {dtype}")
    for what, tokens_per_s in rate.items():
        print(f"  {what:<22} {tokens_per_s:>12,.0f} tokens/s")
    print(f"  ratio similarity / model forward:         {rate['similarity pass'] / rate['model forward']:.2f}  (target >= 0.9)")
    print(f"  ratio similarity / decoder stack forward: {rate['similarity pass'] / rate['decoder stack forward']:.2f}  (hook cost alone)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["small", "mid"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads")
    for name in args.sizes:
        bench(name, device, dtype, args.repeats)


if __name__ == "__main__":
    main()
