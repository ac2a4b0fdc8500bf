"""Each version is also an MLflow model: `mlflow.pyfunc.load_model("models:/<name>@champion")` generates text.

The version's artifact folder carries an `MLmodel` whose pyfunc loader is this module (no pickled
Python object: layermoe loads only safetensors). The loader rebuilds the full model, from the
registry's lineage when the version is a delta, verifies it against its manifest, and wraps it in
a text generator. Prompts in, completions out; generation parameters are the signature's params.
`language` pins every prompt of the request to that language (docs/pinned-serving.md): the model then
computes exactly the version that learned it; empty (the default) serves the classifier-routed model.
`language: auto` identifies each prompt's language offline and pins it when the model knows it; each
prediction is then {"completion", "language", "route": "pinned" or "plain"}.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import pandas as pd

from layermoe_core.errors import LayerMoEError

from .settings import RegistrySettings

MLMODEL_FILE = "MLmodel"
LOADER_MODULE = "registry.pyfunc_model"
MODEL_NAME_KEY = "layermoe_registered_model"
REGISTERED_MODEL_META = "registered_model_meta"
AUTO = "auto"  # the `language` that identifies each prompt's language
GENERATION_DEFAULTS = {"max_new_tokens": 32, "temperature": 0.0, "top_p": 1.0, "seed": 0, "language": ""}


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),  # a list of prompts (unnamed, so predict(["..."]) works)
        outputs=Schema([ColSpec("string")]),  # one completion per prompt
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", GENERATION_DEFAULTS["max_new_tokens"]),
                ParamSpec("temperature", "double", GENERATION_DEFAULTS["temperature"]),  # 0: greedy
                ParamSpec("top_p", "double", GENERATION_DEFAULTS["top_p"]),
                ParamSpec("seed", "long", GENERATION_DEFAULTS["seed"]),
                ParamSpec("language", "string", GENERATION_DEFAULTS["language"]),  # "": not pinned; "auto": identified
            ]
        ),
    )


def write_mlmodel(staging: Path, settings: RegistrySettings) -> Path:
    """The `MLmodel` file of a version (written before the version number exists; the loader finds the lineage)."""
    import mlflow.pyfunc
    from mlflow.models import Model

    model = Model(signature=_signature(), metadata={MODEL_NAME_KEY: settings.registered_model_name})
    mlflow.pyfunc.add_to_model(model, loader_module=LOADER_MODULE)
    path = staging / MLMODEL_FILE
    model.save(str(path))
    return path


class TextGenerator:
    """What `mlflow.pyfunc.load_model(...)` wraps: a LayerMoE (or base) causal LM and its tokenizer."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import layermoe_core.model.modeling_layermoe  # noqa: F401  (registers the layermoe model type with transformers' Auto classes)

        self.model_dir = model_dir
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self._serving = threading.Lock()

    def predict(self, model_input, params: dict | None = None) -> list[str] | list[dict]:
        import contextlib

        from layermoe_core.model.surgery import pinned_language

        if isinstance(model_input, pd.DataFrame):
            prompts = model_input.iloc[:, 0].tolist()
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = list(model_input)
        settings = {**GENERATION_DEFAULTS, **(params or {})}
        language = str(settings["language"])
        sample = float(settings["temperature"]) > 0
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        if language == AUTO:
            return self._predict_identified([str(prompt) for prompt in prompts], settings, sample, pad)
        pin = pinned_language(self.model, language) if language else contextlib.nullcontext()  # refuses an unknown language first
        with self._serving, pin:  # the pin is routing state on the model's blocks: one request at a time
            return [self._complete(str(prompt), settings, sample, pad) for prompt in prompts]

    def _predict_identified(self, prompts: list[str], settings: dict, sample: bool, pad: int | None) -> list[dict]:
        """Each prompt pinned to its identified language; one the identifier cannot name, or the model does not know, plain."""
        import contextlib

        from layermoe_core.language_id import identify_language
        from layermoe_core.model.surgery import pinned_language

        known = getattr(self.model.config, "languages", [])  # a dense base records none: every prompt plain
        predictions = []
        with self._serving:
            for prompt in prompts:
                language = identify_language(prompt, known)
                with pinned_language(self.model, language) if language else contextlib.nullcontext():
                    completion = self._complete(prompt, settings, sample, pad)
                predictions.append({"completion": completion, "language": language or "", "route": "pinned" if language else "plain"})
        return predictions

    def _complete(self, prompt: str, settings: dict, sample: bool, pad: int | None) -> str:
        import torch

        torch.manual_seed(int(settings["seed"]))
        inputs = self.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = self.model.generate(
                **inputs,
                max_new_tokens=int(settings["max_new_tokens"]),
                do_sample=sample,
                pad_token_id=pad,
                **({"temperature": float(settings["temperature"]), "top_p": float(settings["top_p"])} if sample else {}),
            )
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> TextGenerator:
    """MLflow's entry point: `data_path` is the version's downloaded artifact folder."""
    import mlflow
    import yaml

    from layermoe_core.model.files import WEIGHTS_SUFFIX

    from .client import open_client
    from .download import rebuild_verified
    from .manifest import MANIFEST_NAME, sha256_file, verify_listed_files, verify_model_dir
    from .storage import STORED_NAME
    from .versions import find_version

    stored = Path(data_path)
    what = f"the MLflow model at {stored}"
    name = yaml.safe_load((stored / MLMODEL_FILE).read_text())["metadata"][MODEL_NAME_KEY]
    settings = RegistrySettings(tracking_uri=mlflow.get_registry_uri(), registered_model_name=name)
    client = open_client(settings, create=False)
    expected = sha256_file(stored / STORED_NAME)
    registered = stored / REGISTERED_MODEL_META  # written by MLflow when it loads models:/<name>/<version or alias>
    if registered.is_file():
        info = find_version(client, settings, int(yaml.safe_load(registered.read_text())["model_version"]))
        expected = info.stored_sha256 or ""
        what = f"version {info.version} of {name!r}"

    def own(every_byte: bool) -> Path:
        """The folder MLflow downloaded, checked against its listing; a damaged file is named (MLflow fetched it)."""
        sized_only = () if every_byte else (WEIGHTS_SUFFIX,)
        verify_listed_files(stored, STORED_NAME, expected, what, ignore=(REGISTERED_MODEL_META,), sized_only=sized_only)
        return stored

    digest = sha256_file(own(False) / MANIFEST_NAME)
    full = RegistrySettings().cache_dir / "models" / digest[:24]  # one rebuilt copy per distinct model
    if full.is_dir():
        try:
            verify_model_dir(full, digest, what)
            return TextGenerator(full)
        except LayerMoEError:
            shutil.rmtree(full)
    full.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=full.parent, prefix=f".{full.name}-partial-") as staging:
        built = Path(staging) / "model"
        rebuild_verified(client, settings, own, what, digest, built)
        try:
            built.rename(full)
        except OSError:  # a concurrent load put its verified copy in place first
            pass
    return TextGenerator(full)
