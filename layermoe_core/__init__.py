"""layermoe_core: the pure library (no Prefect, no MLflow).

Names load on first use (PEP 562), so `layermoe_core.errors` and the `layermoe` CLI start without
torch or transformers. Using any name below but `LayerMoEError` (`LayerMoEForCausalLM`, `expand`, ...),
or importing `layermoe_core.model.modeling_layermoe`, registers `LayerMoEConfig` / `LayerMoEForCausalLM` with
transformers' Auto classes, so saved expansions reload with `AutoModelForCausalLM.from_pretrained`.

The parts, one subpackage each (imports point from later to earlier in this list):
- `model/`: the expanded model (config, modeling, MoE block, experts, surgery, losses, checkpoints);
- `data/`: corpora, seeded sampling and the token store;
- `analysis/`: per-layer similarity, the other papers' signals, allocation, routing statistics;
- `training/`: Stage-1/Stage-2 training, `accelerate launch` jobs, memory and size estimates;
- `evaluation/`: perplexity, multiple choice, lm-eval, translation, generation, comparison, gates.
`errors` (the one exception type) and `plots` (figures of every part) sit at the top.
"""

from importlib import import_module

from .errors import LayerMoEError

_LAZY = {
    "SUPPORTED_BASE_MODEL_TYPES": "model.configuration_layermoe",
    "LayerMoEConfig": "model.configuration_layermoe",
    "LayerMoECausalLMOutput": "model.modeling_layermoe",
    "LayerMoEForCausalLM": "model.modeling_layermoe",
    "expand": "model.surgery",
    "forced_old_routing": "model.surgery",
    "insert_classifiers": "model.surgery",
    "pinned_language": "model.surgery",
    "set_trainable": "model.surgery",
}


def __getattr__(name: str):
    if name in _LAZY:
        import_module(".model.modeling_layermoe", __name__)  # registers the Auto classes
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["LayerMoEError", *_LAZY]  # noqa: PLE0604  (the lazy names are strings)
