"""Plans are validated at the edge, and the CLI turns bad input into one clear line and exit code 2."""

import glob
import json
import os
import pty
import random
import re
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from flows.cli import main
from flows.compare import ComparePlan
from flows.plan import ExpansionPlan, LifelongPlan, ParentRef, load_lifelong_plan, load_plan
from layermoe_core.data.corpus import CorpusSpec
from layermoe_core.errors import LayerMoEError
from layermoe_core.evaluation.metrics import EvalSettings
from layermoe_core.training.trainer import Stage1Settings, TrainResult
from tasks.results import decode

from .conftest import save_with_tiny_tokenizer, tiny_model
from .synthetic_corpus import write_synthetic_corpus

REPO_ROOT = Path(__file__).resolve().parents[1]
PROCESS_DEADLINE_S = 600.0  # a guard against a hung child process, not a timing

PLAN = """
new_languages: [el]
corpora:
  el: {path: el.txt}
"""


def write(tmp_path, text: str):
    (tmp_path / "el.txt").write_text("καλημέρα κόσμε\n", encoding="utf-8")
    path = tmp_path / "plan.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_valid_plan_loads_with_corpus_paths_relative_to_the_plan(tmp_path):
    plan = load_plan(write(tmp_path, PLAN), ExpansionPlan)
    assert plan.new_languages == ["el"] and plan.corpora["el"].path == tmp_path / "el.txt"
    assert plan.parent.ref == "champion" and plan.allocation.method == "layermoe"


def test_unknown_key_is_named_with_its_path(tmp_path):
    with pytest.raises(LayerMoEError, match=r"stage1: .*learning_rat=0.1: Extra inputs are not permitted"):
        load_plan(write(tmp_path, PLAN + "stage1: {learning_rat: 0.1}\n"), ExpansionPlan)


def test_language_without_corpus_is_refused(tmp_path):
    with pytest.raises(LayerMoEError, match=r"languages \['hu'\] have no corpus"):
        load_plan(write(tmp_path, PLAN.replace("[el]", "[el, hu]")), ExpansionPlan)


def test_language_both_old_and_new_is_refused(tmp_path):
    with pytest.raises(LayerMoEError, match=r"\['el'\] are both old and new"):
        load_plan(write(tmp_path, PLAN + "old_languages: [el]\n"), ExpansionPlan)


def test_non_iso_language_code_is_refused(tmp_path):
    text = PLAN.replace("[el]", "[greek]").replace("el: {path", "greek: {path")
    with pytest.raises(LayerMoEError, match="greek"):
        load_plan(write(tmp_path, text), ExpansionPlan)


def test_bad_training_setting_is_refused(tmp_path):
    with pytest.raises(LayerMoEError, match=r"stage2: .*replay_old_fraction=1.5"):
        load_plan(write(tmp_path, PLAN + "stage2: {replay_old_fraction: 1.5}\n"), ExpansionPlan)


def test_lifelong_round_inherits_shared_settings_and_may_override_allocation(tmp_path):
    text = PLAN.replace("new_languages: [el]", "rounds:\n  - new_languages: [el]\n    allocation: {method: uniform, per_layer: 3}")
    plan = load_plan(write(tmp_path, text), LifelongPlan)
    round_plan = plan.round_plan(0, [], plan.parent)
    assert round_plan.old_languages == [] and round_plan.allocation.per_layer == 3
    assert round_plan.corpora == plan.corpora and round_plan.name == "lifelong-round-1"


# Training commands run in a child process (see flows.cli.run_flow_in_child): capfd sees its output.
def test_cli_reports_a_missing_plan_file_in_one_line(tmp_path, capfd):
    assert main(["add-languages", "--plan", str(tmp_path / "nope.yaml")]) == 2
    assert "plan file" in capfd.readouterr().err


def test_cli_reports_a_plan_folder_and_a_plan_that_is_not_utf8_in_one_line(tmp_path, capfd):
    (tmp_path / "el-hu.yaml").write_text(PLAN, encoding="utf-8")
    assert main(["add-languages", "--plan", str(tmp_path)]) == 2
    (line,) = capfd.readouterr().err.splitlines()
    assert line == f"layermoe: error: plan {tmp_path} is a folder; pass --plan with one YAML plan file in it, e.g. el-hu.yaml"
    (tmp_path / "latin1.yaml").write_bytes(PLAN.replace("el.txt", "él.txt").encode("latin-1"))
    assert main(["add-languages", "--plan", str(tmp_path / "latin1.yaml")]) == 2
    (line,) = capfd.readouterr().err.splitlines()
    assert re.fullmatch(
        r"layermoe: error: plan .*latin1\.yaml is not UTF-8 text \(byte \d+: invalid continuation byte\); save it as UTF-8", line
    )


