"""Model surgery for an expansion round: add experts, add classifiers, choose what trains.

`expand` works on a dense HF model (round 1) and on a LayerMoE model (lifelong rounds):
all existing experts are frozen and each layer i gets `allocation[i]` new experts, copies
of its original MLP. A layer with 0 new experts is left exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Literal

import torch
from transformers import PreTrainedModel

from ..errors import LayerMoEError
from .configuration_layermoe import LayerMoEConfig, check_supported_config
from .modeling_layermoe import LayerMoEForCausalLM, decoder_layers
from .moe_block import RouterInit
from .vocabulary import initialise_added_rows

Stage = Literal["stage1", "stage2"]


def check_supported(model: PreTrainedModel) -> None:
    """Raise a clear error unless the model's layers have the MLP shape the surgery needs (its config, then its MLP)."""
    check_supported_config(model.config)
    mlp = decoder_layers(model)[0].mlp
    if getattr(mlp.gate_proj, "bias", None) is not None:
        raise LayerMoEError(f"{model.config.model_type} MLPs with biases are not supported; use a model without MLP bias.")


def validate_allocation(allocation: Sequence[int], num_layers: int, existing_experts: Sequence[int], top_k: int) -> list[int]:
    """Check an allocation against the model before any weight is touched."""
    allocation = list(allocation)
    if len(allocation) != num_layers:
        raise LayerMoEError(f"allocation has {len(allocation)} entries but the model has {num_layers} layers; give one count per layer")
    negative = [(i, n) for i, n in enumerate(allocation) if n < 0]
    if negative:
        raise LayerMoEError(f"allocation has negative expert counts at (layer, count) {negative}; counts must be >= 0")
    if top_k < 1:
        raise LayerMoEError(f"top_k={top_k}; it must be at least 1")
    too_small = [i for i, (n, old) in enumerate(zip(allocation, existing_experts)) if (n + old) > 1 and n + old < top_k]
    if too_small:
        raise LayerMoEError(
            f"top_k={top_k} exceeds the experts in MoE layers {too_small} "
            f"(they would have {[allocation[i] + existing_experts[i] for i in too_small]}); lower top_k or add experts there"
        )
    return allocation


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def check_same_as_parent(name: str, given: float | None, parent_value: float) -> None:
    """The one rule for settings a LayerMoE parent fixes (top_k, the balance-loss coefficient): `expand` and the
    plan check (before anything trains) both call it, `name` being what the caller calls the setting."""
    if given is not None and given != parent_value:
        raise LayerMoEError(
            f"{name}={given} differs from the parent's value {parent_value}; a lifelong round keeps the parent's "
            f"value (the parent's routers were trained with it). Set {name} to {parent_value}"
        )


def expand(
    model: PreTrainedModel,
    allocation: Sequence[int],
    old_languages: Sequence[str],
    new_languages: Sequence[str],
    top_k: int | None = None,
    router_aux_loss_coef: float | None = None,
    seed: int = 0,
    router_init: RouterInit = "parent",
) -> LayerMoEForCausalLM:
    """Add one round of new experts. The input model is modified in place and wrapped if dense.

    Each layer with new experts gets a new router for the round, initialised from `seed` as
    `router_init` says (see `LayerMoEBlock.add_expert_group`);
    everything the parent had (experts, routers, classifiers) is kept and frozen, so
    `forced_old_routing` of the result is the parent. top_k (default 2) and
    router_aux_loss_coef (default 0.01) are set in round 1; later rounds keep the parent's.
    """
    if isinstance(model, LayerMoEForCausalLM):
        wrapped = model
        check_same_as_parent("top_k", top_k, wrapped.config.num_experts_per_tok)
        check_same_as_parent("router_aux_loss_coef", router_aux_loss_coef, wrapped.config.router_aux_loss_coef)
        top_k = wrapped.config.num_experts_per_tok
    else:
        check_supported(model)
        top_k = 2 if top_k is None else top_k
        router_aux_loss_coef = 0.01 if router_aux_loss_coef is None else router_aux_loss_coef
        config = LayerMoEConfig(base_config=model.config, num_experts_per_tok=top_k, router_aux_loss_coef=router_aux_loss_coef)
        wrapped = None
    num_layers = model.config.num_layers if wrapped else model.config.num_hidden_layers
    existing = [wrapped.config.num_experts(i) if wrapped else 1 for i in range(num_layers)]
    allocation = validate_allocation(allocation, num_layers, existing, top_k)
    if wrapped is None:
        wrapped = LayerMoEForCausalLM(config, causal_lm=model).train(model.training)

    wrapped.config.expansion_rounds = wrapped.config.expansion_rounds + [
        {"old_languages": list(old_languages), "new_languages": list(new_languages), "allocation": allocation, "classifier_layers": []}
    ]
    blocks = wrapped.moe_blocks()
    generator = _generator(seed)
    for layer, num_new in enumerate(allocation):
        block = blocks.get(layer)
        if block is None and num_new == 0:
            continue  # stays the parent's dense layer
        if block is None:
            block = wrapped.install_block(layer)
            block.group_sizes.extend([0] * (len(wrapped.config.expansion_rounds) - 1))
        block.add_expert_group(num_new, generator, router_init)
    set_trainable(wrapped, "stage1")
    return wrapped


