"""Corpora and seeded token sampling: the text every later step measures or trains on.

A corpus per language is a local file (.txt with one document per line, .jsonl/.json or
.parquet), a directory of such files, or a `datasets` hub dataset. Local corpora load
through `datasets` (memory-mapped Arrow); hub corpora stream (`streaming=True`) and are read
only as far as the token budgets need.

Sampling reads from the token store (`token_store`): each corpus is tokenized once into
memory-mapped token files keyed by corpus, tokenizer and split rule, and every step of every
round takes its rows from there. The train/heldout split is per document, decided by a
seeded hash of the document's id (or, without ids, its row number). It therefore does not
depend on which other languages, how many tokens or which split a caller asks for:
held-out documents never reach training as long as the same seed is used.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import datasets
import numpy as np
import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerBase

from ..atomic_file import write_atomically
from ..errors import LayerMoEError
from .token_store import TOKENIZE_BATCH, Split, SplitRule, TokenRows, TokenStore

# ISO 639-1 (2 letters) or 639-3 (3 letters), then optionally a script (Latn) and/or a
# region (BR, 419), joined by "_" or "-": en, zh_CN, pt-BR, sr-Latn, zh_Hans_CN.
_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}([_-][A-Z][a-z]{3})?([_-]([A-Z]{2}|[0-9]{3}))?")
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SAMPLE_BYTES = 1 << 16  # of every local corpus file, checked before anything reads it (see _check_readable)
_KEY_BATCH = 65_536  # document ids read per batch when ordering a corpus
_SHUFFLE_BUFFER = 10_000  # documents in the seeded shuffle buffer of a streamed hub corpus
SAMPLE_FORMAT = "layermoe-token-sample/1"


def validate_language_code(code: str) -> str:
    if not isinstance(code, str) or not _LANGUAGE_CODE.fullmatch(code):
        raise LayerMoEError(
            f"bad language code {code!r}: use an ISO 639-1/639-3 code, optionally with a script or region "
            "suffix, e.g. 'en', 'zh', 'zh_CN', 'pt-BR', 'sr-Latn'"
        )
    return code


LanguageCode = Annotated[str, AfterValidator(validate_language_code)]


def check_old_new(old: Iterable[str], new: Iterable[str]) -> None:
    """A language is old or new in a round, never both."""
    both = sorted(set(old) & set(new))
    if both:
        raise LayerMoEError(
            f"languages {both} are both old and new; each language is one or the other (a round adds languages its parent lacks)"
        )


class CorpusSpec(BaseModel):
    """Where one language's documents come from: a local file or folder (`path`) or a datasets hub dataset
    (`hub_name`), exactly one of them. Data without the `id_field` column simply has no ids."""

    model_config = ConfigDict(extra="forbid", title="Corpus")

    path: Path | None = Field(
        None,
        title="Local path",
        description="a local .txt (one document per line), .jsonl/.json or .parquet file, or a folder of one format; empty: use hub_name",
    )
    hub_name: str | None = Field(
        None, title="Hub dataset", description="a datasets hub dataset, e.g. uonlp/CulturaX (needs hub access); empty: use path"
    )
    hub_config: str | None = Field(None, title="Hub config", description="the hub dataset's config, e.g. el; empty: its default")
    hub_split: str = Field("train", title="Hub split", description="the hub dataset's split")
    text_field: str = Field("text", title="Text field", description="the text column of json/parquet/hub data")
    id_field: str | None = Field(
        "id", title="Id field", description="a column of document ids shared across languages (parallel corpora); empty: no ids"
    )

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
    if any(p.suffix not in _BUILDERS for p in files):
        raise LayerMoEError(f"corpus file {str(path)!r} has an unsupported suffix; use one of {', '.join(_BUILDERS)}")
    builders = {_BUILDERS[p.suffix] for p in files}
    if len(builders) > 1:
        raise LayerMoEError(f"corpus directory {str(path)!r} mixes formats {sorted(builders)}; keep one format per directory")
    if all(p.stat().st_size == 0 for p in files):
        raise LayerMoEError(f"corpus {str(path)!r} is empty; give it at least one document")
    for file in files:
        _check_readable(file)
    return builders.pop(), [str(p) for p in files]


def _check_readable(path: Path) -> None:
    """The start of a corpus file is what its suffix says: UTF-8 text without NUL bytes, or a parquet file.

    A binary file, or text in another encoding, would otherwise fail deep inside the sampling step's
    tokenizer run, without the file's name; here it is named before any step runs.
    """
    with path.open("rb") as f:
        sample = f.read(_SAMPLE_BYTES)
    if path.suffix == ".parquet":
        if sample and not sample.startswith(b"PAR1"):
            raise LayerMoEError(
                f"corpus file {str(path)!r} is not a parquet file (it does not start with PAR1); write it with pandas or pyarrow"
            )
        return
    try:  # a character cut at the end of the sample is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(sample, final=len(sample) < _SAMPLE_BYTES)
    except UnicodeDecodeError as e:
        raise LayerMoEError(
            f"corpus file {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8, "
            "one document per line (.txt) or one JSON object per line (.jsonl)"
        ) from e
    if "\x00" in text:
        raise LayerMoEError(
            f"corpus file {str(path)!r} holds NUL bytes at character {text.index(chr(0))}: it is binary, not text; give a UTF-8 text file"
        )


def check_corpus_source(spec: CorpusSpec) -> None:
    """A local corpus exists, has one supported format, is not empty and starts readable; a hub corpus is checked when it loads."""
    if spec.path is not None:
        _builder_and_files(spec.path)


def _local_path(spec: CorpusSpec) -> Path:
    assert spec.path is not None  # CorpusSpec holds exactly one of path and hub_name
    return spec.path


def load_documents(spec: CorpusSpec) -> datasets.Dataset:
    """The corpus as a `datasets.Dataset` with a "text" column and, when it has ids, an "id" column."""
    if spec.hub_name is not None:
        dataset = datasets.load_dataset(spec.hub_name, spec.hub_config, split=spec.hub_split)
        source, text_field = spec.hub_name, spec.text_field
    else:
        builder, files = _builder_and_files(_local_path(spec))
        dataset = datasets.load_dataset(builder, data_files=files, split="train")
        source, text_field = str(spec.path), "text" if builder == "text" else spec.text_field
    if text_field not in dataset.column_names:
        raise LayerMoEError(f"corpus {source!r} has no text field {text_field!r} (columns: {dataset.column_names}); set `text_field`")
    if len(dataset) == 0:
        raise LayerMoEError(f"corpus {source!r} is empty; give it at least one document")
    columns = {text_field: "text"}
    if spec.id_field is not None and spec.id_field in dataset.column_names:
        columns[spec.id_field] = "id"
    dataset = dataset.select_columns(list(columns))
    return dataset.rename_columns({k: v for k, v in columns.items() if k != v})


def corpus_fingerprint(spec: CorpusSpec) -> str:
    """What identifies the corpus's documents: its files (path, size, modification time) or its hub name, and its fields.

    Editing or replacing a file changes its size or time, so the store is rebuilt; a hub
    dataset is named, not hashed (pin `hub_config`/`hub_split`; an upstream change is not seen).
    """
    fields = {"text_field": spec.text_field, "id_field": spec.id_field}
    source: dict[str, Any]
    if spec.hub_name is not None:
        source = {"hub": [spec.hub_name, spec.hub_config, spec.hub_split]}
    else:
        builder, files = _builder_and_files(_local_path(spec))
        stats = [(str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in files]
        source = {"builder": builder, "files": stats}
        if builder == "text":
            fields["text_field"] = "text"
    return hashlib.sha256(json.dumps({**source, **fields}, sort_keys=True).encode()).hexdigest()


class _LocalDocuments:
    """A local corpus read through `datasets` (memory-mapped Arrow), every document ordered by the split rule's hash."""

    def __init__(self, spec: CorpusSpec):
        self.documents = load_documents(spec)
        self.has_ids = "id" in self.documents.column_names

    def keys(self) -> Iterator[str]:
        """Each document's key, in row order: its id, or its row number when the corpus has no ids."""
        if not self.has_ids:
            yield from map(str, range(len(self.documents)))
            return
        for batch in self.documents.select_columns(["id"]).iter(batch_size=_KEY_BATCH):
            yield from map(str, batch["id"])

    def _order(self, rule: SplitRule, cache_dir: Path) -> np.ndarray:
        """Row numbers sorted by the seeded hash of their keys (cached in the store: int64, one per document)."""
        path = cache_dir / "order.bin"
        if not path.is_file():
            hashes = np.fromiter((rule.order_of(key) for key in self.keys()), dtype=np.uint64, count=len(self.documents))
            write_atomically(path, np.argsort(hashes, kind="stable").astype(np.int64).tobytes())
        return np.memmap(path, dtype=np.int64, mode="r")

    def batches(self, start: int, rule: SplitRule, cache_dir: Path) -> Iterator[list[tuple[str, str]]]:
        order = self._order(rule, cache_dir)
        for first in range(start, len(order), TOKENIZE_BATCH):
            rows = order[first : first + TOKENIZE_BATCH].tolist()
            chunk = self.documents[rows]
            keys = map(str, chunk["id"]) if self.has_ids else map(str, rows)
            yield list(zip(keys, chunk["text"]))


