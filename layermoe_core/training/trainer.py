"""Training on HF `Trainer`: plain causal-LM training, Stage 1 (new experts) and Stage 2 (review).

One `Trainer` subclass computes each objective as named components (LM, balance, LPR,
classifier), so the loss is one weighted sum and every component is logged through
`on_log`. Because it is plain `Trainer`, `accelerate launch` / torchrun with FSDP2 or
DeepSpeed scale it; the one addition is FSDP2 on CPUs, which accelerate does not set up
(`LayerMoETrainer.create_accelerator_and_postprocess`). Checkpoints are Trainer checkpoints (safetensors
weights) in `output_dir`; a rerun resumes from the newest complete one, and the data order
depends only on the seed, so a resumed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import bisect
import math
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..analysis.routing_stats import routing_statistics
from ..data.corpus import check_old_new
from ..data.token_store import TokenRows, check_token_rows
from ..errors import LayerMoEError, describe_validation_error
from ..model.checkpoints import save_model
from ..model.losses import IGNORE_INDEX, NEW, OLD, classifier_loss, lpr_loss, new_prior_loss
from ..model.modeling_layermoe import LayerMoEForCausalLM
from ..model.moe_block import RouterInit
from ..model.surgery import set_trainable
from ..model.vocabulary import vocabulary_size
from .stopping import StopOnSigterm, caught_sigterm

FINAL_DIR_NAME = "final"
T = TypeVar("T")


# -- settings ----------------------------------------------------------------------
class _Settings(BaseModel):
    """Pydantic settings whose validation errors are `LayerMoEError`s naming the field and the fix."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise _settings_error(type(self), error) from error

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any):
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as error:
            raise _settings_error(cls, error) from error


def _settings_error(cls: type[BaseModel], error: ValidationError) -> LayerMoEError:
    return LayerMoEError(f"bad {cls.__name__}: {describe_validation_error(error, cls, root='settings')}")


class TrainSettings(_Settings):
    """Optimisation settings shared by every training run; the defaults run on a CPU."""

    learning_rate: float = Field(5e-5, title="Learning rate", gt=0, description="the peak learning rate, > 0 (reference: 5e-5)")
    max_steps: int | None = Field(
        None, title="Max steps", ge=1, description="optimizer steps, >= 1; empty: train num_epochs epochs (overrides num_epochs when set)"
    )
    num_epochs: float = Field(1.0, title="Epochs", gt=0, description="passes over the data when max_steps is unset, > 0")
    per_device_batch_size: int = Field(8, title="Batch size per device", ge=1, description="sequences per device and micro-batch, >= 1")
    gradient_accumulation_steps: int = Field(
        1, title="Gradient accumulation steps", ge=1, description="micro-batches per optimizer step, >= 1"
    )
    warmup_ratio: float = Field(0.0, title="Warm-up ratio", ge=0, lt=1, description="the share of steps of linear warm-up, in [0, 1)")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", title="LR schedule", description="one of cosine (reference), linear, constant, constant_with_warmup"
    )
    weight_decay: float = Field(0.0, title="Weight decay", ge=0, description="AdamW weight decay, >= 0")
    max_grad_norm: float = Field(1.0, title="Gradient-norm clip", gt=0, description="the gradient-norm clip, > 0")
    seed: int = Field(0, title="Seed", ge=0, description="the seed of initialisation and data order, >= 0")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", title="Precision", description="fp32, bf16 (mixed, GPU or CPU) or fp16 (mixed, GPU only)"
    )
    gradient_checkpointing: bool = Field(
        False, title="Gradient checkpointing", description="recompute activations in backward to save memory"
    )
    save_steps: int = Field(500, title="Save steps", ge=1, description="optimizer steps between checkpoints, >= 1")
    save_total_limit: int | None = Field(2, title="Checkpoints kept", ge=1, description="checkpoints kept (newest), >= 1; none: keep all")
    logging_steps: int = Field(10, title="Logging steps", ge=1, description="optimizer steps between loss logs, >= 1")
    dataloader_num_workers: int = Field(0, title="Data-loading workers", ge=0, description="data-loading worker processes, >= 0")


