"""The plans a user writes (YAML or the Prefect UI form): one round, or a lifelong series.

Each plan is validated once, here at the edge, and composes the settings models of the
library (`layermoe_core`) and of the registry. Unknown keys are errors, so a typo in a
plan never silently falls back to a default. Every field has a title and a description, on the
model that holds it; `run_form` says how a plan reads as the Prefect UI's run form.
"""

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from layermoe_core.analysis.allocation import AllocationSettings, allocate_experts
from layermoe_core.analysis.similarity import SimilarityScore
from layermoe_core.data.corpus import CorpusSpec, check_corpus_source, check_old_new, validate_language_code
from layermoe_core.errors import LayerMoEError, describe_validation_error
from layermoe_core.evaluation.metrics import EvalSettings
from layermoe_core.model.checkpoints import PlacementSettings, num_decoder_layers
from layermoe_core.model.configuration_layermoe import LayerMoEConfig
from layermoe_core.model.surgery import check_same_as_parent, validate_allocation
from layermoe_core.model.vocabulary import VocabularySettings
from layermoe_core.training.launch import LauncherSettings
from layermoe_core.training.trainer import Stage1Settings, Stage2Settings
from registry.settings import RegistrySettings


def settings_section(annotation: Any) -> type[BaseModel] | None:
    """The settings model a plan field holds: itself, as an optional, or as a mapping's values (corpora)."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def section_keys(model: type[BaseModel]) -> str:
    """A section's keys in one line, a nested section's keys in parentheses: `batch_size, ..., gates (max_old_loss_increase, ...)`."""
    keys = []
    for name, field in model.model_fields.items():
        nested = settings_section(field.annotation)
        keys.append(f"{name} ({section_keys(nested)})" if nested is not None else name)
    return ", ".join(keys)


def run_form(*first: str):
    """A plan's `json_schema_extra`: how the plan reads as the Prefect UI's run form (docs/operations.md).

    The form lists `first` first, the other fields after in their order. Prefect draws every field of a nested
    model and cannot fold a section, so each settings section is drawn as a JSON editor instead (Prefect's widget
    for an object without properties) that holds what the plan sets; its description names the section's keys.
    Each key's title and description stay on its settings model.
    """

    def form(schema: dict[str, Any], model: type[BaseModel]) -> None:
        properties = schema["properties"]
        for name, field in model.model_fields.items():
            section = settings_section(field.annotation)
            if section is not None:
                each = "Each corpus's keys" if get_origin(field.annotation) is dict else "Keys"
                properties[name] = {
                    "type": "object",
                    "title": field.title,
                    "description": f"{field.description}. {each}: {section_keys(section)}",
                }
        names = [name for name in first if name in properties]
        schema["properties"] = {name: properties[name] for name in [*names, *(n for n in properties if n not in names)]}

    return form


WORKDIR_ENV = "LAYERMOE_WORKDIR"  # where a plan without `workdir` keeps its rounds (the compose workers: /data/work)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParentRef(_Strict):
    """Where a round starts: a registry version (by alias or number), or an HF model directory.

    An HF directory is registered as version 1 (round 0) of the registered model first.
    """

    model_config = ConfigDict(title="Parent model")

    alias: str = Field(
        "champion",
        title="Registry alias",
        description="start from the registry version holding this alias (used when version and hf_path are empty)",
    )
    version: int | None = Field(
        None, ge=1, title="Registry version", description="start from this version number instead of the alias; empty: use the alias"
    )
    hf_path: Path | None = Field(
        None,
        title="HF model directory",
        description="a local HF model directory (save_pretrained) for the first round, relative to the plan file; "
        "it is registered as version 1 first. Empty: start from the registry",
    )
    languages: list[str] = Field(
        default_factory=list,
        title="Languages of the HF model",
        description="with hf_path: the language codes that model already knows, e.g. [en, zh]",
    )

    @property
    def ref(self) -> int | str:
        return self.version if self.version is not None else self.alias


class TokenSettings(_Strict):
    """How many tokens of each language each step samples (packed into seq_len rows)."""

    model_config = ConfigDict(title="Token budgets")

    seq_len: int = Field(128, ge=8, title="Sequence length", description="tokens per packed training row, >= 8")
    analysis_tokens: int = Field(
        100_000, ge=1, title="Analysis tokens", description="per language, for layer similarity (reference: ~100k)"
    )
    stage1_tokens: int = Field(200_000, ge=1, title="Stage-1 tokens", description="per new language, Stage-1 training")
    stage2_tokens: int = Field(20_000, ge=1, title="Stage-2 tokens", description="per language, the Stage-2 replay (old and new)")
    eval_tokens: int = Field(20_000, ge=1, title="Evaluation tokens", description="per language, held-out evaluation")
    heldout_fraction: float = Field(0.1, gt=0, lt=1, title="Held-out fraction", description="share of documents kept out of training")
    seed: int = Field(0, title="Sampling seed", description="seed of document sampling and the held-out split")


class ExpansionSettings(_Strict):
    """Everything a round needs besides its languages: shared by every round of a lifelong plan."""

    registry: RegistrySettings = Field(
        default_factory=RegistrySettings, title="Registry", description="the MLflow store that holds the versions"
    )
    corpora: dict[str, CorpusSpec] = Field(
        title="Corpora",
        description="one corpus per language code, old and new languages alike, e.g. "
        '{"el": {"path": "corpus/el.jsonl"}}; paths are relative to the plan file',
    )
    tokens: TokenSettings = Field(
        default_factory=TokenSettings, title="Token budgets", description="tokens sampled per language for each step"
    )
    similarity_score: SimilarityScore = Field(
        "mean", title="Similarity score", description="how a layer's old/new hidden-state similarity is summarised"
    )
    similarity_batch_size: int = Field(
        8, ge=1, title="Similarity batch size", description="sequences per forward pass while measuring similarity"
    )
    allocation: AllocationSettings = Field(
        default_factory=AllocationSettings, title="Expert budget", description="how many new experts, and in which layers"
    )
    top_k: int = Field(
        2, ge=1, title="Experts per token (top_k)", description="set in the first round; a LayerMoE parent's value must be kept"
    )
    classifier_layer_count: int = Field(
        2, ge=0, title="Classifier layer count", description="K: routing classifiers go to the K most similar layers"
    )
    vocabulary: VocabularySettings = Field(
        default_factory=VocabularySettings,
        title="Vocabulary",
        description="keep the parent's tokenizer, or extend it for the new scripts: {extend: N}",
    )
    stage1: Stage1Settings = Field(
        default_factory=Stage1Settings, title="Stage 1", description="training of the new experts and routers on the new languages"
    )
    stage2: Stage2Settings = Field(
        default_factory=Stage2Settings,
        title="Stage 2",
        description="the review: classifiers and routers on a replay of old and new languages",
    )
    evaluation: EvalSettings = Field(
        default_factory=EvalSettings, title="Evaluation", description="held-out parent-vs-child evaluation and the promotion gate"
    )
    launcher: LauncherSettings | None = Field(
        None,
        title="Launcher",
        description="run Stage 1 and Stage 2 as `accelerate launch` jobs (processes, or an accelerate config); empty: in-process",
    )
    placement: PlacementSettings = Field(
        default_factory=PlacementSettings,
        title="Model placement",
        description="where the flow's own process puts a model it measures or evaluates: one device (the default), "
        "or device_map auto over every GPU, then CPU, then disk, for a model larger than one device",
    )
    promote_alias: str = Field("champion", title="Alias to promote", description="the alias a child that passes the gate takes")
    promotion: Literal["auto", "manual"] = Field(
        "auto",
        title="Promotion",
        description="auto: the gate moves the alias; manual: the round pauses after evaluation for a person to approve or reject",
    )
    workdir: Path = Field(
        default_factory=lambda: Path(os.environ.get(WORKDIR_ENV, ".layermoe/work")),
        title="Work directory",
        description=f"checkpoints and reports of each round; empty: ${WORKDIR_ENV}, or .layermoe/work under the current folder",
    )

    def check_corpora(self, languages: Iterable[str]) -> None:
        missing = [lang for lang in languages if lang not in self.corpora]
        if missing:
            raise LayerMoEError(
                f"languages {missing} have no corpus; add them under `corpora:` in the plan (corpora given: {sorted(self.corpora)})"
            )

    def check_parent_model(self, model_dir: Path) -> None:
        """A LayerMoE parent fixes top_k and the balance-loss coefficient; in a dense parent's layers top_k must fit
        the experts the plan's allocation can give them. A plan that differs fails here, before anything trains,
        by the rules `expand` applies."""
        if json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type") != "layermoe":
            layers = num_decoder_layers(model_dir)
            most = most_new_experts(self.allocation, layers)
            try:
                validate_allocation(most, layers, [1] * layers, self.top_k)
            except LayerMoEError as error:
                raise LayerMoEError(
                    f"{error}; the plan's allocation ({self.allocation.method}) gives a layer of the parent {model_dir} "
                    f"at most {max(most)} new experts beside its own MLP"
                ) from None
            return
        parent = LayerMoEConfig.from_pretrained(model_dir)
        check_same_as_parent("top_k", self.top_k, parent.num_experts_per_tok)
        check_same_as_parent("stage1.balance_loss_coef", self.stage1.balance_loss_coef, parent.router_aux_loss_coef)


def most_new_experts(allocation: AllocationSettings, num_layers: int) -> list[int]:
    """Per layer, the most new experts `allocation` can give: its counts for uniform and fixed, which read no
    signal; otherwise its per-layer cap, or the whole budget."""
    if allocation.method in ("uniform", "fixed"):
        return allocate_experts([1.0] * num_layers, allocation).counts
    most = allocation.max_per_layer if allocation.max_per_layer is not None else max(allocation.delta, allocation.min_per_layer)
    return [most] * num_layers


def _check_codes(codes: Iterable[str]) -> None:
    for code in codes:
        validate_language_code(code)


class ExpansionPlan(ExpansionSettings):
    """One "add languages" round. `old_languages` defaults to the parent version's languages."""

    model_config = ConfigDict(
        title="Add-languages plan",
        json_schema_extra=run_form("new_languages", "corpora", "allocation", "promotion", "old_languages", "parent"),
    )

    name: str = Field("add-languages", title="Plan name", description="names the round's folder and its runs")
    parent: ParentRef = Field(default_factory=ParentRef, title="Parent model", description="the version this round starts from")
    old_languages: list[str] = Field(
        default_factory=list, title="Old languages", description="languages the parent knows; empty: the parent's own list"
    )
    new_languages: list[str] = Field(min_length=1, title="New languages", description="language codes this round adds, e.g. [el, hu]")

    @model_validator(mode="after")
    def _languages(self) -> "ExpansionPlan":
        _check_codes(self.old_languages + self.new_languages)
        check_old_new(self.old_languages, self.new_languages)
        self.check_corpora(self.old_languages + self.new_languages)
        return self

    def check_parent_languages(self, known: list[str]) -> None:
        """Against the parent's own languages (the plan's list, or the registry's once it answers). A parent that
        knows every new language is no error: the round has nothing to do (`flows.add_languages.nothing_to_do`)."""
        already = sorted(set(self.new_languages) & set(known))
        if already and len(already) < len(self.new_languages):
            raise LayerMoEError(f"new languages {already} are already in the parent (it knows {known}); drop them from new_languages")
        self.check_corpora(self.old_languages or known)


