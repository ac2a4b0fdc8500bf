"""Vocabulary extension: tokens for a round's new scripts, with old text and old logits untouched.

New tokens are continued BPE merges, learned on the new languages' text and appended after the
parent's merges (lowest priority). BPE applies merges by priority, so a parent's word runs all the
parent's merges first and ends as before; a new merge could then fire only on a pair of that final
tokenization. Merges are learned only from pairs that never occur in the old languages' text, so
old text tokenizes as before, byte for byte. Added tokens would not: HF matches them before
pre-tokenization, anywhere in any text, so they could split old words.

The new rows live in parameters of their own (`AddedVocabulary`), one pair (embedding, head) per
round, beside the parent's embedding and LM head, which stay frozen and bitwise unchanged (tied or
not). A request routed as an older version (`forced_old_routing`, `pinned_language`) sees the rows
of newer rounds masked to -inf, so its probabilities over the parent's vocabulary are the parent's.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ..errors import LayerMoEError

Pair = tuple[str, str]


class VocabularySettings(BaseModel):
    """A round's vocabulary: the parent's, or extended with tokens for the new languages' scripts (docs/vocabulary.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Vocabulary")

    extend: int = Field(
        0,
        ge=0,
        title="New tokens",
        description="0: keep the parent's tokenizer; N: add up to N BPE merges learned on the new languages' training text "
        "(old text tokenizes as before; new rows train in Stage 1)",
    )