class _HubDocuments:
    """A hub dataset streamed (`streaming=True`), shuffled with the seed through a buffer, read only as far as needed."""

    def __init__(self, spec: CorpusSpec):
        self.spec = spec

    def batches(self, start: int, rule: SplitRule, cache_dir: Path) -> Iterator[list[tuple[str, str]]]:
        spec = self.spec
        stream = datasets.load_dataset(spec.hub_name, spec.hub_config, split=spec.hub_split, streaming=True)
        stream = stream.shuffle(seed=rule.seed, buffer_size=_SHUFFLE_BUFFER).skip(start)
        batch: list[tuple[str, str]] = []
        for record in stream:
            if spec.text_field not in record:
                raise LayerMoEError(
                    f"corpus {spec.hub_name!r} has no text field {spec.text_field!r} (columns: {sorted(record)}); set `text_field`"
                )
            text = record[spec.text_field]
            has_id = spec.id_field is not None and spec.id_field in record
            # Without ids a document is known by its text, so copies of it share a split.
            key = str(record[spec.id_field]) if has_id else "text:" + hashlib.blake2b(str(text).encode(), digest_size=16).hexdigest()
            batch.append((key, text))
            if len(batch) == TOKENIZE_BATCH:
                yield batch
                batch = []
        yield batch


