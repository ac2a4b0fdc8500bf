"""Token store benchmark: tokenization throughput into the store against a plain loop, and peak memory as the corpus grows.

    python -m bench.data [--documents 20000] [--repeats 3] [--skip-memory]

1. Throughput: the same corpus (synthetic words, one document per line) tokenized by a
   byte-level BPE (the demo's, vocabulary 8000), (a) into a fresh token store (`open_store` +
   `ensure`: the seeded order, the split, the token files) and (b) by a plain batched
   `tokenizer(...)` loop over the same documents that keeps nothing, under the caller's
   TOKENIZERS_PARALLELISM (the Makefile's false). Runs are interleaved, alternating which goes
   first; the median and the spread (min-max) over repeats are printed, and the store's rate
   over the loop's taken per repeat.
2. Memory: `tests.memory_probe` at 1x, 4x and 16x its corpus, and at 20 MB and 200 MB of text,
   one fresh process each: the peak anonymous memory and the peak RSS of sampling 80% of the
   tokens through the store (a first build: the corpus's datasets cache too), the peak RSS of
   one training step reading the rows from the memory map, then (up to 16x) of the same step
   with the rows read into RAM (`load_sequences`) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from layermoe_core.environment import use_local_stack

WORK = Path(tempfile.mkdtemp(prefix="layermoe-bench-data-"))
use_local_stack(WORK / "prefect")
os.environ["HF_DATASETS_CACHE"] = str(WORK / "datasets-cache")  # before `datasets` is imported

from demo.base import train_demo_tokenizer  # noqa: E402
from layermoe_core.data.corpus import CorpusSpec, load_documents, open_store  # noqa: E402
from layermoe_core.data.token_store import TOKENIZE_BATCH, SplitRule  # noqa: E402
from tests.memory_probe import write_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCALES = (1, 4, 16)  # x tests.memory_probe's base corpus (0.64 MB of text)
LARGE_SCALES = (32, 320)  # 20 MB and 200 MB of text


def tokenize_into_store(spec: CorpusSpec, tokenizer, store_dir: Path) -> int:
    with open_store(spec, tokenizer, SplitRule(seed=0, heldout_fraction=0.1), store_dir) as store:
        store.ensure("train", 2**62)  # to the end of the corpus
        return store.num_tokens("train") + store.num_tokens("heldout")


def tokenize_plainly(spec: CorpusSpec, tokenizer) -> int:
    """The baseline: batched calls over the same documents, counting tokens (+1 EOS each) and keeping nothing."""
    total = 0
    for batch in load_documents(spec).iter(batch_size=TOKENIZE_BATCH):
        texts = [t for t in batch["text"] if t and t.strip()]
        total += sum(len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return total


def throughput(work: Path, documents: int, repeats: int) -> None:
    spec = CorpusSpec(path=write_corpus(work / "corpus.txt", documents))
    tokenizer = train_demo_tokenizer(
        list(load_documents(CorpusSpec(path=write_corpus(work / "tok.txt", 2000, seed=1)))["text"]), 8000, work / "tokenizer"
    )
    load_documents(spec)  # build the datasets cache once, outside the timings
    wall: dict[str, list[float]] = {"token store": [], "plain tokenizer loop": []}
    cpu: dict[str, list[float]] = {name: [] for name in wall}
    for repeat in range(repeats):
        names = list(wall) if repeat % 2 == 0 else list(reversed(wall))  # interleaved, alternating who goes first
        for name in names:
            start, start_cpu = time.perf_counter(), time.process_time()
            tokens = (
                tokenize_into_store(spec, tokenizer, work / f"store-{repeat}")
                if name == "token store"
                else tokenize_plainly(spec, tokenizer)
            )
            wall[name].append(tokens / (time.perf_counter() - start))
            cpu[name].append(tokens / (time.process_time() - start_cpu))
        shutil.rmtree(work / f"store-{repeat}")
    print(
        f"\nThroughput: {documents} documents, {tokens:,} tokens, byte-level BPE (vocab 8000), {repeats} interleaved repeats; "
        f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')!r} for the plain loop"
    )
    print("| path | tokens/s (wall), median | min - max | tokens per CPU second, median |\n|---|---|---|---|")
    for name, values in wall.items():
        print(
            f"| {name} | {statistics.median(values):,.0f} | {min(values):,.0f} - {max(values):,.0f} | {statistics.median(cpu[name]):,.0f} |"
        )
    ratios = [store / plain for store, plain in zip(wall["token store"], wall["plain tokenizer loop"])]
    print(
        f"token store: {statistics.median(ratios):.2f}x the plain loop (wall, per repeat {min(ratios):.2f}-{max(ratios):.2f}); goal >= 1.5x"
    )


def memory(work: Path) -> None:
    """The probe at 1x, 4x and 16x (0.6 to 10 MB of text), then at 32x and 320x (20 MB and 200 MB), each in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results: dict[tuple[int, bool], dict] = {}
    runs = [(scale, False) for scale in (*SCALES, *LARGE_SCALES)] + [(scale, True) for scale in SCALES]
    for scale, in_ram in runs:
        directory = work / f"memory-{scale}-{in_ram}"
        directory.mkdir()
        command = [sys.executable, "-m", "tests.memory_probe", str(directory), str(scale)] + (["--in-ram"] if in_ram else [])
        out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
        results[scale, in_ram] = json.loads(out.strip().splitlines()[-1])
        shutil.rmtree(directory)
    print("\nPeak memory (MB), one fresh process per size, the corpus's datasets cache built in it (a first build);")
    print("sampling takes 80% of the corpus's tokens. Anonymous: RssAnon polled every millisecond; peak RSS also counts")
    print("the pages of memory-mapped files read (the corpus's Arrow file, the token files).")
    print(
        "| corpus | MB of text | tokens sampled | sampling, peak anonymous | sampling, peak RSS "
        "| training step, rows memory-mapped | training step, rows in RAM |"
    )
    print("|---|---|---|---|---|---|---|")
    for scale in (*SCALES, *LARGE_SCALES):
        mapped, ram = results[scale, False], results.get((scale, True))
        print(
            f"| {scale}x | {mapped['corpus_mb']:.0f} | {mapped['tokens']:,} | {mapped['sampling_peak_anonymous_mb']:.0f} "
            f"| {mapped['sampling_peak_mb']:.0f} | {mapped['training_step_peak_mb']:.0f} "
            f"| {ram['training_step_peak_mb'] if ram else float('nan'):.0f} |"
        )
    small, large = (results[scale, False] for scale in LARGE_SCALES)
    growth = large["sampling_peak_anonymous_mb"] / small["sampling_peak_anonymous_mb"]
    print(
        f"sampling's peak anonymous memory at {large['corpus_mb']:.0f} MB: {growth:.3f}x the one at {small['corpus_mb']:.0f} MB "
        f"(goal within 10%: {'met' if growth <= 1.1 else 'not met'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20_000, help="documents of ~1000 characters for the throughput run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true", help="throughput only (the 200 MB memory case alone takes minutes)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    try:
        throughput(WORK, args.documents, args.repeats)
        if not args.skip_memory:
            memory(WORK)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
