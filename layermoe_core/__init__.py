"""layermoe_core: the pure library (no Prefect, no MLflow).

Importing it registers `LayerMoEConfig` / `LayerMoEForCausalLM` with transformers' Auto
classes, so saved expansions reload with `AutoModelForCausalLM.from_pretrained`.
"""

from .configuration_layermoe import SUPPORTED_BASE_MODEL_TYPES, LayerMoEConfig
from .errors import LayerMoEError
from .modeling_layermoe import LayerMoECausalLMOutput, LayerMoEForCausalLM
from .surgery import expand, forced_old_routing, insert_classifiers, set_trainable

__all__ = [
    "SUPPORTED_BASE_MODEL_TYPES",
    "LayerMoEConfig",
    "LayerMoEError",
    "LayerMoECausalLMOutput",
    "LayerMoEForCausalLM",
    "expand",
    "forced_old_routing",
    "insert_classifiers",
    "set_trainable",
]
