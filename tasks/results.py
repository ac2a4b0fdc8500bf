"""How a step's result is stored for the next run: JSON of a closed set of types, never a pickle.

Prefect persists a cached step's result in its result storage and, on a cache hit, decodes it
with the serializer named inside the stored record, whatever the task itself uses. A record
planted in shared result storage that names the pickle serializer would therefore run its
payload's code on every machine that reruns the step. So the steps persist with
`StepResultSerializer` (plain JSON; paths, pandas tables, tuples and the pydantic models listed
in `RESULT_MODELS` are tagged, and decoded from that fixed list only, never by importing a name
from the record), and their cache policy keeps its records in `StepResultRecords`, which hands
Prefect a record only when that serializer wrote it and its result decodes. Any other record
reads as a cache miss: the step runs again and writes over it. See docs/reliability.md.
"""

import json
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import LocalFileSystem
from prefect.results import get_default_result_storage
from prefect.serializers import Serializer
from prefect.settings import get_current_settings
from pydantic import BaseModel

from layermoe_core.data.corpus import CorpusSpec
from layermoe_core.training.trainer import TrainResult

logger = logging.getLogger(__name__)

SERIALIZER_TYPE = "layermoe-step-json"
TAG = "layermoe:type"  # marks an encoded value that plain JSON cannot hold
RESULT_MODELS: dict[str, type[BaseModel]] = {model.__name__: model for model in (TrainResult, CorpusSpec)}


def encode(value: Any) -> Any:
    """`value` as plain JSON data; a type outside the closed set is a bug in the step, so it raises."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if value is pd.NA or value is pd.NaT:  # a missing value of a nullable column: its dtype restores it
        return None
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list):
        return [encode(item) for item in value]
    if isinstance(value, tuple):
        return {TAG: "tuple", "items": [encode(item) for item in value]}
    if isinstance(value, dict):
        if TAG in value or not all(isinstance(key, str) for key in value):
            raise TypeError(f"a step result's dict keys must be strings other than {TAG!r}: {list(value)}")
        return {key: encode(item) for key, item in value.items()}
    if isinstance(value, Path):
        return {TAG: "path", "path": str(value)}
    if isinstance(value, pd.DataFrame):
        return _encode_frame(value)
    if isinstance(value, BaseModel) and RESULT_MODELS.get(type(value).__name__) is type(value):
        return {TAG: "model", "model": type(value).__name__, "fields": value.model_dump(mode="json")}
    raise TypeError(f"a step returned a {type(value).__qualname__}, which {SERIALIZER_TYPE} does not store; return plain data")


def _encode_frame(frame: pd.DataFrame) -> dict[str, Any]:
    """Column by column, with each column's dtype, so the table comes back with the same values and dtypes."""
    plain_index = isinstance(frame.index, pd.RangeIndex) and frame.index.start == 0 and frame.index.step == 1
    return {
        TAG: "dataframe",
        "columns": [encode(name) for name in frame.columns],
        "dtypes": [str(dtype) for dtype in frame.dtypes],
        "data": [encode(frame.iloc[:, i].tolist()) for i in range(frame.shape[1])],
        "index": None if plain_index else [encode(label) for label in frame.index],
        "rows": len(frame),
        "attrs": encode(frame.attrs),
    }


def decode(data: Any) -> Any:
    if isinstance(data, list):
        return [decode(item) for item in data]
    if not isinstance(data, dict):
        return data
    kind = data.get(TAG)
    if kind is None:
        return {key: decode(item) for key, item in data.items()}
    if kind == "tuple":
        return tuple(decode(item) for item in data["items"])
    if kind == "path":
        return Path(data["path"])
    if kind == "dataframe":
        return _decode_frame(data)
    if kind == "model" and data["model"] in RESULT_MODELS:
        return RESULT_MODELS[data["model"]].model_validate(data["fields"])
    raise ValueError(f"unknown {TAG} {kind!r} (model {data.get('model')!r}) in a stored step result")


def _decode_frame(data: dict[str, Any]) -> pd.DataFrame:
    index = pd.RangeIndex(data["rows"]) if data["index"] is None else pd.Index(decode(data["index"]))
    columns = [pd.Series(decode(values), dtype=dtype, index=index) for values, dtype in zip(data["data"], data["dtypes"])]
    frame = pd.concat(columns, axis=1) if columns else pd.DataFrame(index=index)
    frame.columns = pd.Index(decode(data["columns"]))
    frame.attrs = decode(data["attrs"])
    return frame


class StepResultSerializer(Serializer):
    """A step's result as JSON (see `encode`); loading it imports nothing and runs no code."""

    type: Literal["layermoe-step-json"] = SERIALIZER_TYPE

    def dumps(self, obj: Any) -> bytes:
        return json.dumps(encode(obj)).encode()

    def loads(self, blob: bytes) -> Any:
        return decode(json.loads(blob))


RECORDS_FOLDER = "layermoe-step-records"  # beside the results, under PREFECT_LOCAL_STORAGE_PATH


def check_record(metadata: bytes, where: str) -> bytes:
    """`metadata`, if it is the record of a result that `StepResultSerializer` wrote and that decodes; else ValueError.

    Prefect reads a record it cannot use as a cache miss (see `ResultStore.exists`), so the step runs again
    and writes over it. The result itself is decoded here too, so a tampered result is recomputed, not loaded.
    """
    try:
        record = json.loads(metadata)
        serializer = record["serializer"]["type"]
    except (ValueError, KeyError, TypeError):
        record, serializer = {}, None
    problem = None if serializer == SERIALIZER_TYPE else f"written by serializer {serializer!r}, not {SERIALIZER_TYPE!r}"
    if problem is None:
        try:
            StepResultSerializer().loads(get_default_result_storage(_sync=True).read_path(record["storage_key"], _sync=True))
        except Exception as e:  # noqa: BLE001  (any failure means: do not use this record)
            problem = f"its result does not load as {SERIALIZER_TYPE} ({type(e).__name__}: {e})"
    if problem is not None:
        logger.warning("refused the stored step result %s: %s; the step runs again", where, problem)
        raise ValueError(f"step result record {where} refused: {problem}")
    return metadata


class StepResultRecords(LocalFileSystem):
    """The steps' result records by cache key (`key_storage` of their cache policy), in
    PREFECT_LOCAL_STORAGE_PATH/layermoe-step-records as set when read; it reads back only records `check_record` accepts.

    The results themselves stay in Prefect's default result storage; Prefect looks a cached step up here first.
    """

    _block_type_slug = "layermoe-step-result-records"

    def _resolve_path(self, path: str) -> Path:
        if self.basepath is None:
            here = self.model_copy(update={"basepath": str(get_current_settings().results.local_storage_path / RECORDS_FOLDER)})
            return here._resolve_path(path)
        return super()._resolve_path(path)

    async def aread_path(self, path: str) -> bytes:
        return self.read_path(path, _sync=True)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return check_record(super().read_path(path, _sync=True), str(self._resolve_path(path)))