def open_store(
    spec: CorpusSpec, tokenizer: PreTrainedTokenizerBase, rule: SplitRule, store_dir: Path, fingerprint: str | None = None
) -> TokenStore:
    """The token store of `spec` under `store_dir` for this tokenizer and split rule, locked until closed."""
    source = _HubDocuments(spec) if spec.hub_name is not None else _LocalDocuments(spec)
    return TokenStore.open(store_dir, fingerprint or corpus_fingerprint(spec), source, tokenizer, rule)


def _too_few(language: str, where: str, available: int, needed: int) -> LayerMoEError:
    return LayerMoEError(
        f"language {language!r}: {where} has {available} tokens but {needed} are needed; "
        "add text to the corpus, or lower num_tokens (or heldout_fraction, for the train split)"
    )


def _aligned_tokens(stores: dict[str, TokenStore], sources: dict[str, CorpusSpec], split: Split, needed: int) -> dict[str, np.ndarray]:
    """Token streams that read the same shared ids in the same order, until every language has `needed`.

    The split rule orders documents by a hash of their id, so the shared ids come in the same
    order in every language's store: walking each store and keeping the shared ids aligns them.
    """
    hub = [lang for lang, spec in sources.items() if spec.hub_name is not None]
    if hub:
        raise LayerMoEError(
            f"parallel sampling reads document ids from local corpora, but {hub} stream from the hub; "
            "download them to a local path or sample with parallel=False"
        )
    key_sets = [set(_LocalDocuments(sources[lang]).keys()) for lang in stores]
    shared = set.intersection(*key_sets)
    del key_sets
    walks = {lang: ((key, tokens) for key, tokens in store.documents(split) if key in shared) for lang, store in stores.items()}
    pieces: dict[str, list[np.ndarray]] = {lang: [] for lang in stores}
    counts = dict.fromkeys(stores, 0)
    for documents in zip(*walks.values()):  # document by document, so the shared prefix is as short as possible
        keys = {key for key, _ in documents}
        assert len(keys) == 1, f"parallel stores out of step: {keys}"
        for lang, (_, tokens) in zip(walks, documents):
            pieces[lang].append(tokens)
            counts[lang] += len(tokens)
        if min(counts.values()) >= needed:
            return {lang: np.concatenate(parts) for lang, parts in pieces.items()}
    lang = min(counts, key=lambda language: counts[language])
    where = f"the {split} split of the {len(shared)} document ids shared by {sorted(stores)}"
    raise _too_few(lang, where, counts[lang], needed)