def test_cli_reports_an_invalid_plan(tmp_path, capfd):
    assert main(["lifelong", "--plan", str(write(tmp_path, PLAN.replace("new_languages: [el]", "")))]) == 2  # no rounds
    assert "rounds: Field required" in capfd.readouterr().err


def test_lifelong_refuses_registry_options_because_each_tick_reads_only_the_plan_file(tmp_path, capfd):
    assert main(["lifelong", "--plan", str(write(tmp_path, PLAN)), "--tracking-uri", "sqlite:///x.db"]) == 2
    (line,) = capfd.readouterr().err.splitlines()
    assert "lifelong reads the registry from the plan file" in line and "drop --tracking-uri" in line


def test_commands_that_read_no_registry_refuse_registry_options_instead_of_ignoring_them(tmp_path, capsys):
    assert main(["estimate", "--plan", str(write(tmp_path, PLAN)), "--model-name", "other"]) == 2
    assert "estimate reads no registry" in capsys.readouterr().err
    assert main(["approve", "00000000-0000-0000-0000-000000000000", "--yes", "--tracking-uri", "sqlite:///x.db"]) == 2
    assert "approve answers the paused run" in capsys.readouterr().err


# -- the plan means what it says ----------------------------------------------------------
def lifelong_text(rounds: list[list[str]], parent_languages=("en",), corpora=("en", "el", "hu")) -> str:
    return yaml.safe_dump(
        {
            "parent": {"hf_path": "base", "languages": list(parent_languages)},
            "corpora": {code: {"path": "el.txt"} for code in corpora},
            "rounds": [{"new_languages": languages} for languages in rounds],
        }
    )


BAD_LIFELONG = {
    "language in two rounds": ([["el"], ["el", "hu"]], r"languages repeat: 'el' in round 2 \(already in round 1\)"),
    "language already in the parent": ([["el"], ["en"]], r"languages repeat: 'en' in round 2 \(already in the parent\)"),
    "bad code in a later round": ([["el"], ["greek"]], r"bad language code 'greek'"),
    "later round without a corpus": ([["el"], ["tr"]], r"languages \['tr'\] have no corpus"),
}


@pytest.mark.parametrize("case", BAD_LIFELONG)
def test_lifelong_plan_is_checked_whole_before_round_one(tmp_path, case):
    rounds, message = BAD_LIFELONG[case]
    with pytest.raises(LayerMoEError, match=message):
        load_plan(write(tmp_path, lifelong_text(rounds)), LifelongPlan)


def test_lifelong_plan_needs_a_corpus_for_the_parents_languages_too(tmp_path):
    with pytest.raises(LayerMoEError, match=r"languages \['en'\] have no corpus"):
        load_plan(write(tmp_path, lifelong_text([["el"]], corpora=("el",))), LifelongPlan)


def test_the_pending_round_is_the_first_whose_languages_the_parent_lacks(tmp_path):
    plan = LifelongPlan.model_validate(yaml.safe_load(lifelong_text([["el"], ["hu"]]).replace("hf_path: base", "alias: champion")))
    assert plan.pending_round(["en"]) == 0
    assert plan.pending_round(["en", "el"]) == 1
    assert plan.pending_round(["en", "el", "hu"]) is None


def test_a_half_done_round_is_an_error_that_names_it(tmp_path):
    plan = LifelongPlan.model_validate(yaml.safe_load(lifelong_text([["el", "hu"]]).replace("hf_path: base", "alias: champion")))
    with pytest.raises(LayerMoEError, match=r"round 1 \(el, hu\) is half done: the parent already knows \['hu'\] but not \['el'\]"):
        plan.check_parent_languages(["en", "hu"])


def save_tiny_parent(directory: Path, **expand_settings) -> Path:
    """A tiny Llama with the test tokenizer: dense, or (with expand_settings) a LayerMoE round-1 child."""
    from layermoe_core import expand

    model = tiny_model("llama", num_hidden_layers=2)
    if expand_settings:
        model = expand(model, [1, 1], ["en"], ["el"], **expand_settings)
    save_with_tiny_tokenizer(model, directory)
    return directory


