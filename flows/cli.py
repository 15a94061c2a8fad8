"""`lowbit` command line.

    lowbit run [--preset full] [-P baseline.epochs=2 ...] [--force]
                                                      run the Prefect flow (stages DVC says changed)
          [--runner threads|dask] [--parallel N] [--dask-address tcp://HOST:8786]
    lowbit stage prepare                              run one stage in this process
    lowbit sensitivity                                quantize one layer at a time, write reports/sensitivity.*
    lowbit check [--preset NAME]                      validate params.yaml (after writing a preset into it) and exit
    lowbit show                                       print the last report
    lowbit gguf lora_merged [--qtype Q8_0 Q4_1]       causal LMs: export to GGUF, reload, print the test-loss gap
    lowbit compare [--last N | --run ID ...]          one table across MLflow runs and variants (CSV, Markdown, plot)
    lowbit reproduce RUN_ID [--workdir DIR] [--tolerance ABS] [--force]
                                                      re-create a run in a git worktree, compare its quality figures
    lowbit retrain                                    re-read data, run the pipeline, promote (as scheduled)
    lowbit promote [--run RUN_ID]                     promote the best variant of a run (params `promote`)
    lowbit rollback --reason TEXT [--to VERSION]      @champion back to @previous
    lowbit champion                                   @champion, @previous and the alias history
    lowbit schedule --cron "0 3 * * 1"                serve the retraining flow on a cron schedule

Exit status: 0 done; 1 some stages failed (the others finished and were reported); 2 bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import time
from pathlib import Path

from flows.compare import add_arguments as add_compare_arguments, compare_command
from flows.reproduce import add_arguments as add_reproduce_arguments, reproduce_command
from flows.stage_host import stage_env, stage_host
from flows.up_to_date import recorded_run
from lowbit.config import load_params, preset_overrides, write_overrides
from lowbit.errors import LowbitError, StagesFailed
from tasks import STAGES
from tasks.plumbing import Paths, quiet_libraries


# Without PREFECT_API_URL, Prefect starts a temporary local API server for the run: a fresh
# process that imports Prefect's server and migrates a SQLite database. Prefect waits 20 s for
# it by default, which ran out on a 2-core machine whose cores were busy with another job (a
# weekly run on a shared machine). lowbit waits longer unless the variable is already set.
PREFECT_STARTUP_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
PREFECT_STARTUP_SECONDS = 300

# Inductor's on-disk cache, kept in the project rather than in /tmp, which a `docker run --rm` or a
# reboot empties before the next weekly run. The compiled int8 variant's first call took 26-29 s
# with an empty cache and 13 s with its kernels cached (3 runs each); the rest (tracing, freezing the
# weights into oneDNN's packed layout) is redone every time: Inductor cannot cache packed oneDNN weights.
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
COMPILE_CACHE_DIR = ".cache/torchinductor"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".", help="project root holding params.yaml and dvc.yaml (default: .)")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the whole pipeline as a Prefect flow")
    run.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE",
                     help="set a param in params.yaml before running (recorded in MLflow), e.g. -P baseline.epochs=2")
    run.add_argument("--force", action="store_true", help="rerun every stage even if DVC says it is up to date")
    run.add_argument("--preset", metavar="NAME",
                     help="set the params in presets/NAME.yaml first, like -P (e.g. full: the full-size configuration); "
                          "-P values are applied after it")
    add_runner_arguments(run)
    stage = sub.add_parser("stage", help="run one stage in this process (what dvc.yaml's cmd does)")
    stage.add_argument("name", choices=STAGES)
    sub.add_parser("sensitivity", help="per-layer int8 sensitivity of models/baseline on the validation split")
    check = sub.add_parser("check", help="validate params.yaml")
    check.add_argument("--preset", metavar="NAME", help="write presets/NAME.yaml's values into params.yaml first "
                       "(then run single stages with `lowbit stage`, e.g. a 7B QLoRA on a GPU)")
    sub.add_parser("show", help="print the last report (reports/summary.md)")
    gguf = sub.add_parser("gguf", help="export a causal LM variant to GGUF (llama.cpp), reload it, report its loss gap")
    gguf.add_argument("variant", help="fp32, lora_merged, qlora_merged (an adapter variant exports its merged copy)")
    gguf.add_argument("--qtype", nargs="+", default=["Q8_0", "Q4_1"], choices=["F32", "F16", "Q8_0", "Q4_1"])
    add_compare_arguments(sub.add_parser("compare", help="compare pipeline runs and their variants from MLflow"))
    add_reproduce_arguments(sub.add_parser("reproduce", help="re-create a past run in a git worktree and compare its figures"))
    retrain = sub.add_parser("retrain", help="re-read the data, run the pipeline, promote (what the schedule runs)")
    add_runner_arguments(retrain)
    promote = sub.add_parser("promote", help="promote the best variant of a pipeline run under params.yaml `promote`")
    promote.add_argument("--run", metavar="RUN_ID", help="pipeline run to promote from (default: the latest finished)")
    rollback = sub.add_parser("rollback", help="move @champion back to @previous (or to --to VERSION)")
    rollback.add_argument("--to", metavar="VERSION", help="model version to make champion instead of @previous")
    rollback.add_argument("--reason", required=True, help="why (recorded with the alias move)")
    sub.add_parser("champion", help="print @champion, @previous and the latest alias moves")
    schedule = sub.add_parser("schedule", help="serve the retraining flow here on a cron schedule")
    schedule.add_argument("--cron", required=True, help="five-field cron, e.g. '0 3 * * 1' (Mondays 03:00, local time)")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    os.environ.setdefault(COMPILE_CACHE_ENV, str(root / COMPILE_CACHE_DIR))  # an explicit setting wins
    try:
        return COMMANDS[args.command](args, Paths(root))
    except StagesFailed as err:
        print(err.report)
        print(f"lowbit: error: {err}", file=sys.stderr)
        for stage, why in err.failures.items():
            print(f"  {stage}: {why}", file=sys.stderr)
        return 1
    except LowbitError as err:
        print(f"lowbit: error: {err}", file=sys.stderr)
        return 2


def add_runner_arguments(parser: argparse.ArgumentParser) -> None:
    """Command-line values override params.yaml `runner`."""
    parser.add_argument("--runner", choices=("threads", "dask"),
                        help="where independent stages run: threads of this process or Dask worker processes")
    parser.add_argument("--parallel", type=int, metavar="N",
                        help="stages at once (threads: default 1, clean timings; dask local cluster: default 4 workers)")
    parser.add_argument("--dask-address", metavar="ADDRESS",
                        help="a running Dask scheduler, e.g. tcp://dask-scheduler:8786 (implies --runner dask)")


def runner_choice(args: argparse.Namespace, params):
    from flows.runners import RunnerChoice

    return RunnerChoice.from_params(params.runner, args.runner, args.parallel, args.dask_address)


def apply_overrides(paths: Paths, preset: str | None, params: list[str]) -> list[str]:
    """Write a preset's values, then -P values, into params.yaml (validated first; printed); returns them."""
    overrides = (preset_overrides(paths.root, preset) if preset else []) + params
    if overrides:
        for key, old, new in write_overrides(paths.params, overrides):
            print(f"params.yaml: {key}: {old!r} -> {new!r}")
    return overrides


