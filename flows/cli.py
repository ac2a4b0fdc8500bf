"""`layermoe`: the command line over the flows and the registry.

It starts instantly: this module imports only the standard library and `layermoe_core.errors`;
each command imports what it needs. A training command runs in a child process of its own
session (see run_flow_in_child), which checks the plan's inputs before Prefect starts.
"""

import argparse
import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from layermoe_core.errors import LayerMoEError

FLOW_CHILD_ENV = "LAYERMOE_CLI_FLOW_CHILD"  # set in the child process that runs a training command's flow
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, as shells report it
LOG_DIR_ENV = "LAYERMOE_LOG_DIR"  # where a command's tracebacks go (default: .layermoe/logs under the current folder)
COMMAND_STARTED = time.time()  # names the command's log file
VERBOSE = False  # --verbose: tracebacks on the console as well


def _registry_overrides(args) -> dict[str, str]:
    given = {"tracking_uri": getattr(args, "tracking_uri", None), "registered_model_name": getattr(args, "model_name", None)}
    return {key: value for key, value in given.items() if value}


def _registry_settings(args, base: dict | None = None):
    """RegistrySettings from `base` (a plan's) with --tracking-uri / --model-name applied; a bad value is one line."""
    from pydantic import ValidationError

    from layermoe_core.errors import describe_validation_error
    from registry.settings import RegistrySettings

    try:
        return RegistrySettings(**{**(base or {}), **_registry_overrides(args)})
    except ValidationError as error:
        raise LayerMoEError(f"bad registry option: {describe_validation_error(error)}") from None


def load_checked_plan(args, kind):
    """The plan, with --tracking-uri / --model-name applied, and its inputs checked before Prefect starts."""
    from .plan import check_plan_inputs, load_plan

    plan = load_plan(args.plan, kind)
    if _registry_overrides(args):
        plan = plan.model_copy(update={"registry": _registry_settings(args, plan.registry.model_dump())})
    if plan.promotion == "manual":
        _check_a_reviewer_can_answer()
    check_plan_inputs(plan)
    return plan


