"""Evaluate a model per language and compare a child with its parent.

Every evaluator returns a *metrics table*: one row per (language, metric) with columns
language, metric, value, n (tokens or questions behind the value). `compare_models` joins
a parent's and a child's tables into the tidy comparison that the gates, the plots and the
registry read. Works on any HF-style causal LM (`model(input_ids=...).logits`), dense or
LayerMoE, on any device.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from torch import nn

from ..data.corpus import check_old_new
from ..data.token_store import check_token_rows
from ..errors import LayerMoEError, describe_validation_error
from ..model.inference import inference, input_device
from ..model.modeling_layermoe import LayerMoEForCausalLM
from ..model.surgery import pinned_language
from .gates import BITS_PER_BYTE, COMPARISON_COLUMNS, PINNED_LOSS, GateSettings
from .generation import context_length, greedy_generate
from .translation import TranslationSettings, translate_pairs, translation_metrics

METRICS_COLUMNS = ["language", "metric", "value", "n"]


class HarnessTask(BaseModel):
    """One lm-eval task: the language it measures and its few-shot count (the reference's shots, e.g. ARC 25)."""

    model_config = ConfigDict(extra="forbid", title="lm-eval task")

    language: str = Field(min_length=1, title="Language", description="the language code the task measures, e.g. el")
    num_fewshot: int = Field(0, ge=0, title="Few-shot examples", description="few-shot examples per prompt, e.g. 25 for ARC")


class EvalSettings(BaseModel):
    """What the parent and its child are compared on (held-out loss per language, optional benchmarks), and the gate
    the child must pass to take the alias."""

    model_config = ConfigDict(extra="forbid", title="Evaluation and gate")

    batch_size: int = Field(8, ge=1, title="Batch size", description="Sequences (or answer options) per forward pass.")
    max_sequences: int | None = Field(256, ge=1, title="Held-out sequences", description="Held-out sequences per language; none keeps all.")
    multiple_choice_files: list[Path] = Field(
        default_factory=list,
        title="Multiple-choice files",
        description="Local Belebele-like .jsonl files; each file's metric is named after it (belebele_el.jsonl: belebele_el.mc_acc).",
    )
    lm_eval_tasks: dict[str, str | HarnessTask] = Field(
        default_factory=dict,
        title="lm-eval tasks",
        description="lm-eval task -> its language, or {language, num_fewshot}; tasks not in lm_eval_task_files need hub access.",
    )
    lm_eval_task_files: list[Path] = Field(
        default_factory=list,
        title="lm-eval task files",
        description="Local lm-eval task YAMLs (over local data files); name their tasks in lm_eval_tasks.",
    )
    lm_eval_limit: int | None = Field(None, ge=1, title="lm-eval limit", description="Examples per lm-eval task; empty: run them all.")
    translation: TranslationSettings | None = Field(
        None,
        title="Translation",
        description="Few-shot translation to and from a pivot on held-out parallel sentences, scored with chrF++; "
        "empty: no translation evaluation.",
    )
    continuation_prompts: int = Field(
        3,
        ge=0,
        title="Continuation prompts",
        description="Held-out sentence openings per language that parent and child continue, for a person to read.",
    )
    continuation_tokens: int = Field(24, ge=1, title="Continuation tokens", description="Tokens generated per continuation.")
    pinned_drift: bool = Field(
        True,
        title="Measure pinned drift",
        description="Also measure each old language's held-out loss with parent and child pinned to it (metric "
        "'pinned_loss'; docs/pinned-serving.md): zero drift by construction, measured. Costs one more pass per old language.",
    )
    gates: GateSettings = Field(default_factory=GateSettings, title="Gate", description="When the child may take the alias.")

    @field_validator("multiple_choice_files")
    @classmethod
    def distinct_task_names(cls, paths: list[Path]) -> list[Path]:
        stems = [p.stem for p in paths]
        repeated = sorted({s for s in stems if stems.count(s) > 1})
        if repeated:
            raise ValueError(f"multiple-choice files share the names {repeated}; give each file a distinct name")
        return paths


# -- held-out perplexity --------------------------------------------------------------


def language_perplexity(
    model: nn.Module, sequences: Mapping[str, torch.Tensor], batch_size: int = 8, max_sequences: int | None = None
) -> pd.DataFrame:
    """Per language: loss = mean next-token NLL (nats) over every predicted token, perplexity = exp(loss).

    Sequences are packed (no padding), so every position but the first is predicted. The mean
    is weighted by tokens across batches, not a mean of batch means.
    """
    if not sequences:
        raise LayerMoEError("no held-out sequences were given; pass {language: LongTensor (num_sequences, seq_len)}")
    if batch_size < 1:
        raise LayerMoEError(f"batch_size={batch_size}; it must be at least 1")
    device = input_device(model)
    rows = []
    with inference(model):
        for language, ids in sequences.items():
            check_token_rows(ids, f"held-out sequences for {language!r}", dtypes=(torch.int64, torch.int32))
            ids = ids[:max_sequences]
            nll = torch.zeros((), dtype=torch.float64, device=device)
            for batch in ids.split(batch_size):
                batch = batch.to(device=device, dtype=torch.long)
                logits = model(input_ids=batch, use_cache=False).logits  # (B, T, V)
                targets = batch[:, 1:].to(logits.device)  # (B, T-1)
                nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="sum").double().to(device)
            tokens = ids.shape[0] * (ids.shape[1] - 1)
            loss = nll.item() / tokens
            rows.append({"language": language, "loss": loss, "perplexity": math.exp(loss), "tokens": tokens})
    return pd.DataFrame(rows, columns=["language", "loss", "perplexity", "tokens"])


