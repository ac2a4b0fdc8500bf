"""`layermoe`: the command line over the flows and the registry."""

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from layermoe_core.errors import LayerMoEError


def _registry_settings(args):
    from registry.settings import RegistrySettings

    overrides = {k: v for k, v in {"tracking_uri": args.tracking_uri, "registered_model_name": args.model_name}.items() if v}
    return RegistrySettings(**overrides)


def cmd_add_languages(args) -> None:
    from .add_languages import add_languages
    from .plan import ExpansionPlan, load_plan

    summary = add_languages(load_plan(args.plan, ExpansionPlan))
    print(summary.table().to_string(index=False))


def cmd_lifelong(args) -> None:
    from .lifelong_expansion import lifelong_expansion
    from .plan import LifelongPlan, load_plan

    for summary in lifelong_expansion(load_plan(args.plan, LifelongPlan)):
        print(f"\nversion {summary.version} (parent {summary.parent_version}, promoted={summary.promoted})")
        print(summary.table().to_string(index=False))


def cmd_compare(args) -> None:
    from .compare import ComparePlan, compare, with_variants
    from .plan import load_plan

    plan = load_plan(args.plan, ComparePlan)
    if args.variants:
        plan = with_variants(plan, args.variants.split(","))
    print(compare(plan).to_string(index=False))


def cmd_serve(args) -> None:
    from .serve import serve_plan

    if args.command == "schedule" and not (args.cron or args.interval):  # the old verb always meant "on a schedule"
        raise LayerMoEError("schedule needs --cron 'MIN HOUR DOM MON DOW' or --interval SECONDS")
    serve_plan(args.plan, args.name, args.cron, args.interval)


def cmd_approve(args) -> None:
    from .approval import answer_review

    name = answer_review(args.run_id, args.approve, args.reason)
    print(f"{'approved' if args.approve else 'rejected'}: flow run {name} resumes")


def cmd_registry(args) -> None:
    from registry.versions import lineage, list_versions, show_version

    settings = _registry_settings(args)
    if args.registry_command == "list":
        print(list_versions(settings).to_string(index=False))
    else:
        ref = int(args.ref) if args.ref.isdigit() else args.ref
        info = show_version(settings, ref)
        info["lineage"] = [v.version for v in lineage(settings, ref)]
        print(json.dumps(info, indent=2, default=str))


def cmd_demo(args) -> None:
    # The demo is self-contained: its Prefect state lives beside its MLflow store, telemetry off.
    workdir = Path(args.workdir).resolve()
    (workdir / "prefect").mkdir(parents=True, exist_ok=True)
    for key, value in {"PREFECT_HOME": str(workdir / "prefect"), "DO_NOT_TRACK": "true",
                       "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90", "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(key, value)
    from .demo import run_demo

    run_demo(args.workdir, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layermoe", description="Teach an LLM new languages with LayerMoE, round after round.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("add-languages", help="run one expansion round (the add-languages flow)")
    p.add_argument("--plan", required=True, help="YAML plan (see plans/)")
    p.set_defaults(run=cmd_add_languages)

    p = sub.add_parser("lifelong", help="run every round of a lifelong plan now")
    p.add_argument("--plan", required=True)
    p.set_defaults(run=cmd_lifelong)

    p = sub.add_parser("compare", help="allocation methods side by side (LayerMoE, uniform MoE-LPR, NeuronMoE, DMoE, ...), same parent and data")
    p.add_argument("--plan", required=True, help="an add-languages plan, optionally with variants and uniform_budget_factor")
    p.add_argument("--variants", help="comma-separated, e.g. layermoe,uniform,neuron,param_delta,late_layers,no_classifier "
                                      "(default: the plan's `variants`)")
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser("serve", aliases=["schedule"],
                       help="serve add-languages, compare and lifelong-expansion for the Prefect UI (Ctrl-C stops)")
    p.add_argument("--plan", required=True, help="a lifelong or add-languages plan: every deployment's default parameters")
    p.add_argument("--cron", help="schedule lifelong-expansion, e.g. '0 3 * * 0'")
    p.add_argument("--interval", type=int, help="or run lifelong-expansion every SECONDS")
    p.add_argument("--name", help="deployment name (default: the plan's name)")
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("approve", help="answer a round paused for review (promotion: manual), as the UI's Resume form does")
    p.add_argument("run_id", help="the paused add-languages flow run's id")
    decision = p.add_mutually_exclusive_group(required=True)
    decision.add_argument("--yes", dest="approve", action="store_true", help="move the alias to the round's version")
    decision.add_argument("--no", dest="approve", action="store_false", help="tag the version layermoe.rejected")
    p.add_argument("--reason", default="", help="stored on the version (required with --no)")
    p.set_defaults(run=cmd_approve)

    p = sub.add_parser("registry", help="browse registered versions")
    p.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")
    p.add_argument("--model-name", help="registered model name (default: layermoe)")
    reg = p.add_subparsers(dest="registry_command", required=True)
    reg.add_parser("list", help="every version with aliases and lineage")
    show = reg.add_parser("show", help="one version: tags, metrics, lineage")
    show.add_argument("ref", help="version number or alias, e.g. 3 or champion")
    p.set_defaults(run=cmd_registry)

    p = sub.add_parser("demo", help="the embedded-default demo: base + two lifelong rounds, all local")
    p.add_argument("--workdir", default=".demo", help="where corpus, checkpoints and the MLflow store go")
    p.add_argument("--quick", action="store_true", help="a much smaller run, for a smoke test")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except LayerMoEError as error:
        print(f"layermoe: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
