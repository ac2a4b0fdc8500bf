"""Corpora and seeded token sampling: the text every later step measures or trains on.

A corpus per language is a local file (.txt with one document per line, .jsonl/.json or
.parquet), a directory of such files, or a `datasets` hub dataset. All of them load through
`datasets`, so large corpora stay memory-mapped: sampling tokenizes only the documents it
takes.

The train/heldout split is per document, decided by a seeded hash of the document's id
(or, without ids, its row number). It therefore does not depend on which other languages,
how many tokens or which split a caller asks for: held-out documents never reach training
as long as the same seed is used.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Literal

import datasets
import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from .errors import LayerMoEError

Split = Literal["train", "heldout"]

# ISO 639-1 (2 letters) or 639-3 (3 letters), then optionally a script (Latn) and/or a
# region (BR, 419), joined by "_" or "-": en, zh_CN, pt-BR, sr-Latn, zh_Hans_CN.
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}([_-][A-Z][a-z]{3})?([_-]([A-Z]{2}|[0-9]{3}))?")
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_TOKENIZE_CHUNK = 256  # documents tokenized per call: bounds memory, keeps the fast tokenizer busy


def validate_language_code(code: str) -> str:
    if not isinstance(code, str) or not _LANGUAGE_CODE.fullmatch(code):
        raise LayerMoEError(
            f"bad language code {code!r}: use an ISO 639-1/639-3 code, optionally with a script or region "
            "suffix, e.g. 'en', 'zh', 'zh_CN', 'pt-BR', 'sr-Latn'"
        )
    return code


LanguageCode = Annotated[str, AfterValidator(validate_language_code)]


class CorpusSpec(BaseModel):
    """Where one language's documents come from: exactly one of `path` or `hub_name`.

    Data without the `id_field` column simply has no ids.
    """

    model_config = ConfigDict(extra="forbid")

    path: Path | None = Field(None, description="a local .txt (one document per line), .jsonl/.json or .parquet file, or a folder of one format; empty: use hub_name")
    hub_name: str | None = Field(None, description="a datasets hub dataset, e.g. uonlp/CulturaX (needs hub access); empty: use path")
    hub_config: str | None = Field(None, description="the hub dataset's config, e.g. el; empty: its default")
    hub_split: str = Field("train", description="the hub dataset's split")
    text_field: str = Field("text", description="the text column of json/parquet/hub data")
    id_field: str | None = Field("id", description="a column of document ids shared across languages (parallel corpora); empty: no ids")

    @model_validator(mode="after")
    def _one_source(self) -> CorpusSpec:
        if (self.path is None) == (self.hub_name is None):
            raise LayerMoEError(
                f"a corpus needs exactly one source, got path={self.path!r} and hub_name={self.hub_name!r}: "
                "give a local file/directory as `path` or a datasets hub name as `hub_name`"
            )
        return self


def _builder_and_files(path: Path) -> tuple[str, list[str]]:
    if not path.exists():
        raise LayerMoEError(f"corpus path {str(path)!r} does not exist; point `path` at a file or directory of text")
    files = sorted(p for p in path.iterdir() if p.suffix in _BUILDERS) if path.is_dir() else [path]
    if not files:
        raise LayerMoEError(f"corpus directory {str(path)!r} holds no {'/'.join(_BUILDERS)} files; add some or fix `path`")
    builders = {_BUILDERS.get(p.suffix) for p in files}
    if None in builders:
        raise LayerMoEError(f"corpus file {str(path)!r} has an unsupported suffix; use one of {', '.join(_BUILDERS)}")
    if len(builders) > 1:
        raise LayerMoEError(
            f"corpus directory {str(path)!r} mixes formats {sorted(builders)}; keep one format per directory"
        )
    if all(p.stat().st_size == 0 for p in files):
        raise LayerMoEError(f"corpus {str(path)!r} is empty; give it at least one document")
    return builders.pop(), [str(p) for p in files]


def check_corpus_source(spec: CorpusSpec) -> None:
    """A local corpus exists, has one supported format and is not empty; a hub corpus is checked when it loads."""
    if spec.path is not None:
        _builder_and_files(spec.path)


def load_documents(spec: CorpusSpec) -> datasets.Dataset:
    """The corpus as a `datasets.Dataset` with a "text" column and, when it has ids, an "id" column."""
    if spec.hub_name is not None:
        dataset = datasets.load_dataset(spec.hub_name, spec.hub_config, split=spec.hub_split)
        source, text_field = spec.hub_name, spec.text_field
    else:
        builder, files = _builder_and_files(spec.path)
        dataset = datasets.load_dataset(builder, data_files=files, split="train")
        source, text_field = str(spec.path), "text" if builder == "text" else spec.text_field
    if text_field not in dataset.column_names:
        raise LayerMoEError(
            f"corpus {source!r} has no text field {text_field!r} (columns: {dataset.column_names}); set `text_field`"
        )
    if len(dataset) == 0:
        raise LayerMoEError(f"corpus {source!r} is empty; give it at least one document")
    columns = {text_field: "text"}
    if spec.id_field is not None and spec.id_field in dataset.column_names:
        columns[spec.id_field] = "id"
    dataset = dataset.select_columns(list(columns))
    return dataset.rename_columns({k: v for k, v in columns.items() if k != v})


def _in_heldout(key: str, seed: int, heldout_fraction: float) -> bool:
    """A seeded, uniform-looking coin per document, stable across calls and languages."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < heldout_fraction


