"""How many new experts each layer gets, and which layers get the old/new classifiers.

LayerMoE gives a layer more experts the less similar its languages are:
N_i = ceil((1/S_i) / sum_j (1/S_j) * delta), then clipped to [min_per_layer, max_per_layer].
Ceil rounding makes the total overshoot delta by up to the number of layers; callers record
the realised total. The counts are of NEW experts; the default min_per_layer=1 reproduces
the reference's "at least 2 experts per layer" (the frozen original plus one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import LayerMoEError

AllocationMethod = Literal["layermoe", "uniform", "fixed"]
# Shares are ceiled; a share that is an integer up to float rounding (e.g. 1.0000000000000002)
# must stay that integer, or every layer of a flat profile would overshoot by one.
_ROUNDING_DIGITS = 9


class AllocationSettings(BaseModel):
    """The allocation method and its budget. min/max_per_layer bound the "layermoe" method only."""

    model_config = ConfigDict(extra="forbid")

    method: AllocationMethod = "layermoe"
    delta: int = Field(8, description="layermoe: total budget of new experts over all layers (the realised total may exceed it)")
    per_layer: int = Field(1, description="uniform: new experts in every layer (the MoE-LPR baseline)")
    fixed: list[int] | None = Field(None, description="fixed: new experts per layer, one count per layer")
    min_per_layer: int = Field(1, description="layermoe: at least this many new experts per layer (0 lets a layer stay dense)")
    max_per_layer: int | None = Field(None, description="layermoe: at most this many new experts per layer")
    clamp_similarity: float | None = Field(
        None, description="layermoe: raise similarities below this positive floor to it, so 1/S stays defined"
    )

    @model_validator(mode="after")
    def _check(self) -> AllocationSettings:
        if self.delta < 0:
            raise LayerMoEError(f"delta={self.delta}: the budget of new experts must be >= 0")
        if self.per_layer < 0:
            raise LayerMoEError(f"per_layer={self.per_layer}: the experts per layer must be >= 0")
        if self.min_per_layer < 0:
            raise LayerMoEError(f"min_per_layer={self.min_per_layer} must be >= 0")
        if self.max_per_layer is not None and self.max_per_layer < self.min_per_layer:
            raise LayerMoEError(
                f"min_per_layer={self.min_per_layer} exceeds max_per_layer={self.max_per_layer}; "
                "lower the minimum or raise the maximum"
            )
        if self.clamp_similarity is not None and not self.clamp_similarity > 0:
            raise LayerMoEError(f"clamp_similarity={self.clamp_similarity} must be a small positive number, e.g. 1e-3")
        if self.method == "fixed" and self.fixed is None:
            raise LayerMoEError("method='fixed' needs `fixed`, the list of new experts per layer")
        if self.fixed is not None and any(n < 0 for n in self.fixed):
            raise LayerMoEError(f"fixed={self.fixed} has negative counts; every count must be >= 0")
        return self


def _finite(scores: Sequence[float]) -> list[float]:
    scores = [float(s) for s in scores]
    not_finite = [(i, s) for i, s in enumerate(scores) if not math.isfinite(s)]
    if not_finite:
        raise LayerMoEError(f"similarity scores at (layer, score) {not_finite} are not finite; recompute the similarity")
    return scores


def _positive(scores: Sequence[float], clamp: float | None) -> list[float]:
    scores = _finite(scores)
    if not scores:
        raise LayerMoEError("no similarity scores: give one per layer")
    if clamp is not None:
        return [max(s, clamp) for s in scores]
    non_positive = [(i, s) for i, s in enumerate(scores) if s <= 0]
    if non_positive:
        raise LayerMoEError(
            f"similarity scores at (layer, score) {non_positive} are not positive, so their inverse 1/S is undefined; "
            "set clamp_similarity (e.g. 1e-3) to floor them, or use method='uniform'/'fixed'"
        )
    return scores


def _layermoe(scores: list[float], settings: AllocationSettings) -> list[int]:
    num_layers = len(scores)
    if settings.max_per_layer is not None and settings.max_per_layer * num_layers < settings.delta:
        raise LayerMoEError(
            f"max_per_layer={settings.max_per_layer} over {num_layers} layers cannot hold delta={settings.delta} "
            "new experts; raise max_per_layer or lower delta"
        )
    inverse = [1 / s for s in scores]
    total = sum(inverse)
    counts = [math.ceil(round(inv / total * settings.delta, _ROUNDING_DIGITS)) for inv in inverse]
    upper = settings.max_per_layer if settings.max_per_layer is not None else math.inf
    return [int(min(max(n, settings.min_per_layer), upper)) for n in counts]


def allocate_experts(scores: Sequence[float], settings: AllocationSettings) -> list[int]:
    """New experts per layer, from the per-layer similarity scores (one per decoder layer).

    "layermoe" follows the formula above; its total is >= delta. "uniform" gives
    `per_layer` everywhere; "fixed" returns the user's vector after checking its length.
    """
    num_layers = len(scores)
    if settings.method == "uniform":
        return [settings.per_layer] * num_layers
    if settings.method == "fixed":
        if len(settings.fixed) != num_layers:
            raise LayerMoEError(
                f"fixed has {len(settings.fixed)} counts but the model has {num_layers} layers; give one count per layer"
            )
        return list(settings.fixed)
    return _layermoe(_positive(scores, settings.clamp_similarity), settings)


def choose_classifier_layers(scores: Sequence[float], k: int) -> list[int]:
    """The k layers of highest similarity (ties: the lower layer), in ascending layer order."""
    scores = _finite(scores)
    if not 0 <= k <= len(scores):
        raise LayerMoEError(
            f"k={k} classifier layers requested but the model has {len(scores)} layers; use 0 <= k <= {len(scores)}"
        )
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])