def insert_classifiers(model: LayerMoEForCausalLM, layers: Sequence[int], seed: int = 0) -> None:
    """Give each of `layers` an old/new classifier in front of this round's router (initialised from `seed`).

    Only layers that received experts this round have a new path to choose; old-predicted
    tokens take the parent's path.
    """
    eligible = [layer for layer, block in model.moe_blocks().items() if block.expanded_this_round]
    not_eligible = [layer for layer in layers if layer not in eligible]
    if not_eligible:
        raise LayerMoEError(
            f"classifier layers {not_eligible} received no new experts this round (dense or unchanged), so they have "
            f"no new path to classify for; choose among the layers that received experts: {eligible}"
        )
    generator = _generator(seed)
    for layer in sorted(set(layers)):
        router = model.moe_block(layer).router
        assert router is not None  # an eligible layer was expanded this round, so it has this round's router
        router.add_classifier(generator)
    model.config.expansion_rounds[-1]["classifier_layers"] = sorted(set(layers))


def extend_vocabulary(model: LayerMoEForCausalLM, pieces: Sequence[Sequence[int]]) -> None:
    """Give this round one new vocabulary row per entry of `pieces` (`vocabulary.added_token_pieces`), after all earlier rows.

    Each row (embedding and LM head) starts as the mean of its pieces' parent rows; the parent's rows stay as they are.
    """
    rounds = model.config.expansion_rounds
    if model.vocabulary.rounds and model.vocabulary.rounds[-1] == len(rounds):
        raise LayerMoEError(f"round {len(rounds)} already extended the vocabulary; extend it once per round")
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    model.vocabulary.add_round(len(rounds), len(pieces), like=embedding)
    initialise_added_rows(model.vocabulary, pieces, embedding, head)
    rounds[-1]["added_tokens"] = len(pieces)
    set_trainable(model, "stage1")


def count_parameters(model: torch.nn.Module, trainable: bool | None = None) -> int:
    """Distinct parameters (tied embeddings counted once); only the trainable (True) or frozen (False) ones if asked.

    A saved model's count, read from its safetensors headers, is `files.parameter_count`; the two agree.
    """
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


def set_trainable(model: LayerMoEForCausalLM, stage: Stage) -> list[str]:
    """Freeze everything, then unfreeze what `stage` trains; returns the trainable names.

    stage1: this round's new experts and routers, and the vocabulary rows it added. stage2: this round's routers
    and classifiers. The parent's experts, routers, classifiers and vocabulary rows never train.
    """
    model.requires_grad_(False)
    vocabulary = model.vocabulary
    if stage == "stage1" and vocabulary.rounds and vocabulary.rounds[-1] == len(model.config.expansion_rounds):
        vocabulary.embeddings[-1].requires_grad_(True)
        vocabulary.heads[-1].requires_grad_(True)
    for block in model.moe_blocks().values():
        router = block.router
        if router is None:
            continue
        router.gate.requires_grad_(True)
        if stage == "stage1":
            block.new_experts[-1].requires_grad_(True)
        elif router.classifier is not None:
            router.classifier.requires_grad_(True)
    return [name for name, p in model.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def _routing_cut(model: LayerMoEForCausalLM, rounds: int) -> Iterator[LayerMoEForCausalLM]:
    """Only the routers of the first `rounds` rounds route; each newer round's router takes its parent path."""
    blocks = list(model.moe_blocks().values())
    before = [block.routed_rounds for block in blocks]  # a cut inside another restores the outer one
    visible_before = model.vocabulary.visible_rounds
    for block in blocks:
        block.routed_rounds = rounds
    model.vocabulary.visible_rounds = rounds  # newer rounds' vocabulary rows are masked too
    try:
        yield model
    finally:
        for block, routed in zip(blocks, before):
            block.routed_rounds = routed
        model.vocabulary.visible_rounds = visible_before


def forced_old_routing(model: LayerMoEForCausalLM) -> contextlib.AbstractContextManager[LayerMoEForCausalLM]:
    """Route every token down the parent's path: the child then computes exactly its parent."""
    return _routing_cut(model, len(model.config.expansion_rounds) - 1)


def pinned_language(model: PreTrainedModel, language: str) -> contextlib.AbstractContextManager[PreTrainedModel]:
    """Serve `language` with exactly the function of the version that learned it (docs/pinned-serving.md).

    The routing tree is cut at that version's round: every newer round's router takes its parent
    path, so no later round can change that language's output. For a base language the model
    computes the dense base. A language the model was not taught is refused with its languages.
    """
    if not isinstance(model, LayerMoEForCausalLM):
        raise LayerMoEError(
            f"pinning language {language!r} needs a LayerMoE model; {type(model).__name__} is a dense model with one path "
            "and no record of its languages (serve it without a language)"
        )
    return _routing_cut(model, model.config.rounds_before_learning(language))