class RoundSpec(_Strict):
    """One round of a lifelong plan: the languages it adds, and optionally its own expert budget."""

    model_config = ConfigDict(title="Round")

    new_languages: list[str] = Field(min_length=1, title="New languages", description="language codes this round adds")
    allocation: AllocationSettings | None = Field(
        None, title="Expert budget of this round", description="overrides the plan's allocation for this round; empty: the plan's"
    )


class LifelongPlan(ExpansionSettings):
    """Rounds run in order; each reads the newest `champion` and treats every language so far as old.

    The whole plan is checked before round 1 trains: every round's codes, no language added twice or
    already in the parent, a corpus for every language.
    """

    model_config = ConfigDict(title="Lifelong plan")

    name: str = Field("lifelong", title="Plan name", description="names the rounds' folders and runs")
    parent: ParentRef = Field(
        default_factory=ParentRef, title="Parent model", description="where round 1 starts; later rounds start from the promoted alias"
    )
    rounds: list[RoundSpec] = Field(min_length=1, title="Rounds", description="the languages each round adds, in order")

    @model_validator(mode="after")
    def _languages(self) -> "LifelongPlan":
        added_by = {code: "the parent" for code in self.parent.languages}
        repeated = []
        for number, spec in enumerate(self.rounds, start=1):
            _check_codes(spec.new_languages)
            for code in spec.new_languages:
                if code in added_by:
                    repeated.append(f"{code!r} in round {number} (already in {added_by[code]})")
                added_by.setdefault(code, f"round {number}")
        if repeated:
            raise ValueError(f"languages repeat: {'; '.join(repeated)}; each language is added once, by one round")
        if self.parent.hf_path is not None and not self.parent.languages:
            raise ValueError("an hf_path parent needs `parent.languages`: the languages that model already knows")
        self.check_corpora(added_by)
        return self

    def check_parent_languages(self, known: list[str]) -> None:
        """Against the current parent's languages: its pending round must be whole, and every language it knows needs a corpus."""
        self.pending_round(known)
        self.check_corpora(known)

    def pending_round(self, known: list[str]) -> int | None:
        """The index of the first round whose new languages the parent lacks; None when every round is done.

        A round whose languages the parent knows only in part cannot be rerun (a language is added once) nor
        skipped (the rest would never be added): it is an error that names the round.
        """
        for index, spec in enumerate(self.rounds):
            learned = [code for code in spec.new_languages if code in known]
            if len(learned) == len(spec.new_languages):
                continue
            if learned:
                missing = [code for code in spec.new_languages if code not in known]
                raise LayerMoEError(
                    f"round {index + 1} ({', '.join(spec.new_languages)}) is half done: the parent already knows {learned} "
                    f"but not {missing}; edit that round in the plan to add only {missing}"
                )
            return index
        return None

    def round_plan(self, index: int, old_languages: list[str], parent: ParentRef) -> ExpansionPlan:
        spec = self.rounds[index]
        shared = self.model_dump(exclude={"name", "parent", "rounds"})
        if spec.allocation is not None:
            shared["allocation"] = spec.allocation.model_dump()
        return ExpansionPlan.model_validate(
            {
                **shared,
                "name": f"{self.name}-round-{index + 1}",
                "parent": parent.model_dump(),
                "old_languages": old_languages,
                "new_languages": spec.new_languages,
            }
        )