def cmd_run(args: argparse.Namespace, paths: Paths) -> int:
    started = time.perf_counter()
    overrides = apply_overrides(paths, args.preset, args.param)
    params = load_params(paths.params)  # fail on bad params before starting Prefect
    quiet_libraries()
    runner = runner_choice(args, params)
    if not args.force and (recorded := recorded_run(paths, params)):
        print((paths.reports / "summary.md").read_text())
        print(f"stages run: nothing (dvc status: every stage up to date; MLflow run {recorded} already records "
              f"these outputs and params); {time.perf_counter() - started:.1f} s in all")
        return 0
    # Started first, so the host's imports overlap Prefect's (and its temporary API's) start-up.
    with stage_host(paths.root, stage_env()) if runner.kind == "threads" else contextlib.nullcontext("") as host:
        prepare_prefect_environment()
        from flows.pipeline import pipeline_on  # Prefect import is slow: only for `run`

        flow = pipeline_on(runner)
        print(f"stages run on {runner.describe()}")
        with explained_prefect_startup():
            outcome = flow(root=str(paths.root), force=args.force, overrides=tuple(overrides), stage_host_address=host)
    print()
    print(outcome["report"])
    ran = ", ".join(outcome["ran"]) or "nothing (all stages up to date)"
    print(f"stages run: {ran}; {time.perf_counter() - started:.1f} s in all")
    print(f"MLflow run {outcome['mlflow_run_id']} in {outcome['tracking_uri']}")
    return 0


def prepare_prefect_environment() -> None:
    """Before Prefect is imported (it reads its settings then): a startup wait sized for busy machines."""
    os.environ.setdefault(PREFECT_STARTUP_ENV, str(PREFECT_STARTUP_SECONDS))


@contextlib.contextmanager
def explained_prefect_startup():
    """Prefect's startup time-out is a bare RuntimeError; say what to set instead."""
    try:
        yield
    except RuntimeError as err:
        if "ephemeral Prefect API server" not in str(err):
            raise
        waited = os.environ.get(PREFECT_STARTUP_ENV, "20")
        raise LowbitError(
            f"Prefect's temporary local API server did not answer within {waited} s (is the machine busy?). "
            f"Wait longer with {PREFECT_STARTUP_ENV}=900, or start a server once (`prefect server start`) and "
            "point runs at it with PREFECT_API_URL=http://127.0.0.1:4200/api"
        ) from None