def _seeded_order(keys: Sequence[str], split: Split, seed: int, heldout_fraction: float) -> list[int]:
    """Positions in `keys` of the documents in `split`, shuffled with `seed`."""
    want_heldout = split == "heldout"
    positions = [i for i, key in enumerate(keys) if _in_heldout(key, seed, heldout_fraction) == want_heldout]
    return [positions[i] for i in np.random.default_rng(seed).permutation(len(positions))]


def _document_tokens(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each document's tokens followed by EOS; empty documents give []."""
    kept = [(i, t) for i, t in enumerate(texts) if t and t.strip()]
    encoded = tokenizer([t for _, t in kept], add_special_tokens=False)["input_ids"] if kept else []
    out: list[list[int]] = [[] for _ in texts]
    for (i, _), ids in zip(kept, encoded):
        out[i] = list(ids) + [tokenizer.eos_token_id]
    return out


def _too_few(language: str, where: str, available: int, needed: int) -> LayerMoEError:
    return LayerMoEError(
        f"language {language!r}: {where} has {available} tokens but {needed} are needed; "
        "add text to the corpus, or lower num_tokens (or heldout_fraction, for the train split)"
    )


def _pack(tokens: list[int], seq_len: int) -> torch.Tensor:
    rows = len(tokens) // seq_len
    return torch.tensor(tokens[: rows * seq_len], dtype=torch.long).view(rows, seq_len)


def _sample_independent(
    documents: datasets.Dataset,
    language: str,
    tokenizer: PreTrainedTokenizerBase,
    needed: int,
    split: Split,
    seed: int,
    heldout_fraction: float,
) -> list[int]:
    """Exactly `needed` tokens of the language's `split`, documents in seeded order."""
    keys = [str(k) for k in documents["id"]] if "id" in documents.column_names else [str(r) for r in range(len(documents))]
    order = _seeded_order(keys, split, seed, heldout_fraction)
    tokens: list[int] = []
    for start in range(0, len(order), _TOKENIZE_CHUNK):
        for ids in _document_tokens(documents[order[start : start + _TOKENIZE_CHUNK]]["text"], tokenizer):
            tokens.extend(ids)
        if len(tokens) >= needed:
            return tokens[:needed]
    raise _too_few(language, f"its {split} split", len(tokens), needed)


def _sample_aligned(
    documents: dict[str, datasets.Dataset],
    tokenizer: PreTrainedTokenizerBase,
    needed: int,
    split: Split,
    seed: int,
    heldout_fraction: float,
) -> dict[str, list[int]]:
    """Token streams that read the same shared ids in the same order, until every language has `needed`."""
    row_of = {lang: {str(k): row for row, k in enumerate(docs["id"])} for lang, docs in documents.items()}
    shared = sorted(set.intersection(*(set(rows) for rows in row_of.values())))
    order = [shared[i] for i in _seeded_order(shared, split, seed, heldout_fraction)]
    tokens: dict[str, list[int]] = {lang: [] for lang in documents}
    for start in range(0, len(order), _TOKENIZE_CHUNK):
        chunk = order[start : start + _TOKENIZE_CHUNK]
        chunk_tokens = {
            lang: _document_tokens(docs[[row_of[lang][i] for i in chunk]]["text"], tokenizer) for lang, docs in documents.items()
        }
        for position in range(len(chunk)):  # document by document, so the shared prefix is as short as possible
            for lang, stream in tokens.items():
                stream.extend(chunk_tokens[lang][position])
            if min(map(len, tokens.values())) >= needed:
                return tokens
    lang = min(tokens, key=lambda lang: len(tokens[lang]))
    where = f"the {split} split of the {len(shared)} document ids shared by {sorted(documents)}"
    raise _too_few(lang, where, len(tokens[lang]), needed)


def sample_sequences(
    corpora: Mapping[str, CorpusSpec],
    tokenizer: PreTrainedTokenizerBase,
    num_tokens: int,
    seq_len: int,
    seed: int,
    split: Split = "train",
    heldout_fraction: float = 0.1,
    languages: Sequence[str] | None = None,
    parallel: bool | Literal["auto"] = False,
) -> dict[str, torch.Tensor]:
    """Per language, a fixed seeded set of packed token rows of exactly `seq_len` tokens.

    Documents of `split` are shuffled with `seed`, tokenized, joined with EOS and cut into
    num_tokens // seq_len rows. `languages` (default: all of `corpora`) picks what to sample.

    parallel=True reads the same document ids (the intersection over languages) in the same
    seeded order in every language, so similarity compares translations of the same text.
    It takes the shortest id prefix that gives every language num_tokens, so a language
    whose translations are longer gets more rows: shape (rows_l, seq_len), rows_l >=
    num_tokens // seq_len, and the last partial row is dropped. parallel="auto" does that
    when every corpus has ids and there are two languages or more (what similarity wants);
    training should keep the default, False, which uses each corpus in full.
    """
    for code in corpora:
        validate_language_code(code)
    languages = list(corpora) if languages is None else list(languages)
    missing = [lang for lang in languages if lang not in corpora]
    if missing or not languages:
        raise LayerMoEError(
            f"no corpus for languages {missing or '[]'}; corpora exist for {sorted(corpora)}: add one per language"
        )
    if seq_len < 1 or num_tokens < seq_len:
        raise LayerMoEError(f"num_tokens={num_tokens} must be at least seq_len={seq_len} >= 1, to fill one sequence")
    if split not in ("train", "heldout"):
        raise LayerMoEError(f"unknown split {split!r}; use 'train' or 'heldout'")
    if not 0 <= heldout_fraction < 1:
        raise LayerMoEError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
    if tokenizer.eos_token_id is None:
        raise LayerMoEError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")

    needed = (num_tokens // seq_len) * seq_len
    documents = {lang: load_documents(corpora[lang]) for lang in languages}
    without_ids = [lang for lang, docs in documents.items() if "id" not in docs.column_names]
    if parallel == "auto":
        parallel = not without_ids and len(languages) > 1
    if not parallel:
        return {
            lang: _pack(_sample_independent(docs, lang, tokenizer, needed, split, seed, heldout_fraction), seq_len)
            for lang, docs in documents.items()
        }
    if without_ids:
        raise LayerMoEError(
            f"parallel sampling needs document ids, but the corpora of {without_ids} have no id column; "
            "set `id_field` to the column the languages share, or sample with parallel=False"
        )
    aligned = _sample_aligned(documents, tokenizer, needed, split, seed, heldout_fraction)
    return {lang: _pack(tokens, seq_len) for lang, tokens in aligned.items()}


def save_sequences(sequences: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write sampled rows to a safetensors file (one tensor per language), so steps pass a path, not tensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({lang: rows.contiguous() for lang, rows in sequences.items()}, str(path))
    return path


def load_sequences(path: str | Path) -> dict[str, torch.Tensor]:
    """The {language: (rows, seq_len) LongTensor} that `save_sequences` wrote."""
    return load_file(str(path))