class Stage1Settings(TrainSettings):
    """Stage 1 trains the new experts and their routers on the new languages; everything the parent had stays frozen."""

    model_config = ConfigDict(title="Stage 1: new experts")

    new_prior_coef: float = Field(
        0.1,
        ge=0,
        title="New-expert prior coefficient",
        description="the new-expert prior, -log P(this round's experts) of new-language tokens, >= 0 (not in the papers: "
        "without it a lifelong round's new experts lose the new languages to earlier rounds' experts; bench/router_init.py)",
    )
    balance_loss_coef: float = Field(
        0.01, ge=0, title="Balance loss coefficient", description="the load-balancing loss coefficient, >= 0 (reference: 0.01)"
    )
    router_init: RouterInit = Field(
        "parent",
        title="Router initialisation",
        description="this round's routers: parent (parent rows copied, new experts start at expert 0's row; "
        "measured better than the reference's choice, bench/router_init.py) or fresh (re-initialised, as the reference)",
    )


class Stage2Settings(TrainSettings):
    """Stage 2 (the review) trains only the routers and the routing classifiers, on a replay of old and new languages,
    so old-language tokens go back to the old experts."""

    model_config = ConfigDict(title="Stage 2: review")

    replay_old_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        title="Old-language share of the replay",
        description="the share of old-language sequences in the replay mix, in [0, 1]",
    )
    lpr_coef: float = Field(0.1, ge=0, title="LPR loss coefficient", description="the LPR loss coefficient, >= 0 (reference: 0.1)")
    classifier_coef: float = Field(
        0.1, ge=0, title="Classifier loss coefficient", description="the classifier loss coefficient, >= 0 (reference: 0.1)"
    )
    lm_coef: float = Field(1.0, ge=0, title="LM loss coefficient", description="the language-modelling loss coefficient, >= 0")
    new_prior_coef: float = Field(
        0.1,
        ge=0,
        title="New-expert prior coefficient",
        description="the new-expert prior on the replay's new-language tokens, >= 0: LPR's mirror, set it with lpr_coef",
    )
    classifier_target_accuracy: float = Field(
        0.95,
        gt=0,
        le=1,
        title="Classifier accuracy target",
        description="held-out accuracy every routing classifier must reach on every language, in (0, 1]; measured "
        "after the planned steps, the round records it per layer and language and the gate names a classifier below it",
    )
    classifier_max_steps: int | None = Field(
        None,
        ge=1,
        title="Classifier step cap",
        description="the step cap: while a classifier is below its target after max_steps, Stage 2 trains on, measuring "
        "every logging_steps, up to this many optimizer steps in all (>= max_steps; the LR schedule spans the cap). "
        "None: no steps past max_steps",
    )

    @model_validator(mode="after")
    def cap_follows_the_planned_steps(self) -> Stage2Settings:
        if self.classifier_max_steps is not None and (self.max_steps is None or self.classifier_max_steps < self.max_steps):
            raise ValueError(
                f"classifier_max_steps={self.classifier_max_steps} needs max_steps set and at most equal to it "
                f"(max_steps={self.max_steps}); set max_steps, or raise the cap"
            )
        return self


class ClassifierAccuracy(BaseModel):
    """One routing classifier's held-out accuracy on one language, after Stage 2."""

    layer: int
    language: str
    accuracy: float  # share of the language's held-out tokens the classifier labels right (old or new)
    target: float
    step: int  # the optimizer step it was measured at


class TrainResult(BaseModel):
    """What a training run leaves: the saved model and its loss curves, as plain data."""

    model_dir: Path  # save_pretrained directory (safetensors): output_dir/"final"
    global_step: int
    resumed_from: Path | None  # the checkpoint this call continued, if any
    num_sequences: dict[str, int]  # training sequences per language
    final_metrics: dict[str, float]  # the last logged value of each loss component (and train_loss)
    log_history: list[dict[str, Any]]
    classifier_accuracy: list[ClassifierAccuracy] = []  # Stage 2 with held-out text: per classifier layer and language


# -- data ----------------------------------------------------------------------------
TokenSource: TypeAlias = torch.Tensor | TokenRows  # (rows, seq_len): a LongTensor in RAM, or rows read from a token file's memory map


