"""Peak RSS of sampling a corpus into the token store, and of one training step on the sampled rows.

Run in a fresh process, as `python -m tests.memory_probe WORKDIR SCALE [SCALE ...]`: for each
scale it writes a corpus of SCALE x BASE_DOCUMENTS documents, samples 80% of its tokens
through the token store, then trains one step of a tiny Llama on those rows read from the
memory map. The peak (VmHWM) is reset before each of the two measurements, so each is the
peak of that step alone. One JSON line per scale on stdout. `--in-ram` reads the rows with
`load_sequences` instead: what keeping tokens in RAM costs, for comparison.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

BASE_DOCUMENTS = 640  # x DOCUMENT_CHARS: about 640k tokens at scale 1 with the character tokenizer
DOCUMENT_CHARS = 1000
SEQ_LEN = 64
WORDS = ["hello", "reader", "token", "store", "memory", "layer", "expert", "router", "corpus", "shard"]


def write_corpus(path: Path, num_documents: int, seed: int = 0) -> Path:
    """One document per line, written line by line so that the writer holds one document at a time."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for i in range(num_documents):
            words: list[str] = [f"doc{i}"]
            while sum(map(len, words)) + len(words) < DOCUMENT_CHARS:
                words.append(rng.choice(WORDS))
            out.write(" ".join(words)[:DOCUMENT_CHARS] + "\n")
    return path


def reset_peak_rss() -> None:
    """Set this process's peak RSS (VmHWM) to its current RSS (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def probe(workdir: Path, scale: int, in_ram: bool = False) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from layermoe_core.data.corpus import CorpusSpec, load_sequences, open_sequences, sample_token_rows
    from layermoe_core.training.trainer import TrainSettings, train_causal_lm
    from tests.tiny_tokenizer import tiny_tokenizer

    corpus = write_corpus(workdir / f"corpus-{scale}.txt", BASE_DOCUMENTS * scale, seed=scale)
    num_tokens = int(0.8 * BASE_DOCUMENTS * scale * (DOCUMENT_CHARS + 1))  # 80% of the corpus: the train split holds ~90%
    reset_peak_rss()
    sample = sample_token_rows(
        {"en": CorpusSpec(path=corpus)},
        tiny_tokenizer(),
        num_tokens,
        SEQ_LEN,
        seed=0,
        store_dir=workdir / "store",
        out_path=workdir / f"sample-{scale}.json",
    )
    sampling = peak_rss_mb()

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=97,
            max_position_embeddings=SEQ_LEN,
        )
    )
    settings = TrainSettings(max_steps=1, per_device_batch_size=8, learning_rate=1e-3, logging_steps=1, save_steps=10)
    reset_peak_rss()
    rows = load_sequences(sample) if in_ram else open_sequences(sample)
    train_causal_lm(model, rows, settings, workdir / f"train-{scale}")
    training = peak_rss_mb()
    return {
        "scale": scale,
        "tokens": num_tokens // SEQ_LEN * SEQ_LEN,
        "sampling_peak_mb": round(sampling, 1),
        "training_step_peak_mb": round(training, 1),
    }


def main(argv: list[str]) -> None:
    in_ram = "--in-ram" in argv
    workdir, *scales = [a for a in argv if a != "--in-ram"]
    workdir = Path(workdir)
    os.environ.setdefault("HF_DATASETS_CACHE", str(workdir / "datasets-cache"))
    for scale in map(int, scales):
        print(json.dumps(probe(workdir, scale, in_ram)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
