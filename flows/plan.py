"""The plans a user writes (YAML or the Prefect UI form): one round, or a lifelong series.

Each plan is validated once, here at the edge, and composes the settings models of the
library (`layermoe_core`) and of the registry. Unknown keys are errors, so a typo in a
plan never silently falls back to a default. The same models are the Prefect UI's run form,
so every field has a title and a description, and the form lists first what a user sets first.
"""

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, ValidationError, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema as cs

from layermoe_core.analysis.allocation import AllocationSettings
from layermoe_core.analysis.similarity import SimilarityScore
from layermoe_core.data.corpus import CorpusSpec, check_corpus_source, check_old_new, validate_language_code
from layermoe_core.errors import LayerMoEError, describe_validation_error
from layermoe_core.evaluation.metrics import EvalSettings
from layermoe_core.model.checkpoints import PlacementSettings
from layermoe_core.model.configuration_layermoe import (
    SUPPORTED_BASE_MODEL_TYPES,
    LayerMoEConfig,
)
from layermoe_core.model.surgery import check_same_as_parent
from layermoe_core.training.launch import LauncherSettings
from layermoe_core.training.trainer import Stage1Settings, Stage2Settings
from registry.settings import RegistrySettings

# Keys a plan used to have: each names what replaced it, so an old plan fails with the fix.
RENAMED_KEYS = {
    "classifier_layers": "`classifier_layers` is now `classifier_layer_count` (it is a count K: classifiers go "
    "to the K most similar layers); rename the key",
}
REMOVED_PARENT_KEYS = {
    "trust_remote_code": "`parent.trust_remote_code` is gone: layermoe expands only architectures that transformers "
    f"implements itself ({', '.join(SUPPORTED_BASE_MODEL_TYPES)}) and never runs a model's own code; "
    "remove the key",
}


def _refuse_old_keys(data: Any, old_keys: dict[str, str]) -> Any:
    if isinstance(data, dict):
        for key, fix in old_keys.items():
            if key in data:
                raise ValueError(fix)
    return data


def form_first(*names: str):
    """A `json_schema_extra` that lists `names` first in the Prefect form, the other fields after in their order.

    It also keeps each field's own title: pydantic leaves it out where it equals the title of the model the
    field holds, and the form then shows the bare key ("Parent") instead.
    """

    def reorder(schema: dict[str, Any], model: type[BaseModel]) -> None:
        properties = schema.get("properties", {})
        for name, prop in properties.items():
            field = model.model_fields.get(name)
            if field is not None and field.title and "title" not in prop:
                prop["title"] = field.title
        first = [name for name in names if name in properties]
        schema["properties"] = {name: properties[name] for name in [*first, *(n for n in properties if n not in first)]}

    return reorder


