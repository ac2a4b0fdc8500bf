"""`LayerMoEConfig`: the transformers config of an expanded model.

It wraps the config of the dense base model (`base_config`) and records every expansion
round (languages, per-layer allocation, classifier layers), so any registry version
reloads with `AutoModelForCausalLM.from_pretrained` and no `trust_remote_code`.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from ..errors import LayerMoEError

# Base families whose decoder layers expose `mlp` (gate/up/down projections, no bias)
# behind `post_attention_layernorm`: the shape the MoE surgery needs.
SUPPORTED_BASE_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
ROUTING_FORMAT = 2  # the routing tree: one router per round and layer (see moe_block)


@strict
class LayerMoEConfig(PreTrainedConfig):
    """Config of a LayerMoE model.

    `expansion_rounds` is the history, one dict per round with keys `old_languages`,
    `new_languages`, `allocation` (new experts per layer) and `classifier_layers`, plus
    `added_tokens` for a round that extended the vocabulary (its rows follow every earlier row).
    Layer i holds 1 + sum_r allocation_r[i] experts: expert 0 is the original MLP,
    then each round's experts in order. Every round's classifiers stay active: an earlier
    round's classifier is part of the frozen parent path that old tokens take.

    `routing_format` 2 is the routing tree (one router per round); a checkpoint without it is
    refused when it loads.
    """

    model_type = "layermoe"
    sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2")}

    base_config: dict | PreTrainedConfig | None = None
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01
    expansion_rounds: list | None = None
    routing_format: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.expansion_rounds is None:
            self.expansion_rounds = []
        if self.routing_format is None and not self.expansion_rounds:
            self.routing_format = ROUTING_FORMAT  # a new model; a loaded config keeps what it says
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = bool(getattr(self.base_config, "tie_word_embeddings", False))

    def get_text_config(self, *args, **kwargs) -> PreTrainedConfig:
        """Generation and caching read the decoder's config: that of the wrapped base model."""
        return self.base_config

    @property
    def num_layers(self) -> int:
        return self.get_text_config().num_hidden_layers

    def expert_group_sizes(self, layer: int) -> list[int]:
        """[1 (the original MLP), round-1 new experts, round-2 new experts, ...] for one layer."""
        return [1] + [r["allocation"][layer] for r in self.expansion_rounds or []]

    def num_experts(self, layer: int) -> int:
        return sum(self.expert_group_sizes(layer))

    @property
    def moe_layers(self) -> list[int]:
        """Layers with at least one added expert; the rest are the parent's dense layers."""
        return [i for i in range(self.num_layers) if self.num_experts(i) > 1]

    @property
    def classifier_layers(self) -> list[int]:
        """The newest round's classifier layers."""
        return list(self.expansion_rounds[-1].get("classifier_layers", [])) if self.expansion_rounds else []

    @property
    def old_languages(self) -> list[str]:
        return list(self.expansion_rounds[-1]["old_languages"]) if self.expansion_rounds else []

    @property
    def languages(self) -> list[str]:
        """Every language the model has been taught so far, old then new."""
        if not self.expansion_rounds:
            return []
        last = self.expansion_rounds[-1]
        return list(last["old_languages"]) + list(last["new_languages"])

    def rounds_before_learning(self, language: str) -> int:
        """How many rounds the version that learned `language` had: 0 for a base language, r for round r's.

        The pinned route cuts the routing tree there (`surgery.pinned_language`); a language taught
        again in a later round keeps its first round.
        """
        rounds = self.expansion_rounds or []
        if rounds and language in rounds[0]["old_languages"]:
            return 0
        for number, expansion in enumerate(rounds, start=1):
            if language in expansion["new_languages"]:
                return number
        raise LayerMoEError(
            f"language {language!r} is not one this model was taught; its languages are {self.languages} "
            "(give one of them, or no language for the classifier-routed model)"
        )


def check_supported_config(config: PreTrainedConfig, where: str = "") -> None:
    """Raise a clear error unless the surgery can expand a model of `config` (of a LayerMoE model: its base's).

    The config alone decides, so a plan or a registry download is refused before any weight loads.
    """
    base = config.base_config if isinstance(config, LayerMoEConfig) else config
    model_type = getattr(base, "model_type", None)
    at = f" in {where}" if where else ""
    if model_type not in SUPPORTED_BASE_MODEL_TYPES:
        raise LayerMoEError(
            f"unsupported base architecture {model_type!r}{at}: layermoe expands {', '.join(SUPPORTED_BASE_MODEL_TYPES)} "
            "models (decoder layers with a gated MLP). Convert the model to one of these families or pick another parent."
        )
    if getattr(base, "mlp_bias", False):
        raise LayerMoEError(f"{model_type} MLPs with biases (mlp_bias=True{at}) are not supported; use a model without MLP bias.")


__all__ = ["LayerMoEConfig", "ROUTING_FORMAT", "SUPPORTED_BASE_MODEL_TYPES", "check_supported_config"]
