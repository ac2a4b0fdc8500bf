"""Peak memory of Stage-1 training on a CPU, against `layermoe estimate`'s per-device total.

Run in a fresh process, as `python -m tests.training_memory_probe WORKDIR HIDDEN LAYERS CHECKPOINTING`:
builds a Llama parent (fp32) of that width and depth, expands it, and trains Stage 1 for two
steps in this process. Prints one JSON line: the peak RSS (VmHWM) above the RSS after imports,
and the estimate's per-device total for the same model, batch and sequence length.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VOCAB, SEQ_LEN, BATCH, ALLOCATION_PER_LAYER = 4_000, 256, 4, 2
OLD, NEW = ["en"], ["el"]


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def probe(workdir: Path, hidden: int, layers: int, checkpointing: bool) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from layermoe_core.model.surgery import expand
    from layermoe_core.training.estimate import estimate_round
    from layermoe_core.training.trainer import Stage1Settings, Stage2Settings, train_stage1

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        vocab_size=VOCAB,
        max_position_embeddings=SEQ_LEN,
    )
    settings = Stage1Settings(
        max_steps=2, per_device_batch_size=BATCH, gradient_checkpointing=checkpointing, save_steps=100, logging_steps=1
    )
    allocation = [ALLOCATION_PER_LAYER] * layers
    rows = {"el": torch.randint(0, VOCAB, (2 * BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))}
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    start = rss_mb("VmRSS")
    torch.manual_seed(0)
    model = expand(LlamaForCausalLM(config), allocation, OLD, NEW, top_k=2)
    train_stage1(model, rows, settings, workdir / "stage1")
    measured = (rss_mb("VmHWM") - start) * 2**20
    estimate = estimate_round(
        config,
        allocation,
        OLD,
        NEW,
        top_k=2,
        classifier_layers=1,
        seq_len=SEQ_LEN,
        stage1_tokens=2 * BATCH * SEQ_LEN,
        stage2_tokens=SEQ_LEN,
        stage1=settings,
        stage2=Stage2Settings(),
    ).stages[0]
    return {
        "hidden": hidden,
        "layers": layers,
        "checkpointing": checkpointing,
        "measured_bytes": measured,
        "estimated_bytes": estimate.total_bytes,
        "parts": {k: getattr(estimate, k) for k in ("weights_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes")},
    }


if __name__ == "__main__":
    print(json.dumps(probe(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1")), flush=True)
