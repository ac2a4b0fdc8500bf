"""The token store: tokenized once, keyed by corpus, tokenizer and split rule, read by memory map, flat in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import AddedToken

from layermoe_core import expand
from layermoe_core.data.corpus import (
    CorpusSpec,
    combine_samples,
    corpus_fingerprint,
    load_sequences,
    open_sequences,
    open_store,
    sample_sequences,
    sample_token_rows,
)
from layermoe_core.data.token_store import SplitRule, TokenRows, store_key, tokenizer_fingerprint
from layermoe_core.errors import LayerMoEError
from layermoe_core.training.trainer import MetricsCallback, Stage1Settings, train_stage1

from .conftest import tiny_model
from .test_data import DOCS, complete_documents, write_jsonl
from .test_training import StopAfterStep
from .tiny_tokenizer import tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "el.txt"
    path.write_text("\n".join(DOCS) + "\n")
    return CorpusSpec(path=path)


def index_of(store_dir: Path) -> dict:
    (store,) = store_dir.iterdir()
    return json.loads((store / "index.json").read_text())


def test_later_steps_and_rounds_read_the_tokens_already_stored(corpus, tokenizer, tmp_path):
    store = tmp_path / "store"
    sample = lambda name, num_tokens, split="train": sample_token_rows(  # noqa: E731
        {"el": corpus}, tokenizer, num_tokens, 20, seed=0, store_dir=store, out_path=tmp_path / f"{name}.json", split=split
    )
    stage2 = load_sequences(sample("round1-stage2", 400))
    read_after_round1 = index_of(store)["consumed"]
    stage1 = load_sequences(sample("round2-stage1", 200))
    heldout = load_sequences(sample("round2-heldout", 100, split="heldout"))

    assert len(list(store.iterdir())) == 1, "one corpus, one tokenizer, one split rule: one store"
    assert index_of(store)["consumed"] == read_after_round1, "a budget the store already holds tokenizes nothing"
    assert torch.equal(stage1["el"], stage2["el"][:10])  # a budget is a prefix of the split's tokens
    fresh = sample_sequences({"el": corpus}, tokenizer, 100, 20, seed=0, split="heldout")
    assert torch.equal(heldout["el"], fresh["el"]), "reading a grown store gives what a fresh one gives"


def test_the_store_grows_only_as_far_as_the_budget_needs(tmp_path, tokenizer):
    path = tmp_path / "big.txt"
    path.write_text("".join(f"document {i} of a corpus much larger than the budget\n" for i in range(5000)))
    store = tmp_path / "store"
    sample_token_rows({"el": CorpusSpec(path=path)}, tokenizer, 500, 50, seed=0, store_dir=store, out_path=tmp_path / "a.json")
    assert index_of(store)["consumed"] < 5000 and not index_of(store)["exhausted"]
    rows = sample_token_rows({"el": CorpusSpec(path=path)}, tokenizer, 200_000, 50, seed=0, store_dir=store, out_path=tmp_path / "b.json")
    assert open_sequences(rows)["el"].shape == (4000, 50)


def test_the_store_key_changes_with_the_corpus_the_tokenizer_and_the_split_rule(corpus, tokenizer, tmp_path):
    rule = SplitRule(seed=0, heldout_fraction=0.1)
    key = store_key(corpus_fingerprint(corpus), tokenizer_fingerprint(tokenizer), rule)
    assert key == store_key(corpus_fingerprint(corpus), tokenizer_fingerprint(tiny_tokenizer()), rule)

    other_tokenizer = tiny_tokenizer()
    other_tokenizer.add_tokens([AddedToken("hello", single_word=True)])
    edited = tmp_path / "edited.txt"
    edited.write_text(corpus.path.read_text().replace("reader", "writer!"))
    variants = {
        "corpus": store_key(corpus_fingerprint(CorpusSpec(path=edited)), tokenizer_fingerprint(tokenizer), rule),
        "text field": store_key(corpus_fingerprint(CorpusSpec(path=corpus.path, id_field=None)), tokenizer_fingerprint(tokenizer), rule),
        "tokenizer": store_key(corpus_fingerprint(corpus), tokenizer_fingerprint(other_tokenizer), rule),
        "seed": store_key(corpus_fingerprint(corpus), tokenizer_fingerprint(tokenizer), SplitRule(1, 0.1)),
        "heldout fraction": store_key(corpus_fingerprint(corpus), tokenizer_fingerprint(tokenizer), SplitRule(0, 0.2)),
    }
    assert all(variant != key for variant in variants.values()) and len(set(variants.values())) == len(variants)

    before = corpus_fingerprint(corpus)
    corpus.path.write_text(corpus.path.read_text() + "one more document\n")
    assert corpus_fingerprint(corpus) != before, "editing the corpus file changes its fingerprint"
    for name, (tok, seed) in {"a": (tokenizer, 0), "b": (other_tokenizer, 0), "c": (tokenizer, 1)}.items():
        sample_token_rows({"el": corpus}, tok, 100, 20, seed=seed, store_dir=tmp_path / "store", out_path=tmp_path / f"{name}.json")
    assert len(list((tmp_path / "store").iterdir())) == 3


def test_training_rows_are_read_from_the_memory_map_of_the_store(corpus, tokenizer, tmp_path):
    path = sample_token_rows({"el": corpus}, tokenizer, 400, 20, seed=0, store_dir=tmp_path / "store", out_path=tmp_path / "s.json")
    rows = open_sequences(path)["el"]
    assert isinstance(rows, TokenRows) and Path(rows.file).parent.parent == tmp_path / "store"
    assert rows.dtype.name == "uint16" and rows.shape == (20, 20)
    assert torch.equal(rows[3], load_sequences(path)["el"][3]) and rows[3].dtype == torch.long
    assert all(doc in DOCS for doc in complete_documents(rows.to_tensor(), tokenizer))


def test_a_stage_resumed_from_the_memory_map_ends_bit_identical(corpus, tokenizer, tmp_path):
    path = sample_token_rows({"el": corpus}, tokenizer, 640, 16, seed=0, store_dir=tmp_path / "store", out_path=tmp_path / "s.json")
    settings = Stage1Settings(learning_rate=1e-2, max_steps=4, per_device_batch_size=4, save_steps=2, logging_steps=2)
    fresh_model = lambda: expand(tiny_model(), [2, 1, 1], ["en"], ["el"])  # noqa: E731
    uninterrupted = train_stage1(fresh_model(), open_sequences(path), settings, tmp_path / "uninterrupted")
    with pytest.raises(KeyboardInterrupt):
        train_stage1(fresh_model(), open_sequences(path), settings, tmp_path / "interrupted", [StopAfterStep(3)])
    steps = []
    resumed = train_stage1(
        fresh_model(),
        open_sequences(path),
        settings,
        tmp_path / "interrupted",
        [MetricsCallback(lambda logs, step, max_steps: steps.append(step))],
    )
    assert resumed.resumed_from.name == "checkpoint-2" and min(steps) > 2
    before, after = (load_file(r.model_dir / "model.safetensors") for r in (uninterrupted, resumed))
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_a_hub_corpus_streams_only_until_the_budget_is_met(tmp_path, tokenizer):
    """A local dataset directory stands in for the hub (no network in CI): `load_dataset(name, streaming=True)`."""
    dataset = tmp_path / "hub-dataset"
    dataset.mkdir()
    for part in range(4):
        write_jsonl(dataset / f"part-{part}.jsonl", [{"id": f"{part}-{i}", "content": f"streamed {part} {i} hello"} for i in range(2000)])
    spec = CorpusSpec(hub_name=str(dataset), text_field="content")
    store = tmp_path / "store"
    train = sample_sequences({"tr": spec}, tokenizer, 600, 30, seed=0, store_dir=store)["tr"]
    assert index_of(store)["consumed"] < 8000 and not index_of(store)["exhausted"]
    assert torch.equal(train, sample_sequences({"tr": spec}, tokenizer, 600, 30, seed=0)["tr"]), "seeded"
    heldout = sample_sequences({"tr": spec}, tokenizer, 600, 30, seed=0, split="heldout", store_dir=store)["tr"]
    documents = {split: set(complete_documents(rows, tokenizer)) for split, rows in (("train", train), ("heldout", heldout))}
    assert documents["train"] and documents["heldout"] and not documents["train"] & documents["heldout"]


def test_a_store_write_cut_off_midway_is_dropped_on_reopening(corpus, tokenizer, tmp_path):
    store = tmp_path / "store"
    first = sample_sequences({"el": corpus}, tokenizer, 200, 20, seed=0, store_dir=store)
    (directory,) = store.iterdir()
    with open(directory / "train.bin", "ab") as f:
        f.write(b"\xff\xff" * 37)  # a writer died after appending tokens, before recording them
    again = sample_sequences({"el": corpus}, tokenizer, 1200, 20, seed=0, store_dir=store)
    assert torch.equal(again["el"][:10], first["el"]) and int(again["el"].max()) < len(tokenizer)


def test_peak_memory_of_sampling_and_a_training_step_stays_flat_as_the_corpus_grows(tmp_path):
    """1x, 4x and 16x the corpus, each sampled (80% of its tokens) and trained on in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    processes = []
    for scale in (1, 4, 16):
        (tmp_path / str(scale)).mkdir()
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "tests.memory_probe", str(tmp_path / str(scale)), str(scale)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = {}
    for process in processes:
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        results[result["scale"]] = result
    one = results[1]
    # Tokens held in RAM (a Python list and a LongTensor, 16 bytes a token) would add more than 20% at 16x.
    assert 16 * results[16]["tokens"] > 0.2 * one["sampling_peak_mb"] * 2**20
    for scale in (4, 16):
        for measure in ("sampling_peak_mb", "training_step_peak_mb"):
            assert results[scale][measure] <= 1.2 * one[measure], (measure, results)