def pinned_perplexity_metrics(
    model: nn.Module, sequences: Mapping[str, torch.Tensor], languages: Sequence[str], batch_size: int = 8, max_sequences: int | None = None
) -> pd.DataFrame:
    """Metric `pinned_loss` per language: its held-out loss with `model` pinned to it (`surgery.pinned_language`).

    A dense model has one path, so its pinned loss is its loss, measured the same way.
    """
    missing = [language for language in languages if language not in sequences]
    if missing:
        raise LayerMoEError(f"no held-out sequences for {missing}, whose pinned loss was asked; provide them or drop those languages")
    tables = []
    for language in languages:
        pin = pinned_language(model, language) if isinstance(model, LayerMoEForCausalLM) else contextlib.nullcontext()
        with pin:
            tables.append(language_perplexity(model, {language: sequences[language]}, batch_size, max_sequences))
    if not tables:
        return pd.DataFrame(columns=METRICS_COLUMNS)
    table = pd.concat(tables, ignore_index=True)
    return pd.DataFrame({"language": table["language"], "metric": PINNED_LOSS, "value": table["loss"], "n": table["tokens"]})


def perplexity_metrics(perplexity: pd.DataFrame) -> pd.DataFrame:
    """The `language_perplexity` table as a metrics table (metrics `loss` and `perplexity`)."""
    long = perplexity.melt(id_vars=["language", "tokens"], value_vars=["loss", "perplexity"], var_name="metric")
    return long.rename(columns={"tokens": "n"})[METRICS_COLUMNS]


# -- multiple choice from local files -----------------------------------------------------
MULTIPLE_CHOICE_FORMAT = (
    'each line must be one JSON object {"language": str, "passage": str (may be omitted), "question": str, '
    '"options": [str, ...] (at least 2), "answer": 0-based index of the correct option}'
)


class MultipleChoiceRecord(BaseModel):
    """One Belebele-like question. Unknown keys are refused so that a misspelt field is caught."""

    model_config = ConfigDict(extra="forbid")

    language: str = Field(min_length=1)
    passage: str = ""
    question: str = Field(min_length=1)
    options: list[Annotated[str, Field(min_length=1)]] = Field(min_length=2)
    answer: int = Field(ge=0)

    @model_validator(mode="after")
    def answer_indexes_an_option(self) -> MultipleChoiceRecord:
        if self.answer >= len(self.options):
            raise ValueError(
                f"answer {self.answer} is out of range for {len(self.options)} options; "
                f"use a 0-based index from 0 to {len(self.options) - 1}"
            )
        return self

    def prompt(self) -> str:
        question = f"Question: {self.question}\nAnswer:"
        return f"{self.passage}\n{question}" if self.passage else question


