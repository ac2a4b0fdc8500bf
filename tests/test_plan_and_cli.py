"""Plans are validated at the edge, and the CLI turns bad input into one clear line and exit code 2."""

from __future__ import annotations

import pytest

from flows.cli import main
from flows.plan import ExpansionPlan, LifelongPlan, load_plan
from layermoe_core.errors import LayerMoEError

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


def test_cli_reports_a_missing_plan_file_in_one_line(tmp_path, capsys):
    assert main(["add-languages", "--plan", str(tmp_path / "nope.yaml")]) == 2
    assert "plan file" in capsys.readouterr().err


def test_cli_reports_an_invalid_plan(tmp_path, capsys):
    assert main(["lifelong", "--plan", str(write(tmp_path, PLAN))]) == 2  # a round plan is not a lifelong plan
    assert "rounds: Field required" in capsys.readouterr().err


def test_cli_schedule_needs_cron_or_interval(tmp_path, capsys):
    text = PLAN.replace("new_languages: [el]", "rounds: [{new_languages: [el]}]")
    assert main(["schedule", "--plan", str(write(tmp_path, text))]) == 2
    assert "--cron" in capsys.readouterr().err