def round_plan_file(root: Path, parent_dir: Path, **changes) -> Path:
    corpora = write_synthetic_corpus(root / "corpus", ["en", "el", "hu"])
    plan = {
        "parent": {"hf_path": str(parent_dir), "languages": ["en", "el"]},
        "new_languages": ["hu"],
        "corpora": {code: {"path": str(spec.path)} for code, spec in corpora.items()},
        "registry": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "registered_model_name": "tiny"},
        "tokens": {"seq_len": 16, "analysis_tokens": 500, "stage1_tokens": 2000, "stage2_tokens": 500, "eval_tokens": 500},
        "allocation": {"method": "uniform", "per_layer": 1},
        "workdir": str(root / "work"),
        **changes,
    }
    path = root / "plan.yaml"
    path.write_text(yaml.safe_dump(plan), encoding="utf-8")
    return path


@pytest.fixture
def own_prefect_home(tmp_path, monkeypatch) -> Path:
    """The CLI's child process inherits it: an early error must leave it without a Prefect database."""
    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    return home


@pytest.mark.parametrize(
    "changes, message",
    [
        ({}, r"top_k=2 differs from the parent's value 1; .*Set top_k to 1"),
        ({"top_k": 1, "stage1": {"balance_loss_coef": 0.05}}, r"stage1.balance_loss_coef=0.05 differs from the parent's value 0.01"),
    ],
)
def test_settings_a_layermoe_parent_fixes_are_checked_before_prefect_starts(tmp_path, own_prefect_home, capfd, changes, message):
    parent = save_tiny_parent(tmp_path / "parent", top_k=1)
    plan = round_plan_file(tmp_path, parent, **changes)
    capfd.readouterr()
    assert main(["add-languages", "--plan", str(plan)]) == 2
    (line,) = capfd.readouterr().err.splitlines()
    assert re.search(message, line) and not (own_prefect_home / "prefect.db").exists()