def load_multiple_choice(path: str | Path) -> list[MultipleChoiceRecord]:
    """Read and validate a .jsonl task file; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LayerMoEError(f"multiple-choice file {path} does not exist; pass the path of a .jsonl file ({MULTIPLE_CHOICE_FORMAT})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise LayerMoEError(f"{path} is not UTF-8 text ({e.reason}); save it as UTF-8 JSON lines") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise LayerMoEError(f"{path}:{number}: not valid JSON ({e.msg}); {MULTIPLE_CHOICE_FORMAT}") from None
        try:
            records.append(MultipleChoiceRecord.model_validate(raw))
        except ValidationError as e:
            raise LayerMoEError(f"{path}:{number}: {describe_validation_error(e, root='record')}; {MULTIPLE_CHOICE_FORMAT}") from None
    if not records:
        raise LayerMoEError(f"{path} holds no questions; {MULTIPLE_CHOICE_FORMAT}")
    return records


def continuation_logprobs(model: nn.Module, requests: Sequence[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """log p(continuation | context), summed over the continuation's tokens, for each (context, continuation)."""
    device = input_device(model)
    order = sorted(range(len(requests)), key=lambda i: -sum(map(len, requests[i])))  # similar lengths share a batch
    scores = [0.0] * len(requests)
    with inference(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            rows = [requests[i][0] + requests[i][1] for i in chunk]
            ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # right-padded: (B, L)
            mask = torch.zeros_like(ids)
            for r, row in enumerate(rows):
                ids[r, : len(row)] = torch.tensor(row)
                mask[r, : len(row)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits  # (B, L, V)
            for r, i in enumerate(chunk):
                context, continuation = requests[i]
                # Position t predicts token t+1, so the continuation is read off the positions before it.
                positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1, device=logits.device)
                logprobs = logits[r, positions].float().log_softmax(-1)  # (len(continuation), V)
                target = torch.tensor(continuation, device=logits.device)
                scores[i] = logprobs.gather(-1, target[:, None]).sum().item()
    return scores


def score_multiple_choice(model: nn.Module, tokenizer: Any, path: str | Path, batch_size: int = 8, task: str | None = None) -> pd.DataFrame:
    """Zero-shot multiple-choice accuracy per language, as a metrics table.

    Each option is scored by the summed log-probability of " <option>" after the prompt
    "<passage>\\nQuestion: <question>\\nAnswer:" (context and option tokenised separately).
    `<task>.mc_acc` picks the highest sum; `<task>.mc_acc_norm` divides each sum by the
    option's length in characters first (as lm-eval's acc_norm), so long options are not
    penalised for having more tokens. Ties go to the first option. `task` defaults to the file stem.
    """
    records = load_multiple_choice(path)
    task = task or Path(path).stem
    requests = []
    for record in records:
        context = tokenizer.encode(record.prompt(), add_special_tokens=True)
        for option in record.options:
            continuation = tokenizer.encode(" " + option, add_special_tokens=False)
            if not context or not continuation:
                raise LayerMoEError(f"{path}: the tokenizer turned {option!r} or its prompt into no tokens; check the tokenizer")
            requests.append((context, continuation))
    scores = iter(continuation_logprobs(model, requests, batch_size))
    rows = []
    for record in records:
        option_scores = torch.tensor([next(scores) for _ in record.options], dtype=torch.float64)
        lengths = torch.tensor([len(" " + option) for option in record.options], dtype=torch.float64)
        rows.append(
            {
                "language": record.language,
                "mc_acc": float(option_scores.argmax() == record.answer),
                "mc_acc_norm": float((option_scores / lengths).argmax() == record.answer),
            }
        )
    per_question = pd.DataFrame(rows)
    table = per_question.groupby("language", sort=False).agg(
        mc_acc=("mc_acc", "mean"), mc_acc_norm=("mc_acc_norm", "mean"), n=("mc_acc", "size")
    )
    long = table.reset_index().melt(id_vars=["language", "n"], value_vars=["mc_acc", "mc_acc_norm"], var_name="metric")
    long["metric"] = task + "." + long["metric"]
    return long[METRICS_COLUMNS]


# -- the lm-eval harness ----------------------------------------------------------------------
def harness_tasks(tasks: Mapping[str, str | HarnessTask]) -> dict[str, HarnessTask]:
    """`{task: "el"}` is shorthand for a zero-shot task in language el."""
    return {name: HarnessTask(language=spec) if isinstance(spec, str) else spec for name, spec in tasks.items()}


def load_task_file(path: str | Path) -> dict[str, Any]:
    """A local lm-eval task YAML as a task config; relative `data_files` are resolved against the YAML's folder."""
    path = Path(path)
    if not path.is_file():
        raise LayerMoEError(f"lm-eval task file {path} does not exist; pass the path of a task YAML")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise LayerMoEError(f"{path} is not plain YAML ({e}); local task files cannot use !function tags") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise LayerMoEError(f"{path} names no task; an lm-eval task YAML needs `task: <name>`")
    data_files = config.get("dataset_kwargs", {}).get("data_files")
    if isinstance(data_files, dict):
        config["dataset_kwargs"]["data_files"] = {
            split: str(path.parent / file) if not Path(file).is_absolute() else file for split, file in data_files.items()
        }
    return config


def lm_eval_metrics(results: Mapping[str, Any], tasks: Mapping[str, str]) -> pd.DataFrame:
    """The numeric metrics of `lm_eval.simple_evaluate` results as a metrics table (stderr and sample counts dropped)."""
    rows = []
    for task, language in tasks.items():
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        for key, value in results["results"][task].items():
            name, _, filter_name = key.partition(",")
            if name.endswith("_stderr") or name == "sample_len" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric = f"{task}.{name}" if filter_name in ("", "none") else f"{task}.{name}[{filter_name}]"
            rows.append({"language": language, "metric": metric, "value": float(value), "n": n})
    return pd.DataFrame(rows, columns=METRICS_COLUMNS)


def lm_eval_scores(
    model: nn.Module,
    tokenizer: Any,
    tasks: Mapping[str, str | HarnessTask],
    batch_size: int = 8,
    limit: int | None = None,
    task_files: Sequence[str | Path] = (),
) -> pd.DataFrame:
    """Run lm-eval's own evaluator on the live model, per task at its few-shot count, as a metrics table.

    Tasks named in `task_files` (local YAMLs) run offline; any other name is one of lm-eval's
    registered tasks, whose datasets need hub access.
    """
    if not tasks:
        return pd.DataFrame(columns=METRICS_COLUMNS)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    local = {config["task"]: config for config in map(load_task_file, task_files)}
    specs = harness_tasks(tasks)
    harness_model = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal", max_length=context_length(model))
    # HFLM sends inputs to `model.device`, the first parameter's: on the meta device where a dispatched model's embedding is offloaded.
    harness_model._device = input_device(model)
    tables = []
    for shots in sorted({spec.num_fewshot for spec in specs.values()}):
        names = [name for name, spec in specs.items() if spec.num_fewshot == shots]
        results = simple_evaluate(
            model=harness_model, tasks=[local.get(name, name) for name in names], num_fewshot=shots, limit=limit, log_samples=False
        )
        tables.append(lm_eval_metrics(results, {name: specs[name].language for name in names}))
    return pd.concat(tables, ignore_index=True)


# -- one model, everything ------------------------------------------------------------------
def bits_per_byte(model: nn.Module, tokenizer: Any, texts: Mapping[str, Sequence[str]], seq_len: int, batch_size: int = 8) -> pd.DataFrame:
    """Per language, the NLL of every token of its texts in bits over their UTF-8 bytes: a metrics table (metric `BITS_PER_BYTE`).

    It does not depend on the tokenizer, so a child with an extended vocabulary and its parent compare on it.
    Each text starts after an EOS (so its first token is predicted too) and is cut into windows of `seq_len`
    predictions that overlap by one token, so every token is predicted exactly once.
    """
    start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    if start is None:
        raise LayerMoEError("bits per byte predicts each text's first token after EOS or BOS; this tokenizer has neither: set eos_token")
    device = input_device(model)
    rows = []
    with inference(model):
        for language, documents in texts.items():
            windows: list[list[int]] = []
            for ids in tokenizer(list(documents), add_special_tokens=False)["input_ids"]:
                ids = [start, *ids]
                windows += [ids[i : i + seq_len + 1] for i in range(0, len(ids) - 1, seq_len)]
            nll = 0.0
            for first in range(0, len(windows), batch_size):
                batch = windows[first : first + batch_size]
                width = max(len(w) for w in batch)
                ids = torch.tensor([w + [start] * (width - len(w)) for w in batch], device=device)  # (B, T)
                mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in batch], device=device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
                targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).to(logits.device)
                nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum").item()
            size = sum(len(text.encode("utf-8")) for text in documents)
            rows.append({"language": language, "metric": BITS_PER_BYTE, "value": nll / math.log(2) / size, "n": size})
    return pd.DataFrame(rows, columns=METRICS_COLUMNS)


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    sequences: Mapping[str, torch.Tensor],
    settings: EvalSettings | None = None,
    translation_pairs: pd.DataFrame | None = None,
    pinned_languages: Sequence[str] = (),
) -> pd.DataFrame:
    """Held-out loss and perplexity per language plus every configured task, as one metrics table.

    With `settings.translation`, `translation_pairs` (from `translation.heldout_pairs`) are translated
    and scored; parent and child must be given the same pairs. With `settings.pinned_drift`, each of
    `pinned_languages` (a round's old languages) also gets its `pinned_loss`.
    """
    settings = settings or EvalSettings()
    if tokenizer is None and (settings.multiple_choice_files or settings.lm_eval_tasks or settings.translation):
        raise LayerMoEError(
            "multiple-choice, lm-eval or translation tasks are configured but no tokenizer was given; pass the model's tokenizer"
        )
    if settings.translation is not None and translation_pairs is None:
        raise LayerMoEError("translation is configured but no pairs were given; pass translation.heldout_pairs(...) as translation_pairs")
    perplexity = language_perplexity(model, sequences, settings.batch_size, settings.max_sequences)
    tables = [perplexity_metrics(perplexity)]
    if settings.pinned_drift:
        tables.append(pinned_perplexity_metrics(model, sequences, pinned_languages, settings.batch_size, settings.max_sequences))
    tables += [score_multiple_choice(model, tokenizer, path, settings.batch_size) for path in settings.multiple_choice_files]
    if settings.lm_eval_tasks:
        tables.append(
            lm_eval_scores(
                model, tokenizer, settings.lm_eval_tasks, settings.batch_size, settings.lm_eval_limit, settings.lm_eval_task_files
            )
        )
    if settings.translation is not None:
        tables.append(translation_metrics(translate_pairs(model, tokenizer, translation_pairs, settings.translation)))
    return pd.concat([t for t in tables if not t.empty], ignore_index=True)