class FormSection:
    """How a settings model of the library reads as a section of the Prefect run form.

    Prefect titles a nested model's section with the model's schema title, which is its class name
    (`Stage1Settings`) unless the model sets one. The library's settings models stay free of form
    concerns, so the plan annotates its fields with this: the model's title and description, texts
    for the fields that lack them (or do not say what leaving them empty does), and the same for the
    models nested inside it (by field name). It edits the model's shared schema definition, so the
    model reads the same wherever the form shows it.
    """

    def __init__(
        self,
        title: str,
        description: str | None = None,
        fields: dict[str, dict[str, str]] | None = None,
        nested: dict[str, "FormSection"] | None = None,
    ):
        self.title, self.description, self.fields, self.nested = title, description, fields or {}, nested or {}

    def __get_pydantic_json_schema__(self, schema: cs.CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        json_schema = handler(schema)
        self.apply(handler.resolve_ref_schema(json_schema), handler)
        return json_schema

    def apply(self, definition: dict[str, Any], handler: GetJsonSchemaHandler) -> None:
        definition["title"] = self.title
        if self.description:
            definition["description"] = self.description
        properties = definition.get("properties", {})
        for name, texts in self.fields.items():
            properties[name].update(texts)
        for name, section in self.nested.items():
            ref = _model_ref(properties[name])
            section.apply(handler.resolve_ref_schema({"$ref": ref}), handler)


def _model_ref(prop: dict[str, Any]) -> str:
    """The `$ref` of the model a property holds: directly, as an optional, or as a dict's values."""
    if "$ref" in prop:
        return prop["$ref"]
    for option in prop.get("anyOf", []):
        if "$ref" in option:
            return option["$ref"]
    return _model_ref(prop["additionalProperties"])


# The library's settings models as form sections. The field texts below only fill gaps in the library's own
# descriptions (mostly: what an empty optional field does); they belong there once layermoe_core is free to change.
EMPTY_MAX_STEPS = {"description": "optimizer steps, >= 1; empty: train num_epochs epochs (overrides num_epochs when set)"}
TRAINING_TITLES = {
    "lr_scheduler": {"title": "LR schedule"},
    "max_steps": {**EMPTY_MAX_STEPS, "title": "Max steps"},
    "new_prior_coef": {"title": "New-expert prior coefficient"},
}
ALLOCATION_FORM = FormSection(
    "Expert budget",
    "How many new experts a round adds and to which layers: the allocation method, its budget (delta) and per-layer "
    "bounds, and the settings of the signal the method reads.",
    fields={
        "method": {
            "description": "layermoe: by hidden-state similarity to the old languages (the paper); uniform: the same "
            "count in every layer (MoE-LPR); fixed: the counts in `fixed`; neuron, param_delta, late_layers: "
            "the other signals compared in `layermoe compare`"
        },
        "fixed": {"description": "with method fixed: new experts per layer, one count per layer; empty: the method decides"},
        "max_per_layer": {"description": "at most this many new experts per layer (minmax: the top of the range); empty: no cap"},
        "clamp_similarity": {
            "description": "layermoe: raise similarities below this positive floor to it, so 1/S stays defined; empty: no floor"
        },
    },
)
CORPUS_FORM = FormSection(
    "Corpus",
    "Where one language's documents come from: a local file or folder (`path`) or a "
    "datasets hub dataset (`hub_name`), exactly one of them.",
)
STAGE1_FORM = FormSection(
    "Stage 1: new experts",
    "Stage 1 trains the new experts and their routers on the new languages; everything the parent had stays frozen.",
    fields={**TRAINING_TITLES, "balance_loss_coef": {"title": "Balance loss coefficient"}},
)
STAGE2_FORM = FormSection(
    "Stage 2: review",
    "Stage 2 (the review) trains only the routers and the routing classifiers, on a "
    "replay of old and new languages, so old-language tokens go back to the old experts.",
    fields={
        **TRAINING_TITLES,
        "lpr_coef": {"title": "LPR loss coefficient"},
        "classifier_coef": {"title": "Classifier loss coefficient"},
        "lm_coef": {"title": "LM loss coefficient"},
    },
)
EVALUATION_FORM = FormSection(
    "Evaluation and gate",
    "What the parent and its child are compared on (held-out loss per language, optional benchmarks), and the gate the "
    "child must pass to take the alias.",
    fields={
        "translation": {
            "title": "Translation",
            "description": "few-shot translation to and from a pivot on held-out "
            "parallel sentences, scored with chrF++; empty: no translation evaluation",
        },
        "gates": {"title": "Promotion gate", "description": "when the child may take the alias"},
        "multiple_choice_files": {
            "description": "local Belebele-like .jsonl files; each file's metric is named after it (belebele_el.jsonl: belebele_el.mc_acc)"
        },
        "lm_eval_tasks": {"title": "lm-eval tasks"},
        "lm_eval_task_files": {"title": "lm-eval task files"},
        "lm_eval_limit": {"title": "lm-eval limit"},
    },
    nested={
        "gates": FormSection(
            "Promotion gate",
            "Bounds on the child's held-out loss (and, optionally, translation chrF++) "
            "per language, relative to its parent; with `promotion: manual` the gate's verdict is advice "
            "shown to the reviewer.",
        ),
        "translation": FormSection(
            "Translation", "Few-shot translation between a pivot language (English by default) and every other evaluated language."
        ),
        "lm_eval_tasks": FormSection(
            "lm-eval task",
            "One lm-eval task: the language it measures and its few-shot count.",
            fields={
                "language": {"description": "the language code the task measures, e.g. el"},
                "num_fewshot": {"description": "few-shot examples per prompt, e.g. 25 for ARC"},
            },
        ),
    },
)
LAUNCHER_FORM = FormSection(
    "Launcher",
    "How Stage 1 and Stage 2 start: `accelerate launch` with this many processes (DDP), or an accelerate "
    "config (DDP, FSDP or DeepSpeed ZeRO).",
    fields={"config_file": {"description": "an accelerate config YAML (DDP, FSDP or DeepSpeed ZeRO); empty: plain DDP with num_processes"}},
)

PLACEMENT_FORM = FormSection(
    "Model placement",
    "How the flow's own process places a model it measures: similarity and the other allocation signals, routing "
    "statistics and evaluation (held-out loss, benchmarks, translation, continuations). Training is the launcher's.",
    fields={
        "device_map": {"title": "Device map"},
        "max_memory": {"title": "Memory per device"},
        "offload_folder": {"title": "Offload folder"},
    },
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParentRef(_Strict):
    """Where a round starts: a registry version (by alias or number), or an HF model directory.

    An HF directory is registered as version 1 (round 0) of the registered model first.
    """

    model_config = ConfigDict(title="Parent model", json_schema_extra=form_first("hf_path", "alias", "version", "languages"))

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
        description="a local HF model directory (save_pretrained) for the first round; it is registered as version 1 first. Empty: start from the registry",
    )
    languages: list[str] = Field(
        default_factory=list,
        title="Languages of the HF model",
        description="with hf_path: the language codes that model already knows, e.g. [en, zh]",
    )

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        return _refuse_old_keys(data, REMOVED_PARENT_KEYS)

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
    corpora: dict[str, Annotated[CorpusSpec, CORPUS_FORM]] = Field(
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
    allocation: Annotated[AllocationSettings, ALLOCATION_FORM] = Field(
        default_factory=AllocationSettings, title="Expert budget", description="how many new experts, and in which layers"
    )
    top_k: int = Field(
        2, ge=1, title="Experts per token (top_k)", description="set in the first round; a LayerMoE parent's value must be kept"
    )
    classifier_layer_count: int = Field(
        2, ge=0, title="Classifier layer count", description="K: routing classifiers go to the K most similar layers"
    )
    stage1: Annotated[Stage1Settings, STAGE1_FORM] = Field(
        default_factory=Stage1Settings, title="Stage 1", description="training of the new experts and routers on the new languages"
    )
    stage2: Annotated[Stage2Settings, STAGE2_FORM] = Field(
        default_factory=Stage2Settings,
        title="Stage 2",
        description="the review: classifiers and routers on a replay of old and new languages",
    )
    evaluation: Annotated[EvalSettings, EVALUATION_FORM] = Field(
        default_factory=EvalSettings, title="Evaluation", description="held-out parent-vs-child evaluation and the promotion gate"
    )
    launcher: Annotated[LauncherSettings, LAUNCHER_FORM] | None = Field(
        None,
        title="Launcher",
        description="run Stage 1 and Stage 2 as `accelerate launch` jobs (processes, or an accelerate config); empty: in-process",
    )
    placement: Annotated[PlacementSettings, PLACEMENT_FORM] = Field(
        default_factory=PlacementSettings,
        title="Model placement",
        description="where the flow's own process puts a model it measures or evaluates: one device (the default), or device_map auto over every GPU, then CPU, then disk, for a model larger than one device",
    )
    promote_alias: str = Field("champion", title="Alias to promote", description="the alias a child that passes the gate takes")
    promotion: Literal["auto", "manual"] = Field(
        "auto",
        title="Promotion",
        description="auto: the gate moves the alias; manual: the round pauses after evaluation for a person to approve or reject",
    )
    workdir: Path = Field(Path(".layermoe/work"), title="Work directory", description="checkpoints and reports of each round")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        return _refuse_old_keys(data, RENAMED_KEYS)

    def check_corpora(self, languages: Iterable[str]) -> None:
        missing = [lang for lang in languages if lang not in self.corpora]
        if missing:
            raise LayerMoEError(
                f"languages {missing} have no corpus; add them under `corpora:` in the plan (corpora given: {sorted(self.corpora)})"
            )

    def check_parent_model(self, model_dir: Path) -> None:
        """A LayerMoE parent fixes top_k and the balance-loss coefficient: a plan that differs fails here,
        before anything trains, by the rule `expand` applies."""
        if json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type") != "layermoe":
            return
        parent = LayerMoEConfig.from_pretrained(model_dir)
        check_same_as_parent("top_k", self.top_k, parent.num_experts_per_tok)
        check_same_as_parent("stage1.balance_loss_coef", self.stage1.balance_loss_coef, parent.router_aux_loss_coef)


def _check_codes(codes: Iterable[str]) -> None:
    for code in codes:
        validate_language_code(code)


class ExpansionPlan(ExpansionSettings):
    """One "add languages" round. `old_languages` defaults to the parent version's languages."""

    model_config = ConfigDict(
        title="Add-languages plan", json_schema_extra=form_first("parent", "new_languages", "old_languages", "corpora", "allocation")
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
        """Against the parent's own languages (the plan's list, or the registry's once it answers)."""
        already = sorted(set(self.new_languages) & set(known))
        if already:
            raise LayerMoEError(f"new languages {already} are already in the parent (it knows {known}); drop them from new_languages")
        self.check_corpora(self.old_languages or known)


class RoundSpec(_Strict):
    """One round of a lifelong plan: the languages it adds, and optionally its own expert budget."""

    model_config = ConfigDict(title="Round")

    new_languages: list[str] = Field(min_length=1, title="New languages", description="language codes this round adds")
    allocation: Annotated[AllocationSettings, ALLOCATION_FORM] | None = Field(
        None, title="Expert budget of this round", description="overrides the plan's allocation for this round; empty: the plan's"
    )


class LifelongPlan(ExpansionSettings):
    """Rounds run in order; each reads the newest `champion` and treats every language so far as old.

    The whole plan is checked before round 1 trains: every round's codes, no language added twice or
    already in the parent, a corpus for every language.
    """

    model_config = ConfigDict(title="Lifelong plan", json_schema_extra=form_first("parent", "rounds", "corpora", "allocation"))

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
        """Against a registry parent's languages, known once the registry answers."""
        already = sorted({code for spec in self.rounds for code in spec.new_languages} & set(known))
        if already:
            raise LayerMoEError(f"rounds add languages {already} that the parent already knows ({known}); drop them")
        self.check_corpora(known)

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


def check_plan_inputs(plan: ExpansionPlan | LifelongPlan) -> None:
    """The checks that need no model and no Prefect, run before either starts: corpus files exist and are
    not empty, the parent resolves (a model directory, or a registry version), the registry answers, and
    the plan fits the parent's languages, top_k and balance-loss coefficient as far as they are known."""
    from layermoe_core.model.files import check_model_dir
    from registry.client import open_client
    from registry.versions import show_version

    for spec in plan.corpora.values():
        check_corpus_source(spec)
    if plan.parent.hf_path is None:
        known = show_version(plan.registry, plan.parent.ref).get("languages") or []
    else:
        _check_codes(plan.parent.languages)
        plan.check_parent_model(check_model_dir(plan.parent.hf_path))
        open_client(plan.registry)
        known = plan.parent.languages
    plan.check_parent_languages(known)


def load_plan(path: str | Path, kind: type[BaseModel]):
    """Read and validate a YAML plan; every problem is reported with its key path."""
    path = Path(path)
    if path.is_dir():
        plans = sorted(p.name for p in path.glob("*.yaml"))
        raise LayerMoEError(f"plan {path} is a folder; pass --plan with one YAML plan file{f' in it, e.g. {plans[0]}' if plans else ''}")
    if not path.is_file():
        raise LayerMoEError(f"plan file {path} does not exist; pass --plan with a YAML plan (see plans/ for examples)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise LayerMoEError(f"plan {path} is not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from e
    except yaml.YAMLError as e:
        raise LayerMoEError(f"plan {path} is not valid YAML: {e}") from e
    if raw is None:
        raise LayerMoEError(f"plan {path} is empty; write a plan (see plans/ for examples)")
    if not isinstance(raw, dict):
        raise LayerMoEError(f"plan {path} is a YAML {type(raw).__name__}, not a mapping of plan keys (see plans/ for examples)")
    base = path.parent
    for spec in (raw.get("corpora") or {}).values():  # corpus paths are relative to the plan file
        if isinstance(spec, dict) and spec.get("path") and not Path(spec["path"]).is_absolute():
            spec["path"] = str(base / spec["path"])
    try:
        return kind.model_validate(raw)
    except ValidationError as e:
        raise LayerMoEError(f"plan {path} is invalid: {describe_validation_error(e, root='<plan>')}") from e