def cut_in_half(weights: Path) -> None:
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.mark.parametrize(
    "damage, changes, message",
    [
        (None, {"top_k": 3}, r"top_k=3 exceeds the experts in MoE layers \[0, 1\] \(they would have \[2, 2\]\); .*at most 1 new"),
        (None, {"top_k": 4, "allocation": {"delta": 2}}, r"top_k=4 exceeds the experts .*\(layermoe\) gives a layer .* at most 2 new"),
        (cut_in_half, {}, r"model\.safetensors is not a readable safetensors file \(its header describes \d+ bytes of tensors, "),
        (lambda weights: weights.write_bytes(random.Random(0).randbytes(4096)), {}, r"model\.safetensors is not a readable safetensors"),
    ],
    ids=["top_k-over-uniform", "top_k-over-budget", "truncated-weights", "random-weights"],
)
def test_a_plan_that_cannot_expand_its_parent_is_one_line_before_anything_runs(tmp_path, own_prefect_home, capfd, damage, changes, message):
    """`layermoe add-languages` in its child process: top_k beyond what the allocation can give a dense parent's layers,
    or parent weights that do not parse, are refused with one line before Prefect starts and before the base is registered."""
    parent = save_tiny_parent(tmp_path / "parent")
    if damage is not None:
        damage(parent / "model.safetensors")
    plan = round_plan_file(tmp_path, parent, **changes)
    capfd.readouterr()
    assert main(["add-languages", "--plan", str(plan)]) == 2
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith("layermoe: error: ") and re.search(message, line), line
    assert not (own_prefect_home / "prefect.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_deployed_run_checks_the_parent_folder_before_it_registers_the_base(tmp_path, own_prefect_home):
    """The flow itself, as a deployment runs it without the CLI's checks: the folder is refused, nothing is registered."""
    from flows.add_languages import add_languages

    parent = save_tiny_parent(tmp_path / "parent")
    cut_in_half(parent / "model.safetensors")
    plan = load_plan(round_plan_file(tmp_path, parent), ExpansionPlan)
    with pytest.raises(LayerMoEError, match=r"model\.safetensors is not a readable safetensors file"):
        add_languages(plan)
    assert not (tmp_path / "mlflow.db").exists()


def test_expand_applies_the_same_rule_to_a_layermoe_parent(tmp_path):
    from layermoe_core import expand
    from layermoe_core.model.checkpoints import load_model

    parent = load_model(save_tiny_parent(tmp_path / "parent", top_k=1), device="cpu")
    with pytest.raises(LayerMoEError, match=r"top_k=2 differs from the parent's value 1; .*Set top_k to 1"):
        expand(parent, [1, 1], ["en", "el"], ["hu"], top_k=2)


def test_an_empty_corpus_is_reported_before_prefect_starts(tmp_path, own_prefect_home, capfd):
    plan = round_plan_file(tmp_path, save_tiny_parent(tmp_path / "parent"))
    (tmp_path / "corpus" / "hu.jsonl").write_text("")
    assert main(["add-languages", "--plan", str(plan)]) == 2
    assert "hu.jsonl' is empty" in capfd.readouterr().err and not (own_prefect_home / "prefect.db").exists()


def test_a_manual_round_without_a_prefect_server_is_refused_before_it_starts(tmp_path, own_prefect_home, capfd):
    """It would pause for a week on a temporary server that no reviewer can reach."""
    plan = round_plan_file(tmp_path, save_tiny_parent(tmp_path / "parent"), promotion="manual")
    capfd.readouterr()
    assert main(["add-languages", "--plan", str(plan)]) == 2
    (line,) = capfd.readouterr().err.splitlines()
    assert "promotion: manual pauses each round until a reviewer answers" in line and "PREFECT_API_URL is not set" in line
    assert not (own_prefect_home / "prefect.db").exists()


def test_an_empty_plan_file_is_reported(tmp_path, capfd):
    (tmp_path / "plan.yaml").write_text("# nothing yet\n")
    assert main(["lifelong", "--plan", str(tmp_path / "plan.yaml")]) == 2
    assert "is empty; write a plan" in capfd.readouterr().err


def test_a_registry_parent_that_does_not_resolve_is_reported_before_prefect_starts(tmp_path, own_prefect_home, capfd):
    plan = round_plan_file(tmp_path, tmp_path, parent={"alias": "champion"})
    assert main(["add-languages", "--plan", str(plan)]) == 2
    assert f"there is no MLflow store at {tmp_path}/mlflow.db" in capfd.readouterr().err
    assert not (own_prefect_home / "prefect.db").exists()


def test_a_run_that_fails_prints_one_line_and_its_traceback_goes_to_the_log_it_names_or_with_verbose_to_the_console(tmp_path):
    """A registry parent whose stored weights were altered fails in the flow's first step: Prefect logs the
    task's and the flow's tracebacks, which stay off the console unless --verbose is given."""
    from registry.register import register_base
    from registry.settings import RegistrySettings
    from registry.versions import promote

    parent = save_tiny_parent(tmp_path / "parent")
    registry = RegistrySettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", registered_model_name="tiny")
    promote(registry, register_base(registry, parent, ["en", "el"]).version)
    (stored,) = (tmp_path / "artifacts").rglob("model.safetensors")
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
    plan = round_plan_file(tmp_path, parent, parent={"alias": "champion"})
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PYTHONPATH": str(REPO_ROOT),
        "LAYERMOE_LOG_DIR": str(tmp_path / "logs"),
    }
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "flows.cli", "add-languages", "--plan", str(plan)]

    quiet = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=PROCESS_DEADLINE_S)
    errors = [line for line in quiet.stderr.splitlines() if line.startswith("layermoe: error: ")]
    assert quiet.returncode == 2 and len(errors) == 1 and "Traceback" not in quiet.stderr, quiet.stderr[-3000:]
    found = re.fullmatch(r"layermoe: error: .*model\.safetensors is corrupt .*\(traceback in (\S+); or rerun with --verbose\)", errors[0])
    assert found, errors[0]
    log = Path(found.group(1))
    assert log.parent == tmp_path / "logs" and "Traceback" in log.read_text() and "LayerMoEError" in log.read_text()

    verbose = subprocess.run([*argv, "--verbose"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=PROCESS_DEADLINE_S)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr and "LayerMoEError" in verbose.stderr
    assert re.search(r"^layermoe: error: .*model\.safetensors is corrupt .*\(traceback: \S+\)$", verbose.stderr, re.MULTILINE)


# -- an instant CLI ---------------------------------------------------------------------
HEAVY_MODULES = ("torch", "transformers", "mlflow", "prefect", "pandas", "datasets")


def modules_loaded_by(code: str) -> list[str]:
    probe = f"import sys\n{code}\nprint(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return eval(out.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["registry", "--help"], ["add-languages", "--help"], ["registry", "list", "--help"]])
def test_cli_help_imports_no_heavy_library(argv):
    assert modules_loaded_by(f"from flows.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass") == []


def test_layermoe_errors_imports_no_heavy_library():
    assert modules_loaded_by("from layermoe_core.errors import LayerMoEError\nimport layermoe_core") == []


def test_a_model_name_from_layermoe_core_registers_the_auto_classes():
    assert modules_loaded_by(
        "import layermoe_core\nfrom transformers import AutoConfig\nconfig_class = layermoe_core.LayerMoEConfig\n"
        "assert type(AutoConfig.for_model('layermoe')) is config_class"
    ) == ["torch", "transformers"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--tracking-uri", "URI", "--model-name", "NAME", "registry", "list"],
        ["registry", "--tracking-uri", "URI", "list", "--model-name", "NAME"],
        ["registry", "list", "--tracking-uri", "URI", "--model-name", "NAME"],
    ],
)
def test_global_options_go_before_or_after_the_subcommand(argv):
    from flows.cli import build_parser

    args = build_parser().parse_args(argv)
    assert (args.tracking_uri, args.model_name, args.registry_command) == ("URI", "NAME", "list")