def _check_a_reviewer_can_answer() -> None:
    """A manual round waits for a reviewer's answer; on the temporary server a plain run starts, nobody could give one."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise LayerMoEError(
            "promotion: manual pauses each round until a reviewer answers, which needs a Prefect server they can reach, "
            "and PREFECT_API_URL is not set (this run would use a temporary server nobody can resume). Start one "
            "(`prefect server start`), export PREFECT_API_URL=http://127.0.0.1:4200/api and run again, or serve the plan "
            "with `layermoe serve`; or set promotion: auto"
        )


def _flow_runs_here() -> bool:
    """False in the process a user started: it hands a training command to a child (run_flow_in_child)."""
    return bool(os.environ.get(FLOW_CHILD_ENV))


def cmd_add_languages(args) -> int | None:
    if not _flow_runs_here():
        return run_flow_in_child(args.argv)
    from .plan import ExpansionPlan

    plan = load_checked_plan(args, ExpansionPlan)
    from .add_languages import add_languages

    state = _interruptible(lambda plan: add_languages(plan, return_state=True), plan)
    summary = state.result()  # raises the run's error
    print(state.message if summary is None else summary.table().to_string(index=False))


def cmd_lifelong(args) -> int | None:
    if not _flow_runs_here():
        return run_flow_in_child(args.argv)
    from .plan import check_plan_inputs, load_lifelong_plan

    _refuse_registry_overrides(args, "lifelong", TICKS_READ_THE_PLAN)
    plan = load_lifelong_plan(args.plan)
    if plan.promotion == "manual":
        _check_a_reviewer_can_answer()
    check_plan_inputs(plan)
    from .lifelong_expansion import run_pending_rounds

    for tick in _interruptible(lambda _: run_pending_rounds(Path(args.plan).resolve()), plan):
        print(f"\n{tick.message}")
        if tick.summary is not None:
            print(tick.summary.table().to_string(index=False))


TICKS_READ_THE_PLAN = (
    "reads the registry from the plan file (each tick reads the file anew); set `registry: {tracking_uri: ..., "
    "registered_model_name: ...}` in the plan"
)


def _refuse_registry_overrides(args, command: str, why: str) -> None:
    """Refuse --tracking-uri / --model-name where they would be ignored, saying why."""
    given = [f"--{key.replace('_', '-')}" for key in _registry_overrides(args)]
    if given:
        raise LayerMoEError(f"{command} {why}; drop {' and '.join(given)}")


def at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def cmd_compare(args) -> int | None:
    if not _flow_runs_here():
        return run_flow_in_child(args.argv)
    from .compare import ComparePlan, with_variants

    plan = load_checked_plan(args, ComparePlan)
    if args.variants:
        plan = with_variants(plan, args.variants.split(","))
    if args.seeds is not None:
        plan = plan.model_copy(update={"seeds": args.seeds})
    from .compare import compare

    state = _interruptible(lambda plan: compare(plan, return_state=True), plan)
    table = state.result()  # raises the run's error
    print(state.message if table is None else table.to_string(index=False))


def cmd_serve(args) -> None:
    from .serve import serve_plan

    _refuse_registry_overrides(args, "serve", TICKS_READ_THE_PLAN)
    serve_plan(args.plan, args.name, args.cron, args.interval)


def cmd_approve(args) -> None:
    _refuse_registry_overrides(args, "approve", "answers the paused run, which writes to its own plan's registry")
    from .approval import answer_review, paused_review, review_answer

    paused = paused_review(args.run_id)
    print(markdown_text(paused.brief) + "\n")  # the gate's verdict and table, as the Resume form shows them
    answer = review_answer(args.approve, args.reason, args.override_gate, paused.gate_failed)
    answer_review(paused, answer)
    overridden = " over the failed automatic gate (tagged layermoe.gate_overridden)" if args.override_gate else ""
    print(f"{'approved' if args.approve else 'rejected'}{overridden}: flow run {paused.name} resumes")


def cmd_estimate(args) -> None:
    _refuse_registry_overrides(args, "estimate", "reads no registry (pass a registry parent's config with --parent-config)")
    from layermoe_core.training.estimate import (
        DEFAULT_TFLOPS_PER_DEVICE,
        candidate_allocations,
        estimate_round,
        format_estimate,
        parent_config,
    )

    from .plan import load_lifelong_plan

    lifelong = load_lifelong_plan(args.plan)  # any plan `serve` and `lifelong` take; a one-round plan is one round
    if not 1 <= args.round <= len(lifelong.rounds):
        raise LayerMoEError(f"--round {args.round}: the plan has rounds 1 to {len(lifelong.rounds)}")
    source = args.parent_config or (lifelong.parent.hf_path if args.round == 1 else None)
    if source is None:
        raise LayerMoEError(
            f"round {args.round}'s parent is a registry version; pass --parent-config with its config.json "
            "(or its model directory), e.g. from `layermoe registry download`"
        )
    config = parent_config(source)
    earlier = [code for spec in lifelong.rounds[: args.round - 1] for code in spec.new_languages]
    old = lifelong.parent.languages + earlier if lifelong.parent.languages else list(getattr(config, "languages", []))
    if not old:
        raise LayerMoEError("the plan names no old languages; set parent.languages (or old_languages) in the plan")
    plan = lifelong.round_plan(args.round - 1, old, lifelong.parent)
    layers = getattr(config, "base_config", config).num_hidden_layers
    tokens = plan.tokens
    estimates = [
        estimate_round(
            config,
            allocation,
            old,
            plan.new_languages,
            top_k=plan.top_k,
            classifier_layers=plan.classifier_layer_count,
            seq_len=tokens.seq_len,
            stage1_tokens=tokens.stage1_tokens,
            stage2_tokens=tokens.stage2_tokens,
            stage1=plan.stage1,
            stage2=plan.stage2,
            launcher=plan.launcher,
            analysis_tokens=tokens.analysis_tokens,
            eval_tokens=tokens.eval_tokens,
            tflops_per_device=args.tflops_per_device or DEFAULT_TFLOPS_PER_DEVICE,
            added_tokens=plan.vocabulary.extend,
        )
        for allocation in candidate_allocations(plan.allocation, layers)
    ]
    print(f"round {args.round} of {len(lifelong.rounds)}: adds {', '.join(plan.new_languages)} to {', '.join(old)}")
    print(format_estimate(estimates, plan.allocation, layers))


def cmd_registry(args) -> None:
    settings = _registry_settings(args)
    named = bool(getattr(args, "model_name", None))
    command = args.registry_command
    if command == "list":  # without MLflow: it reads the store itself (registry/listing.py)
        from registry.listing import read_listing

        _print_versions(read_listing(settings, find_name=not named))
        return
    if not named:
        from registry.versions import sole_registered_model_name

        settings = settings.model_copy(update={"registered_model_name": sole_registered_model_name(settings)})
    if command == "show":
        from registry import lineage, show_version

        ref = int(args.ref) if args.ref.isdigit() else args.ref
        info = show_version(settings, ref)
        info["lineage"] = [v.version for v in lineage(settings, ref)]
        print(json.dumps(info, indent=2, default=str) if args.json else version_text(info))
    elif command == "download":
        from registry import download_version

        local = download_version(settings, args.ref, args.dir)
        print(f"version {local.version} ({local.info.storage}, verified) is in {local.path}; load it in Python with:\n")
        print(load_snippet(local.path))
    elif command == "promote":
        from registry import promote

        info = promote(settings, args.ref, args.alias)
        print(f"version {info.version} now holds the alias {args.alias!r} (aliases: {', '.join(info.aliases)})")


def _print_versions(listing) -> None:
    import pandas as pd

    from registry.listing import versions_frame

    table = versions_frame(listing.versions).drop(columns=["run_id"])
    table["created"] = table["created"].dt.strftime("%Y-%m-%d %H:%M")
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.float_format", "{:+.4f}".format):
        print(table.to_string(index=False))
    if listing.schedule_pause_note:
        print(f"\nlifelong schedule paused: {listing.schedule_pause_note}")


def load_snippet(path: Path) -> str:
    """Python that loads a downloaded version as written, in a fresh process.

    Importing `layermoe_core.model.modeling_layermoe` registers the "layermoe" model type with transformers'
    Auto classes; a bare `import layermoe_core` loads names lazily and registers nothing (see layermoe_core/__init__.py).
    """
    return "\n".join(
        [
            "import layermoe_core.model.modeling_layermoe  # registers the layermoe model type with transformers' Auto classes",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({str(path)!r})",
            f"tokenizer = AutoTokenizer.from_pretrained({str(path)!r})",
        ]
    )


def version_text(info: dict) -> str:
    """`registry show` for a person: what the version is, in a few lines, then its model card rendered for a terminal."""
    aliases = f" (aliases: {', '.join(info['aliases'])})" if info["aliases"] else ""
    languages = ", ".join(info.get("languages") or [])
    new = info.get("new_languages")
    verdict, reason = info.get("verdict"), info.get("verdict_reason")
    lines = [
        f"{info['name']} version {info['version']}{aliases}",
        f"  status     {info['status']}, created {info['created'][:16].replace('T', ' ')} UTC, run {info['run_id'] or '-'}",
        f"  lineage    {' <- '.join(str(v) for v in info['lineage'])}",
        f"  round      {info.get('round', 0)}: {languages}" + (f" (new: {', '.join(new)})" if new else ""),
        f"  storage    {info.get('storage', 'whole')}" + (f", {info['stored_bytes']:,} bytes" if info.get("stored_bytes") else ""),
    ]
    if verdict:
        lines.append(f"  verdict    {verdict}" + (f": {reason}" if reason else ""))
    lines += ["  (every tag, metric and param: add --json)", ""]
    return "\n".join(lines) + "\n" + markdown_text(info["description"] or "(no model card)")


def markdown_text(markdown: str) -> str:
    """Markdown (a model card, a review brief) rendered for a terminal: headings, lists and tables drawn as text."""
    from rich.console import Console
    from rich.markdown import Markdown

    terminal = Console()
    console = Console(width=min(terminal.width, 120) if terminal.is_terminal else 120, highlight=False)  # a pipe or file: 120
    with console.capture() as rendered:
        console.print(Markdown(markdown))
    return "\n".join(line.rstrip() for line in rendered.get().splitlines())


def cmd_demo(args) -> int | None:
    if not _flow_runs_here():
        return run_flow_in_child(args.argv)
    # The demo is self-contained: its Prefect state lives beside its MLflow store, telemetry off.
    from layermoe_core.environment import use_local_stack

    use_local_stack(Path(args.workdir).resolve() / "prefect")
    from .demo import run_demo

    if getattr(args, "model_name", None):
        raise LayerMoEError("the demo registers its versions as layermoe-demo; drop --model-name")
    tracking_uri = _registry_settings(args).tracking_uri if getattr(args, "tracking_uri", None) else None
    _interruptible(
        lambda workdir: run_demo(workdir, quick=args.quick, processes=args.processes, tracking_uri=tracking_uri), Path(args.workdir)
    )


class Interrupted(Exception):
    """A training flow stopped by Ctrl-C; the message says where and how to resume."""


def _interruptible(run_flow, plan_or_workdir):
    """Run a flow so that Ctrl-C ends it as Crashed on Prefect's server, with one line instead of tracebacks."""
    stopped: list[str] = []  # where the Ctrl-C came, once it came

    def interrupt(signum, frame):
        if stopped:  # a second Ctrl-C while the run records its end: stop now
            os._exit(INTERRUPTED_EXIT_CODE)
        from prefect.context import FlowRunContext, TaskRunContext

        task, flow = TaskRunContext.get(), FlowRunContext.get()
        where = f"flow run {flow.flow_run.name!r}" if flow else "the flow, before its run started"
        stopped.append(f"task {task.task_run.name!r} of {where}" if task else where)
        _silence_console_logs()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    _keep_tracebacks_off_the_console()
    try:
        return run_flow(plan_or_workdir)
    except KeyboardInterrupt:
        workdir = Path(getattr(plan_or_workdir, "workdir", plan_or_workdir)).resolve()
        raise Interrupted(
            f"interrupted in {stopped[0] if stopped else 'the flow'}; the run is marked Crashed. Rerun the same command "
            f"to resume: finished steps and checkpoints under {workdir} are reused"
        ) from None


