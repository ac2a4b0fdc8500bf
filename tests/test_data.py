"""Corpora and seeded sampling: reproducible, split-disjoint, format-independent, with clear errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from layermoe_core.data.corpus import CorpusSpec, load_sequences, sample_sequences
from layermoe_core.errors import LayerMoEError

from .conftest import save_sequences
from .tiny_tokenizer import tiny_tokenizer

DOCS = [f"document {i} says hello to the reader" for i in range(60)]  # about 35 tokens each


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def txt_corpus(tmp_path):
    path = tmp_path / "en.txt"
    path.write_text("\n".join(DOCS) + "\n")
    return CorpusSpec(path=path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def complete_documents(rows: torch.Tensor, tokenizer) -> list[str]:
    """The documents packed into `rows`, in order, without the last one (cut by the row end)."""
    text = "".join(tokenizer.convert_ids_to_tokens(rows.reshape(-1).tolist()))
    return text.split(tokenizer.eos_token)[:-1]


def test_rows_are_documents_joined_by_eos_in_the_requested_shape(txt_corpus, tokenizer):
    rows = sample_sequences({"en": txt_corpus}, tokenizer, num_tokens=410, seq_len=20, seed=0)["en"]
    assert rows.shape == (20, 20) and rows.dtype == torch.long  # 410 // 20 rows of exactly 20 tokens
    documents = complete_documents(rows, tokenizer)
    assert len(documents) >= 10 and all(doc in DOCS for doc in documents)


def test_sampling_is_reproducible_and_depends_on_the_seed(txt_corpus, tokenizer):
    corpora = {"en": txt_corpus}
    first = sample_sequences(corpora, tokenizer, num_tokens=200, seq_len=20, seed=1)["en"]
    again = sample_sequences(corpora, tokenizer, num_tokens=200, seq_len=20, seed=1)["en"]
    other = sample_sequences(corpora, tokenizer, num_tokens=200, seq_len=20, seed=2)["en"]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_train_and_heldout_documents_are_disjoint(txt_corpus, tokenizer):
    sample = {
        split: sample_sequences({"en": txt_corpus}, tokenizer, 400, 20, seed=0, split=split, heldout_fraction=0.5)["en"]
        for split in ("train", "heldout")
    }
    train, heldout = (set(complete_documents(sample[s], tokenizer)) for s in ("train", "heldout"))
    assert train and heldout and not train & heldout


def test_every_format_yields_the_same_sample_of_the_same_documents(tmp_path, txt_corpus, tokenizer):
    jsonl = write_jsonl(tmp_path / "en.jsonl", [{"content": doc} for doc in DOCS])
    parquet = tmp_path / "en.parquet"
    pd.DataFrame({"content": DOCS}).to_parquet(parquet)
    directory = tmp_path / "en_dir"
    directory.mkdir()
    (directory / "part-0.txt").write_text("\n".join(DOCS[:25]) + "\n")
    (directory / "part-1.txt").write_text("\n".join(DOCS[25:]) + "\n")
    specs = [
        txt_corpus,
        CorpusSpec(path=jsonl, text_field="content"),
        CorpusSpec(path=parquet, text_field="content"),
        CorpusSpec(path=directory),
    ]
    samples = [sample_sequences({"en": spec}, tokenizer, 300, 30, seed=4)["en"] for spec in specs]
    for sample in samples[1:]:
        assert torch.equal(sample, samples[0])


def test_saved_sequences_load_back_identical(txt_corpus, tokenizer, tmp_path):
    sequences = sample_sequences({"en": txt_corpus, "pt-BR": txt_corpus}, tokenizer, 100, 20, seed=0)
    loaded = load_sequences(save_sequences(sequences, tmp_path / "tokens" / "train.safetensors"))
    assert loaded.keys() == sequences.keys() and all(torch.equal(loaded[k], sequences[k]) for k in sequences)


def test_too_small_corpus_names_language_tokens_and_fix(tmp_path, tokenizer):
    path = tmp_path / "el.txt"
    path.write_text("abc\nde\n")  # 4 + 3 tokens with EOS
    with pytest.raises(LayerMoEError, match=r"'el'.* 7 tokens but 100 are needed.*lower num_tokens"):
        sample_sequences({"el": CorpusSpec(path=path)}, tokenizer, 100, 10, seed=0, heldout_fraction=0)


def test_language_without_a_corpus_is_rejected(txt_corpus, tokenizer):
    with pytest.raises(LayerMoEError, match=r"no corpus for languages \['hu'\]; corpora exist for \['en'\]"):
        sample_sequences({"en": txt_corpus}, tokenizer, 100, 10, seed=0, languages=["en", "hu"])


def test_empty_corpus_is_rejected(tmp_path, tokenizer):
    path = tmp_path / "tr.txt"
    path.touch()
    with pytest.raises(LayerMoEError, match="is empty"):
        sample_sequences({"tr": CorpusSpec(path=path)}, tokenizer, 100, 10, seed=0)


@pytest.mark.parametrize("code", ["english", "EN", "en_", "e", "pt-br1"])
def test_bad_language_code_is_rejected(code, txt_corpus, tokenizer):
    with pytest.raises(LayerMoEError, match=f"bad language code '{code}'"):
        sample_sequences({code: txt_corpus}, tokenizer, 100, 10, seed=0)


@pytest.mark.parametrize("code", ["en", "zh", "yue", "zh_CN", "pt-BR", "sr-Latn", "es-419"])
def test_iso_codes_with_region_or_script_are_accepted(code, txt_corpus, tokenizer):
    assert code in sample_sequences({code: txt_corpus}, tokenizer, 40, 10, seed=0)


def test_corpus_needs_exactly_one_source(tmp_path):
    with pytest.raises(ValidationError, match="exactly one source"):
        CorpusSpec()
    with pytest.raises(ValidationError, match="exactly one source"):
        CorpusSpec(path=tmp_path, hub_name="uonlp/CulturaX")
    with pytest.raises(ValidationError, match="textfield"):
        CorpusSpec(path=tmp_path, textfield="content")


@pytest.fixture
def parallel_corpora(tmp_path):
    """en has ids 0-49, el has ids 10-59: only 10-49 are shared. el's sentences are longer."""
    en = write_jsonl(tmp_path / "en.jsonl", [{"id": i, "text": f"en {i} hello"} for i in range(50)])
    el = write_jsonl(tmp_path / "el.jsonl", [{"id": i, "text": f"el {i} hello there, friend"} for i in range(10, 60)])
    return {"en": CorpusSpec(path=en), "el": CorpusSpec(path=el)}


