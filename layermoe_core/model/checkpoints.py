"""Load and save model directories safely: safetensors only, never a model's own code.

Every step of a round reads its input model from a directory and writes its output to
another, so steps can be cached, retried and resumed without passing live models around.
A model too large for one device is loaded dispatched over devices (`PlacementSettings`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import torch
from accelerate.utils import convert_file_size_to_int
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
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
from .files import check_model_dir, refuse_custom_code


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
    dtype: torch.dtype | str = "auto",
    *,
    device_map: str | dict[str, int | str] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> PreTrainedModel:
    """A dense HF model or a LayerMoE model, in eval mode, on `device` (default: CUDA if present).

    dtype "auto" keeps the dtype the checkpoint was saved in. With `device_map` ("auto", or
    {module name: GPU index, "cpu" or "disk"}) accelerate dispatches the model instead, whole
    decoder layers at a time, within `max_memory` ({GPU index or "cpu": bytes or "20GiB"}).
    Weights sent to disk are read from the checkpoint's own safetensors; any that must be
    re-written go to `offload_folder` as safetensors, in a subfolder of their own per model
    (without a device_map, max_memory is refused and offload_folder unused).
    """
    model_dir = check_model_dir(model_dir)
    placement: dict = {}
    if device_map is not None:
        if device is not None:
            raise LayerMoEError(f"give device ({device}) or device_map ({device_map!r}), not both: a device_map places the model itself")
        placement = {"device_map": device_map, "max_memory": max_memory}
        if offload_folder is not None:
            placement["offload_folder"] = str(model_offload_folder(offload_folder, model_dir))
    elif max_memory is not None:
        raise LayerMoEError(f"max_memory={max_memory} limits a device_map; pass device_map='auto' with it, or drop max_memory")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, trust_remote_code=False, dtype=dtype, **placement)
    except LayerMoEError:
        raise  # already names the problem and the fix
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LayerMoEError(
            f"could not load the model in {model_dir}: {e}. The checkpoint may be truncated or corrupt; download or re-save it"
        ) from e
    if device_map is not None:
        return model.eval()  # placed by accelerate; moving it would undo the dispatch
    return model.to(device or default_device()).eval()


def model_offload_folder(offload_folder: str | Path, model_dir: Path) -> Path:
    """`offload_folder`/<digest of the model's path>: two models loaded side by side never share offloaded files."""
    return Path(offload_folder) / hashlib.sha256(str(Path(model_dir).resolve()).encode()).hexdigest()[:16]


class PlacementSettings(BaseModel):
    """How the flow's own process places a model it measures or evaluates (similarity and the other
    allocation signals, routing statistics, evaluation); where training runs is the launcher's.

    By default the whole model sits on one device, CUDA if present. `device_map: auto` dispatches it
    (accelerate's big-model inference) over every GPU, then CPU memory, then disk, never splitting a
    decoder layer, so a model larger than one device can be measured; the results are the same to
    float rounding.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, title="Model placement")

    device_map: Literal["auto"] | None = Field(
        None,
        title="Device map",
        description="auto: spread the model over every GPU, then CPU memory, then disk, whole decoder layers at a time; "
        "empty: the whole model on one device, CUDA if present",
    )
    max_memory: dict[int | Literal["cpu"], int | str] | None = Field(
        None,
        title="Memory per device",
        description="with device_map auto: the most each device may hold, by GPU index or cpu, in bytes or as 20GiB; "
        "a device left out holds nothing, and what does not fit goes to disk. Empty: what each device has free",
    )
    offload_folder: Path | None = Field(
        None,
        title="Offload folder",
        description="where weights sent to disk are re-written when they cannot be read from the checkpoint itself; "
        "empty: the folder offload in the round's work folder",
    )

    @field_validator("max_memory")
    @classmethod
    def _sizes(cls, max_memory: dict[int | str, int | str] | None) -> dict[int | str, int | str] | None:
        for device, size in (max_memory or {}).items():
            try:
                valid = convert_file_size_to_int(size) > 0
            except ValueError:
                valid = False
            if not valid:
                raise ValueError(
                    f"max_memory[{device!r}]={size!r} is not a size; give bytes (an integer > 0) or a string like 20GiB or 500MB"
                )
        return max_memory

    @model_validator(mode="after")
    def _needs_device_map(self) -> PlacementSettings:
        if self.max_memory is not None and self.device_map is None:
            raise ValueError("max_memory limits what device_map auto places on each device; set device_map: auto, or drop max_memory")
        return self

    def with_offload_folder(self, folder: Path) -> PlacementSettings:
        """This placement, offloading to `folder` unless it names its own folder."""
        return self if self.offload_folder is not None else self.model_copy(update={"offload_folder": folder})


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    refuse_custom_code(Path(model_dir))
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
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


def read_config(model_dir: str | Path) -> PretrainedConfig:
    """The config of a saved dense or LayerMoE model, without its weights."""
    return AutoConfig.from_pretrained(check_model_dir(model_dir), trust_remote_code=False)


def num_decoder_layers(model_dir: str | Path) -> int:
    """Decoder layers of a saved dense or LayerMoE model, read from its config alone."""
    config = read_config(model_dir)
    return getattr(config, "base_config", config).num_hidden_layers