@dataclass(frozen=True)
class _RowTable:
    """Every row of every language's tokens, numbered in language order; a row is fetched only when asked for."""

    sources: list[tuple[str, TokenSource, int | None]]  # (language, rows, OLD / NEW for Stage 2 or None)
    starts: list[int]  # number of the first row of each source; a last entry holds the total

    @classmethod
    def of(cls, *groups: tuple[Mapping[str, TokenSource], int | None]) -> _RowTable:
        sources = [(language, tokens, label) for sequences, label in groups for language, tokens in sequences.items()]
        starts = [0]
        for _, tokens, _ in sources:
            starts.append(starts[-1] + len(tokens))
        return cls(sources, starts)

    def __len__(self) -> int:
        return self.starts[-1]

    def _locate(self, row: int) -> tuple[int, int]:
        source = bisect.bisect_right(self.starts, row) - 1
        return source, row - self.starts[source]

    def language(self, row: int) -> str:
        return self.sources[self._locate(row)[0]][0]

    def item(self, row: int) -> dict[str, Any]:
        source, index = self._locate(row)
        _, tokens, label = self.sources[source]
        item: dict[str, Any] = {"input_ids": tokens[index]}
        if label is not None:
            item["language_label"] = label
        return item

    def range_of(self, group_start: int, group_end: int) -> range:
        """The row numbers of sources group_start..group_end-1."""
        return range(self.starts[group_start], self.starts[group_end])


class SequenceDataset(Dataset):
    """The chosen rows of a `_RowTable` in a fixed order; the Trainer's seeded sampler shuffles them.

    Holds row numbers only: the tokens stay in their token files until a batch needs them.
    """

    def __init__(self, table: _RowTable, rows: Sequence[int]):
        self.table, self.rows = table, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.table.item(self.rows[index])


