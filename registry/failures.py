"""The registry's failures as the user reads them, worded once; no MLflow import, so the listing raises the same ones."""

from __future__ import annotations

from pathlib import Path

from layermoe_core.errors import LayerMoEError

from .settings import RegistrySettings


class RegistryUnavailable(LayerMoEError):
    """The registry did not answer (down, timing out, overloaded): retrying later can succeed."""


def unavailable_error(settings: RegistrySettings, cause: Exception, checkpoint: Path | None) -> RegistryUnavailable:
    kept = f"; the checkpoint is still at {checkpoint}, so a retry can register it without retraining" if checkpoint is not None else ""
    return RegistryUnavailable(
        f"the MLflow registry at {settings.tracking_uri} is unreachable ({cause}){kept}. "
        "Start the tracking server or point MLFLOW_TRACKING_URI / RegistrySettings.tracking_uri at a reachable one."
    )


def refused_error(settings: RegistrySettings, message: str) -> LayerMoEError:
    return LayerMoEError(f"the MLflow registry at {settings.tracking_uri} refused a request: {message}")


def not_mlflow_error(settings: RegistrySettings, status: int, content_type: str | None) -> LayerMoEError:
    return LayerMoEError(
        f"{settings.tracking_uri} answers HTTP {status} ({content_type or 'no content type'}) but is not an MLflow tracking "
        "server; point MLFLOW_TRACKING_URI / --tracking-uri at the MLflow server (e.g. http://host:5000), not at another web service"
    )


def no_store_error(settings: RegistrySettings, sqlite_path: Path) -> LayerMoEError:
    return LayerMoEError(
        f"there is no MLflow store at {sqlite_path.resolve()} (from tracking URI {settings.tracking_uri}); "
        "pass the right --tracking-uri / MLFLOW_TRACKING_URI, or register a base model first"
    )


def no_model_error(settings: RegistrySettings, existing: list[str]) -> LayerMoEError:
    return LayerMoEError(
        f"registered model {settings.registered_model_name!r} does not exist at {settings.tracking_uri} "
        f"(registered models there: {existing}); register a base model first with registry.register_base"
    )


def sole_model_name(settings: RegistrySettings, names: list[str]) -> str:
    """The store's one registered model, for commands given no name; with none or several, an error that lists them."""
    if len(names) == 1:
        return names[0]
    if not names:
        raise LayerMoEError(f"{settings.tracking_uri} has no registered model yet; register a base model first (a round's plan does)")
    raise LayerMoEError(
        f"{settings.tracking_uri} holds {len(names)} registered models ({', '.join(names)}); pick one with --model-name, "
        f"e.g. --model-name {names[0]}"
    )