def continue_prompts(model: nn.Module, tokenizer: Any, prompts: pd.DataFrame, settings: EvalSettings) -> list[str]:
    """Greedy continuations of the `heldout_text.continuation_prompts` table, one per row, each exactly
    `continuation_tokens` long: EOS is suppressed, since an empty answer shows a reader nothing."""
    tokens = settings.continuation_tokens
    return greedy_generate(model, tokenizer, list(prompts["prompt"]), tokens, settings.batch_size, min_new_tokens=tokens)


# -- parent vs child -----------------------------------------------------------------------
def as_metrics(table: pd.DataFrame, side: str) -> pd.Series:
    """A metrics table (or a `language_perplexity` table) as a Series indexed by (language, metric)."""
    if {"language", "metric", "value"} <= set(table.columns):
        long = table
    elif {"language", "loss", "perplexity", "tokens"} <= set(table.columns):
        long = perplexity_metrics(table)
    else:
        raise LayerMoEError(
            f"the {side} table has columns {list(table.columns)}; pass a metrics table (language, metric, value, n) "
            "from evaluate_model or a language_perplexity table"
        )
    values = long.set_index(["language", "metric"])["value"].astype(float)
    repeated = values.index[values.index.duplicated()].unique().tolist()
    if repeated:
        raise LayerMoEError(f"the {side} table has (language, metric) pairs more than once: {repeated}; give each task a distinct name")
    return values


