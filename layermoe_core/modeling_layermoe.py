"""The old path of `layermoe_core.model.modeling_layermoe`, which earlier READMEs told users to import.

Importing it registers the layermoe Auto classes, as before. New code imports `layermoe_core` names
or `layermoe_core.model.modeling_layermoe`; this shim goes once no caller is left.
"""

from .model.modeling_layermoe import *  # noqa: F403
from .model.modeling_layermoe import LayerMoECausalLMOutput, LayerMoEForCausalLM  # noqa: F401
