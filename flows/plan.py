"""The plans a user writes (YAML or the Prefect UI form): one round, or a lifelong series.

Each plan is validated once, here at the edge, and composes the settings models of the
library (`layermoe_core`) and of the registry. Unknown keys are errors, so a typo in a
plan never silently falls back to a default.
"""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from layermoe_core.allocation import AllocationSettings
from layermoe_core.data import CorpusSpec, validate_language_code
from layermoe_core.errors import LayerMoEError
from layermoe_core.evaluation import EvalSettings
from layermoe_core.similarity import SimilarityScore
from layermoe_core.training import Stage1Settings, Stage2Settings
from registry.settings import RegistrySettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParentRef(_Strict):
    """Where a round starts: a registry version (by alias or number), or an HF model directory.

    An HF directory is registered as version 1 (round 0) of the registered model first.
    """

    alias: str | None = "champion"
    version: int | None = Field(None, ge=1)
    hf_path: Path | None = Field(None, description="a local HF model directory for the first round")
    languages: list[str] = Field(default_factory=list, description="with hf_path: the languages that model already knows")
    trust_remote_code: bool = Field(False, description="only for hf_path models that need it; off by default")

    @property
    def ref(self) -> int | str:
        return self.version if self.version is not None else (self.alias or "champion")


class TokenSettings(_Strict):
    """How many tokens of each language each step samples (packed into seq_len rows)."""

    seq_len: int = Field(128, ge=8)
    analysis_tokens: int = Field(100_000, ge=1, description="per language, for layer similarity (reference: ~100k)")
    stage1_tokens: int = Field(200_000, ge=1, description="per new language, Stage-1 training")
    stage2_tokens: int = Field(20_000, ge=1, description="per language, the Stage-2 replay (old and new)")
    eval_tokens: int = Field(20_000, ge=1, description="per language, held-out evaluation")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, description="share of documents kept out of training")
    seed: int = 0


class ExpansionSettings(_Strict):
    """Everything a round needs besides its languages: shared by every round of a lifelong plan."""

    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    corpora: dict[str, CorpusSpec]
    tokens: TokenSettings = Field(default_factory=TokenSettings)
    similarity_score: SimilarityScore = "mean"
    similarity_batch_size: int = Field(8, ge=1)
    allocation: AllocationSettings = Field(default_factory=AllocationSettings)
    top_k: int = Field(2, ge=1)
    classifier_layers: int = Field(2, ge=0, description="K: routing classifiers go to the K most similar layers")
    stage1: Stage1Settings = Field(default_factory=Stage1Settings)
    stage2: Stage2Settings = Field(default_factory=Stage2Settings)
    evaluation: EvalSettings = Field(default_factory=EvalSettings)
    promote_alias: str = "champion"
    promotion: Literal["auto", "manual"] = Field(
        "auto", description="auto: the gate moves the alias; manual: the round pauses after evaluation for a person to approve or reject"
    )
    workdir: Path = Field(Path(".layermoe/work"), description="checkpoints and reports of each round")

    def check_corpora(self, languages: list[str]) -> None:
        missing = [lang for lang in languages if lang not in self.corpora]
        if missing:
            raise LayerMoEError(
                f"languages {missing} have no corpus; add them under `corpora:` in the plan "
                f"(corpora given: {sorted(self.corpora)})"
            )


class ExpansionPlan(ExpansionSettings):
    """One "add languages" round. `old_languages` defaults to the parent version's languages."""

    name: str = "add-languages"
    parent: ParentRef = Field(default_factory=ParentRef)
    old_languages: list[str] = Field(default_factory=list)
    new_languages: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _languages(self) -> "ExpansionPlan":
        for code in self.old_languages + self.new_languages:
            validate_language_code(code)
        overlap = sorted(set(self.old_languages) & set(self.new_languages))
        if overlap:
            raise ValueError(f"languages {overlap} are both old and new; a round adds languages the parent lacks")
        self.check_corpora(self.old_languages + self.new_languages)
        return self


class RoundSpec(_Strict):
    new_languages: list[str] = Field(min_length=1)
    allocation: AllocationSettings | None = Field(None, description="overrides the plan's allocation for this round")


class LifelongPlan(ExpansionSettings):
    """Rounds run in order; each reads the newest `champion` and treats every language so far as old."""

    name: str = "lifelong"
    parent: ParentRef = Field(default_factory=ParentRef)
    rounds: list[RoundSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _languages(self) -> "LifelongPlan":
        self.check_corpora([lang for spec in self.rounds for lang in spec.new_languages])
        return self

    def round_plan(self, index: int, old_languages: list[str], parent: ParentRef) -> ExpansionPlan:
        spec = self.rounds[index]
        shared = self.model_dump(exclude={"name", "parent", "rounds"})
        if spec.allocation is not None:
            shared["allocation"] = spec.allocation.model_dump()
        return ExpansionPlan.model_validate(
            {**shared, "name": f"{self.name}-round-{index + 1}", "parent": parent.model_dump(),
             "old_languages": old_languages, "new_languages": spec.new_languages}
        )


PlanKind = Literal["add-languages", "lifelong"]


def load_plan(path: str | Path, kind: type[BaseModel]):
    """Read and validate a YAML plan; every problem is reported with its key path."""
    path = Path(path)
    if not path.is_file():
        raise LayerMoEError(f"plan file {path} does not exist; pass --plan with a YAML plan (see plans/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LayerMoEError(f"plan {path} is not valid YAML: {e}") from e
    base = path.parent
    for spec in (raw.get("corpora") or {}).values():  # corpus paths are relative to the plan file
        if isinstance(spec, dict) and spec.get("path") and not Path(spec["path"]).is_absolute():
            spec["path"] = str(base / spec["path"])
    try:
        return kind.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '<plan>'}: {err['msg']}" for err in e.errors())
        raise LayerMoEError(f"plan {path} is invalid: {problems}") from e
