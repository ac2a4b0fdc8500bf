"""Load and save model directories safely: safetensors only, no remote code unless asked.

Every step of a round reads its input model from a directory and writes its output to
another, so steps can be cached, retried and resumed without passing live models around.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..errors import LayerMoEError
from . import modeling_layermoe  # noqa: F401  (registers the layermoe Auto classes)
from .files import check_model_dir


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def init_model(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A freshly initialised causal LM of `config`; the seed fixes its weights without touching global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config)


def load_model(
    model_dir: str | Path,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype | str = "auto",
) -> PreTrainedModel:
    """A dense HF model or a LayerMoE model, in eval mode, on `device` (default: CUDA if present).

    dtype "auto" keeps the dtype the checkpoint was saved in.
    """
    model_dir = check_model_dir(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype)
    except LayerMoEError:
        raise  # already names the problem and the fix
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LayerMoEError(
            f"could not load the model in {model_dir}: {e}. The checkpoint may be truncated or corrupt; download or re-save it"
        ) from e
    return model.to(device or default_device()).eval()


def load_tokenizer(model_dir: str | Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise LayerMoEError(f"no usable tokenizer in {model_dir}: {e}; save one with tokenizer.save_pretrained") from e


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, model_dir: str | Path, state_dict: dict | None = None
) -> Path:
    """Weights as safetensors, config and tokenizer side by side: what the registry stores.

    `state_dict` replaces the model's own (a gathered FSDP / DeepSpeed one, cast to the saving dtype).
    """
    model_dir = Path(model_dir)
    model.save_pretrained(model_dir, state_dict=state_dict)  # safetensors: transformers 5 writes no other format
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)
    return model_dir


def num_decoder_layers(model_dir: str | Path) -> int:
    """Decoder layers of a saved dense or LayerMoE model, read from its config alone."""
    config = AutoConfig.from_pretrained(check_model_dir(model_dir))
    return getattr(config, "base_config", config).num_hidden_layers