def compare_models(parent: pd.DataFrame, child: pd.DataFrame, old_languages: Sequence[str], new_languages: Sequence[str]) -> pd.DataFrame:
    """Tidy parent-vs-child table: language, group ("old"/"new"), metric, parent, child, delta = child - parent.

    Rows: old languages first, then new, each in the given order; loss and perplexity first.
    """
    old, new = list(old_languages), list(new_languages)
    check_old_new(old, new)
    parent_values, child_values = as_metrics(parent, "parent"), as_metrics(child, "child")
    unmatched = parent_values.index.symmetric_difference(child_values.index).tolist()
    if unmatched:
        raise LayerMoEError(
            f"(language, metric) pairs {unmatched} were measured for only one model; evaluate both on the same data and tasks"
        )
    languages = parent_values.index.get_level_values("language").unique()
    ungrouped = [lang for lang in languages if lang not in old and lang not in new]
    if ungrouped:
        raise LayerMoEError(
            f"languages {ungrouped} were evaluated but are neither old {old} nor new {new}; add them to the plan's languages"
        )
    without_loss = [lang for lang in old + new if (lang, "loss") not in parent_values.index]
    if without_loss:
        raise LayerMoEError(f"languages {without_loss} have no held-out loss; provide held-out sequences for every old and new language")
    table = pd.DataFrame({"parent": parent_values, "child": child_values}).reset_index()
    table["group"] = table["language"].map(lambda lang: "old" if lang in old else "new")
    table["delta"] = table["child"] - table["parent"]
    language_rank = {lang: i for i, lang in enumerate(old + new)}
    metric_rank = {"loss": 0, "perplexity": 1, PINNED_LOSS: 2}
    keys = [(language_rank[lang], metric_rank.get(metric, 3), metric) for lang, metric in zip(table["language"], table["metric"])]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return table.iloc[order][list(COMPARISON_COLUMNS)].reset_index(drop=True)


