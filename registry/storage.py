"""How a version's files are stored: whole, or as a delta on its parent, and rebuilt byte for byte.

A child of a round keeps its parent's frozen weights unchanged (under new names: the dense MLP
becomes the MoE's original expert), so a child version stores only tensors whose bytes the
parent does not already hold, matched by content. What a version stores about its weights
files grows with what its round changed, not with the model: a lifelong lineage adds the same
few kilobytes a round, however many rounds came before.

For each weights file the layout names the parent's file of the same name (`base`), whose tensors
carry over under their names unless `drop`ped, and lists only the other tensors (`tensors`): each
in this version's own `<file>.delta.safetensors`, or in a file of the parent under another name.
The file's safetensors header is written again from its tensors, in safetensors' own order
(`_header_bytes`); registration checks that this gives the registered header byte for byte and
keeps the header verbatim where it does not. Rebuilding writes the header and copies each
tensor's byte range in order, so the result is the registered file, sha256 for sha256; other
files (config, tokenizer) are stored when they changed, else taken from the parent.

Stored beside the files: `layermoe_layout.json` (the layout), `layermoe_tensors.json` (the digests
of the tensors whose bytes this version stores; a model's full set, which the next child diffs
against, is composed down the lineage by `compose_digests`) and `layermoe_stored.json` (sha256
and size of every stored file; its digest is the run param `layermoe.stored_sha256`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from pydantic import BaseModel, ConfigDict

from layermoe_core.errors import LayerMoEError
from layermoe_core.model.files import WEIGHTS_SUFFIX, path_inside

from .manifest import MANIFEST_NAME, sha256_file

LAYOUT_NAME = "layermoe_layout.json"
TENSORS_NAME = "layermoe_tensors.json"
STORED_NAME = "layermoe_stored.json"
LAYOUT_FORMAT = "layermoe-layout/2"
DELTA_SUFFIX = ".delta.safetensors"
_CHUNK = 1 << 20
# safetensors dtype names and their sizes in bytes
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}
# safetensors writes a file's data (and lists its header) by dtype, in this order, then by name
_DTYPE_ORDER = ["F64", "I64", "U64", "F32", "I32", "U32", "BF16", "F16", "I16", "U16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]


class TensorSpan(BaseModel):
    """Where one tensor's bytes are on disk."""

    model_config = ConfigDict(frozen=True)

    path: Path
    offset: int  # absolute, in the file
    length: int
    dtype: str
    shape: tuple[int, ...]


class SafetensorsHeader(BaseModel):
    """A safetensors file's header: the raw bytes (8-byte length + JSON), its metadata and its tensors in data order."""

    model_config = ConfigDict(frozen=True)

    raw: bytes
    metadata: dict | None
    tensors: dict[str, dict]  # name -> {"dtype", "shape", "data_offsets"}, ordered by offset

    @property
    def data_start(self) -> int:
        return len(self.raw)