def collate_sequences(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence; labels and language labels are IGNORE_INDEX on padding.

    Packed sequences of one length need no padding; languages may come in different lengths.
    """
    input_ids = pad_sequence([f["input_ids"] for f in features], batch_first=True)  # (B, L)
    attention_mask = pad_sequence([torch.ones_like(f["input_ids"]) for f in features], batch_first=True)  # (B, L)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX),  # the model shifts them
    }
    if "language_label" in features[0]:
        per_sequence = torch.tensor([f["language_label"] for f in features])  # (B,)
        language_labels = per_sequence[:, None].expand_as(input_ids)  # (B, L)
        batch["language_labels"] = language_labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return batch


def _check_sequences(sequences: Mapping[str, TokenSource], what: str, vocab_size: int) -> None:
    if not sequences:
        raise LayerMoEError(f"no {what} sequences were given; pass a dict language -> (num_sequences, seq_len) LongTensor of token ids")
    for language, tokens in sequences.items():
        check_token_rows(tokens, f"{what} sequences of {language!r}", vocab_size=vocab_size, rows=True)


def _balanced_pick(items: Sequence[T], count: int, language: Callable[[T], str], generator: torch.Generator) -> list[T]:
    """`count` items drawn with `generator`, spread evenly over their languages (the first ones, in name order, get the remainder)."""
    by_language: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        by_language.setdefault(language(item), []).append(index)
    share, extra = divmod(count, max(len(by_language), 1))
    picked = []
    for rank, name in enumerate(sorted(by_language)):
        indices = by_language[name]
        take = share + (rank < extra)
        picked += [indices[i] for i in torch.randperm(len(indices), generator=generator)[:take].tolist()]
    return [items[i] for i in sorted(picked)]


def _balanced_capacity(items: Sequence[T], language: Callable[[T], str]) -> int:
    """The most items a per-language balanced draw can take: languages x the smallest language's count."""
    counts: dict[str, int] = {}
    for item in items:
        counts[language(item)] = counts.get(language(item), 0) + 1
    return len(counts) * min(counts.values(), default=0)


def replay_mix(old: Sequence[T], new: Sequence[T], old_fraction: float, seed: int, language: Callable[[T], str]) -> list[T]:
    """The largest mix holding `old_fraction` old sequences, each side balanced per language, drawn with `seed`.

    Balanced, so that a language with less replay text is not outvoted in the classifier and
    LPR losses (a mean over old tokens would hide its errors).
    """
    old_capacity, new_capacity = _balanced_capacity(old, language), _balanced_capacity(new, language)
    if old_fraction == 0:
        total = new_capacity
    elif old_fraction == 1:
        total = old_capacity
    else:
        total = math.floor(min(new_capacity / (1 - old_fraction), old_capacity / old_fraction) + 1e-9)
    num_old = round(old_fraction * total)
    generator = torch.Generator().manual_seed(seed)
    return _balanced_pick(old, num_old, language, generator) + _balanced_pick(new, total - num_old, language, generator)


# -- objectives ----------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """loss = sum of weights[name] * component[name]; components without a weight are metrics only."""

    weights: Mapping[str, float]
    measure: Callable[[Any, torch.Tensor | None], dict[str, torch.Tensor]]

    def loss(self, components: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum(weight * components[name] for name, weight in self.weights.items() if name in components)


def _measure_lm(outputs, language_labels) -> dict[str, torch.Tensor]:
    return {"lm_loss": outputs.loss}


def _prior_losses(outputs, labels: torch.Tensor, num_old_experts: Sequence[int], loss: Callable) -> torch.Tensor:
    """A routing prior averaged over the layers whose router trains, each with its own number of old experts."""
    return torch.stack([loss(logits, labels, n) for logits, n in zip(outputs.router_logits, num_old_experts, strict=True)]).mean()


def _measure_stage1(outputs, language_labels: torch.Tensor, num_old_experts: Sequence[int]) -> dict[str, torch.Tensor]:
    labels = language_labels.reshape(-1)  # (N,): NEW, IGNORE_INDEX on padding
    return {
        "lm_loss": outputs.lm_loss,
        "balance_loss": outputs.aux_loss,
        "new_prior_loss": _prior_losses(outputs, labels, num_old_experts, new_prior_loss),
    }


def _measure_stage2(outputs, language_labels: torch.Tensor, num_old_experts: Sequence[int]) -> dict[str, torch.Tensor]:
    """LPR (and the new-expert prior) averaged over the layers whose router trains; the classifier loss over
    the classifier layers."""
    labels = language_labels.reshape(-1)  # (N,) in the router logits' (batch * seq) order
    components = {
        "lm_loss": outputs.lm_loss,
        "lpr_loss": _prior_losses(outputs, labels, num_old_experts, lpr_loss),
        "new_prior_loss": _prior_losses(outputs, labels, num_old_experts, new_prior_loss),
    }
    if outputs.classifier_logits:
        components["classifier_loss"] = torch.stack([classifier_loss(logits, labels) for logits in outputs.classifier_logits]).mean()
        counted = labels != IGNORE_INDEX
        with torch.no_grad():
            accuracy = [(logits.argmax(-1)[counted] == labels[counted]).float().mean() for logits in outputs.classifier_logits]
        components["classifier_accuracy"] = torch.stack(accuracy).mean()
    return components


# -- the Trainer ---------------------------------------------------------------------
class LayerMoETrainer(Trainer):
    """`Trainer` whose loss is an `Objective`; each component's mean since the last log joins the log."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean; Trainer divides by accumulation

    def create_accelerator_and_postprocess(self) -> None:
        """Accelerate's set-up, then FSDP2 where `accelerate launch` asked for it and accelerate did not apply it.

        On a CPU-only machine accelerate makes every multi-process run MULTI_CPU (DDP over gloo) and
        drops the FSDP plugin its launcher asked for. FSDP2's `fully_shard` runs on CPU tensors over
        gloo, so the ranks mark accelerate's state FSDP with the launcher's plugin (read from the same
        FSDP_* environment): accelerate's own `fully_shard` wrapping, sharded checkpoints, resume and
        full-state-dict gather then run as on GPUs. Any other mismatch between what the launcher asked
        for and what accelerate set up fails here (no silent fallback to DDP).
        """
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        asked_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        asked_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        if asked_fsdp and state.distributed_type == DistributedType.MULTI_CPU:
            plugin = FullyShardedDataParallelPlugin()  # FSDP_* variables, as accelerate's GPU path builds it
            if plugin.fsdp_version != 2:
                raise LayerMoEError("FSDP on CPUs runs as FSDP2 only; set fsdp_config.fsdp_version: 2 in the accelerate config")
            if state.mixed_precision != "no":
                plugin.set_mixed_precision(state.mixed_precision)
            # AcceleratorState copies PartialState's distributed_type whenever it is built, so both are set.
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            state.fsdp_plugin = plugin
            self.is_fsdp_enabled = True
        if (asked_fsdp and not self.accelerator.is_fsdp2) or (asked_deepspeed and state.distributed_type != DistributedType.DEEPSPEED):
            raise LayerMoEError(
                f"accelerate launch asked for {'FSDP2' if asked_fsdp else 'DeepSpeed'} but accelerate set up "
                f"{state.distributed_type.value}; rather than train undistributed, this rank stops. Check the accelerate "
                "config (distributed_type, fsdp_version: 2) and, for DeepSpeed, that it is installed and CUDA GPUs are visible"
            )

    def __init__(self, *args, objective: Objective, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_batches = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        language_labels = inputs.pop("language_labels", None)
        outputs = model(**inputs)
        components = self.objective.measure(outputs, language_labels)
        if model.training:
            for name, value in components.items():
                self._component_sums[name] = self._component_sums.get(name, 0) + value.detach().float()
            self._component_batches += 1
        loss = self.objective.loss(components)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_batches:
            names = list(self._component_sums)
            means = torch.stack([self._component_sums[n] for n in names]) / self._component_batches
            means = self.accelerator.reduce(means, reduction="mean")  # the mean over processes
            logs.update(zip(names, means.tolist()))
            self._component_sums, self._component_batches = {}, 0
        super().log(logs, start_time)


def shard_moe_blocks(model: torch.nn.Module, plugin) -> None:
    """FSDP2-shard each MoE block on its parameters' largest dimension, before accelerate shards the rest.

    `fully_shard` splits dimension 0 by default, and a block's stacked experts are (new experts,
    2 * intermediate, hidden): with 1 or 2 new experts a layer, dimension 0 gives whole experts to
    one or two ranks and nothing to the others. accelerate skips modules that are already sharded.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import Shard

    if not isinstance(model, LayerMoEForCausalLM):
        return
    for block in model.moe_blocks().values():
        fully_shard(
            block,
            reshard_after_forward=plugin.reshard_after_forward,
            mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
            offload_policy=plugin.cpu_offload,
            shard_placement_fn=lambda parameter: Shard(max(range(parameter.ndim), key=lambda dim: parameter.shape[dim])),
        )


def strategy_name(accelerator) -> str:
    """What this rank runs, in the words of `LauncherSettings.strategy`."""
    from accelerate.utils import DistributedType

    if accelerator.is_fsdp2:
        full = accelerator.state.fsdp_plugin.reshard_after_forward in (True, "FULL_SHARD")
        return "FSDP2 full shard" if full else "FSDP2, no reshard after forward"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return "DDP (replicated)" if accelerator.num_processes > 1 else "single process"


def held_trainable_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of trainable parameters this rank stores, bytes of all trainable parameters): a shard's local part
    against the whole."""
    from torch.distributed.tensor import DTensor

    trainable = [p for p in model.parameters() if p.requires_grad]
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size() for p in trainable)
    return local, sum(p.numel() * p.element_size() for p in trainable)


class _AnnounceRank(TrainerCallback):
    """One line per rank when training starts: rank, world size, strategy, and the trainable bytes it holds."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        accelerator = self.trainer.accelerator
        local, total = held_trainable_bytes(self.trainer.model_wrapped)
        line = (
            f"layermoe rank {accelerator.process_index}/{accelerator.num_processes}: {strategy_name(accelerator)}; "
            f"trainable parameters held by this rank: {local:,} of {total:,} bytes\n"
        )
        # One write with its newline: the ranks share an unbuffered stream (python -u), where print's separate
        # write of the newline let two ranks' lines run together.
        sys.stdout.write(line)
        sys.stdout.flush()


