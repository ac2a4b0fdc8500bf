"""What a round costs before anything trains: parameters, the child's bytes, memory per device, tokens and steps.

The child is built on the meta device by the real surgery (`expand`, `insert_classifiers`,
`set_trainable`), so the counts are the model's own and nothing is allocated. Bytes follow how
`training` holds a model: trainable parameters in fp32 master weights with fp32 gradients and
AdamW's two fp32 moments; frozen ones in the parent's dtype; the child saved in the parent's
dtype. Activations, the CUDA context and allocator slack are not counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from ..analysis.allocation import AllocationSettings
from ..errors import LayerMoEError
from ..model.files import refuse_custom_code
from ..model.modeling_layermoe import LayerMoEForCausalLM
from ..model.surgery import Stage, count_parameters, expand, insert_classifiers, set_trainable
from .launch import LauncherSettings
from .trainer import Stage1Settings, Stage2Settings, TrainSettings, replay_mix

FP32_BYTES = 4
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, fp32 each
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


class StageEstimate(BaseModel):
    """One training stage, per device (bytes) and per optimizer step."""

    stage: str
    trainable_params: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    sequences: int
    tokens_per_step: int
    steps: int


class RoundEstimate(BaseModel):
    """One round at one allocation (for `layermoe`, each end of the range its rounding allows)."""

    allocation: list[int]
    parent_params: int
    added_params: int
    total_params: int
    child_bytes: int  # the child's model.safetensors, header included
    processes: int
    sharding: str
    stages: list[StageEstimate]


# -- the parent and the allocation ---------------------------------------------------------
def parent_config(path: str | Path) -> PretrainedConfig:
    """The parent's config from a model directory or a config.json file (a LayerMoE config too)."""
    from ..model import modeling_layermoe  # noqa: F401  (registers the layermoe config class)

    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise LayerMoEError(f"no parent config at {config_file}; pass a model directory or its config.json")
    refuse_custom_code(config_file)
    return AutoConfig.from_pretrained(str(config_file), trust_remote_code=False)


def parent_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype the parent's weights are stored (and the child saved) in."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _num_layers(config: PretrainedConfig) -> int:
    return getattr(config, "base_config", config).num_hidden_layers


def allocation_range(settings: AllocationSettings, num_layers: int) -> tuple[int, int]:
    """The fewest and most new experts a proportional allocation can give, whatever the signal.

    rounding "exact" gives delta. "ceil": N_i = max(min, ceil(x_i)) with sum x_i = delta, x_i > 0, so
    each ceil adds less than 1: the total is at least max(delta, layers * min) and at most
    delta + layers * max(min, 1) - 1; max_per_layer caps both. Other mappings (minmax, threshold)
    depend on the signal alone and are shown at delta.
    """
    low = max(settings.delta, num_layers * settings.min_per_layer)
    high = low
    if settings.rounding == "ceil" and settings.effective_mapping == "proportional":
        high = max(low, settings.delta + num_layers * max(settings.min_per_layer, 1) - 1)
    if settings.max_per_layer is not None:
        cap = num_layers * settings.max_per_layer
        low, high = min(low, cap), min(high, cap)
    return low, high


def spread(total: int, num_layers: int) -> list[int]:
    """An allocation of `total` new experts over the layers, as even as can be (parameter counts depend only on the
    total when every layer gets at least one)."""
    share, extra = divmod(total, num_layers)
    return [share + (layer < extra) for layer in range(num_layers)]


def candidate_allocations(settings: AllocationSettings, num_layers: int) -> list[list[int]]:
    """The allocation(s) to estimate: the exact one for `uniform` and `fixed`, both ends of the range for the others."""
    if settings.method == "uniform":
        return [[settings.per_layer] * num_layers]
    if settings.method == "fixed":
        return [list(settings.fixed or [])]
    low, high = allocation_range(settings, num_layers)
    return [spread(low, num_layers)] + ([spread(high, num_layers)] if high != low else [])