def test_registry_list_uses_options_given_after_the_subcommand(tmp_path, capsys):
    assert main(["registry", "list", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--model-name", "nothere"]) == 2
    assert f"there is no MLflow store at {tmp_path}/mlflow.db" in capsys.readouterr().err  # the URI given after `list`


# -- a form a person can fill in --------------------------------------------------------
SECTIONS = {
    "corpora",
    "allocation",
    "parent",
    "registry",
    "tokens",
    "stage1",
    "stage2",
    "evaluation",
    "launcher",
    "placement",
    "vocabulary",
}


def flow_form(flow) -> dict:
    """The parameter schema Prefect stores with a deployment and renders as the custom-run form."""
    from prefect.utilities.callables import parameter_schema

    return parameter_schema(flow).model_dump(mode="json")


def settings_models(plan: type[BaseModel]) -> set[type[BaseModel]]:
    """The plan's own models and every settings model they hold, nested ones included."""
    from flows.plan import settings_section

    found, todo = set(), [plan]
    while todo:
        model = todo.pop()
        found.add(model)
        todo += [nested for field in model.model_fields.values() if (nested := settings_section(field.annotation)) not in found | {None}]
    return found


def test_the_run_form_lists_what_a_user_sets_first_and_draws_each_settings_section_as_json():
    """Prefect draws a nested model field by field and cannot fold it: each section is a JSON editor (an object without
    properties), whose description names every key, and no field is an optional Prefect would draw as a type picker
    reading 'Property is type "None"'."""
    from flows.add_languages import add_languages
    from flows.compare import compare
    from flows.plan import section_keys, settings_section

    for flow, model in ((add_languages, ExpansionPlan), (compare, ComparePlan)):
        form = flow_form(flow)["definitions"][model.__name__]
        properties = form["properties"]
        assert list(properties)[:3] == ["new_languages", "corpora", "allocation"] and "promotion" in list(properties)[3:5]
        assert {name for name, prop in properties.items() if prop.get("type") == "object"} == SECTIONS
        for name in SECTIONS:
            assert "properties" not in properties[name] and "$ref" not in json.dumps(properties[name]), f"{name} is drawn field by field"
            section = settings_section(model.model_fields[name].annotation)
            assert all(key in properties[name]["description"] for key in section.model_fields), f"{name}: a key is not named"
        assert section_keys(EvalSettings).endswith(
            "gates (max_old_loss_increase, old_loss_bound, require_new_improvement, max_old_chrf_drop)"
        )
        assert '"null"' not in json.dumps(form), "an optional field would show Prefect's 'Property is type \"None\"'"


def test_every_plan_and_settings_field_has_a_title_and_a_description_and_says_what_empty_means():
    """The models themselves carry the text (docs/plans.md): a human title per section, a title and a description per field."""
    models = settings_models(ExpansionPlan) | settings_models(LifelongPlan) | settings_models(ComparePlan)
    assert {m.__name__ for m in models} >= {
        "AllocationSettings", "Stage1Settings", "Stage2Settings", "EvalSettings", "GateSettings", "CorpusSpec",
        "RegistrySettings", "LauncherSettings", "TranslationSettings", "PlacementSettings", "ParentRef", "TokenSettings",
        "RoundSpec",
    }  # fmt: skip
    for model in models:
        schema = model.model_json_schema()
        title, name = schema.get("title", ""), model.__name__
        assert title and title != name and not re.search(r"[a-z][A-Z]", title), f"{name} shows as {title!r} in the form"
        assert len(schema.get("description") or "") > 20, f"section {title!r} ({name}) lacks a description"
        for field_name, field in model.model_fields.items():
            assert field.title and field.description, f"{name}.{field_name} lacks a title or a description"
            assert not re.search(r"<[A-Za-z]", field.description), f"{name}.{field_name}: the form's markdown hides <...> as a tag"
            if field.default is None:
                assert re.search(r"\b(empty|none)\b", field.description, re.IGNORECASE), f"{name}.{field_name}: what does empty mean?"
    assert Stage1Settings.model_json_schema()["title"] == "Stage 1: new experts"
    assert "empty: train num_epochs" in Stage1Settings.model_fields["max_steps"].description


def test_the_served_form_holds_what_the_plan_sets_with_paths_as_the_plan_file_means_them(tmp_path, monkeypatch):
    """`serve` started in another folder: the form's corpus and parent paths are absolute, the plan's own files."""
    from flows.serve import first_round, form_defaults

    plans = tmp_path / "plans"
    plans.mkdir()
    plan_file = plans / "plan.yaml"
    plan_file.write_text(
        "new_languages: [el]\ncorpora: {el: {path: ../corpus/el.txt}, en: {path: ../corpus/en.txt}}\n"
        "parent: {hf_path: ../base, languages: [en]}\nstage1: {learning_rate: 0.001, num_epochs: 1.0}\nallocation: {delta: 4}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plan = first_round(load_lifelong_plan(Path("..") / "plans" / "plan.yaml"))
    defaults = form_defaults(plan)
    corpora = {lang: str(tmp_path / "corpus" / f"{lang}.txt") for lang in ("el", "en")}
    assert defaults["corpora"] == {lang: {"path": path} for lang, path in corpora.items()}
    assert defaults["parent"] == {"hf_path": str(tmp_path / "base"), "languages": ["en"]}
    assert defaults["stage1"] == {"learning_rate": 0.001} and defaults["allocation"] == {"method": "layermoe", "delta": 4}
    assert "launcher" not in defaults and defaults["placement"] == {}
    assert ExpansionPlan.model_validate(defaults) == plan.model_copy(
        update={
            "corpora": {lang: CorpusSpec(path=Path(path)) for lang, path in corpora.items()},
            "parent": ParentRef(hf_path=tmp_path / "base", languages=["en"]),
        }
    )


# -- Ctrl-C ------------------------------------------------------------------------------
def test_ctrl_c_during_training_ends_the_run_crashed_with_one_line(tmp_path):
    """SIGINT to the CLI's process group, as a terminal's Ctrl-C sends it, while Stage 1 trains."""
    plan = round_plan_file(
        tmp_path,
        save_tiny_parent(tmp_path / "base"),
        stage1={"max_steps": 100_000, "save_steps": 1, "per_device_batch_size": 2, "logging_steps": 1},
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("PREFECT_API_URL", None)
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("w") as stderr:
        cli = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "add-languages", "--plan", str(plan)],
            cwd=REPO_ROOT,
            env=env,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        deadline = time.monotonic() + PROCESS_DEADLINE_S
        while not glob.glob(str(tmp_path / "work" / "*" / "stage1" / "checkpoint-*")):
            assert cli.poll() is None and time.monotonic() < deadline, "the round ended before Stage 1 saved a checkpoint"
            time.sleep(0.2)
        before_ctrl_c = stderr_path.stat().st_size
        os.killpg(cli.pid, signal.SIGINT)
        cli.wait(timeout=PROCESS_DEADLINE_S)
    after_ctrl_c = stderr_path.read_bytes()[before_ctrl_c:].decode("utf-8", errors="replace")

    assert cli.returncode == 130 and "Traceback" not in after_ctrl_c and "Error" not in after_ctrl_c, after_ctrl_c
    last = after_ctrl_c.strip().splitlines()[-1]
    assert re.fullmatch(
        r"layermoe: interrupted in task 'stages 1 and 2[^']*' of flow run '[^']+'; the run is marked Crashed\. "
        r"Rerun the same command to resume: .*",
        last,
    ), last
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        assert db.execute("select state_type from flow_run").fetchall() == [("CRASHED",)]
        assert ("CRASHED",) in db.execute("select state_type from task_run").fetchall()


# -- a model folder with its own code -----------------------------------------------------
CUSTOM_CODE = """
from pathlib import Path
Path(__file__).with_name("custom-code-ran").touch()
from transformers import Qwen2Config
class EvilConfig(Qwen2Config):
    model_type = "evil"
"""


def add_custom_code(model_dir: Path) -> Path:
    """What a downloaded checkpoint can hold: `auto_map` naming a module of the folder, which runs when imported."""
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "configuration_evil.py").write_text(CUSTOM_CODE)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["configuration_evil.EvilTokenizer", None]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return model_dir


def run_cli_answering_yes(argv: list[str], env: dict[str, str], terminal: bool, stderr_path: Path) -> tuple[int, str]:
    """The CLI with a terminal (a pty, where transformers would ask "run the custom code? [y/N]", answered y) or without."""
    master, slave = pty.openpty() if terminal else (None, None)
    with stderr_path.open("w") as stderr:
        cli = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *argv],
            cwd=REPO_ROOT,
            env=env,
            stdin=slave if terminal else subprocess.DEVNULL,
            stdout=slave if terminal else subprocess.PIPE,
            stderr=stderr,
        )
        shown = ""
        if terminal:
            os.close(slave)
            os.write(master, b"y\n" * 3)
        try:
            if terminal:
                while cli.poll() is None or select.select([master], [], [], 0)[0]:
                    if select.select([master], [], [], 0.2)[0]:
                        try:
                            shown += os.read(master, 65536).decode(errors="replace")
                        except OSError:  # the terminal closed with the process
                            break
            else:
                shown = cli.communicate(timeout=PROCESS_DEADLINE_S)[0].decode(errors="replace")
            cli.wait(timeout=PROCESS_DEADLINE_S)
        finally:
            if master is not None:
                os.close(master)
    return cli.returncode, shown


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "no-terminal"])
def test_a_parent_with_its_own_code_is_refused_in_one_line_without_a_prompt(tmp_path, terminal):
    parent = add_custom_code(save_tiny_parent(tmp_path / "parent"))
    plan = round_plan_file(tmp_path, parent)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("PREFECT_API_URL", None)
    code, shown = run_cli_answering_yes(["add-languages", "--plan", str(plan)], env, terminal, tmp_path / "stderr.txt")
    errors = (tmp_path / "stderr.txt").read_text().strip().splitlines()
    assert code == 2 and len(errors) == 1, errors
    assert re.fullmatch(r"layermoe: error: .*config\.json names the model's own code \(auto_map: AutoConfig\); .*", errors[0]), errors
    assert "custom code" not in shown and not (parent / "custom-code-ran").exists()
    assert not (tmp_path / "prefect" / "prefect.db").exists()  # refused before Prefect started