def sample_token_rows(
    corpora: Mapping[str, CorpusSpec],
    tokenizer: PreTrainedTokenizerBase,
    num_tokens: int,
    seq_len: int,
    seed: int,
    store_dir: str | Path,
    out_path: str | Path,
    split: Split = "train",
    heldout_fraction: float = 0.1,
    languages: Sequence[str] | None = None,
    parallel: bool | Literal["auto"] = False,
) -> Path:
    """Per language, a fixed seeded set of packed token rows of exactly `seq_len` tokens, read from the token store.

    Each corpus is tokenized once into `store_dir` (see `token_store`), which later calls and
    rounds reuse. Documents of `split`, in the seed's order, joined with EOS, give
    num_tokens // seq_len rows: the start of the split's token file, so nothing is copied.
    `out_path` gets a small JSON file naming those rows; `open_sequences` maps them,
    `load_sequences` reads them into RAM. `languages` (default: all of `corpora`) picks what to sample.

    parallel=True reads the same document ids (the intersection over languages) in the same
    seeded order in every language, so similarity compares translations of the same text.
    It takes the shortest id prefix that gives every language num_tokens, so a language
    whose translations are longer gets more rows: rows_l >= num_tokens // seq_len, the last
    partial row dropped; those rows are written next to `out_path`. parallel="auto" does that
    when every corpus has ids and there are two languages or more (what similarity wants);
    training should keep the default, False, which uses each corpus in full.
    """
    languages = _checked_sample_request(corpora, tokenizer, num_tokens, seq_len, split, heldout_fraction, languages)
    needed = (num_tokens // seq_len) * seq_len
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sources = {lang: corpora[lang] for lang in languages}
    rule = SplitRule(seed, heldout_fraction)
    if parallel == "auto":
        parallel = len(languages) > 1 and all(spec.hub_name is None and _LocalDocuments(spec).has_ids for spec in sources.values())
    by_corpus: dict[str, TokenStore] = {}  # languages given the same corpus share its store (and its lock)
    for spec in sources.values():
        fingerprint = corpus_fingerprint(spec)
        if fingerprint not in by_corpus:
            by_corpus[fingerprint] = open_store(spec, tokenizer, rule, Path(store_dir), fingerprint)
    stores = {lang: by_corpus[corpus_fingerprint(spec)] for lang, spec in sources.items()}
    try:
        if parallel:
            rows = _aligned_rows(stores, sources, split, needed, seq_len, out_path)
        else:
            rows = {}
            for lang, store in stores.items():
                available = store.ensure(split, needed)
                if available < needed:
                    raise _too_few(lang, f"its {split} split", available, needed)
                rows[lang] = store.rows(split, needed // seq_len, seq_len)
    finally:
        for store in by_corpus.values():
            store.close()
    return _write_sample(rows, out_path)


def _checked_sample_request(
    corpora: Mapping[str, CorpusSpec],
    tokenizer: PreTrainedTokenizerBase,
    num_tokens: int,
    seq_len: int,
    split: Split,
    heldout_fraction: float,
    languages: Sequence[str] | None,
) -> list[str]:
    """The languages to sample (default: all of `corpora`), once the request can be met; otherwise one clear error."""
    for code in corpora:
        validate_language_code(code)
    languages = list(corpora) if languages is None else list(languages)
    missing = [lang for lang in languages if lang not in corpora]
    if missing or not languages:
        raise LayerMoEError(f"no corpus for languages {missing or '[]'}; corpora exist for {sorted(corpora)}: add one per language")
    if seq_len < 1 or num_tokens < seq_len:
        raise LayerMoEError(f"num_tokens={num_tokens} must be at least seq_len={seq_len} >= 1, to fill one sequence")
    if split not in ("train", "heldout"):
        raise LayerMoEError(f"unknown split {split!r}; use 'train' or 'heldout'")
    if not 0 <= heldout_fraction < 1:
        raise LayerMoEError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
    if tokenizer.eos_token_id is None:
        raise LayerMoEError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
    return languages


def _aligned_rows(
    stores: dict[str, TokenStore], sources: dict[str, CorpusSpec], split: Split, needed: int, seq_len: int, out_path: Path
) -> dict[str, TokenRows]:
    without_ids = [lang for lang, spec in sources.items() if spec.hub_name is None and not _LocalDocuments(spec).has_ids]
    if without_ids:
        raise LayerMoEError(
            f"parallel sampling needs document ids, but the corpora of {without_ids} have no id column; "
            "set `id_field` to the column the languages share, or sample with parallel=False"
        )
    rows = {}
    for lang, tokens in _aligned_tokens(stores, sources, split, needed).items():
        num_rows = len(tokens) // seq_len
        file = out_path.with_name(f"{out_path.stem}.{lang}.bin")
        tokens[: num_rows * seq_len].tofile(file)
        rows[lang] = TokenRows(file, str(tokens.dtype), 0, num_rows, seq_len, int(tokens.max()))
    return rows


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
    store_dir: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """`sample_token_rows` read into RAM: {language: (rows, seq_len) LongTensor}, for small samples.

    Without `store_dir` the store lives in a temporary directory and nothing is reused.
    """
    with tempfile.TemporaryDirectory(prefix="layermoe-sample-") as temporary:
        path = sample_token_rows(
            corpora,
            tokenizer,
            num_tokens,
            seq_len,
            seed,
            store_dir or Path(temporary) / "store",
            Path(temporary) / "sample.json",
            split,
            heldout_fraction,
            languages,
            parallel,
        )
        return load_sequences(path)


def _write_sample(rows: Mapping[str, TokenRows], path: Path) -> Path:
    """A small JSON file naming each language's rows: file, dtype, offset, shape and largest token id."""
    entries = {
        lang: {
            "file": str(Path(r.file).resolve()),
            "dtype": r.dtype.name,
            "offset": r.offset,
            "rows": r.num_rows,
            "seq_len": r.seq_len,
            "max_token_id": r.max_token_id,
        }
        for lang, r in rows.items()
    }
    write_atomically(path, json.dumps({"format": SAMPLE_FORMAT, "languages": entries}, indent=1))
    return path


def combine_samples(paths: Sequence[str | Path], out_path: str | Path) -> Path:
    """One token sample holding the languages of several (each language in one of them only); no token is copied."""
    rows: dict[str, TokenRows] = {}
    for path in paths:
        for lang, lang_rows in open_sequences(path).items():
            if lang in rows or not isinstance(lang_rows, TokenRows):
                raise LayerMoEError(f"cannot combine {str(path)!r}: {lang!r} is in two samples or not in the token store")
            rows[lang] = lang_rows
    return _write_sample(rows, Path(out_path))


def open_sequences(path: str | Path) -> dict[str, TokenRows | torch.Tensor]:
    """Sampled rows per language, memory-mapped: what training reads (a safetensors file loads as tensors)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        sample = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise LayerMoEError(f"cannot read token sample {str(path)!r} ({error}); sample the tokens again") from error
    if sample.get("format") != SAMPLE_FORMAT:
        raise LayerMoEError(f"{str(path)!r} is not a token sample ({SAMPLE_FORMAT}); pass the file `sample_token_rows` wrote")
    return {
        lang: TokenRows(e["file"], e["dtype"], e["offset"], e["rows"], e["seq_len"], e["max_token_id"])
        for lang, e in sample["languages"].items()
    }


def load_sequences(path: str | Path) -> dict[str, torch.Tensor]:
    """Sampled rows per language in RAM, {language: (rows, seq_len) LongTensor}: for analysis and evaluation samples."""
    return {lang: rows.to_tensor() if isinstance(rows, TokenRows) else rows for lang, rows in open_sequences(path).items()}
