"""Token store: each corpus tokenized once into flat, memory-mapped token files, reused by every step and round.

Layout of one store (a directory named by its key), as nanoGPT and Megatron pack tokens:

    index.json            what was written: token dtype, documents read, per-split counts
    {split}.bin           token ids (uint16, or uint32 for vocabularies over 65536), documents
                          back to back, each followed by EOS
    {split}.ends.bin      int64 end offset of each document in {split}.bin
    {split}.keys.txt      each document's key (its id, or its row number), one per line

Flat files rather than `datasets` Arrow tables: a packed training row is one contiguous
slice of the map (no decoding, no per-row offsets), and reading needs only numpy.

The key is the corpus fingerprint, the tokenizer's hash and the split rule (seed, held-out
fraction): change any of them and a new store is built; keep them and every step of every
round reads the same tokens. Documents are written in the split rule's seeded order, so a
token budget is a prefix of a split's file: the store only grows (tokenizing documents it has
not read yet) when a step asks for more than it holds, and a prefix never depends on how far
the store was grown before.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import IO, Any, Literal, Protocol

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase

from ..atomic_file import write_atomically
from ..errors import LayerMoEError

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")
FORMAT_VERSION = 1
TOKENIZE_BATCH = 1024  # documents read from the corpus at a time
# Characters per tokenizer call: a fast tokenizer holds ~100 bytes per token of the call's output
# (ids, offsets, masks), so calls are bounded by text, not by documents, to keep memory flat.
TOKENIZE_CHARS = 1 << 18
_PARALLELISM = "TOKENIZERS_PARALLELISM"  # read by the Rust tokenizer at each batch call


# -- the split rule --------------------------------------------------------------------
@dataclass(frozen=True)
class SplitRule:
    """Which split a document is in and where it comes in its split's order, both from a seeded hash of its key.

    The split does not depend on which languages, budgets or other documents a caller asks
    for, so held-out documents never reach training under the same seed. Ordering by a
    hash (not a permutation of the corpus) keeps any subset of documents, such as the ids
    shared by parallel corpora, in the same relative order in every language.
    """

    seed: int
    heldout_fraction: float

    def _hash(self, tag: str, key: str) -> int:
        digest = hashlib.blake2b(f"{self.seed}{tag}{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    def split_of(self, key: str) -> Split:
        return "heldout" if self._hash("\x00", key) / 2**64 < self.heldout_fraction else "train"

    def order_of(self, key: str) -> int:
        """A uint64 sort key: documents are read in ascending order."""
        return self._hash("\x01order\x00", key)


# -- fingerprints ----------------------------------------------------------------------
def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides the token ids: the tokenizer's full definition and its EOS."""
    if tokenizer.is_fast:
        definition = tokenizer.backend_tokenizer.to_str()
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    description = json.dumps(
        {"class": type(tokenizer).__name__, "definition": definition, "eos_token_id": tokenizer.eos_token_id, "size": len(tokenizer)}
    )
    return hashlib.sha256(description.encode()).hexdigest()


def store_key(corpus_fingerprint: str, tokenizer_hash: str, rule: SplitRule) -> str:
    """The store's directory name: a hash of the corpus, the tokenizer and the split rule."""
    parts = json.dumps([FORMAT_VERSION, corpus_fingerprint, tokenizer_hash, rule.seed, rule.heldout_fraction])
    return hashlib.sha256(parts.encode()).hexdigest()[:24]


# -- where documents come from -----------------------------------------------------------
class DocumentSource(Protocol):
    """A corpus as (key, text) batches in the split rule's seeded order, from document `start` on."""

    def batches(self, start: int, rule: SplitRule, cache_dir: Path) -> Iterator[list[tuple[str, str]]]: ...