def cmd_retrain(args: argparse.Namespace, paths: Paths) -> int:
    started = time.perf_counter()
    runner = runner_choice(args, load_params(paths.params))
    quiet_libraries()
    prepare_prefect_environment()
    from flows.retrain import retrain

    with explained_prefect_startup():
        outcome = retrain(root=str(paths.root), runner=runner.kind, parallel=runner.parallel or None,
                          dask_address=runner.dask_address)
    ran = ", ".join(outcome["ran"]) or "nothing (all stages up to date)"
    print(f"stages run: {ran}; {time.perf_counter() - started:.1f} s in all")
    print(outcome["promotion"]["line"])
    return 0


def cmd_promote(args: argparse.Namespace, paths: Paths) -> int:
    load_params(paths.params)
    quiet_libraries()
    prepare_prefect_environment()
    from flows.retrain import promote_flow

    with explained_prefect_startup():
        promote_flow(root=str(paths.root), run_id=args.run)  # the task prints the one-line outcome
    return 0


def cmd_rollback(args: argparse.Namespace, paths: Paths) -> int:
    from flows.registry import Registry, rollback

    registry = Registry.open(load_params(paths.params), paths.root)
    move = rollback(registry, args.reason, args.to)
    print(f"{registry.name}@{registry.champion}: v{move.from_version or '-'} -> v{move.to_version} ({args.reason})")
    return 0


def cmd_champion(args: argparse.Namespace, paths: Paths) -> int:
    from flows.registry import Registry

    registry = Registry.open(load_params(paths.params), paths.root)
    registry.require()
    for alias in (registry.champion, registry.previous):
        version = registry.version_at(alias)
        if version is None:
            print(f"@{alias}: none")
            continue
        tags = version.tags
        print(f"@{alias}: v{version.version} {tags.get('lowbit.variant', '?')} accuracy {tags.get('lowbit.metric.accuracy', '?')} "
              f"weight_bytes {tags.get('lowbit.metric.weight_bytes', '?')} commit {tags.get('lowbit.git_commit', '?')[:12]} "
              f"run {tags.get('lowbit.pipeline_run_id', '?')}")
    print("alias moves (newest first):")
    for move in registry.history():
        print(f"  {move['time']} @{move['alias']} v{move['from_version'] or '-'} -> v{move['to_version']} "
              f"by {move['actor']}: {move['reason']}")
    return 0


def cmd_schedule(args: argparse.Namespace, paths: Paths) -> int:
    load_params(paths.params)
    quiet_libraries()
    from flows.retrain import serve

    serve(paths.root, args.cron)
    return 0


def cmd_stage(args: argparse.Namespace, paths: Paths) -> int:
    module = importlib.import_module(f"tasks.{args.name}")
    os.chdir(paths.root)
    module.stage_main(args.name, module.run, [str(paths.root)])
    return 0


def cmd_sensitivity(args: argparse.Namespace, paths: Paths) -> int:
    """Needs models/baseline and data/prepared (run `lowbit run` first); writes reports/sensitivity.*."""
    params = load_params(paths.params)
    if not (paths.models / "baseline").is_dir():
        raise LowbitError(f"{paths.models / 'baseline'} not found; run `lowbit run` (or `dvc repro baseline`) first")
    quiet_libraries()
    from tasks.calibration import calib_batches
    from tasks.ptq import run_sensitivity

    rows = run_sensitivity(params, paths, calib_batches(paths, params), paths.reports)
    for row in rows[:10]:
        print(f"{row['layer']:55s} Δacc {row['accuracy_delta']:+6.2f} pts   Δloss {row['loss_delta']:+.4f}")
    print(f"all {len(rows)} layers: {paths.reports / 'sensitivity.md'}, {paths.reports / 'sensitivity.png'}")
    return 0


def cmd_check(args: argparse.Namespace, paths: Paths) -> int:
    apply_overrides(paths, args.preset, [])
    params = load_params(paths.params)
    print(f"{paths.params}: ok (params hash {params.digest()[:12]})")
    return 0


def cmd_gguf(args: argparse.Namespace, paths: Paths) -> int:
    params = load_params(paths.params)
    quiet_libraries()
    from flows.gguf_export import export_variant

    for row in export_variant(params, paths, args.variant, args.qtype):
        print(f"{row['file']}: {row['bytes'] / 2**20:.1f} MiB, test loss {row['test_loss_gguf']:.4f} reloaded vs "
              f"{row['test_loss_in_memory']:.4f} in memory (gap {row['loss_gap']:+.4f})")
    return 0


def cmd_show(args: argparse.Namespace, paths: Paths) -> int:
    summary = paths.reports / "summary.md"
    if not summary.is_file():
        raise LowbitError(f"{summary} not found; run `lowbit run` first")
    print(summary.read_text())
    return 0


COMMANDS = {"run": cmd_run, "stage": cmd_stage, "sensitivity": cmd_sensitivity, "check": cmd_check, "show": cmd_show, "gguf": cmd_gguf,
            "retrain": cmd_retrain, "promote": cmd_promote, "rollback": cmd_rollback, "champion": cmd_champion,
            "schedule": cmd_schedule, "compare": compare_command, "reproduce": reproduce_command}

if __name__ == "__main__":
    sys.exit(main())
