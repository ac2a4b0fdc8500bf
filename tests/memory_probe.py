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
import threading
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


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


class PeakAnonymous:
    """The peak of this process's anonymous resident memory (RssAnon), polled by a thread every millisecond.

    Anonymous memory is what the process allocates (Python objects, arrays, tokenizer output); the
    peak RSS also counts pages of memory-mapped files read (the corpus, the token files), which the
    kernel can drop at any time. Polled, so a peak shorter than a poll can be missed.
    """

    def __enter__(self) -> PeakAnonymous:
        self.peak_mb, self._done = _status_mb("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._done.wait(0.001):
            self.peak_mb = max(self.peak_mb, _status_mb("RssAnon"))

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, _status_mb("RssAnon"))


def peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def probe(workdir: Path, scale: int, in_ram: bool = False) -> dict:
    from layermoe_core.data.corpus import CorpusSpec, load_sequences, open_sequences, sample_token_rows
    from layermoe_core.training.trainer import TrainSettings, train_causal_lm
    from tests.tiny_models import tiny_model
    from tests.tiny_tokenizer import tiny_tokenizer

    corpus = write_corpus(workdir / f"corpus-{scale}.txt", BASE_DOCUMENTS * scale, seed=scale)
    num_tokens = int(0.8 * BASE_DOCUMENTS * scale * (DOCUMENT_CHARS + 1))  # 80% of the corpus: the train split holds ~90%
    reset_peak_rss()
    with PeakAnonymous() as anonymous:
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

    model = tiny_model("llama", num_hidden_layers=2, max_position_embeddings=SEQ_LEN)
    settings = TrainSettings(max_steps=1, per_device_batch_size=8, learning_rate=1e-3, logging_steps=1, save_steps=10)
    reset_peak_rss()
    rows = load_sequences(sample) if in_ram else open_sequences(sample)
    train_causal_lm(model, rows, settings, workdir / f"train-{scale}")
    training = peak_rss_mb()
    return {
        "scale": scale,
        "tokens": num_tokens // SEQ_LEN * SEQ_LEN,
        "corpus_mb": round(corpus.stat().st_size / 2**20, 1),
        "sampling_peak_mb": round(sampling, 1),
        "sampling_peak_anonymous_mb": round(anonymous.peak_mb, 1),
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
