"""Plans are validated at the edge, and the CLI turns bad input into one clear line and exit code 2."""

import glob
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from flows.cli import main
from flows.plan import ExpansionPlan, LifelongPlan, load_plan
from layermoe_core.errors import LayerMoEError

from .synthetic_corpus import write_synthetic_corpus
from .tiny_tokenizer import tiny_tokenizer

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


def test_cli_reports_an_invalid_plan(tmp_path, capfd):
    assert main(["lifelong", "--plan", str(write(tmp_path, PLAN))]) == 2  # a round plan is not a lifelong plan
    assert "rounds: Field required" in capfd.readouterr().err


def test_cli_schedule_needs_cron_or_interval(tmp_path, capsys):
    text = PLAN.replace("new_languages: [el]", "rounds: [{new_languages: [el]}]")
    assert main(["schedule", "--plan", str(write(tmp_path, text))]) == 2
    assert "--cron" in capsys.readouterr().err


# -- the plan means what it says ----------------------------------------------------------
def test_old_classifier_layers_key_names_its_new_name(tmp_path):
    with pytest.raises(LayerMoEError, match=r"`classifier_layers` is now `classifier_layer_count` \(it is a count K"):
        load_plan(write(tmp_path, PLAN + "classifier_layers: 1\n"), ExpansionPlan)
    assert load_plan(write(tmp_path, PLAN + "classifier_layer_count: 3\n"), ExpansionPlan).classifier_layer_count == 3


def test_parent_trust_remote_code_is_refused_with_the_reason(tmp_path):
    with pytest.raises(LayerMoEError, match=r"parent: .*`parent.trust_remote_code` is gone: .*never runs a model's own code"):
        load_plan(write(tmp_path, PLAN + "parent: {alias: champion, trust_remote_code: true}\n"), ExpansionPlan)


def lifelong_text(rounds: list[list[str]], parent_languages=("en",), corpora=("en", "el", "hu")) -> str:
    return yaml.safe_dump({
        "parent": {"hf_path": "base", "languages": list(parent_languages)},
        "corpora": {code: {"path": "el.txt"} for code in corpora},
        "rounds": [{"new_languages": languages} for languages in rounds],
    })


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


def test_lifelong_plan_against_a_registry_parent_refuses_languages_it_knows(tmp_path):
    plan = LifelongPlan.model_validate(yaml.safe_load(lifelong_text([["el"], ["hu"]]).replace("hf_path: base", "alias: champion")))
    with pytest.raises(LayerMoEError, match=r"rounds add languages \['hu'\] that the parent already knows"):
        plan.check_parent_languages(["en", "hu"])