# -- rows read from the map --------------------------------------------------------------
class TokenRows:
    """(rows, seq_len) packed token ids in a .bin file; a row is read from the memory map when asked for.

    Pickles as its file path and position, so DataLoader workers map the file themselves.
    """

    def __init__(self, file: str | Path, dtype: str, offset: int, num_rows: int, seq_len: int, max_token_id: int):
        self.file, self.dtype, self.offset = str(file), np.dtype(dtype), offset
        self.num_rows, self.seq_len, self.max_token_id = num_rows, seq_len, max_token_id
        self._map: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_rows, self.seq_len)

    def _rows(self) -> np.ndarray:
        if self._map is None:
            if not Path(self.file).is_file():
                raise LayerMoEError(f"token file {self.file!r} is missing; sample the tokens again (delete the sample file that names it)")
            self._map = np.memmap(
                self.file, dtype=self.dtype, mode="r", offset=self.offset * self.dtype.itemsize, shape=(self.num_rows * self.seq_len,)
            ).reshape(self.num_rows, self.seq_len)
        return self._map

    def __len__(self) -> int:
        return self.num_rows

    def __getitem__(self, index: int | slice) -> torch.Tensor:
        return torch.from_numpy(self._rows()[index].astype(np.int64))  # (seq_len,) or (n, seq_len) for a slice

    def to_tensor(self) -> torch.Tensor:
        """All rows in RAM, as a (rows, seq_len) LongTensor: for small samples (analysis, evaluation)."""
        return self[:]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}


def check_token_rows(
    tokens: Any,
    what: str,
    *,
    vocab_size: int | None = None,
    min_length: int = 2,
    dtypes: tuple[torch.dtype, ...] = (torch.long,),
    rows: bool = False,
) -> None:
    """`tokens` must be (num_sequences, seq_len) token ids: a 2-D integer tensor of `dtypes`, or (`rows`) `TokenRows`.

    The one check of token inputs (training, evaluation, routing statistics); `what` names them in the error.
    With `vocab_size`, ids must lie in [0, vocab_size) (token files record their largest id, so they are not read).
    """
    if rows and isinstance(tokens, TokenRows):
        shape, lowest, highest = tokens.shape, 0, tokens.max_token_id
    elif isinstance(tokens, torch.Tensor) and tokens.dtype in dtypes and tokens.dim() == 2:
        shape = tuple(tokens.shape)
        lowest, highest = (int(tokens.min()), int(tokens.max())) if vocab_size is not None and tokens.numel() else (0, 0)
    else:
        found = f"{tokens.dtype} {tuple(tokens.shape)} tensor" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise LayerMoEError(f"{what} are a {found}; give a 2-D LongTensor (num_sequences, seq_len) of token ids")
    if shape[0] < 1 or shape[1] < min_length:
        raise LayerMoEError(
            f"{what} have shape {tuple(shape)}; give at least one sequence of at least {min_length} tokens"
            + (" (one is predicted from the other)" if min_length == 2 else "")
        )
    if vocab_size is not None and (lowest < 0 or highest >= vocab_size):
        raise LayerMoEError(
            f"{what} hold token ids in [{lowest}, {highest}] but the model's vocabulary is [0, {vocab_size}); "
            "tokenize with the model's own tokenizer"
        )