def test_every_loader_refuses_a_folder_with_its_own_code(tmp_path):
    from layermoe_core.model.checkpoints import load_model, load_tokenizer, num_decoder_layers
    from layermoe_core.training.estimate import parent_config
    from tasks.parent import check_expandable

    parent = add_custom_code(save_tiny_parent(tmp_path / "parent"))
    tokenizer_only = tmp_path / "tokenizer"
    tokenizer_only.mkdir()
    shutil.copy(parent / "tokenizer_config.json", tokenizer_only)
    shutil.copy(parent / "tokenizer.json", tokenizer_only)
    loaders = [load_model, num_decoder_layers, parent_config, check_expandable, lambda path: parent_config(path / "config.json")]
    for load in loaders:
        with pytest.raises(LayerMoEError, match=r"config\.json names the model's own code \(auto_map: AutoConfig\)"):
            load(parent)
    with pytest.raises(LayerMoEError, match=r"tokenizer_config\.json names the model's own code \(auto_map: AutoTokenizer\)"):
        load_tokenizer(tokenizer_only)
    assert not (parent / "custom-code-ran").exists()


# -- a corpus that is not text --------------------------------------------------------------
NOT_TEXT = {
    "random bytes as .txt": ("hu.txt", lambda: random.Random(0).randbytes(20_000), r"is not UTF-8 text \(byte \d+: "),
    "random bytes as .jsonl": ("hu.jsonl", lambda: random.Random(1).randbytes(20_000), r"is not UTF-8 text \(byte \d+: "),
    "UTF-16 text": ("hu.txt", lambda: "Jó napot kívánok\n".encode("utf-16"), r"is not UTF-8 text \(byte 0: "),
    "NUL bytes": ("hu.txt", lambda: b"abc\x00\x01\x02" * 100, r"holds NUL bytes at character 3: it is binary"),
    "random bytes as .parquet": ("hu.parquet", lambda: random.Random(2).randbytes(20_000), r"is not a parquet file"),
}