def sentence_ids(rows: torch.Tensor, tokenizer) -> list[int]:
    return [int(doc.split()[1]) for doc in complete_documents(rows, tokenizer)]


def test_parallel_sampling_reads_the_same_shared_ids_in_every_language(parallel_corpora, tokenizer):
    sample = sample_sequences(parallel_corpora, tokenizer, 120, 12, seed=0, parallel=True)
    en, el = sentence_ids(sample["en"], tokenizer), sentence_ids(sample["el"], tokenizer)
    assert sample["en"].shape[0] >= 10 and sample["el"].shape[0] > sample["en"].shape[0]  # longer translations, more rows
    assert all(10 <= i < 50 for i in en + el)
    shorter, longer = sorted([en, el], key=len)
    assert shorter == longer[: len(shorter)] and len(longer) - len(shorter) <= 1  # same ids, same order, up to the cut row
    assert en != sorted(en)  # seeded order, not file order


def test_parallel_auto_uses_ids_when_every_corpus_has_them(parallel_corpora, tokenizer):
    auto = sample_sequences(parallel_corpora, tokenizer, 120, 12, seed=0, parallel="auto")
    explicit = sample_sequences(parallel_corpora, tokenizer, 120, 12, seed=0, parallel=True)
    assert all(torch.equal(auto[lang], explicit[lang]) for lang in explicit)


def test_parallel_sampling_without_ids_is_rejected(parallel_corpora, txt_corpus, tokenizer):
    corpora = {"el": parallel_corpora["el"], "de": txt_corpus}
    with pytest.raises(LayerMoEError, match=r"corpora of \['de'\] have no id column"):
        sample_sequences(corpora, tokenizer, 60, 12, seed=0, parallel=True)
    assert sample_sequences(corpora, tokenizer, 60, 12, seed=0, parallel="auto")["de"].shape == (5, 12)


def test_split_of_a_document_does_not_depend_on_the_languages_sampled_with_it(parallel_corpora, tokenizer):
    aligned = sample_sequences(parallel_corpora, tokenizer, 120, 12, seed=0, heldout_fraction=0.3, parallel=True)
    heldout_alone = sample_sequences(parallel_corpora, tokenizer, 60, 12, seed=0, split="heldout", heldout_fraction=0.3)
    held = set(sentence_ids(heldout_alone["el"], tokenizer)) | set(sentence_ids(heldout_alone["en"], tokenizer))
    assert held and not held & set(sentence_ids(aligned["el"], tokenizer))