PlanKind = Literal["add-languages", "lifelong"]
P = TypeVar("P", bound=BaseModel)


@dataclass(frozen=True)
class CheckedParent:
    """A plan's parent as its check found it: the reference a round starts from, and what that model is now."""

    ref: ParentRef
    version: int | None  # the registry version `ref` names; None for an HF directory, which its round registers
    round: int  # rounds behind the parent: 0 for an HF directory
    languages: list[str]


def check_plan_inputs(plan: ExpansionPlan | LifelongPlan) -> CheckedParent:
    """The checks that need no model and no Prefect, run before either starts: corpus files exist and are
    not empty, the parent resolves (a model directory, or a registry version), the registry answers, and
    the plan fits the parent's languages, top_k and balance-loss coefficient as far as they are known."""
    from layermoe_core.model.files import check_model_dir
    from registry.client import open_client
    from registry.versions import get_version

    for spec in plan.corpora.values():
        check_corpus_source(spec)
    ref = current_parent(plan) if isinstance(plan, LifelongPlan) else plan.parent
    if ref.hf_path is None:
        info = get_version(plan.registry, ref.ref)
        parent = CheckedParent(ref, info.version, info.round, info.languages)
    else:
        _check_codes(ref.languages)
        plan.check_parent_model(check_model_dir(ref.hf_path))
        open_client(plan.registry)
        parent = CheckedParent(ref, None, 0, ref.languages)
    plan.check_parent_languages(parent.languages)
    return parent