# -- sharding ------------------------------------------------------------------------------
def sharding(launcher: LauncherSettings | None) -> tuple[str, set[str]]:
    """A name for the strategy and which of {weights, grads, optimizer} it splits over the processes."""
    config = launcher.accelerate_config() if launcher else {}
    kind = str(config.get("distributed_type", "MULTI_GPU")).upper()
    if kind == "FSDP":
        fsdp = config.get("fsdp_config") or {}
        if int(fsdp.get("fsdp_version", 1)) == 2:
            full = fsdp.get("fsdp_reshard_after_forward", True) in (True, "true", "FULL_SHARD")
        else:
            strategy = str(fsdp.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
            if strategy in ("NO_SHARD", "3"):
                return "FSDP NO_SHARD", set()
            full = strategy not in ("SHARD_GRAD_OP", "2")
        return ("FSDP full shard", {"weights", "grads", "optimizer"}) if full else ("FSDP SHARD_GRAD_OP", {"grads", "optimizer"})
    if kind == "DEEPSPEED":
        stage = _zero_stage(config.get("deepspeed_config") or {})
        return f"DeepSpeed ZeRO-{stage}", [set(), {"optimizer"}, {"grads", "optimizer"}, {"weights", "grads", "optimizer"}][stage]
    return "DDP (replicated)", set()


def _zero_stage(deepspeed: dict) -> int:
    if deepspeed.get("deepspeed_config_file"):
        file = Path(deepspeed["deepspeed_config_file"])
        if not file.is_file():
            raise LayerMoEError(f"deepspeed_config_file {file} does not exist; fix the path in the accelerate config")
        return int(json.loads(file.read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage", 0))
    return int(deepspeed.get("zero_stage", 0))


# -- the model on the meta device -------------------------------------------------------------
def meta_child(
    config: PretrainedConfig, allocation: Sequence[int], old: Sequence[str], new: Sequence[str], top_k: int, classifier_layers: int
) -> tuple[torch.nn.Module, LayerMoEForCausalLM]:
    """The parent and its child (after expand and insert_classifiers) with meta tensors: shapes only."""
    with torch.device("meta"):
        parent = AutoModelForCausalLM.from_config(config)
        child = AutoModelForCausalLM.from_config(config)
    child = expand(child, list(allocation), list(old), list(new), top_k=None if isinstance(child, LayerMoEForCausalLM) else top_k)
    eligible = [layer for layer, block in child.moe_blocks().items() if block.expanded_this_round]
    insert_classifiers(child, eligible[:classifier_layers])
    return parent, child


def safetensors_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """The size of `model.safetensors` for this model's parameters in `dtype`: data plus the JSON header."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    seen = set()
    for name, parameter in model.named_parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        size = parameter.numel() * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(parameter.shape), "data_offsets": [offset, offset + size]}
        offset += size
    header_bytes = len(json.dumps(header, separators=(",", ":")))
    return 8 + header_bytes + (-header_bytes % 8) + offset


def _steps(sequences: int, settings: TrainSettings, processes: int) -> int:
    """Optimizer steps as HF Trainer counts them: batches are dealt to the processes, then accumulated."""
    if settings.max_steps:
        return settings.max_steps
    batches_per_process = math.ceil(math.ceil(sequences / settings.per_device_batch_size) / processes)
    per_epoch = max(math.ceil(batches_per_process / settings.gradient_accumulation_steps), 1)
    return math.ceil(settings.num_epochs * per_epoch)


def _stage(
    name: Stage,
    model: LayerMoEForCausalLM,
    dtype: torch.dtype,
    settings: TrainSettings,
    sequences: int,
    seq_len: int,
    processes: int,
    sharded: set[str],
) -> StageEstimate:
    set_trainable(model, name)
    trainable, frozen = count_parameters(model, trainable=True), count_parameters(model, trainable=False)

    def per_device(total: int, what: str) -> int:
        return math.ceil(total / processes) if what in sharded else total

    return StageEstimate(
        stage=name,
        trainable_params=trainable,
        weights_bytes=per_device(trainable * FP32_BYTES + frozen * dtype.itemsize, "weights"),
        grads_bytes=per_device(trainable * FP32_BYTES, "grads"),
        optimizer_bytes=per_device(trainable * FP32_BYTES * ADAM_MOMENTS, "optimizer"),
        sequences=sequences,
        tokens_per_step=settings.per_device_batch_size * settings.gradient_accumulation_steps * processes * seq_len,
        steps=_steps(sequences, settings, processes),
    )


def estimate_round(
    config: PretrainedConfig,
    allocation: Sequence[int],
    old_languages: Sequence[str],
    new_languages: Sequence[str],
    *,
    top_k: int,
    classifier_layers: int,
    seq_len: int,
    stage1_tokens: int,
    stage2_tokens: int,
    stage1: Stage1Settings,
    stage2: Stage2Settings,
    launcher: LauncherSettings | None = None,
) -> RoundEstimate:
    """Sizes, memory and steps of one round at `allocation`, with token budgets per language as in a plan.

    Sequences per language are budget // seq_len (what sampling packs when the corpus holds the
    budget); Stage 2 trains on the replay mix of those, balanced per language.
    """
    dtype = parent_dtype(config)
    parent, child = meta_child(config, allocation, old_languages, new_languages, top_k, classifier_layers)
    processes = launcher.processes if launcher else 1
    name, sharded = sharding(launcher)
    parent_params, total = count_parameters(parent), count_parameters(child)
    rows1, rows2 = stage1_tokens // seq_len, stage2_tokens // seq_len
    replay = len(
        replay_mix(
            [lang for lang in old_languages for _ in range(rows2)],
            [lang for lang in new_languages for _ in range(rows2)],
            stage2.replay_old_fraction,
            stage2.seed,
            language=lambda lang: lang,
        )
    )
    return RoundEstimate(
        allocation=list(allocation),
        parent_params=parent_params,
        added_params=total - parent_params,
        total_params=total,
        child_bytes=safetensors_bytes(child, dtype),
        processes=processes,
        sharding=name,
        stages=[
            _stage("stage1", child, dtype, stage1, rows1 * len(new_languages), seq_len, processes, sharded),
            _stage("stage2", child, dtype, stage2, replay, seq_len, processes, sharded),
        ],
    )


def _gib(size: int) -> str:
    return f"{size / 2**30:,.2f} GiB" if size >= 2**30 else f"{size / 2**20:,.2f} MiB"


def format_estimate(estimates: Sequence[RoundEstimate], allocation: AllocationSettings, num_layers: int) -> str:
    """The report `layermoe estimate` prints."""
    lines = []
    if allocation.method in ("uniform", "fixed"):
        lines.append(f"allocation: {allocation.method}, {sum(estimates[0].allocation)} new experts: {estimates[0].allocation}")
    else:
        low, high = allocation_range(allocation, num_layers)
        mapping, rounding = allocation.effective_mapping, allocation.rounding
        lines.append(
            f"allocation: {allocation.method} ({mapping} mapping, {rounding} rounding), delta={allocation.delta} over "
            f"{num_layers} layers. The {allocation.method} signal decides the split"
            + (
                f"; ceil rounding puts the total in [{low}, {high}] new experts. Both ends are shown."
                if high != low
                else f"; shown at {low} new experts."
            )
        )
    for estimate in estimates:
        lines += [
            "",
            f"== {sum(estimate.allocation)} new experts ==",
            f"parameters: parent {estimate.parent_params:,}  added {estimate.added_params:,}  total {estimate.total_params:,}",
            f"child on disk (model.safetensors): {_gib(estimate.child_bytes)} ({estimate.child_bytes:,} bytes)",
            f"per device, {estimate.processes} process(es), {estimate.sharding}; activations not included:",
        ]
        for stage in estimate.stages:
            lines.append(
                f"  {stage.stage}: trainable {stage.trainable_params:,}  weights {_gib(stage.weights_bytes)}  "
                f"grads {_gib(stage.grads_bytes)}  optimizer {_gib(stage.optimizer_bytes)}  | "
                f"{stage.sequences:,} sequences, {stage.tokens_per_step:,} tokens/step, {stage.steps:,} steps"
            )
    return "\n".join(lines)


__all__ = [
    "RoundEstimate",
    "StageEstimate",
    "allocation_range",
    "candidate_allocations",
    "estimate_round",
    "format_estimate",
    "parent_config",
    "safetensors_bytes",
]