def read_header(path: Path) -> SafetensorsHeader:
    with path.open("rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise LayerMoEError(f"{path} is not a safetensors file (shorter than its header); re-save the model")
        (size,) = struct.unpack("<Q", size_bytes)
        if size > path.stat().st_size - 8:
            raise LayerMoEError(f"{path} has a header length {size} beyond the end of the file; re-save the model")
        text = f.read(size)
    try:
        parsed = json.loads(text)
    except ValueError as e:
        raise LayerMoEError(f"{path} has an unreadable safetensors header ({e}); re-save the model") from e
    metadata = parsed.pop("__metadata__", None)
    tensors = dict(sorted(parsed.items(), key=lambda item: item[1]["data_offsets"][0]))
    return SafetensorsHeader(raw=size_bytes + text, metadata=metadata, tensors=tensors)


def _spans(path: Path, header: SafetensorsHeader) -> dict[str, TensorSpan]:
    return {
        name: TensorSpan(
            path=path,
            offset=header.data_start + info["data_offsets"][0],
            length=info["data_offsets"][1] - info["data_offsets"][0],
            dtype=info["dtype"],
            shape=tuple(info["shape"]),
        )
        for name, info in header.tensors.items()
    }


def _header_bytes(metadata: dict | None, spans: Mapping[str, TensorSpan]) -> tuple[bytes, list[str]] | None:
    """The header safetensors writes for these tensors, and their names in data order; None where a dtype's place
    in safetensors' order is unknown. Registration checks the result against the registered header."""
    if any(span.dtype not in _DTYPE_ORDER for span in spans.values()):
        return None
    names = sorted(spans, key=lambda name: (_DTYPE_ORDER.index(spans[name].dtype), name))
    header: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name in names:
        span = spans[name]
        header[name] = {"dtype": span.dtype, "shape": list(span.shape), "data_offsets": [offset, offset + span.length]}
        offset += span.length
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, names


def _contiguous(header: SafetensorsHeader) -> bool:
    """Data regions back to back from 0: then header + ranges in order is the whole file."""
    end = 0
    for info in header.tensors.values():
        start, stop = info["data_offsets"]
        if start != end:
            return False
        end = stop
    return True


class _HashingWriter:
    """A file opened for writing that hashes every byte written to it, so the written file needs no second read."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.sha256 = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.out.write(data)


def _copy_range(src: Path, offset: int, length: int, out: BinaryIO | _HashingWriter) -> None:
    with src.open("rb") as f:
        f.seek(offset)
        while length > 0:
            chunk = f.read(min(_CHUNK, length))
            if not chunk:
                raise LayerMoEError(f"{src} ends early (expected {length} more bytes at {offset}); download it again")
            out.write(chunk)
            length -= len(chunk)


def tensor_digests(path: Path) -> dict[str, str]:
    """sha256 of each tensor's dtype, shape and bytes: equal digests mean interchangeable tensors."""
    header = read_header(path)
    digests = {}
    with path.open("rb") as f:
        for name, span in _spans(path, header).items():
            info = header.tensors[name]
            digest = hashlib.sha256(json.dumps([info["dtype"], info["shape"]]).encode())
            f.seek(span.offset)
            left = span.length
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                digest.update(chunk)
                left -= len(chunk)
            digests[name] = digest.hexdigest()
    return digests


def _write_safetensors(spans: Mapping[str, TensorSpan], infos: Mapping[str, dict], path: Path) -> None:
    """A plain safetensors file of the given tensors (readable by safetensors itself)."""
    header, offset = {}, 0
    for name, span in spans.items():
        header[name] = {"dtype": infos[name]["dtype"], "shape": infos[name]["shape"], "data_offsets": [offset, offset + span.length]}
        offset += span.length
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for span in spans.values():
            _copy_range(span.path, span.offset, span.length, out)


class StoredFiles(BaseModel):
    """What a registration uploads: artifact name -> local file, and the layout's summary."""

    files: dict[str, Path]
    storage: str  # "whole" or "delta"
    stored_bytes: int


def plan_storage(
    model_dir: Path,
    files: list[str],
    manifest: str,
    staging: Path,
    parent: ParentFiles | None,
) -> StoredFiles:
    """Decide per file what to store, writing delta files and the layout into `staging`.

    `parent` (its full manifest and tensor digests) enables deltas; without it everything is stored whole.
    """
    full = json.loads(manifest)["files"]
    parent_by_digest: dict[str, tuple[str, str]] = {}
    if parent is not None:
        for file, digests in parent.tensors.items():
            for name, digest in digests.items():
                parent_by_digest.setdefault(digest, (file, name))
    layout: dict[str, dict] = {}
    upload: dict[str, Path] = {}
    own_digests: dict[str, dict[str, str]] = {}
    for file in files:
        if file.endswith(WEIGHTS_SUFFIX):
            digests = tensor_digests(model_dir / file)
            header = read_header(model_dir / file)
            in_base = parent.tensors.get(file, {}) if parent is not None else {}
            carried = {name for name, digest in digests.items() if in_base.get(name) == digest}
            reused = {name: parent_by_digest[d] for name, d in digests.items() if name not in carried and d in parent_by_digest}
            if (carried or reused) and _contiguous(header):
                layout[file], own_digests[file] = _delta_entry(model_dir, file, header, digests, in_base, carried, reused, staging)
                upload[file + DELTA_SUFFIX] = staging / (file + DELTA_SUFFIX)
                continue
            own_digests[file] = digests
        elif parent is not None and parent.manifest.get(file, {}).get("sha256") == full[file]["sha256"]:
            layout[file] = {"parent": file}
            continue
        layout[file] = {"stored": file}
        upload[file] = model_dir / file
    storage = "delta" if any("stored" not in entry for entry in layout.values()) else "whole"
    (staging / MANIFEST_NAME).write_text(manifest)
    (staging / TENSORS_NAME).write_text(json.dumps(own_digests, sort_keys=True))
    (staging / LAYOUT_NAME).write_text(
        json.dumps(
            {
                "format": LAYOUT_FORMAT,
                "parent": None
                if parent is None or storage == "whole"
                else {"version": parent.version, "manifest_sha256": parent.manifest_sha256},
                "files": layout,
            },
            indent=1,
            sort_keys=True,
        )
    )
    for name in (MANIFEST_NAME, TENSORS_NAME, LAYOUT_NAME):
        upload[name] = staging / name
    return StoredFiles(files=upload, storage=storage, stored_bytes=sum(path.stat().st_size for path in upload.values()))


def _delta_entry(
    model_dir: Path,
    file: str,
    header: SafetensorsHeader,
    digests: Mapping[str, str],
    in_base: Mapping[str, str],
    carried: set[str],
    reused: Mapping[str, tuple[str, str]],
    staging: Path,
) -> tuple[dict, dict[str, str]]:
    """The layout entry of a weights file stored as a delta (its own tensors written to staging/<file>.delta.safetensors),
    and the digests of the tensors it stores."""
    spans = _spans(model_dir / file, header)
    own = {name: spans[name] for name in header.tensors if name not in carried and name not in reused}
    delta_name = file + DELTA_SUFFIX
    _write_safetensors(own, header.tensors, staging / delta_name)
    entry: dict[str, object] = {
        "base": file if in_base else None,
        "drop": sorted(set(in_base) - set(header.tensors)),
        "tensors": {
            name: ["parent", *reused[name]] if name in reused else ["stored", delta_name, name] for name in sorted({*reused, *own})
        },
        "metadata": header.metadata,
    }
    rewritten = _header_bytes(header.metadata, spans)
    if rewritten is None or rewritten[0] != header.raw:
        entry["header"] = base64.b64encode(header.raw).decode()
    return entry, {name: digests[name] for name in own}


def write_stored_manifest(upload: Mapping[str, Path], staging: Path) -> Path:
    """sha256 and size of every stored file; its own digest becomes a param of the version's run."""
    entries = {name: {"sha256": sha256_file(path), "bytes": path.stat().st_size} for name, path in sorted(upload.items())}
    path = staging / STORED_NAME
    path.write_text(json.dumps({"format": LAYOUT_FORMAT, "files": entries}, indent=1, sort_keys=True))
    return path


class ParentFiles(BaseModel):
    """What a child's registration needs of its parent: no weights, only digests."""

    version: int
    manifest_sha256: str
    manifest: dict[str, dict]  # full file -> {"sha256", "bytes"}
    tensors: dict[str, dict[str, str]]  # weights file -> tensor name -> digest


# A full model file as a recipe: a plain file to copy, or a header and tensor byte ranges to concatenate.
FileSource = Path | tuple[bytes, list[TensorSpan]]


def locate_files(stored_dir: Path, parent_sources: Mapping[str, FileSource] | None, what: str) -> dict[str, FileSource]:
    """Where each file of this version's full model comes from, following delta references into the parent's sources."""
    layout = _read_layout(stored_dir, what)
    sources: dict[str, FileSource] = {}
    own: dict[str, dict[str, TensorSpan]] = {}  # this version's delta files' tensors, by file
    in_parent: dict[str, dict[str, TensorSpan]] = {}  # the parent's full files' tensors, by file: each header parsed once

    def parent_tensors(file: str) -> dict[str, TensorSpan]:
        if file not in in_parent:
            in_parent[file] = _tensors_of(_source_of(parent_sources, file, what))
        return in_parent[file]

    for file, entry in layout["files"].items():
        if "stored" in entry:
            sources[file] = path_inside(stored_dir, entry["stored"], what)
            continue
        if "parent" in entry:
            sources[file] = _source_of(parent_sources, entry["parent"], what)
            continue
        spans = {}
        base = parent_tensors(entry["base"]) if entry["base"] is not None else {}
        for name, (origin, src_file, src_name) in _origins(entry, base, file, what).items():
            if origin == "stored":
                if src_file not in own:
                    path = path_inside(stored_dir, src_file, what)
                    own[src_file] = _spans(path, read_header(path))
                spans[name] = _tensor_in(own[src_file], src_file, src_name, what)
            else:
                spans[name] = _tensor_in(parent_tensors(src_file), src_file, src_name, what)
        sources[file] = _recipe(entry, spans, file, what)
    return sources


def compose_digests(stored_dir: Path, parent_digests: Mapping[str, Mapping[str, str]] | None, what: str) -> dict[str, dict[str, str]]:
    """The digests of every tensor of this version's full model (weights file -> name -> digest): its own stored ones,
    and for the rest those of the parent's tensors they are (`parent_digests`: the parent's, composed the same way)."""
    layout = _read_layout(stored_dir, what)
    own = json.loads((stored_dir / TENSORS_NAME).read_text())

    def of_parent(file: str) -> Mapping[str, str]:
        if parent_digests is None or file not in parent_digests:
            raise LayerMoEError(f"{what} refers to its parent's {file}, which the parent does not have; its lineage is broken")
        return parent_digests[file]

    digests: dict[str, dict[str, str]] = {}
    for file, entry in layout["files"].items():
        if not file.endswith(WEIGHTS_SUFFIX):
            continue
        if "stored" in entry or "parent" in entry:
            digests[file] = dict(own[file] if "stored" in entry else of_parent(entry["parent"]))
            continue
        base = of_parent(entry["base"]) if entry["base"] is not None else {}
        digests[file] = {}
        for name, (origin, src_file, src_name) in _origins(entry, base, file, what).items():
            source, key = (own.get(file, {}), name) if origin == "stored" else (of_parent(src_file), src_name)
            if key not in source:
                raise LayerMoEError(f"{what} lists tensor {name} of {file} with no digest; its layout is corrupt")
            digests[file][name] = source[key]
    return digests


def _read_layout(stored_dir: Path, what: str) -> dict:
    layout = json.loads((stored_dir / LAYOUT_NAME).read_text())
    if layout.get("format") != LAYOUT_FORMAT:
        raise LayerMoEError(
            f"{what} has layout format {layout.get('format')!r}, and this layermoe reads {LAYOUT_FORMAT!r}; "
            "use the layermoe that registered it, or re-register the version from its checkpoint"
        )
    return layout


def _origins(entry: Mapping, base: Mapping[str, object], file: str, what: str) -> dict[str, tuple[str, str, str]]:
    """Where each tensor of a weights file stored as a delta is: ("parent", parent's file, name) or ("stored", own
    delta file, name). The base file's tensors carry over under their names unless dropped or listed."""
    dropped = set(entry["drop"])
    origins = {name: ("parent", entry["base"], name) for name in base if name not in dropped}
    for name, (origin, src_file, src_name) in entry["tensors"].items():
        if origin not in ("parent", "stored"):
            raise LayerMoEError(f"{what} says tensor {name} of {file} is in {origin!r}; its layout is corrupt")
        origins[name] = (origin, src_file, src_name)
    return origins


def _recipe(entry: Mapping, spans: Mapping[str, TensorSpan], file: str, what: str) -> tuple[bytes, list[TensorSpan]]:
    """The header and byte ranges in order of a weights file stored as a delta: the header written again, or kept verbatim."""
    if "header" in entry:
        raw = base64.b64decode(entry["header"])
        names = _parse_raw_header(raw)
        if sorted(names) != sorted(spans):
            raise LayerMoEError(f"{what}: the header of {file} and its listed tensors differ; its layout is corrupt")
        return raw, [spans[name] for name in names]
    rewritten = _header_bytes(entry["metadata"], spans)
    if rewritten is None:
        raise LayerMoEError(f"{what} has a tensor of {file} whose dtype this layermoe cannot order; upgrade layermoe")
    raw, names = rewritten
    return raw, [spans[name] for name in names]


def _source_of(sources: Mapping[str, FileSource] | None, file: str, what: str) -> FileSource:
    if sources is None:
        raise LayerMoEError(f"{what} refers to its parent's {file}, but no parent was given; its lineage is broken")
    if file not in sources:
        raise LayerMoEError(f"{what} refers to its parent's {file}, which the parent does not have; its lineage is broken")
    return sources[file]


def _tensors_of(source: FileSource) -> dict[str, TensorSpan]:
    """Where each tensor of a full weights file is: in the file itself, or in the spans of its recipe."""
    if isinstance(source, Path):
        return _spans(source, read_header(source))
    return dict(zip(_parse_raw_header(source[0]), source[1]))


def _tensor_in(spans: Mapping[str, TensorSpan], file: str, name: str, what: str) -> TensorSpan:
    if name not in spans:
        raise LayerMoEError(f"{what} refers to tensor {name} of its parent's {file}, which does not exist; its lineage is broken")
    return spans[name]


def _parse_raw_header(raw: bytes) -> list[str]:
    parsed = json.loads(raw[8:])
    parsed.pop("__metadata__", None)
    return [name for name, _ in sorted(parsed.items(), key=lambda item: item[1]["data_offsets"][0])]


def _write_file(source: FileSource, target: Path) -> str:
    """`source` (a file to copy, or a recipe) written to `target`; returns the sha256 of the bytes as they were written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as f:
        out = _HashingWriter(f)
        if isinstance(source, Path):
            _copy_range(source, 0, source.stat().st_size, out)
        else:
            raw, spans = source
            out.write(raw)
            for span in spans:
                _copy_range(span.path, span.offset, span.length, out)
    return out.sha256.hexdigest()


def write_full_model(sources: Mapping[str, FileSource], manifest: str, dest: Path, what: str) -> dict[str, str]:
    """The full save_pretrained directory (plus its manifest) from its sources; `what` names the version in errors.
    Returns the sha256 of each file written (`_write_file`)."""
    digests = {file: _write_file(source, path_inside(dest, file, what)) for file, source in sources.items()}
    (dest / MANIFEST_NAME).write_text(manifest)
    return digests