class TracebacksToLog(logging.Handler):
    """Every log record that carries a traceback (Prefect's task and engine failures), written to the command's log
    file; the file is created only when the first one comes."""

    def __init__(self, path: Path) -> None:
        super().__init__(logging.ERROR)
        self.path = path
        self.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is None and record.exc_text is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as log:
            log.write(self.format(record) + "\n")


class WithoutTraceback(logging.Formatter):
    """A console handler's formatter, less the traceback a record carries: the console keeps its one line."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        kept = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = kept


def traceback_log() -> Path:
    """This command's log file for tracebacks: one per command, in $LAYERMOE_LOG_DIR (default .layermoe/logs)."""
    stamp = time.strftime("%Y-%m-%dT%H-%M-%S", time.gmtime(COMMAND_STARTED))
    return Path(os.environ.get(LOG_DIR_ENV, ".layermoe/logs")).resolve() / f"layermoe-{stamp}-{os.getpid()}.log"


def _keep_tracebacks_off_the_console() -> None:
    """Prefect logs a failing task's and flow's traceback; they go to traceback_log(), and to the console only with --verbose."""
    logging.getLogger().addHandler(TracebacksToLog(traceback_log()))
    if VERBOSE:
        return
    for logger in [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                if not isinstance(handler.formatter, WithoutTraceback):
                    handler.setFormatter(WithoutTraceback(handler.formatter or logging.Formatter()))


def _silence_console_logs() -> None:
    """After Ctrl-C, Prefect's crash reports and server shutdown would print tracebacks: the one line says it all."""
    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is not logging.FileHandler and isinstance(handler, logging.StreamHandler):
                handler.setLevel(logging.CRITICAL + 1)


def run_flow_in_child(argv: Sequence[str]) -> int:
    """Run this command again in a child process in its own session; pass Ctrl-C (and SIGTERM) on to it, and end it with this one.

    A terminal Ctrl-C goes to every process of the foreground group. Prefect's temporary API server is
    a child of the process running the flow, so in one process the Ctrl-C stopped the server before the
    run could record its end (it stayed Running, after minutes of connection retries). Here only this
    process, which imports nothing heavy, gets it: the child's run ends Crashed and it prints one line.
    The child must not outlive the command, or it would train on and register unseen: a closed terminal's
    SIGHUP is passed on as a Ctrl-C, and where this process is killed outright (SIGKILL) the kernel sends
    the child a Ctrl-C's SIGINT itself (see _interrupt_when_parent_dies).
    """
    child = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *argv],
        env={**os.environ, FLOW_CHILD_ENV: "1"},
        start_new_session=True,
        preexec_fn=_interrupt_when_parent_dies(os.getpid()),
    )

    def forward(signum, frame):
        child.send_signal(signal.SIGINT if signum == signal.SIGHUP else signum)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies


