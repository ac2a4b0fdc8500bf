"""Shared fixtures and helpers: tiny base models built from a config (no hub), seeded, and folders holding them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from layermoe_core.environment import use_local_stack

# Keep Prefect and MLflow local, quiet and inside temporary directories for every test.
_TMP = tempfile.mkdtemp(prefix="layermoe-tests-")
use_local_stack(
    os.path.join(_TMP, "prefect"), tracking_uri=f"sqlite:///{_TMP}/mlflow.db", registry_cache=os.path.join(_TMP, "registry-cache")
)

import pytest  # noqa: E402
import torch  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

# Session-wide real PostgreSQL + MLflow server fixtures (started only by tests that use them).
from tests.services import mlflow_server, mlflow_tracking_uri, stack_databases  # noqa: E402, F401
from tests.tiny_models import TINY, tiny_model  # noqa: E402
from tests.tiny_tokenizer import tiny_tokenizer  # noqa: E402


def save_with_tiny_tokenizer(model, path: Path) -> Path:
    """`model` and the test tokenizer in one save_pretrained folder, as a parent or a registered version is."""
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prefect_backend():
    """A temporary Prefect server for the flows of one test module (`pytestmark = pytest.mark.usefixtures(...)`)."""
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(params=["qwen2", "llama"])
def base_model(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def token_ids():
    return torch.randint(0, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))


def save_sequences(sequences: dict[str, torch.Tensor], path: Path) -> Path:
    """Token rows (one tensor per language) as the safetensors file `load_sequences` reads."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({lang: rows.contiguous() for lang, rows in sequences.items()}, str(path))
    return path
