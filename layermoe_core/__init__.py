"""layermoe_core: the pure library (no Prefect, no MLflow).

Names load on first use (PEP 562), so `layermoe_core.errors` and the `layermoe` CLI start without
torch or transformers. Using any name below but `LayerMoEError` (`LayerMoEForCausalLM`, `expand`, ...),
or importing `layermoe_core.modeling_layermoe`, registers `LayerMoEConfig` / `LayerMoEForCausalLM` with
transformers' Auto classes, so saved expansions reload with `AutoModelForCausalLM.from_pretrained`.
"""

from importlib import import_module

from .errors import LayerMoEError

_LAZY = {
    "SUPPORTED_BASE_MODEL_TYPES": "configuration_layermoe",
    "LayerMoEConfig": "configuration_layermoe",
    "LayerMoECausalLMOutput": "modeling_layermoe",
    "LayerMoEForCausalLM": "modeling_layermoe",
    "expand": "surgery",
    "forced_old_routing": "surgery",
    "insert_classifiers": "surgery",
    "set_trainable": "surgery",
}


def __getattr__(name: str):
    if name in _LAZY:
        import_module(".modeling_layermoe", __name__)  # registers the Auto classes
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LayerMoEError", *_LAZY]  # noqa: PLE0604  (the lazy names are strings)
