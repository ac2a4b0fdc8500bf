"""Plain (classifier-routed) against pinned drift per old language and round, read from a registry's versions.

Run from the repository root:

    python -m bench.pinned_drift report --tracking-uri sqlite:///$PWD/.demo/mlflow.db --model-name layermoe-demo \
        --plot docs/img/pinned-drift-demo.png
    python -m bench.pinned_drift one-language --workdir /tmp/pinned-one-language

`report` reads every registered round's `evaluation` table (`loss` and `pinned_loss`, parent and child) and its
`classifier_accuracy` table, prints both as markdown, draws them in one PNG, and with `--log` logs the tables and the
plot as a report run beside the versions. `one-language` builds the hardest case for the classifiers: a demo-size
base trained on English alone (no exposure to other languages), taken through three rounds (hu+el, then tr,
then es) with the demo's round settings, the gate's old-language bound widened so every round runs and is
measured; it then prints the report of that store.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

BENCH_GATE_BOUND = 10.0  # nats: wide enough that no round is rejected, so all three are measured
ONE_LANGUAGE_ROUNDS = [["hu", "el"], ["tr"], ["es"]]


def drift_tables(tracking_uri: str, model_name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(drift, classifiers): one row per round and old language; one row per round and classifier layer."""
    from registry import RegistrySettings, list_versions, version_table

    settings = RegistrySettings(tracking_uri=tracking_uri, registered_model_name=model_name)
    versions = list_versions(settings)
    drift, classifiers = [], []
    for row in versions[versions["round"].fillna(0) > 0].itertuples():
        label = {
            "version": row.version,
            "round": int(row.round),
            "adds": row.new_languages.replace(",", "+"),
            "new_gain": row.new_gain,  # mean new-language loss decrease (nats)
            "verdict": row.verdict,
        }
        evaluation = version_table(settings, row.version, "evaluation")
        old = evaluation[evaluation["group"] == "old"].pivot(index="language", columns="metric", values="delta")
        for language in old.index:
            pinned = old.at[language, "pinned_loss"] if "pinned_loss" in old else float("nan")
            drift.append({**label, "old_language": language, "plain_drift": old.at[language, "loss"], "pinned_drift": pinned})
        accuracy = version_table(settings, row.version, "classifier_accuracy")
        for layer, entries in accuracy.groupby("layer") if accuracy is not None else []:
            lowest = entries.loc[entries["accuracy"].idxmin()]
            classifiers.append(
                {
                    **label,
                    "layer": int(layer),
                    "lowest_accuracy": float(lowest["accuracy"]),
                    "lowest_language": lowest["language"],
                    "target": float(lowest["target"]),
                    "stage2_step": int(lowest["step"]),
                }
            )
    return pd.DataFrame(drift), pd.DataFrame(classifiers)


def markdown(drift: pd.DataFrame, classifiers: pd.DataFrame) -> str:
    """The docs' table: per round and old language, plain and pinned drift, with the round's new-language gain and the
    lowest held-out accuracy of each of its classifiers."""
    lines = [
        "| round (adds) | new-language gain | old language | plain drift | pinned drift "
        "| lowest classifier accuracy in layer (language) / target |",
        "|---|---:|---|---:|---:|---|",
    ]
    for (version, round_number), rows in drift.groupby(["version", "round"], sort=True):
        layers = classifiers[classifiers["version"] == version] if len(classifiers) else classifiers
        notes = [f"{r.lowest_accuracy:.2f} in {r.layer} ({r.lowest_language})" for r in layers.itertuples()]
        target = f" / {layers['target'].iloc[0]:.2f}" if len(layers) else ""
        for index, r in enumerate(rows.itertuples()):
            first = index == 0
            note = ", ".join(notes) + target if first else ""
            gain = f"{r.new_gain:+.4f}" if first else ""
            lines.append(
                f"| {round_number} ({r.adds}) | {gain} | {r.old_language} | {r.plain_drift:+.4f} | {r.pinned_drift:+.4f} | {note} |"
            )
    return "\n".join(lines)