def test_parallel_sampling_stays_aligned_past_a_document_empty_in_one_language(tmp_path, tokenizer):
    en = write_jsonl(tmp_path / "en.jsonl", [{"id": i, "text": f"en {i} hello"} for i in range(40)])
    el = write_jsonl(tmp_path / "el.jsonl", [{"id": i, "text": "" if i % 5 == 0 else f"el {i} hello there"} for i in range(40)])
    sample = sample_sequences({"en": CorpusSpec(path=en), "el": CorpusSpec(path=el)}, tokenizer, 120, 12, seed=0, parallel=True)
    ids = {lang: [int(doc.split()[1]) for doc in complete_documents(rows, tokenizer)] for lang, rows in sample.items()}
    assert any(i % 5 == 0 for i in ids["en"]), "the sample passes documents empty in el"
    assert [i for i in ids["en"] if i % 5][: len(ids["el"]) - 1] == ids["el"][:-1]


def test_samples_of_different_languages_combine_into_one_without_copying(corpus, tokenizer, tmp_path):
    sample = lambda lang, name, num_tokens: sample_token_rows(  # noqa: E731
        {lang: corpus}, tokenizer, num_tokens, 20, seed=0, store_dir=tmp_path / "store", out_path=tmp_path / f"{name}.json"
    )
    main, exposure = sample("el", "main", 400), sample("tr", "exposure", 100)
    combined = open_sequences(combine_samples([main, exposure], tmp_path / "both.json"))
    assert {lang: rows.num_rows for lang, rows in combined.items()} == {"el": 20, "tr": 5}
    assert combined["el"].file == open_sequences(main)["el"].file, "the combined sample points at the same store rows"
    with pytest.raises(LayerMoEError, match="'el' is in two samples"):
        combine_samples([main, main], tmp_path / "twice.json")


