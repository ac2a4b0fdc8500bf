"""What a round costs before anything trains: parameters, the child's bytes, memory per device, tokens and steps.

The child is built on the meta device by the real surgery (`expand`, `insert_classifiers`,
`set_trainable`), so the counts are the model's own and nothing is allocated. Bytes follow how
`training` holds a model: trainable parameters in fp32 master weights with fp32 gradients and
AdamW's two fp32 moments; frozen ones in the parent's dtype; the child saved in the parent's
dtype. Activations are the tensors a decoder layer keeps for backward (`activation_bytes`);
the CUDA context and allocator slack are not counted. Time is training FLOPs over a stated
achieved throughput (`DEFAULT_TFLOPS_PER_DEVICE`); docs/multi-gpu.md checks the memory against
peaks measured on a CPU.
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
from ..model.modeling_layermoe import LayerMoEForCausalLM, decoder_layers
from ..model.surgery import Stage, count_parameters, expand, extend_vocabulary, insert_classifiers, set_trainable
from ..model.vocabulary import vocabulary_size
from .launch import LauncherSettings
from .trainer import Stage1Settings, Stage2Settings, TrainSettings, replay_mix

FP32_BYTES = 4
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, fp32 each
# Achieved bf16 throughput of one device, in TFLOP/s: Llama 3's pre-training reached 38-43% of an
# H100's 989 dense bf16 TFLOP/s (Dubey et al. 2024, "The Llama 3 Herd of Models", Table 4). LayerMoE's
# expert dispatch has not been timed on GPUs here, so the hours it gives are a floor; pass the
# throughput you measure with `layermoe estimate --tflops-per-device`.
DEFAULT_TFLOPS_PER_DEVICE = 400.0
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


class StageEstimate(BaseModel):
    """One training stage, per device (bytes) and per optimizer step."""

    stage: str
    trainable_params: int
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int  # at the stage's gradient_checkpointing setting
    gathered_bytes: int  # sharded weights: the largest decoder layer gathered, twice (the next one is prefetched)
    activations_without_checkpointing_bytes: int
    activations_with_checkpointing_bytes: int
    total_bytes: int  # per device: weights + grads + optimizer + activations + gathered
    checkpoint_bytes: int  # one Trainer checkpoint on disk (all ranks' shards together)
    checkpoints_kept: int  # save_total_limit, or every checkpoint of the stage
    sequences: int
    tokens_per_step: int
    steps: int
    train_flops: float
    hours: float  # wall-clock at tflops_per_device on each of the processes
    device_hours: float


class RoundEstimate(BaseModel):
    """One round at one allocation (for `layermoe`, each end of the range its rounding allows)."""

    allocation: list[int]
    added_tokens: int  # vocabulary rows the round adds: the plan's `vocabulary.extend`, the most it can add
    parent_params: int
    added_params: int
    total_params: int
    child_bytes: int  # the child's model.safetensors, header included
    processes: int
    sharding: str
    token_store_bytes: int  # the sampled token files of every language (training, analysis and evaluation splits)
    tflops_per_device: float
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


# -- the model on the meta device -------------------------------------------------------------
def meta_child(
    config: PretrainedConfig,
    allocation: Sequence[int],
    old: Sequence[str],
    new: Sequence[str],
    top_k: int,
    classifier_layers: int,
    added_tokens: int = 0,
) -> tuple[torch.nn.Module, LayerMoEForCausalLM]:
    """The parent and its child (after expand, extend_vocabulary and insert_classifiers) with meta tensors: shapes only."""
    with torch.device("meta"):
        parent = AutoModelForCausalLM.from_config(config)
        child = AutoModelForCausalLM.from_config(config)
    child = expand(child, list(allocation), list(old), list(new), top_k=None if isinstance(child, LayerMoEForCausalLM) else top_k)
    if added_tokens:
        extend_vocabulary(child, [[0]] * added_tokens)  # the rows' shapes; which pieces they start from changes no size
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


def _shape(config: PretrainedConfig) -> tuple[int, int, int, int, int, int]:
    """(hidden, intermediate, vocabulary, heads, key-value heads, head dim) of the dense parent."""
    base = getattr(config, "base_config", config)
    heads = base.num_attention_heads
    kv_heads = getattr(base, "num_key_value_heads", None) or heads
    head_dim = getattr(base, "head_dim", None) or base.hidden_size // heads
    return base.hidden_size, base.intermediate_size, base.vocab_size, heads, kv_heads, head_dim


def _experts_per_token(model: LayerMoEForCausalLM) -> list[int]:
    """Experts each token passes through, per layer: top_k in an MoE layer, 1 in a dense one."""
    blocks = model.moe_blocks()
    layers = _num_layers(model.config)
    return [min(blocks[i].top_k, blocks[i].num_experts) if i in blocks else 1 for i in range(layers)]


def activation_bytes(model: LayerMoEForCausalLM, config: PretrainedConfig, batch: int, seq_len: int, checkpointing: bool) -> int:
    """Bytes kept for backward by one micro-batch of `batch` sequences of `seq_len` tokens.

    Per token and layer: the attention's inputs and outputs (norm input in fp32, q, k, v and
    their rotated copies, the attention output and o_proj's input), and for each expert a token
    passes through its input, gate and up (2 * intermediate), the activation and the product
    (2 * intermediate); logits and their log-softmax are fp32 (batch, seq, vocab), the added vocabulary rows included. SDPA keeps
    no (seq, seq) scores; eager attention keeps them. With checkpointing a layer keeps only its
    input, and backward rebuilds one layer at a time, holding its activations and their gradients.
    """
    hidden, intermediate, _, heads, kv_heads, head_dim = _shape(config)
    vocab = vocabulary_size(model.config)
    element = parent_dtype(config).itemsize
    tokens = batch * seq_len
    attention = (3 * hidden + 2 * (heads + 2 * kv_heads) * head_dim) * element + 2 * hidden * FP32_BYTES
    if getattr(getattr(config, "base_config", config), "_attn_implementation", None) == "eager":
        attention += 2 * heads * seq_len * FP32_BYTES  # scores and probabilities, (heads, seq) a token
    layers = [tokens * (attention + experts * (hidden + 4 * intermediate) * element) for experts in _experts_per_token(model)]
    logits = 2 * tokens * vocab * FP32_BYTES
    if not checkpointing:
        return sum(layers) + logits
    return len(layers) * tokens * hidden * element + 2 * max(layers) + logits


def _active_params(model: LayerMoEForCausalLM, trainable: bool | None) -> int:
    """Parameters (all, or the trainable ones) one token's forward multiplies by: none of the embeddings (the parent's
    and the added rows'), and of each MoE layer's experts (all the size of expert 0) only as many as it is routed to,
    top_k at most."""
    unused = count_parameters(model.vocabulary.embeddings, trainable)
    for block in model.moe_blocks().values():
        per_expert = count_parameters(block.original_mlp)
        counted = block.num_experts if trainable is None else count_parameters(block.new_experts, trainable) // per_expert
        unused += max(counted - min(block.top_k, block.num_experts), 0) * per_expert
    return count_parameters(model, trainable) - count_parameters(model.get_input_embeddings(), trainable) - unused


def train_flops(model: LayerMoEForCausalLM, config: PretrainedConfig, tokens: int, seq_len: int, checkpointing: bool) -> float:
    """FLOPs to train on `tokens`: a forward is 2 per active parameter plus 4 * seq * hidden a layer for attention;
    backward repeats it for the inputs' gradients and adds 2 per active trainable parameter for the weights';
    checkpointing runs the forward once more."""
    hidden = _shape(config)[0]
    forward = 2 * _active_params(model, None) + 4 * seq_len * hidden * _num_layers(config)
    return float(tokens) * ((2 + checkpointing) * forward + 2 * _active_params(model, True))


def _stage(
    name: Stage,
    model: LayerMoEForCausalLM,
    dtype: torch.dtype,
    settings: TrainSettings,
    sequences: int,
    seq_len: int,
    processes: int,
    sharded: frozenset[str],
    config: PretrainedConfig,
    tflops_per_device: float,
) -> StageEstimate:
    set_trainable(model, name)
    trainable, frozen = count_parameters(model, trainable=True), count_parameters(model, trainable=False)

    def per_device(total: int, what: str) -> int:
        return math.ceil(total / processes) if what in sharded else total

    weights = trainable * FP32_BYTES + frozen * dtype.itemsize
    optimizer = trainable * FP32_BYTES * ADAM_MOMENTS
    per_step = per_device(weights, "weights") + per_device(trainable * FP32_BYTES, "grads") + per_device(optimizer, "optimizer")
    activations = {
        checkpointing: activation_bytes(model, config, settings.per_device_batch_size, seq_len, checkpointing)
        for checkpointing in (False, True)
    }
    gathered = 0
    if "weights" in sharded and processes > 1:
        held = [
            sum(p.numel() * (FP32_BYTES if p.requires_grad else dtype.itemsize) for p in layer.parameters())
            for layer in decoder_layers(model.causal_lm)
        ]
        gathered = 2 * max(held)
    steps = _steps(sequences, settings, processes)
    tokens_per_step = settings.per_device_batch_size * settings.gradient_accumulation_steps * processes * seq_len
    flops = train_flops(model, config, steps * tokens_per_step, seq_len, settings.gradient_checkpointing)
    hours = flops / (tflops_per_device * 1e12 * processes) / 3600
    return StageEstimate(
        stage=name,
        trainable_params=trainable,
        weights_bytes=per_device(weights, "weights"),
        grads_bytes=per_device(trainable * FP32_BYTES, "grads"),
        optimizer_bytes=per_device(optimizer, "optimizer"),
        activations_bytes=activations[settings.gradient_checkpointing],
        gathered_bytes=gathered,
        activations_without_checkpointing_bytes=activations[False],
        activations_with_checkpointing_bytes=activations[True],
        total_bytes=per_step + activations[settings.gradient_checkpointing] + gathered,
        checkpoint_bytes=weights + optimizer,  # Trainer saves the weights as trained (fp32 masters) and AdamW's moments
        checkpoints_kept=min(settings.save_total_limit or steps, math.ceil(steps / settings.save_steps)),  # and one at the end
        sequences=sequences,
        tokens_per_step=tokens_per_step,
        steps=steps,
        train_flops=flops,
        hours=hours,
        device_hours=hours * processes,
    )


def token_store_bytes(vocabulary: int, old: Sequence[str], new: Sequence[str], per_language: dict[str, int]) -> int:
    """The token files sampling writes: uint16 ids (uint32 past a `vocabulary` of 65,536 tokens), for each new language
    its Stage-1, analysis and evaluation tokens, for each old one its Stage-2 replay, analysis and evaluation tokens."""
    width = 2 if vocabulary <= 2**16 else 4
    new_tokens = per_language["stage1"] + per_language["analysis"] + per_language["eval"]
    old_tokens = per_language["stage2"] + per_language["analysis"] + per_language["eval"]
    return width * (len(new) * new_tokens + len(old) * old_tokens)


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
    analysis_tokens: int = 0,
    eval_tokens: int = 0,
    tflops_per_device: float = DEFAULT_TFLOPS_PER_DEVICE,
    added_tokens: int = 0,
) -> RoundEstimate:
    """Sizes, memory, disk, steps and time of one round at `allocation`, with token budgets per language as in a plan.

    Sequences per language are budget // seq_len (what sampling packs when the corpus holds the
    budget); Stage 2 trains on the replay mix of those, balanced per language. `added_tokens` vocabulary rows (the plan's
    `vocabulary.extend`) are counted in full, though a round may learn fewer.
    """
    dtype = parent_dtype(config)
    parent, child = meta_child(config, allocation, old_languages, new_languages, top_k, classifier_layers, added_tokens)
    launcher = launcher or LauncherSettings()
    processes, strategy = launcher.processes, launcher.strategy()
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
        added_tokens=added_tokens,
        parent_params=parent_params,
        added_params=total - parent_params,
        total_params=total,
        child_bytes=safetensors_bytes(child, dtype),
        processes=processes,
        sharding=strategy.name,
        token_store_bytes=token_store_bytes(
            vocabulary_size(child.config),
            old_languages,
            new_languages,
            {"stage1": stage1_tokens, "stage2": stage2_tokens, "analysis": analysis_tokens, "eval": eval_tokens},
        ),
        tflops_per_device=tflops_per_device,
        stages=[
            _stage(
                "stage1", child, dtype, stage1, rows1 * len(new_languages), seq_len, processes, strategy.sharded, config, tflops_per_device
            ),
            _stage("stage2", child, dtype, stage2, replay, seq_len, processes, strategy.sharded, config, tflops_per_device),
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
            *(
                [f"vocabulary: up to {estimate.added_tokens:,} new tokens, counted in full (an embedding and an LM-head row each)"]
                if estimate.added_tokens
                else []
            ),
            f"child on disk (model.safetensors): {_gib(estimate.child_bytes)} ({estimate.child_bytes:,} bytes)",
            f"token store on disk: {_gib(estimate.token_store_bytes)}",
            f"per device, {estimate.processes} process(es), {estimate.sharding}:",
        ]
        for stage in estimate.stages:
            lines += [
                f"  {stage.stage}: trainable {stage.trainable_params:,}  weights {_gib(stage.weights_bytes)}  "
                f"grads {_gib(stage.grads_bytes)}  optimizer {_gib(stage.optimizer_bytes)}  "
                f"activations {_gib(stage.activations_bytes)}"
                + (f"  gathered layers {_gib(stage.gathered_bytes)}" if stage.gathered_bytes else "")
                + f"  = total {_gib(stage.total_bytes)} per device",
                f"    activations per micro-batch: {_gib(stage.activations_without_checkpointing_bytes)} without, "
                f"{_gib(stage.activations_with_checkpointing_bytes)} with gradient checkpointing",
                f"    {stage.sequences:,} sequences, {stage.tokens_per_step:,} tokens/step, {stage.steps:,} steps; "
                f"Trainer checkpoints on disk: {_gib(stage.checkpoint_bytes)} each, up to {stage.checkpoints_kept} kept "
                f"({_gib(stage.checkpoint_bytes * stage.checkpoints_kept)})",
                f"    time at {estimate.tflops_per_device:g} TFLOP/s per device: {stage.hours:,.1f} h, "
                f"{stage.device_hours:,.1f} device-hours ({stage.train_flops:.3g} FLOPs)",
            ]
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