def plot(drift: pd.DataFrame, classifiers: pd.DataFrame, path: Path, title: str) -> Path:
    """Left: plain and pinned drift bars per (round, old language). Right: each classifier's lowest accuracy and the target."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11.0, 3.8), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, width_ratios=[2.2, 1])
    positions = range(len(drift))
    width = 0.4
    plain = left.bar([p - width / 2 for p in positions], drift["plain_drift"], width, color="tab:red", label="plain (classifier-routed)")
    pinned = left.bar([p + width / 2 for p in positions], drift["pinned_drift"], width, color="tab:green", label="pinned to the language")
    left.bar_label(plain, fmt="%+.3f", fontsize=7)
    left.bar_label(pinned, fmt="%+.3f", fontsize=7)
    left.axhline(0, color="black", linewidth=0.6)
    left.set_xticks(list(positions), [f"r{r.round}\n{r.old_language}" for r in drift.itertuples()], fontsize=8)
    left.set(xlabel="round, old language", ylabel="loss rise, child - parent (nats)", title="Old-language drift per round")
    left.margins(y=0.15)
    left.legend(fontsize=8)
    if len(classifiers):
        labels = [f"r{r.round}\nL{r.layer}" for r in classifiers.itertuples()]
        bars = right.bar(range(len(classifiers)), classifiers["lowest_accuracy"], color="tab:blue")
        right.bar_label(bars, labels=list(classifiers["lowest_language"]), fontsize=7)
        right.axhline(classifiers["target"].iloc[0], color="black", linestyle="--", linewidth=1, label="target")
        right.set_xticks(range(len(classifiers)), labels, fontsize=8)
        right.set_ylim(0, 1.05)
        right.legend(fontsize=8, loc="lower right")
    right.set(xlabel="round, classifier layer", ylabel="held-out accuracy", title="Weakest language per classifier")
    figure.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def report(tracking_uri: str, model_name: str, plot_path: Path | None, title: str, log: bool) -> None:
    drift, classifiers = drift_tables(tracking_uri, model_name)
    pd.set_option("display.width", 200)
    print(drift.to_string(index=False, float_format=lambda v: f"{v:+.4f}"))
    if len(classifiers):
        print()
        print(classifiers.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print()
    print(markdown(drift, classifiers))
    if plot_path is not None:
        plot(drift, classifiers, plot_path, title)
        print(f"\nplot: {plot_path}")
        if log:
            from registry import RegistrySettings, log_report_run

            settings = RegistrySettings(tracking_uri=tracking_uri, registered_model_name=model_name)
            tables = {"pinned_drift": drift, **({"classifier_lowest_accuracy": classifiers} if len(classifiers) else {})}
            run_id = log_report_run(settings, "pinned-drift", tables, {"pinned_drift": plot_path})
            print(f"logged as report run {run_id}")


def one_language(workdir: Path, quick: bool) -> tuple[str, str]:
    """Train the English-only base and its three rounds into `workdir`; returns the store's URI and model name."""
    from layermoe_core.environment import use_local_stack

    workdir = workdir.resolve()
    use_local_stack(workdir / "prefect", ephemeral=True)
    import yaml

    from demo.offline_corpus import DEFAULT_PACKAGES
    from flows.bootstrap_base import BootstrapPlan, bootstrap_base
    from flows.demo import BASE_LANGUAGES, ROUNDS, demo_plans
    from flows.lifelong_expansion import run_pending_rounds
    from flows.plan import LifelongPlan
    from tasks.bootstrap import build_corpus

    languages = BASE_LANGUAGES + [language for group in ROUNDS for language in group]  # the demo's tokenizer covers all nine
    corpora = build_corpus(workdir / "corpus", languages, list(DEFAULT_PACKAGES))
    base_plan, round_plan = demo_plans(workdir, corpora, quick=quick)
    registry = {**base_plan.registry.model_dump(mode="json"), "registered_model_name": "layermoe-one-language"}
    base = BootstrapPlan.model_validate(
        {**base_plan.model_dump(mode="json"), "registry": registry, "languages": ["en"], "exposure_tokens": 0}
    )
    bootstrap_base(base)
    plan = round_plan.model_dump(mode="json")
    plan["evaluation"]["gates"] = {
        **plan["evaluation"]["gates"],
        "max_old_loss_increase": BENCH_GATE_BOUND,
        "require_new_improvement": False,
    }
    lifelong = LifelongPlan.model_validate(
        {**plan, "name": "one-language", "registry": registry, "rounds": [{"new_languages": group} for group in ONE_LANGUAGE_ROUNDS]}
    )
    plan_file = workdir / "one-language-plan.yaml"
    plan_file.write_text(yaml.safe_dump(lifelong.model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    for tick in run_pending_rounds(plan_file):
        print(tick.message)
    return lifelong.registry.tracking_uri, lifelong.registry.registered_model_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    shown = argparse.ArgumentParser(add_help=False)
    shown.add_argument("--plot", type=Path, help="write the plot to this PNG")
    shown.add_argument("--title", default="Plain against pinned drift")
    shown.add_argument("--log", action="store_true", help="log the tables and the plot as a report run in the store")
    read = sub.add_parser("report", parents=[shown], help="the tables and plot of an existing store")
    read.add_argument("--tracking-uri", required=True)
    read.add_argument("--model-name", required=True)
    build = sub.add_parser("one-language", parents=[shown], help="train the English-only base and three rounds, then report")
    build.add_argument("--workdir", type=Path, required=True)
    build.add_argument("--quick", action="store_true", help="the quick demo's sizes (a smoke test)")
    args = parser.parse_args()
    if args.command == "one-language":
        tracking_uri, model_name = one_language(args.workdir, args.quick)
    else:
        tracking_uri, model_name = args.tracking_uri, args.model_name
    report(tracking_uri, model_name, args.plot, args.title, args.log)


if __name__ == "__main__":
    main()