@pytest.mark.parametrize("case", NOT_TEXT)
def test_a_corpus_that_is_not_text_is_named_before_prefect_starts(tmp_path, own_prefect_home, capfd, case):
    name, content, message = NOT_TEXT[case]
    (tmp_path / name).write_bytes(content())
    plan = round_plan_file(tmp_path, save_tiny_parent(tmp_path / "parent"))
    raw = yaml.safe_load(plan.read_text())
    raw["corpora"]["hu"] = {"path": str(tmp_path / name)}
    plan.write_text(yaml.safe_dump(raw))
    capfd.readouterr()
    assert main(["add-languages", "--plan", str(plan)]) == 2
    (line,) = capfd.readouterr().err.splitlines()
    assert line.startswith(f"layermoe: error: corpus file '{tmp_path / name}' ") and re.search(message, line), line
    assert not (own_prefect_home / "prefect.db").exists()


def test_a_missing_corpus_is_named_by_the_path_it_resolved_to_beside_the_plan(tmp_path, capfd, monkeypatch):
    (tmp_path / "plans").mkdir()
    (tmp_path / "plans" / "plan.yaml").write_text(PLAN.replace("el.txt", "corpus/el.txt"), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert main(["add-languages", "--plan", "plans/plan.yaml"]) == 2
    assert f"corpus path '{tmp_path / 'plans' / 'corpus' / 'el.txt'}' does not exist" in capfd.readouterr().err


# -- the terminal closed, or the command killed --------------------------------------------
def children_of(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def has_exited(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet (an orphan's new parent may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGHUP], ids=["kill-9", "terminal-closed"])
def test_a_killed_command_leaves_no_run_behind_and_the_rerun_resumes(tmp_path, signum):
    """kill -9 -PGID, or SIGHUP to the group as a closing terminal sends it, while Stage 1 trains: the flow's own process
    stops with the command, registers nothing, and the same command run again resumes from Stage 1's checkpoint."""
    plan = round_plan_file(
        tmp_path,
        save_tiny_parent(tmp_path / "base"),
        stage1={"max_steps": 40, "save_steps": 4, "per_device_batch_size": 2, "logging_steps": 1},
        evaluation={"continuation_prompts": 0},  # the tiny parent's 64 positions hold no continuation
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO_ROOT)}
    env.pop("PREFECT_API_URL", None)
    argv = [sys.executable, "-m", "flows.cli", "add-languages", "--plan", str(plan)]
    with (tmp_path / "killed.txt").open("w") as output:
        cli = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, start_new_session=True, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + PROCESS_DEADLINE_S
        # A complete checkpoint (its trainer state is written last), so the rerun has one to resume from.
        while not glob.glob(str(tmp_path / "work" / "*" / "stage1" / "checkpoint-*" / "trainer_state.json")):
            assert cli.poll() is None and time.monotonic() < deadline, "the round ended before Stage 1 saved a checkpoint"
            time.sleep(0.1)
        (flow_process,) = children_of(cli.pid)
        os.killpg(cli.pid, signum)
        cli.wait(timeout=PROCESS_DEADLINE_S)
        while not has_exited(flow_process):
            assert time.monotonic() < deadline, "the flow's process outlived the command"
            time.sleep(0.1)
    assert not glob.glob(str(tmp_path / "work" / "*" / "stage1" / "final")), "Stage 1 finished: the round was not stopped"
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("select version from model_versions").fetchall() == [(1,)]  # the base only
    with sqlite3.connect(tmp_path / "prefect" / "prefect.db") as db:
        assert db.execute("select state_type from flow_run").fetchall() == [("CRASHED",)]

    rerun = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=PROCESS_DEADLINE_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("select version from model_versions").fetchall() == [(1,), (2,)]
    stored = [
        decode(json.loads(path.read_text()))
        for path in (tmp_path / "prefect" / "storage").glob("*")
        if path.is_file() and '"model": "TrainResult"' in path.read_text()
    ]  # the training step's result: Stage 1's and Stage 2's TrainResult
    trained = [result for value in stored for result in (value if isinstance(value, tuple) else (value,))]
    resumed = [str(result.resumed_from) for result in trained if isinstance(result, TrainResult) and "/stage1/" in str(result.model_dir)]
    assert len(resumed) == 1 and re.search(r"/stage1/checkpoint-\d+$", resumed[0]), resumed


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "/tmp/mlruns"])
def test_a_tracking_uri_the_registry_cannot_use_is_one_line(uri, capsys):
    assert main(["registry", "list", "--tracking-uri", uri]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("layermoe: error: bad registry option: tracking_uri")