def _text_groups(documents: list[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    """Consecutive documents in groups of at most TOKENIZE_CHARS characters (or one longer document)."""
    group: list[tuple[str, str]] = []
    size = 0
    for document in documents:
        if group and size + len(document[1]) > TOKENIZE_CHARS:
            yield group
            group, size = [], 0
        group.append(document)
        size += len(document[1])
    if group:
        yield group


class BatchEncoder:
    """Token ids of many texts per call, exactly as `tokenizer(texts, add_special_tokens=False)` gives them.

    A fast tokenizer's texts go to its Rust backend's `encode_batch_fast` (ids without offsets),
    with the batch spread over every core by the backend's thread pool: parallelism is switched
    on for that call alone, whatever TOKENIZERS_PARALLELISM says (it is off where processes fork
    DataLoader workers), and the setting is put back after it, so a process forked later still
    sees it. The backend is a copy without truncation or padding, as `tokenizer(...)` runs it,
    with the tokenizer's rule for special tokens in the text. A slow tokenizer is called as is.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        self.backend: Tokenizer | None = None
        if tokenizer.is_fast:
            self.backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
            self.backend.no_truncation()
            self.backend.no_padding()
            self.backend.encode_special_tokens = tokenizer.split_special_tokens

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if self.backend is None:
            return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        setting = os.environ.get(_PARALLELISM)
        os.environ[_PARALLELISM] = "true"
        try:
            encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        finally:
            if setting is None:
                del os.environ[_PARALLELISM]
            else:
                os.environ[_PARALLELISM] = setting
        return [encoding.ids for encoding in encodings]


# -- the store ---------------------------------------------------------------------------
def _empty_index(key: str, dtype: str, eos: int) -> dict:
    return {
        "format": FORMAT_VERSION,
        "key": key,
        "dtype": dtype,
        "eos_token_id": eos,
        "consumed": 0,
        "exhausted": False,
        "splits": {split: {"tokens": 0, "documents": 0, "keys_bytes": 0, "max_token_id": -1} for split in SPLITS},
    }


class TokenStore:
    """One corpus, one tokenizer, one split rule: token files that grow on demand. Use as a context manager.

    The store is locked (fcntl) while open, so two processes never write it at once.
    """

    def __init__(self, directory: Path, source: DocumentSource, tokenizer: PreTrainedTokenizerBase, rule: SplitRule):
        self.directory, self.source, self.tokenizer, self.rule = directory, source, tokenizer, rule
        self._encode = BatchEncoder(tokenizer)
        self._batches: Iterator[list[tuple[str, str]]] | None = None
        self._lock: IO[str] | None = None
        self.index: dict[str, Any] = {}  # index.json, read by `open`

    @classmethod
    def open(
        cls, root: str | Path, corpus_fingerprint: str, source: DocumentSource, tokenizer: PreTrainedTokenizerBase, rule: SplitRule
    ) -> TokenStore:
        if tokenizer.eos_token_id is None:
            raise LayerMoEError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
        key = store_key(corpus_fingerprint, tokenizer_fingerprint(tokenizer), rule)
        store = cls(Path(root) / key, source, tokenizer, rule)
        store.directory.mkdir(parents=True, exist_ok=True)
        store._lock = lock = open(store.directory / "lock", "w")  # noqa: SIM115 (held until close)
        fcntl.flock(lock, fcntl.LOCK_EX)
        index_path = store.directory / "index.json"
        if index_path.is_file():
            store.index = json.loads(index_path.read_text())
        else:
            dtype = "uint16" if len(tokenizer) <= 2**16 else "uint32"
            store.index = _empty_index(key, dtype, tokenizer.eos_token_id)
        store._truncate_to_index()
        return store

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading
    @property
    def key(self) -> str:
        return self.index["key"]

    def file(self, split: Split, kind: str = "bin") -> Path:
        return self.directory / f"{split}.{kind}"

    def num_tokens(self, split: Split) -> int:
        return self.index["splits"][split]["tokens"]

    def ensure(self, split: Split, num_tokens: int) -> int:
        """Grow the store until `split` holds `num_tokens` tokens or the corpus ends; return how many it holds."""
        while self.num_tokens(split) < num_tokens and not self.index["exhausted"]:
            self._read_batch()
        return self.num_tokens(split)

    def rows(self, split: Split, num_rows: int, seq_len: int) -> TokenRows:
        """The first num_rows * seq_len tokens of `split` as rows (call `ensure` first)."""
        assert num_rows * seq_len <= self.num_tokens(split)
        return TokenRows(self.file(split), self.index["dtype"], 0, num_rows, seq_len, self.index["splits"][split]["max_token_id"])

    def documents(self, split: Split) -> Iterator[tuple[str, np.ndarray]]:
        """(key, tokens with EOS) of every document of `split` in order, growing the store as the caller reads on."""
        position = 0
        with open(self.file(split, "keys.txt"), encoding="utf-8") as keys:
            while True:
                stored = self.index["splits"][split]["documents"]
                while position >= stored and not self.index["exhausted"]:
                    self._read_batch()
                    stored = self.index["splits"][split]["documents"]
                if position >= stored:
                    return
                ends = np.fromfile(self.file(split, "ends.bin"), dtype=np.int64, count=stored)
                tokens = np.memmap(self.file(split), dtype=self.index["dtype"], mode="r", shape=(int(ends[-1]),))
                for i in range(position, stored):
                    start = int(ends[i - 1]) if i else 0
                    yield keys.readline().rstrip("\n"), np.array(tokens[start : int(ends[i])])
                position = stored
                del tokens

    # -- growing
    def _read_batch(self) -> None:
        """Tokenize the next batch of documents and append each to its split's files, then record it in the index."""
        if self._batches is None:
            self._batches = self.source.batches(self.index["consumed"], self.rule, self.directory)
        batch = next(self._batches, [])
        if len(batch) < TOKENIZE_BATCH:
            self.index["exhausted"] = True
        eos, dtype = self.index["eos_token_id"], self.index["dtype"]
        for group in _text_groups([(key, text if text and text.strip() else "") for key, text in batch]):
            texts = [text for _, text in group if text]
            encoded = iter(self._encode(texts) if texts else [])
            by_split: dict[Split, list[tuple[str, list[int] | None]]] = {split: [] for split in SPLITS}
            for key, text in group:  # an empty document stays, with no tokens (None), so parallel stores keep in step
                by_split[self.rule.split_of(key)].append((key, next(encoded) if text else None))
            del encoded
            for split, documents in by_split.items():
                if documents:
                    self._append(split, documents, eos, dtype)
        self.index["consumed"] += len(batch)
        self._write_index()

    def _append(self, split: Split, documents: list[tuple[str, list[int] | None]], eos: int, dtype: str) -> None:
        """Each document's tokens and EOS (nothing for an empty one) at the end of the split's files."""
        state = self.index["splits"][split]
        lengths = np.array([0 if ids is None else len(ids) + 1 for _, ids in documents], dtype=np.int64)
        pieces = chain.from_iterable((ids, (eos,)) for _, ids in documents if ids is not None)
        tokens = np.fromiter(chain.from_iterable(pieces), dtype=dtype, count=int(lengths.sum()))
        keys = "".join(key.replace("\n", " ") + "\n" for key, _ in documents).encode("utf-8")
        with open(self.file(split), "ab") as f:
            f.write(tokens.tobytes())
        with open(self.file(split, "ends.bin"), "ab") as f:
            f.write((state["tokens"] + np.cumsum(lengths)).tobytes())
        with open(self.file(split, "keys.txt"), "ab") as f:
            f.write(keys)
        state["tokens"] += len(tokens)
        state["documents"] += len(documents)
        state["keys_bytes"] += len(keys)
        state["max_token_id"] = max(state["max_token_id"], int(tokens.max()) if len(tokens) else -1)

    def _write_index(self) -> None:
        write_atomically(self.directory / "index.json", json.dumps(self.index, indent=1))

    def _truncate_to_index(self) -> None:
        """Drop what a writer that died mid-batch appended after the last index it recorded."""
        itemsize = np.dtype(self.index["dtype"]).itemsize
        for split, state in self.index["splits"].items():
            for kind, size in (
                ("bin", state["tokens"] * itemsize),
                ("ends.bin", state["documents"] * 8),
                ("keys.txt", state["keys_bytes"]),
            ):
                path = self.file(split, kind)
                with open(path, "ab") as f:
                    if f.tell() != size:
                        f.truncate(size)