def current_parent(plan: LifelongPlan) -> ParentRef:
    """Where a lifelong plan's next round starts: the version holding the plan's alias once a round has taken it,
    and until then the plan's own parent (an HF directory, or a registry version)."""
    from registry.versions import alias_version

    return ParentRef(alias=plan.promote_alias) if alias_version(plan.registry, plan.promote_alias) is not None else plan.parent


def load_lifelong_plan(path: str | Path) -> LifelongPlan:
    """A lifelong plan file, or a one-round plan file read as a lifelong plan of that one round."""
    return parse_lifelong_plan(path, read_plan_file(path))


def parse_lifelong_plan(path: str | Path, content: bytes) -> LifelongPlan:
    """The lifelong plan in `content`, the bytes of the plan file at `path` (its input paths are relative to that file's folder),
    for a caller that needs the bytes too: a tick records their sha256."""
    raw = _plan_mapping(Path(path), content)
    if "new_languages" in raw and "rounds" not in raw:
        one_round = _validate_plan(Path(path), raw, ExpansionPlan)
        shared = one_round.model_dump(exclude={"new_languages", "old_languages"})
        shared["parent"]["languages"] = one_round.parent.languages or one_round.old_languages
        return LifelongPlan.model_validate({**shared, "rounds": [{"new_languages": one_round.new_languages}]})
    return _validate_plan(Path(path), raw, LifelongPlan)