# -- the tokenizer ------------------------------------------------------------------------
def _bpe_state(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The tokenizer's tokenizer.json as a dict; only a plain BPE model can be extended by merges."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    model = state.get("model", {})
    if model.get("type") != "BPE":
        raise LayerMoEError(
            f"vocabulary extension continues BPE merges, but this tokenizer's model is {model.get('type', type(tokenizer).__name__)!r}; "
            "drop `vocabulary.extend` from the plan or use a parent with a BPE tokenizer"
        )
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("dropout"):
        raise LayerMoEError(
            "vocabulary extension supports BPE tokenizers without continuing_subword_prefix, end_of_word_suffix or dropout; "
            "drop `vocabulary.extend` from the plan"
        )
    return state


def _words(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> Counter[str]:
    """Pre-tokenized words and their counts: the units BPE merges within."""
    backend = tokenizer.backend_tokenizer
    counts: Counter[str] = Counter()
    for text in texts:
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        pieces = backend.pre_tokenizer.pre_tokenize_str(normalized) if backend.pre_tokenizer is not None else [(normalized, None)]
        counts.update(piece for piece, _ in pieces)
    return counts


def _pieces(tokenizer: PreTrainedTokenizerBase, word: str) -> list[str]:
    return [token.value for token in tokenizer.backend_tokenizer.model.tokenize(word)]


def _merge(pieces: list[str], pair: Pair) -> list[str]:
    out, i = [], 0
    while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
            out.append(pieces[i] + pieces[i + 1])
            i += 2
        else:
            out.append(pieces[i])
            i += 1
    return out


def learn_merges(
    tokenizer: PreTrainedTokenizerBase, new_texts: Iterable[str], old_texts: Iterable[str], count: int, min_frequency: int = 2
) -> list[Pair]:
    """Up to `count` merges, most frequent pair first, on `new_texts` as the parent tokenizes them.

    A pair seen in the parent's tokenization of `old_texts`, or whose merged token is already a token or
    an old word, is never merged, so no old word can change. Fewer merges come back when no pair is left
    at `min_frequency`. Ties go to the smaller pair, so the same texts give the same merges.
    """
    state = _bpe_state(tokenizer)
    old_words = _words(tokenizer, old_texts)
    blocked = set(state["model"]["vocab"]) | {token["content"] for token in state.get("added_tokens", [])} | set(old_words)
    forbidden = {pair for word in old_words for pieces in [_pieces(tokenizer, word)] for pair in zip(pieces, pieces[1:])}
    words = [(_pieces(tokenizer, word), frequency) for word, frequency in _words(tokenizer, new_texts).items()]
    pair_counts: Counter[Pair] = Counter()
    where: defaultdict[Pair, set[int]] = defaultdict(set)

    def count_pairs(index: int, sign: int) -> None:
        pieces, frequency = words[index]
        for pair in zip(pieces, pieces[1:]):
            pair_counts[pair] += sign * frequency
            if sign > 0:
                where[pair].add(index)

    for index in range(len(words)):
        count_pairs(index, 1)
    merges: list[Pair] = []
    while len(merges) < count:
        candidates = [
            (-frequency, pair)
            for pair, frequency in pair_counts.items()
            if frequency >= min_frequency and pair not in forbidden and pair[0] + pair[1] not in blocked
        ]
        if not candidates:
            break
        _, best = min(candidates)
        merges.append(best)
        blocked.add(best[0] + best[1])
        for index in sorted(where.pop(best)):
            count_pairs(index, -1)
            words[index] = (_merge(words[index][0], best), words[index][1])
            count_pairs(index, 1)
        pair_counts.pop(best, None)
    return merges


def extend_tokenizer(tokenizer: PreTrainedTokenizerBase, merges: Sequence[Pair], first_id: int) -> PreTrainedTokenizerBase:
    """The parent's tokenizer with `merges` appended; merge k's token gets id `first_id + k`.

    `first_id` is the parent model's number of embedding rows, so the new ids index the added rows.
    """
    state = _bpe_state(tokenizer)
    vocab = state["model"]["vocab"]
    used = max([*vocab.values(), *(token["id"] for token in state.get("added_tokens", []))])
    if used >= first_id:
        raise LayerMoEError(
            f"the tokenizer already uses id {used}, but the model has only {first_id} embedding rows; "
            "resize the parent's embeddings to its tokenizer before extending its vocabulary"
        )
    strings = bool(state["model"]["merges"]) and isinstance(state["model"]["merges"][0], str)
    for k, (a, b) in enumerate(merges):
        vocab[a + b] = first_id + k
        state["model"]["merges"].append(f"{a} {b}" if strings else [a, b])
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        (Path(folder) / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def added_token_pieces(tokenizer: PreTrainedTokenizerBase, first_id: int) -> list[list[int]]:
    """For each id from `first_id` on, the parent's token ids that its merges expand to (its pieces)."""
    state = _bpe_state(tokenizer)
    vocab = state["model"]["vocab"]
    merged: dict[str, Pair] = {}
    for merge in state["model"]["merges"]:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        merged.setdefault(a + b, (a, b))

    def expand(token: str) -> list[int]:
        if vocab[token] < first_id:
            return [vocab[token]]
        a, b = merged[token]
        return expand(a) + expand(b)

    added = sorted((i, token) for token, i in vocab.items() if i >= first_id)
    return [expand(token) for _, token in added]


def check_old_text_unchanged(parent: PreTrainedTokenizerBase, child: PreTrainedTokenizerBase, texts: dict[str, Sequence[str]]) -> None:
    """Every old language's text tokenizes to the same ids under both tokenizers (LayerMoEError naming the first that does not)."""
    for language, documents in texts.items():
        before = parent(list(documents), add_special_tokens=False)["input_ids"]
        after = child(list(documents), add_special_tokens=False)["input_ids"]
        for document, old_ids, new_ids in zip(documents, before, after):
            if old_ids != new_ids:
                raise LayerMoEError(
                    f"the extended vocabulary tokenizes old language {language}'s held-out text differently ({document[:60]!r}...); "
                    "its text holds the new script: lower vocabulary.extend or give old text without it"
                )


# -- the model ----------------------------------------------------------------------------
class AddedVocabulary(nn.Module):
    """The rows that rounds added to the vocabulary: ids parent_rows.. in round order.

    embeddings[j], heads[j]: (N_j, d) for the j-th round that added tokens (`rounds[j]` is its
    number). `visible_rounds` (set by the routing cut) hides the rows of later rounds: their logits are -inf.
    """

    def __init__(self, parent_rows: int, hidden_size: int):
        super().__init__()
        self.parent_rows, self.hidden_size = parent_rows, hidden_size
        self.embeddings = nn.ParameterList()
        self.heads = nn.ParameterList()
        self.rounds: list[int] = []
        self.visible_rounds: int | None = None

    @property
    def size(self) -> int:
        return sum(rows.shape[0] for rows in self.embeddings)

    def add_round(self, round_number: int, count: int, like: torch.Tensor) -> None:
        """Empty (zero) rows for `count` tokens of round `round_number`, on `like`'s device and dtype."""
        for rows in (self.embeddings, self.heads):
            rows.append(nn.Parameter(torch.zeros(count, self.hidden_size, device=like.device, dtype=like.dtype)))
        self.rounds.append(round_number)

    def embed(self, input_ids: torch.Tensor, parent: nn.Embedding) -> torch.Tensor:
        """(B, T) ids -> (B, T, d): the parent's rows for its ids, the added rows for the rest."""
        embedded = parent(input_ids.clamp(max=self.parent_rows - 1))
        added = input_ids - self.parent_rows
        is_added = added >= 0
        if not bool(is_added.any()):
            return embedded
        table = torch.cat(list(self.embeddings)).to(embedded.dtype)  # (N, d)
        return torch.where(is_added[..., None], table[added.clamp(min=0)], embedded)

    def logits(self, hidden: torch.Tensor, parent_logits: torch.Tensor) -> torch.Tensor:
        """(..., d) hidden states and (..., V) parent logits -> (..., V + N); hidden rounds' columns are -inf."""
        added = torch.cat(
            [
                hidden @ head.to(hidden.dtype).T
                if self.visible_rounds is None or number <= self.visible_rounds
                else torch.full((*hidden.shape[:-1], head.shape[0]), -torch.inf, dtype=hidden.dtype, device=hidden.device)
                for number, head in zip(self.rounds, self.heads)
            ],
            dim=-1,
        )  # (..., N)
        return torch.cat([parent_logits, added.to(parent_logits.dtype)], dim=-1)


@torch.no_grad()
def initialise_added_rows(
    vocabulary: AddedVocabulary, pieces: Sequence[Sequence[int]], embedding: torch.Tensor, head: torch.Tensor
) -> None:
    """The newest round's rows start as the mean of their pieces' parent rows: (V, d) `embedding` and `head`."""
    index = torch.tensor([i for ids in pieces for i in ids], device=embedding.device)
    owner = torch.tensor([k for k, ids in enumerate(pieces) for _ in ids], device=embedding.device)
    for rows, parent in ((vocabulary.embeddings[-1], embedding), (vocabulary.heads[-1], head)):
        sums = torch.zeros(len(pieces), parent.shape[1], dtype=torch.float32, device=parent.device)
        sums.index_add_(0, owner, parent[index].float())
        counts = torch.tensor([max(len(ids), 1) for ids in pieces], device=parent.device)[:, None]  # (N, 1)
        rows.copy_((sums / counts).to(rows.dtype))


def vocabulary_size(config) -> int:
    """Ids a model of `config` accepts: its base's embedding rows plus the rows its rounds added."""
    rounds = getattr(config, "expansion_rounds", None) or []
    return getattr(config, "base_config", config).vocab_size + sum(expansion.get("added_tokens", 0) for expansion in rounds)