def _bpe_tokenizer(directory: Path, split_special_tokens: bool = False):
    """The demo's byte-level BPE, with a truncation left switched on in its backend, as a loaded tokenizer.json may have."""
    from demo.base import train_demo_tokenizer

    texts = [f"λόγος {i} hello reader, token store {i * 7} of the corpus" for i in range(300)]
    tokenizer = train_demo_tokenizer(texts, 400, directory)
    tokenizer.split_special_tokens = split_special_tokens
    tokenizer.backend_tokenizer.enable_truncation(8)
    return tokenizer


@pytest.mark.parametrize("kind", ["characters", "bpe", "bpe-split-special"])
def test_stored_tokens_are_byte_identical_to_the_tokenizer_called_one_document_at_a_time(kind, tmp_path, monkeypatch):
    """The batched, multi-core encoding stores what `tokenizer(text, add_special_tokens=False)` gives each document."""
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    tokenizer = tiny_tokenizer() if kind == "characters" else _bpe_tokenizer(tmp_path / "bpe", kind == "bpe-split-special")
    eos = tokenizer.eos_token
    documents = [f"document {i}: hello reader {'λόγος ' * (i % 4)}{eos if i % 9 == 0 else ''} and more" for i in range(1500)]
    documents[3] = ""  # an empty document stores nothing
    documents[5] = "a long document " * 20_000  # longer than one tokenizer call's text
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(documents) + "\n")
    spec = CorpusSpec(path=path)
    with open_store(spec, tokenizer, SplitRule(seed=0, heldout_fraction=0.1), tmp_path / "store") as store:
        store.ensure("train", 2**62)
        files = {split: (store.file(split), store.file(split, "keys.txt"), store.index["dtype"]) for split in ("train", "heldout")}
    assert os.environ["TOKENIZERS_PARALLELISM"] == "false", "the setting is put back after each batch"
    text_of = {str(row): text for row, text in enumerate(documents)}
    for split, (tokens_file, keys_file, dtype) in files.items():
        expected = [
            token
            for key in keys_file.read_text().splitlines()
            if text_of[key]
            for token in tokenizer(text_of[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ]
        assert len(expected) > 1000, split
        assert tokens_file.read_bytes() == np.array(expected, dtype=dtype).tobytes(), split