def _interrupt_when_parent_dies(parent_pid: int):
    """What the child runs before it starts: ask Linux for SIGINT when its parent dies, as on Ctrl-C.

    Elsewhere there is no such request, and the child outlives a parent killed with SIGKILL.
    """

    def request() -> None:
        if not sys.platform.startswith("linux"):
            return
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT)
        if os.getppid() != parent_pid:  # the parent died before the request: nobody will send the signal
            os._exit(INTERRUPTED_EXIT_CODE)

    return request


def _with_global_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options every command takes, before or after its name, added to the parser and every subparser (commands
    added later get them too). SUPPRESS keeps a subcommand from resetting a value given before it."""
    parser.add_argument(
        "--tracking-uri",
        default=argparse.SUPPRESS,
        help="MLflow URI (default: the plan's, or $MLFLOW_TRACKING_URI, or sqlite:///mlruns/mlflow.db)",
    )
    parser.add_argument(
        "--model-name",
        default=argparse.SUPPRESS,
        help="registered model name (default: the plan's; registry commands: the store's only one)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"show tracebacks on the console too (they always go to a log file in ${LOG_DIR_ENV}, default .layermoe/logs)",
    )
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in {id(choice): choice for choice in action.choices.values()}.values():  # an alias repeats its parser
                _with_global_options(subparser)
    return parser


def _add_round_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("add-languages", help="run one expansion round (the add-languages flow)")
    p.add_argument("--plan", required=True, help="YAML plan (see plans/)")
    p.set_defaults(run=cmd_add_languages)

    p = sub.add_parser("lifelong", help="run the pending rounds of a lifelong plan now, until none is pending or one is rejected")
    p.add_argument("--plan", required=True, help="a lifelong plan (or a one-round plan)")
    p.set_defaults(run=cmd_lifelong)

    p = sub.add_parser(
        "compare", help="allocation methods side by side (LayerMoE, uniform MoE-LPR, NeuronMoE, DMoE, ...), same parent and data"
    )
    p.add_argument("--plan", required=True, help="an add-languages plan, optionally with variants and uniform_budget_factor")
    p.add_argument(
        "--variants",
        help="comma-separated, e.g. layermoe,uniform,neuron,param_delta,late_layers,no_classifier (default: the plan's `variants`)",
    )
    p.add_argument("--seeds", type=at_least_one, help="runs per variant (Stage-1/2 seeds +0..N-1); the table gives mean and std")
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser("serve", help="serve add-languages, compare and lifelong-expansion for the Prefect UI (Ctrl-C stops)")
    p.add_argument("--plan", required=True, help="a lifelong or add-languages plan file; each lifelong tick reads it anew")
    p.add_argument("--cron", help="tick lifelong-expansion on a cron schedule, e.g. '0 3 * * 0': each tick runs the next pending round")
    p.add_argument("--interval", type=at_least_one, help="or tick lifelong-expansion every SECONDS")
    p.add_argument("--name", help="deployment name (default: the plan's name)")
    p.set_defaults(run=cmd_serve)


def _add_approve_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("approve", help="answer a round paused for review (promotion: manual), as the UI's Resume form does")
    p.add_argument("run_id", help="the paused add-languages flow run's id")
    decision = p.add_mutually_exclusive_group(required=True)
    decision.add_argument("--yes", dest="approve", action="store_true", help="move the alias to the round's version")
    decision.add_argument(
        "--no", dest="approve", action="store_false", help="reject the round: its version's verdict becomes rejected and the alias stays"
    )
    p.add_argument("--reason", default="", help="stored on the version (required with --no)")
    p.add_argument(
        "--override-gate",
        action="store_true",
        help="with --yes: approve a version the automatic gate failed (tagged layermoe.gate_overridden)",
    )
    p.set_defaults(run=cmd_approve)


def _add_estimate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="parameters, child size, memory per device, tokens and steps of a plan; trains nothing")
    p.add_argument("--plan", required=True, help="a lifelong or add-languages plan")
    p.add_argument("--round", type=at_least_one, default=1, help="which round of a lifelong plan (default: 1)")
    p.add_argument(
        "--parent-config", help="the round's parent's config.json or model directory (default for round 1: the plan's parent.hf_path)"
    )
    p.add_argument(
        "--tflops-per-device",
        type=float,
        help="achieved training throughput of one device in TFLOP/s, for the time (default: 400, Llama 3's reported "
        "38-43%% bf16 utilisation of an H100; docs/multi-gpu.md)",
    )
    p.set_defaults(run=cmd_estimate)


def _add_registry_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="browse registered versions")
    reg = p.add_subparsers(dest="registry_command", required=True)
    reg.add_parser("list", help="every version: aliases, lineage, gate verdict, worst old-language drift, new-language gain")
    show = reg.add_parser("show", help="one version: what it is, its lineage and its model card")
    show.add_argument("ref", help="version number or alias, e.g. 3 or champion")
    show.add_argument("--json", action="store_true", help="everything as JSON, for programs: tags, run metrics and params, card")
    fetch = reg.add_parser("download", help="a version, verified and rebuilt from its lineage, as a standalone save_pretrained folder")
    fetch.add_argument("ref", help="version number or alias")
    fetch.add_argument("dir", help="a new or empty folder")
    move = reg.add_parser("promote", help="point an alias at a READY, checksummed version")
    move.add_argument("ref", help="version number or alias")
    move.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
    p.set_defaults(run=cmd_registry)


def _add_demo_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the embedded-default demo: base + two lifelong rounds, all local")
    p.add_argument("--workdir", default=".demo", help="where corpus, checkpoints and the MLflow store go")
    p.add_argument("--quick", action="store_true", help="a much smaller run, for a smoke test")
    p.add_argument("--processes", type=int, help="launch base training and every stage with accelerate, this many processes")
    p.set_defaults(run=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="layermoe", description="Teach an LLM new languages with LayerMoE, round after round.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_round_commands(sub)
    _add_approve_command(sub)
    _add_estimate_command(sub)
    _add_registry_command(sub)
    _add_demo_command(sub)
    return _with_global_options(parser)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    global VERBOSE
    VERBOSE = getattr(args, "verbose", False)
    exit_code = [1]  # an uncaught exception exits 1
    if _flow_runs_here():
        atexit.register(_exit_without_teardown, exit_code)  # first registered, so it runs last
    exit_code[0] = _run_command(args)
    return exit_code[0]


def _run_command(args) -> int:
    try:
        return args.run(args) or 0
    except LayerMoEError as error:
        print(f"layermoe: error: {error}{_where_the_traceback_is()}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        # A training progress bar leaves its line open (it ends in \r, not \n): start the message on a line of its own.
        print(f"\nlayermoe: {stop}", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except KeyboardInterrupt:  # outside a flow run (plan checks, registry commands): nothing to resume
        print("layermoe: interrupted (no flow run had started)", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except Exception as error:  # a bug, or a library's own failure: one line, its traceback in the log
        import traceback

        log = traceback_log()
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as out:
            traceback.print_exc(file=out)
        if VERBOSE:
            traceback.print_exc()
        print(f"layermoe: error: {type(error).__name__}: {error}{_where_the_traceback_is()}", file=sys.stderr)
        return 1


def _where_the_traceback_is() -> str:
    log = traceback_log()
    if not log.is_file():
        return ""
    return f" (traceback: {log})" if VERBOSE else f" (traceback in {log}; or rerun with --verbose)"


def _exit_without_teardown(exit_code: list[int]) -> None:
    """End the flow child once every other exit handler (Prefect's server shutdown included) has run.

    Tearing down the torch/transformers/mlflow modules is slow, and nothing
    is left for it to do: the run's state is recorded and files are closed.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code[0])


if __name__ == "__main__":
    sys.exit(main())