class _LogLastStep(TrainerCallback):
    """Log at the last step too, so the final losses are always in the history."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True


class MetricsCallback(TrainerCallback):
    """Forward every training log as fn(metrics, step, max_steps), on the main process only.

    The metrics are the loss components (lm_loss, balance_loss, lpr_loss, classifier_loss),
    classifier_accuracy, loss, learning_rate and grad_norm; tasks forward them to MLflow or
    Prefect, so the library never imports either.
    """

    def __init__(self, fn: Callable[[dict[str, float], int, int], None]):
        self.fn = fn

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.fn({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}, state.global_step, state.max_steps)


class ClassifierTarget(TrainerCallback):
    """Held-out accuracy of this round's classifiers per (layer, language), first when the planned steps are done.

    Below the target anywhere, training goes on (the Trainer runs to the cap) and is measured again every
    `logging_steps`; it stops once every classifier reaches the target, or at the cap.
    """

    def __init__(
        self, heldout: Mapping[str, torch.Tensor], old_languages: Sequence[str], planned_steps: int | None, target: float, batch_size: int
    ):
        self.heldout, self.old_languages, self.target, self.batch_size = heldout, list(old_languages), target, batch_size
        self.planned = planned_steps
        self.measured: list[ClassifierAccuracy] = []

    def measure(self, model: LayerMoEForCausalLM, step: int) -> bool:
        """Record the accuracies at `step`; whether every classifier reached the target."""
        table = routing_statistics(model, self.heldout, self.old_languages, batch_size=self.batch_size).dropna(
            subset=["classifier_accuracy"]
        )
        self.measured = [
            ClassifierAccuracy(layer=row.layer, language=row.language, accuracy=row.classifier_accuracy, target=self.target, step=step)
            for row in table.itertuples()
        ]
        return all(entry.accuracy >= self.target for entry in self.measured)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.planned is None:  # trained by epochs, with no cap: the planned steps are the Trainer's total
            self.planned = state.max_steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step < self.planned or (step > self.planned and step < state.max_steps and (step - self.planned) % args.logging_steps):
            return
        if self.measure(model, step) or step >= state.max_steps:
            control.should_training_stop = True
            control.should_log = True


class _ProgressBarOnly(ProgressCallback):
    """The Trainer's progress bar without its printed log dict: a `MetricsCallback` already reports each log."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def _print_each_log_once(trainer: Trainer, callbacks: Sequence[TrainerCallback]) -> None:
    """With a `MetricsCallback`, each log step prints one line (the callback's), not that line and the Trainer's dict."""
    if not any(isinstance(callback, MetricsCallback) for callback in callbacks):
        return
    trainer.remove_callback(PrinterCallback)  # the Trainer's printer when its progress bar is off
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_ProgressBarOnly)


