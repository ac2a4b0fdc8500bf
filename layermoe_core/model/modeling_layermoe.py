"""`LayerMoEForCausalLM`: a dense causal LM whose chosen MLPs are `LayerMoEBlock`s.

It wraps the base model (`causal_lm`, e.g. `Qwen2ForCausalLM`) rather than re-implementing
it, so attention, caching and generation stay the base family's own. Registered with the
Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)` reloads any expanded version.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import LayerMoEError
from .configuration_layermoe import ROUTING_FORMAT, LayerMoEConfig
from .experts import StackedExperts
from .losses import load_balancing_loss
from .moe_block import LayerMoEBlock, LayerMoERouter, recording_routing, routes_read_once
from .vocabulary import AddedVocabulary


@dataclass
class LayerMoECausalLMOutput(CausalLMOutputWithPast):
    """`loss` = `lm_loss` + router_aux_loss_coef * `aux_loss` when labels are given.

    router_logits: one (N, E_i) tensor per layer whose router trains this round (the layers the
      newest round gave experts), in layer order (N = batch * seq): this round's router.
    classifier_logits: one (N, 2) tensor per classifier layer of the newest round, in layer order.
    Both are recorded (and aux_loss computed) in training mode, with labels, or with
    `output_router_logits=True`; otherwise they are empty. Without labels and recording (serving) the
    forward returns the wrapped model's own output instead, without these fields.
    """

    lm_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    classifier_logits: tuple[torch.Tensor, ...] | None = None


def causal_lm_of(model: PreTrainedModel) -> PreTrainedModel:
    """The HF causal LM itself: the model, or the one a LayerMoEForCausalLM wraps."""
    return getattr(model, "causal_lm", model)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layers of a dense Llama/Qwen-style causal LM (model.model.layers) or of a LayerMoE model."""
    layers = getattr(getattr(causal_lm_of(model), "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise LayerMoEError(
            f"{type(model).__name__} has no decoder layers at model.model.layers; "
            "layermoe needs a Llama/Qwen-style causal LM or a LayerMoEForCausalLM"
        )
    return layers


def mlp_shape(base_config) -> tuple[int, int, str]:
    return base_config.hidden_size, base_config.intermediate_size, base_config.hidden_act


class LayerMoEForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = LayerMoEConfig
    base_model_prefix = "causal_lm"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # No `_skip_keys_device_placement` of its own: post_init takes transformers' (the cache) and the wrapped model's.
    # No `_no_split_modules` of its own: post_init takes the wrapped model's (e.g. LlamaDecoderLayer), so a
    # device_map keeps each decoder layer, MoE block included, on one device. Listing LayerMoEBlock too would
    # also make FSDP's transformer-based wrap (which reads the same list) shard the block apart from its layer.

    def __init__(self, config: LayerMoEConfig, causal_lm: PreTrainedModel | None = None):
        if config.routing_format != ROUTING_FORMAT:
            raise LayerMoEError(
                f"this LayerMoE checkpoint has routing_format={config.routing_format}; layermoe loads only "
                f"routing_format {ROUTING_FORMAT} (one router per round and layer): rerun its rounds with this layermoe"
            )
        super().__init__(config)
        # Composite configs leave the sub-config's attention backend unset; the base model reads it.
        base_config = config.get_text_config()
        base_config._attn_implementation = config._attn_implementation
        self.causal_lm = causal_lm if causal_lm is not None else AutoModelForCausalLM.from_config(base_config)
        for layer in config.moe_layers:
            block = self.install_block(layer)
            for expansion, size in zip(config.expansion_rounds or [], config.expert_group_sizes(layer)[1:]):
                block.add_expert_group(size)
                if size and layer in expansion.get("classifier_layers", []):
                    block.routers[-1].add_classifier()
        embedding = self.causal_lm.get_input_embeddings()
        self.vocabulary = AddedVocabulary(embedding.num_embeddings, embedding.embedding_dim)
        for number, expansion in enumerate(config.expansion_rounds or [], start=1):
            if expansion.get("added_tokens"):
                self.vocabulary.add_round(number, expansion["added_tokens"], like=embedding.weight)
        # The added rows' logits follow the parent's: (..., V) -> (..., V + N).
        self.causal_lm.get_output_embeddings().register_forward_hook(lambda head, args, logits: self._with_added_logits(args[0], logits))
        self.post_init()

    # -- structure -----------------------------------------------------------------
    def install_block(self, layer: int) -> LayerMoEBlock:
        """Turn layer `layer`'s dense MLP into a `LayerMoEBlock` whose expert 0 is that MLP."""
        decoder_layer = decoder_layers(self.causal_lm)[layer]
        block = LayerMoEBlock(decoder_layer.mlp, *mlp_shape(self.config.base_config), self.config.num_experts_per_tok)
        block.to(next(decoder_layer.mlp.parameters()))
        decoder_layer.mlp = block
        return block

    def moe_block(self, layer: int) -> LayerMoEBlock:
        mlp = decoder_layers(self.causal_lm)[layer].mlp
        if not isinstance(mlp, LayerMoEBlock):
            raise KeyError(f"layer {layer} is dense; MoE layers are {self.config.moe_layers}")
        return mlp

    def moe_blocks(self) -> dict[int, LayerMoEBlock]:
        """{layer index: block} for every MoE layer, in layer order."""
        return {i: layer.mlp for i, layer in enumerate(decoder_layers(self.causal_lm)) if isinstance(layer.mlp, LayerMoEBlock)}

    def get_input_embeddings(self):
        return self.causal_lm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.causal_lm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.causal_lm.get_output_embeddings()

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, LayerMoERouter):
            module.gate.weight.normal_(std=0.02)
            if module.classifier is not None:
                module.classifier.weight.normal_(std=0.02)
                module.classifier.bias.zero_()
        elif isinstance(module, StackedExperts):
            std = getattr(self.config.base_config, "initializer_range", 0.02)
            module.gate_up_proj.normal_(std=std)
            module.down_proj.normal_(std=std)
        else:
            self.causal_lm._init_weights(module)

    # -- forward -------------------------------------------------------------------
    def forward(
        self, input_ids=None, attention_mask=None, labels=None, output_router_logits: bool | None = None, **kwargs
    ) -> LayerMoECausalLMOutput | CausalLMOutputWithPast:
        """output_router_logits: record this round's router and classifier logits (and the balance
        loss) in the output; by default in training mode or with labels, where the losses need them.
        Without them (generation, evaluation) a router that no token reaches is not run at all.

        Serving (nothing recorded, no labels) returns the wrapped model's own output: there is nothing
        to add to it, and building a second one is a visible share of a small model's decoding step (docs/performance.md).
        """
        if output_router_logits is None:
            output_router_logits = self.training or labels is not None
        if self.vocabulary.size and input_ids is not None:
            kwargs["inputs_embeds"], input_ids = self.vocabulary.embed(input_ids, self.get_input_embeddings()), None
        if not output_router_logits and labels is None:
            return self.causal_lm(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        # The wrapped model's loss reads its config's vocabulary size; with added rows the loss is taken here.
        inner_labels = labels if not self.vocabulary.size else None
        with self._recorded_routing(output_router_logits) as (router_by_layer, classifier_by_layer):
            out = self.causal_lm(input_ids=input_ids, attention_mask=attention_mask, labels=inner_labels, **kwargs)
        if labels is not None and inner_labels is None:
            out.loss = self.causal_lm.loss_function(
                out.logits, labels, vocab_size=out.logits.shape[-1], num_items_in_batch=kwargs.get("num_items_in_batch")
            )
        router_logits, classifier_logits = tuple(router_by_layer.values()), tuple(classifier_by_layer.values())
        aux_loss = None
        if router_logits:
            aux_loss = self.balance_loss(router_logits, attention_mask)
        loss = None
        if out.loss is not None:
            loss = out.loss + self.config.router_aux_loss_coef * aux_loss if aux_loss is not None else out.loss
        # The wrapped output's logits, cache, ... under the names this transformers version gives them.
        inherited = {name: value for name, value in out.items() if name in CausalLMOutputWithPast.__dataclass_fields__}
        return LayerMoECausalLMOutput(
            **{**inherited, "loss": loss},
            lm_loss=out.loss,
            aux_loss=aux_loss,
            router_logits=router_logits,
            classifier_logits=classifier_logits,
        )

    def generate(self, *args, **kwargs):
        """transformers' `generate`, each MoE layer reading its routing tree once for the whole call
        (`moe_block.routes_read_once`): its weights do not change while it generates."""
        with routes_read_once():
            return super().generate(*args, **kwargs)

    def _with_added_logits(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return self.vocabulary.logits(hidden, logits) if self.vocabulary.size else logits

    @contextlib.contextmanager
    def _recorded_routing(self, record: bool = True) -> Iterator[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
        """Collect this round's router and classifier logits during one forward, by layer (if `record`).

        Forward hooks, removed at exit, as transformers records outputs: nothing stays on the
        modules between calls, and a gradient-checkpointing recompute in backward records nothing twice.
        """
        router_logits: dict[int, torch.Tensor] = {}
        classifier_logits: dict[int, torch.Tensor] = {}
        if not record:
            yield router_logits, classifier_logits
            return

        def keep(store: dict[int, torch.Tensor], layer: int, first_output: bool):
            def hook(module, args, output):
                store[layer] = output[0] if first_output else output

            return hook

        handles = []
        for layer, block in self.moe_blocks().items():
            if block.router is None:
                continue
            handles.append(block.router.register_forward_hook(keep(router_logits, layer, True)))
            if block.router.classifier is not None:
                handles.append(block.router.classifier.register_forward_hook(keep(classifier_logits, layer, False)))
        try:
            with recording_routing():
                yield router_logits, classifier_logits
        finally:
            for handle in handles:
                handle.remove()

    def balance_loss(self, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None):
        """Mean over the trained routers' layers of the Mixtral balance loss, padding excluded."""
        if not router_logits:
            return None
        mask = attention_mask.reshape(-1).bool() if attention_mask is not None else None
        if mask is not None and mask.numel() != router_logits[0].shape[0]:
            mask = None  # cached generation: logits cover the new tokens only
        k = self.config.num_experts_per_tok
        return torch.stack([load_balancing_loss(logits, k, mask) for logits in router_logits]).mean()


AutoConfig.register(LayerMoEConfig.model_type, LayerMoEConfig)
AutoModelForCausalLM.register(LayerMoEConfig, LayerMoEForCausalLM)