def load_plan(path: str | Path, kind: type[P]) -> P:
    """Read and validate a YAML plan; every problem is reported with its key path."""
    return _validate_plan(Path(path), _plan_mapping(Path(path), read_plan_file(path)), kind)


PlanFile = Annotated[
    str,
    Field(
        title="Plan file",
        description="the path of a YAML plan file, which the worker reads when the run starts; paths in it are relative to the file",
    ),
]


def plan_parameter(plan: P | dict[str, Any] | str, kind: type[P]) -> P:
    """A flow's `plan` parameter as the plan. The parameter is the plan or its file's path (`PlanFile`), so the
    Prefect UI's run form offers both: a deployment's default is a file the worker reads when each run starts
    (prefect.yaml), a served form's is the plan itself."""
    return load_plan(plan, kind) if isinstance(plan, str) else kind.model_validate(plan)


def read_plan_file(path: str | Path) -> bytes:
    """The plan file's bytes; a folder or a missing file is an error that says what to pass."""
    path = Path(path)
    if path.is_dir():
        plans = sorted(p.name for p in path.glob("*.yaml"))
        raise LayerMoEError(f"plan {path} is a folder; pass --plan with one YAML plan file{f' in it, e.g. {plans[0]}' if plans else ''}")
    if not path.is_file():
        raise LayerMoEError(f"plan file {path} does not exist; pass --plan with a YAML plan (see plans/ for examples)")
    return path.read_bytes()


def _plan_mapping(path: Path, content: bytes) -> dict[str, Any]:
    """The plan's YAML mapping, its input paths (corpora, HF parent, accelerate config) made absolute against the plan's folder."""
    try:
        raw = yaml.safe_load(content.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise LayerMoEError(f"plan {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from e
    except yaml.YAMLError as e:
        raise LayerMoEError(f"plan {path} is not valid YAML: {e}") from e
    if raw is None:
        raise LayerMoEError(f"plan {path} is empty; write a plan (see plans/ for examples)")
    if not isinstance(raw, dict):
        raise LayerMoEError(f"plan {path} is a YAML {type(raw).__name__}, not a mapping of plan keys (see plans/ for examples)")
    base = path.resolve().parent
    for spec in (raw.get("corpora") or {}).values():
        if isinstance(spec, dict) and spec.get("path") and not Path(spec["path"]).is_absolute():
            spec["path"] = str(base / spec["path"])
    for section, key in (("parent", "hf_path"), ("launcher", "config_file")):
        holder = raw.get(section)
        if isinstance(holder, dict) and holder.get(key) and not Path(holder[key]).is_absolute():
            holder[key] = str(base / holder[key])
    return raw


def _validate_plan(path: Path, raw: dict[str, Any], kind: type[BaseModel]):
    try:
        return kind.model_validate(raw)
    except ValidationError as e:
        raise LayerMoEError(f"plan {path} is invalid: {describe_validation_error(e, root='<plan>')}") from e