def old_language_drift(comparison: pd.DataFrame) -> float:
    """Mean change in old-language loss (child - parent, nats); positive means forgetting. NaN without old languages."""
    return mean_loss_delta(comparison, "old")


def new_language_gain(comparison: pd.DataFrame) -> float:
    """Mean decrease in new-language loss (parent - child, nats); positive means learning. NaN without new languages."""
    return -mean_loss_delta(comparison, "new")


def old_drift_max(comparison: pd.DataFrame) -> float:
    """The largest old-language loss rise (nats): what the gate bounds. NaN without old languages."""
    deltas = _loss_deltas(comparison, "old")
    return float(deltas.max()) if len(deltas) else math.nan


def pinned_drifts(comparison: pd.DataFrame) -> pd.Series:
    """Per old language (index): its loss rise with parent and child pinned to it (nats), 0 by construction. Empty if not measured."""
    rows = comparison[(comparison["metric"] == PINNED_LOSS) & (comparison["group"] == "old")]
    return rows.set_index("language")["delta"].astype(float)


def pinned_drift_max(comparison: pd.DataFrame) -> float:
    """The largest pinned drift (nats); NaN where pinned loss was not measured."""
    drifts = pinned_drifts(comparison)
    return float(drifts.max()) if len(drifts) else math.nan


def mean_loss_delta(comparison: pd.DataFrame, group: str) -> float:
    deltas = _loss_deltas(comparison, group)
    return float(deltas.mean()) if len(deltas) else math.nan


def _loss_deltas(comparison: pd.DataFrame, group: str) -> pd.Series:
    return comparison.loc[(comparison["metric"] == "loss") & (comparison["group"] == group), "delta"]


def compare_variants(rounds: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """One row per variant of the same round (e.g. LayerMoE vs uniform MoE-LPR vs no classifier).

    `rounds` maps a variant name (or any label, with the name as "variant") to {"comparison":
    compare_models table, "allocation": list, "params_added": int, optionally "variant": str and
    "seed": int}. Columns: variant, seed, new_experts, params_added, old_drift, new_gain, and one
    `loss_delta:<language>` per language.
    """
    rows = []
    for label, result in rounds.items():
        comparison = result["comparison"]
        losses = comparison[comparison["metric"] == "loss"]
        rows.append(
            {
                "variant": result.get("variant", label),
                "seed": int(result.get("seed", 0)),
                "new_experts": int(sum(result["allocation"])),
                "params_added": int(result["params_added"]),
                "old_drift": old_language_drift(comparison),
                "new_gain": new_language_gain(comparison),
                **{f"loss_delta:{row.language}": row.delta for row in losses.itertuples()},
            }
        )
    return pd.DataFrame(rows)


def summarise_seeds(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample std over seeds of each variant's drift, gain and loss deltas (a `compare_variants` table
    with one row per variant and seed, the variant column naming the variant without its seed).

    Columns: variant, seeds, then the run's settings as the first seed has them (new_experts, params_added and,
    if present, allocation: training seeds do not change them), then `<column>` (mean) and `<column>_std` for
    old_drift, old_drift_max (if present), new_gain and each loss_delta. The std of one seed is NaN: one run says
    nothing about noise.
    """
    measured = [c for c in per_seed.columns if c in ("old_drift", "old_drift_max", "new_gain") or c.startswith("loss_delta:")]
    settings = [c for c in ("allocation", "new_experts", "params_added") if c in per_seed.columns]
    groups = per_seed.groupby("variant", sort=False)
    table = groups[settings].first()
    table.insert(0, "seeds", groups.size())
    for column in measured:
        table[column] = groups[column].mean()
        table[f"{column}_std"] = groups[column].std(ddof=1)
    return table.reset_index()