def training_arguments(settings: TrainSettings, output_dir: Path) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    if settings.precision == "fp16" and not on_gpu:
        raise LayerMoEError("precision='fp16' needs a CUDA GPU and none is visible; use 'bf16' or 'fp32' on a CPU")
    return TrainingArguments(
        output_dir=str(output_dir),
        learning_rate=settings.learning_rate,
        max_steps=settings.max_steps or -1,
        num_train_epochs=settings.num_epochs,
        per_device_train_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=settings.lr_scheduler,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        seed=settings.seed,
        data_seed=settings.seed,
        bf16=settings.precision == "bf16",
        fp16=settings.precision == "fp16",
        activation_checkpointing=settings.gradient_checkpointing,
        # Non-reentrant: frozen embeddings give inputs without grad, and router logits leave the layer.
        activation_checkpointing_kwargs={"use_reentrant": False},
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        logging_steps=settings.logging_steps,
        dataloader_num_workers=settings.dataloader_num_workers,
        remove_unused_columns=False,  # the collator's language_labels are not a forward argument
        # An expert group can get no tokens on one rank in a step; DDP must not wait for its gradients.
        # transformers turns this off under checkpointing, but ours is non-reentrant, which allows it.
        ddp_find_unused_parameters=True,
        report_to="none",
        push_to_hub=False,
        use_cpu=not on_gpu,
    )


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete Trainer checkpoint: one whose trainer state was written (it is written last)."""
    complete = [
        path
        for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-").isdigit() and (path / TRAINER_STATE_NAME).is_file()
    ]
    return max(complete, key=lambda path: int(path.name.rsplit("-", 1)[1]), default=None)


def _final_metrics(log_history: list[dict[str, Any]], objective: Objective) -> dict[str, float]:
    keys = {"loss", "train_loss", "classifier_accuracy", *objective.weights}
    return {key: float(value) for entry in log_history for key, value in entry.items() if key in keys}


def fp32_master_weights(model: PreTrainedModel) -> torch.dtype:
    """Give every trainable parameter fp32 storage; return the dtype the model came in, to save it in.

    AdamW updates a bf16 weight in place in bf16, which rounds most small updates away (from a
    bf16 parent, 4 steps at lr 5e-5 left about half the new experts' elements unchanged). Frozen
    weights stay in the parent's dtype, for memory; the model's modules cast where dtypes meet.
    """
    dtype = model.dtype
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return dtype


def _train(
    model: PreTrainedModel,
    dataset: SequenceDataset,
    objective: Objective,
    settings: TrainSettings,
    output_dir: str | Path,
    callbacks: Sequence[TrainerCallback],
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> TrainResult:
    """The shared plumbing: Trainer run (resumed when a checkpoint exists), then the model (and `tokenizer`) to final/.

    Trainable parameters train in fp32 (`fp32_master_weights`); final/ is saved in the dtype the model came in.
    A SIGTERM stops training at the next step's end, with a checkpoint there (`stopping.StopOnSigterm`).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    saved_dtype = fp32_master_weights(model)
    stop = StopOnSigterm()
    trainer = LayerMoETrainer(
        model=model,
        args=training_arguments(settings, output_dir),
        train_dataset=dataset,
        data_collator=collate_sequences,
        callbacks=[_LogLastStep(), stop, *callbacks],
        objective=objective,
    )
    trainer.add_callback(_AnnounceRank(trainer))
    if trainer.accelerator.is_fsdp2:
        shard_moe_blocks(model, trainer.accelerator.state.fsdp_plugin)
    _print_each_log_once(trainer, callbacks)
    checkpoint = latest_checkpoint(output_dir)
    with caught_sigterm(stop.request):
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        stop.raise_if_stopped(trainer.accelerator, output_dir)

    final_dir = output_dir / FINAL_DIR_NAME
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)  # gathers FSDP / DeepSpeed shards
    if trainer.args.should_save:
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        # A gathered FSDP state dict holds tied weights (lm_head = embed_tokens) as separate copies, which
        # save_pretrained cannot recognise as shared; keep the names the model itself keeps.
        kept = {name for name, _ in unwrapped.named_parameters()} | {name for name, _ in unwrapped.named_buffers()}
        state_dict = {name: t.to(saved_dtype) if t.is_floating_point() else t for name, t in state_dict.items() if name in kept}
        unwrapped.config.dtype = saved_dtype
        save_model(unwrapped, tokenizer, final_dir, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()

    counts = Counter(dataset.table.language(row) for row in dataset.rows)
    history = trainer.state.log_history
    return TrainResult(
        model_dir=final_dir,
        global_step=trainer.state.global_step,
        resumed_from=checkpoint,
        num_sequences=dict(counts),
        final_metrics=_final_metrics(history, objective),
        log_history=history,
    )


def _trained_routers_old_experts(model: LayerMoEForCausalLM) -> list[int]:
    """Old experts per layer whose router trains this round, in the order of the output's router_logits."""
    return [block.num_old_experts for block in model.moe_blocks().values() if block.expanded_this_round]


# -- public entry points ---------------------------------------------------------------
def train_causal_lm(
    model: PreTrainedModel,
    sequences: Mapping[str, TokenSource],
    settings: TrainSettings,
    output_dir: str | Path,
    callbacks: Sequence[TrainerCallback] = (),
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> TrainResult:
    """Plain causal-LM training of every trainable parameter (the demo trains its dense base with it)."""
    _check_sequences(sequences, "training", vocabulary_size(model.config))
    objective = Objective({"lm_loss": 1.0}, _measure_lm)
    table = _RowTable.of((sequences, None))
    return _train(model, SequenceDataset(table, range(len(table))), objective, settings, output_dir, callbacks, tokenizer)


def train_stage1(
    model: LayerMoEForCausalLM,
    new_sequences: Mapping[str, TokenSource],
    settings: Stage1Settings,
    output_dir: str | Path,
    callbacks: Sequence[TrainerCallback] = (),
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> TrainResult:
    """Stage 1: this round's experts and routers learn the new languages; loss = LM + coef * balance."""
    _check_sequences(new_sequences, "new-language", vocabulary_size(model.config))
    set_trainable(model, "stage1")
    objective = Objective(
        {"lm_loss": 1.0, "balance_loss": settings.balance_loss_coef, "new_prior_loss": settings.new_prior_coef},
        partial(_measure_stage1, num_old_experts=_trained_routers_old_experts(model)),
    )
    table = _RowTable.of((new_sequences, NEW))
    return _train(model, SequenceDataset(table, range(len(table))), objective, settings, output_dir, callbacks, tokenizer)


def train_stage2(
    model: LayerMoEForCausalLM,
    old_sequences: Mapping[str, TokenSource],
    new_sequences: Mapping[str, TokenSource],
    settings: Stage2Settings,
    output_dir: str | Path,
    callbacks: Sequence[TrainerCallback] = (),
    tokenizer: PreTrainedTokenizerBase | None = None,
    heldout_sequences: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Stage 2 (review): routers and classifiers train on a replay mix of old and new sequences.

    loss = lm_coef * LM + lpr_coef * LPR + classifier_coef * classifier CE; insert the
    classifiers (`surgery.insert_classifiers`) before calling this. With `heldout_sequences` (every
    old and new language) the classifiers' held-out accuracy is measured after the planned steps and
    recorded in the result; below `classifier_target_accuracy`, training goes on up to `classifier_max_steps`.
    """
    vocab_size = vocabulary_size(model.config)
    _check_sequences(old_sequences, "old-language", vocab_size)
    if settings.replay_old_fraction < 1:
        _check_sequences(new_sequences, "new-language", vocab_size)
    check_old_new(old_sequences, new_sequences)
    set_trainable(model, "stage2")
    table = _RowTable.of((old_sequences, OLD), (new_sequences, NEW))
    old_rows, new_rows = table.range_of(0, len(old_sequences)), table.range_of(len(old_sequences), len(table.sources))
    rows = replay_mix(old_rows, new_rows, settings.replay_old_fraction, settings.seed, language=table.language)
    objective = Objective(
        {
            "lm_loss": settings.lm_coef,
            "lpr_loss": settings.lpr_coef,
            "classifier_loss": settings.classifier_coef,
            "new_prior_loss": settings.new_prior_coef,
        },
        partial(_measure_stage2, num_old_experts=_trained_routers_old_experts(model)),
    )
    has_classifiers = any(block.router is not None and block.router.classifier is not None for block in model.moe_blocks().values())
    if heldout_sequences is None or not has_classifiers:
        return _train(model, SequenceDataset(table, rows), objective, settings, output_dir, callbacks, tokenizer)
    missing = sorted((set(old_sequences) | set(new_sequences)) - set(heldout_sequences))
    if missing:
        raise LayerMoEError(
            f"held-out sequences lack {missing}; give held-out text of every old and new language to measure the classifiers"
        )
    dataset = SequenceDataset(table, rows)
    planned = settings.max_steps  # None: the Trainer's count for num_epochs, read when training begins
    target = ClassifierTarget(
        heldout_sequences, list(old_sequences), planned, settings.classifier_target_accuracy, settings.per_device_batch_size
    )
    run = settings.model_copy(update={"max_steps": settings.classifier_max_steps or settings.max_steps})
    result = _train(model, dataset, objective, run, output_dir, [*callbacks, target], tokenizer)
    if not target.measured:  # resumed after the last step: nothing left to train, measure the saved model
        target.measure(model, result.global_step)
    return result.model_copy(update={"classifier_accuracy": target.measured})


__all__ = [
    "MetricsCallback",
    "Stage1Settings",
    "Stage2Settings",
    "ClassifierAccuracy",
    "TrainResult",
    "TrainSettings",
    "collate_sequences",
    "fp32_master_weights",
    "held_trainable_bytes",
    "latest_checkpoint",
    "replay_mix",
    "strategy_name",
    "train_causal_lm",
    "train_stage1",
    "train_stage2",
]
