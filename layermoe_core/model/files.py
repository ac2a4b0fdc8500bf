"""What a safe, loadable model directory holds, and how many parameters its weights have: standard library only.

One rule for every place that reads or stores a model directory (loading, planning, the registry):
config.json and safetensors weights, no file in a format that unpickles on load, i.e. runs code,
no code of the model's own (`auto_map`), and no file name that leaves the folder.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path, PurePosixPath, PureWindowsPath

from ..errors import LayerMoEError

CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
WEIGHTS_SUFFIX = ".safetensors"
# Formats that unpickle on load, i.e. run code: never stored, never loaded. Compared case-insensitively.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def list_model_files(model_dir: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Relative POSIX paths of the files under `model_dir`, hidden ones (.cache, .git...) skipped."""
    files = []
    for path in model_dir.rglob("*"):
        rel = path.relative_to(model_dir)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.as_posix() not in exclude:
            files.append(rel.as_posix())
    return sorted(files)


def path_inside(folder: Path, name: str, what: str) -> Path:
    """`folder / name`, for a file name read from a manifest, a layout or a listing: a relative path that stays in `folder`.

    An absolute path, a `..` part or a symlink on the way could reach any file of the machine, to
    overwrite it or to copy it into a model, so each is refused. Every such name goes through here.
    """
    relative = PurePosixPath(name) if isinstance(name, str) else None
    if (
        relative is None
        or not relative.parts
        or relative.is_absolute()
        or PureWindowsPath(name).drive
        or "\\" in name
        or ".." in relative.parts
    ):
        raise LayerMoEError(
            f"{what} names the file {name!r}, which leaves its folder (an absolute path, .. or not a file name); "
            "refused: its manifest or layout was altered. Delete that version, or re-register it from its checkpoint"
        )
    path = folder
    for part in relative.parts:
        path = path / part
        if path.is_symlink():
            raise LayerMoEError(
                f"{what}: {path} is a symlink, which could point at any file; refused. "
                "A model folder holds plain files only: delete the folder and download the version again"
            )
    return path


def refuse_custom_code(path: Path) -> None:
    """Refuse a model or tokenizer folder (or a config file) that names its own code in `auto_map`.

    transformers would import and run that code if trust_remote_code were True, and asks on a terminal
    where it is not given; layermoe passes False everywhere and refuses such a folder up front.
    """
    path = Path(path)
    for config_file in [path] if path.is_file() else [path / CONFIG_FILE, path / TOKENIZER_CONFIG_FILE]:
        if not config_file.is_file():
            continue
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise LayerMoEError(f"{config_file} is not valid JSON ({e}); re-save the model with save_pretrained") from e
        if isinstance(config, dict) and "auto_map" in config:
            raise LayerMoEError(
                f"{config_file} names the model's own code (auto_map: {', '.join(sorted(config['auto_map']))}); "
                "layermoe never runs code from a model folder (trust_remote_code is always False): use a model whose "
                "architecture transformers implements, or delete auto_map if that code is not needed"
            )


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
        raise LayerMoEError(f"{where} lacks {missing} (it has {files}); pass a directory written by model.save_pretrained(...).")


def check_model_files(files: list[str], where: str) -> None:
    refuse_pickles(files, where)
    require_loadable(files, where)


def check_model_dir(model_dir: str | Path) -> Path:
    """`model_dir`, if it is a directory that holds config.json and whole safetensors weights and no pickles."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise LayerMoEError(f"{model_dir} is not a model directory (it does not exist); pass a save_pretrained directory")
    files = list_model_files(model_dir)
    check_model_files(files, str(model_dir))
    refuse_custom_code(model_dir)
    for name in files:
        if name.endswith(WEIGHTS_SUFFIX):
            read_weights_header(model_dir / name)
    return model_dir


def read_weights_header(path: Path) -> dict:
    """A safetensors file's JSON header (tensor name -> dtype, shape, data_offsets), checked against the file's size.

    The file is a little-endian u64 header length, the header, then the tensors' bytes; a file cut short or
    overwritten fails here, where a model load would fail only steps later.
    """
    try:
        with path.open("rb") as weights:
            (size,) = struct.unpack("<Q", weights.read(8))
            if size > path.stat().st_size - 8:
                raise ValueError(f"its header length {size} is beyond the end of the file")
            header = json.loads(weights.read(size))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        data_bytes = path.stat().st_size - 8 - size
        if max(ends, default=0) != data_bytes:
            raise ValueError(f"its header describes {max(ends, default=0)} bytes of tensors, the file holds {data_bytes}")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error) as e:
        raise LayerMoEError(f"{path} is not a readable safetensors file ({e}); re-save the model with save_pretrained") from e
    return header


def parameter_count(model_dir: Path, files: list[str]) -> int:
    """Sum of tensor sizes, read from the safetensors headers without loading the weights."""
    total = 0
    for name in files:
        if name.endswith(WEIGHTS_SUFFIX):
            header = read_weights_header(model_dir / name)
            total += sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
    return total
