"""Which files make a safe, loadable model directory, and how many parameters its weights hold."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from layermoe_core.errors import LayerMoEError

CONFIG_FILE = "config.json"
WEIGHTS_SUFFIX = ".safetensors"
# Formats that unpickle on load, i.e. run code: never stored, never loaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def list_model_files(model_dir: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Relative POSIX paths of the files under `model_dir`, hidden ones (.cache, .git...) skipped."""
    files = []
    for path in model_dir.rglob("*"):
        rel = path.relative_to(model_dir)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.as_posix() not in exclude:
            files.append(rel.as_posix())
    return sorted(files)


def refuse_pickles(files: list[str], where: str) -> None:
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise LayerMoEError(
            f"{where} holds pickle files {pickles}; layermoe stores and loads only safetensors. "
            "Delete them (save_pretrained writes safetensors by default; training_args.bin is not needed)."
        )


def require_loadable(files: list[str], where: str) -> None:
    """What `from_pretrained` needs: config.json and safetensors weights."""
    missing = [CONFIG_FILE] if CONFIG_FILE not in files else []
    if not any(f.endswith(WEIGHTS_SUFFIX) for f in files):
        missing.append(f"*{WEIGHTS_SUFFIX}")
    if missing:
        raise LayerMoEError(
            f"{where} lacks {missing} (it has {files}); pass a directory written by model.save_pretrained(...)."
        )


def check_model_files(files: list[str], where: str) -> None:
    refuse_pickles(files, where)
    require_loadable(files, where)


def parameter_count(model_dir: Path, files: list[str]) -> int:
    """Sum of tensor sizes, read from the safetensors headers without loading the weights."""
    total = 0
    for name in files:
        if name.endswith(WEIGHTS_SUFFIX):
            try:
                with safe_open(model_dir / name, framework="pt") as weights:
                    for key in weights.keys():
                        numel = 1
                        for dim in weights.get_slice(key).get_shape():
                            numel *= dim
                        total += numel
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise LayerMoEError(f"{model_dir / name} is not a readable safetensors file ({e}); re-save the model") from e
    return total
