"""`lowbit reproduce <run-id>`: re-create a past pipeline run and compare its quality figures.

    lowbit reproduce 3f2a9c...                          # beside the project: <project>-reproduce-3f2a9c1e/
    lowbit reproduce 3f2a9c... --workdir /tmp/check --tolerance 0.01 --force

1. The run is looked up in MLflow (the store `tracking.uri` names, or MLFLOW_TRACKING_URI): a
   pipeline run (tag lowbit.kind=pipeline) that finished, recorded from a clean tree. A run made
   with uncommitted changes cannot be re-created from its commit: commit, run again, reproduce
   that run. A tracking server that does not answer is asked a bounded number of times
   (flows/mlflow_store.py), then the command stops with that said. Each of these is an error
   before anything changes.
2. `git worktree add --detach <workdir> <commit>`: a separate checkout of the recorded commit;
   the project and its outputs are untouched. Its params.yaml, hashed by the worktree's own code,
   must give the recorded params hash (it does not when a run used params that were never
   committed); if not, the worktree is removed again and the command stops.
3. `dvc pull`, when the commit tracks anything in DVC (a dvc.lock, .dvc files) and a remote is
   configured; with nothing tracked there is nothing to pull, and every stage is computed. A
   remote that is a local folder is taken as the project sees it (a relative `../.dvc-remote`
   would otherwise point into the worktree). DVC reads a file it cannot fetch as missing, whether
   the remote lacks it or cannot be reached, so what arrived decides: a stage output that did not
   is computed by `dvc repro` (the pull line says how many arrived); source data (.dvc files)
   that did not is an error, as is a pull that fails outright (no plugin for the remote, no access).
4. `dvc repro --no-run-cache` in the worktree (a stage that runs is computed, not restored from
   DVC's run cache; `--force`: every stage, also those the pulled outputs make up to date), with
   this interpreter's bin folder first on PATH and the worktree first on PYTHONPATH, so that the
   recorded commit's code runs, not this checkout's (checked before anything runs).
5. Each variant's quality metrics (metrics/<variant>.json) next to the original's, with the
   absolute difference and the tolerance, and the prepared data's hash; the table is printed and
   written to the worktree's reports/reproduction.json, and the outcome is tagged on the original run
   (lowbit.reproduced: ok | mismatch, lowbit.reproduced_detail).

Tolerance, absolute, on every figure: DEFAULT_TOLERANCE = 1e-6. With `determinism.enabled` and
the same kind of CPU and thread count, training and evaluation repeat the same floating-point
operations in the same order, so every figure comes out identical (difference 0); 1e-6 leaves
room only for last-bit differences in loss and ece. On another CPU kind (AVX2 vs AVX512 vs AMX,
or a GPU) the kernels round differently in the last bits; across a training run those
differences can grow until a test prediction flips, which moves accuracy by 1/n_test. That is a
real difference and is reported; to accept it across machine kinds, pass a looser --tolerance
(e.g. 0.01).

Exit status: 0 every figure within tolerance; 1 some figure is not (or a variant is missing);
2 bad input or a failed step (the worktree is kept for inspection after a failed pull or repro).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from flows.mlflow_store import open_store, store_errors
from lowbit.config import load_params
from lowbit.errors import LowbitError
from lowbit.io import read_json, write_json
from tasks.plumbing import EXCLUDE_ENV

# Quality figures compared; the classification ones at least, the causal-LM ones where a run has them.
QUALITY_METRICS = ("accuracy", "f1_macro", "loss", "ece", "token_accuracy", "perplexity")
DEFAULT_TOLERANCE = 1e-6
# MLflow's answers to a run id its store does not hold (a well-formed one, a malformed one).
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")
REPORT_FILE = Path("reports") / "reproduction.json"


@dataclass(frozen=True)
class RecordedRun:
    run_id: str
    uri: str
    status: str
    tags: dict[str, str]
    variants: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> its nested run's metrics

    @property
    def commit(self) -> str:
        return self.tags.get("lowbit.git_commit", "unknown")


# --- 1. the recorded run ---------------------------------------------------------------------------

def find_run(uri: str, run_id: str) -> RecordedRun:
    """The run and its nested variant runs."""
    from mlflow.exceptions import MlflowException

    client = open_store(uri)
    with store_errors(uri):
        try:
            run = client.get_run(run_id)
        except MlflowException as err:
            if err.error_code not in NOT_FOUND:
                raise
            raise LowbitError(f"no MLflow run {run_id!r} in {uri} (`lowbit run` prints the id of each run; "
                              "tracking.uri in params.yaml or MLFLOW_TRACKING_URI chooses the store)") from None
        children = client.search_runs([run.info.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'", max_results=5000)
    variants = {child.data.tags["lowbit.variant"]: dict(child.data.metrics)
                for child in children if "lowbit.variant" in child.data.tags}
    return RecordedRun(run_id, uri, run.info.status, dict(run.data.tags), variants)


def check_reproducible(run: RecordedRun) -> None:
    kind = run.tags.get("lowbit.kind")
    if kind == "variant":
        parent = run.tags.get("mlflow.parentRunId", "?")
        raise LowbitError(f"run {run.run_id} is the nested run of variant {run.tags.get('lowbit.variant')!r}; "
                          f"reproduce its pipeline run: lowbit reproduce {parent}")
    if kind != "pipeline":
        raise LowbitError(f"run {run.run_id} is not a lowbit pipeline run (tag lowbit.kind={kind!r}, expected 'pipeline')")
    if run.status != "FINISHED":
        why = f" (failed stages: {run.tags['lowbit.failed_stages']})" if "lowbit.failed_stages" in run.tags else ""
        raise LowbitError(f"run {run.run_id} ended {run.status}{why}: only a finished run has every figure to compare")
    if len(run.commit) != 40:
        raise LowbitError(f"run {run.run_id} has no git commit recorded (lowbit.git_commit={run.commit!r}): it was "
                          "not run from a git checkout. Commit the project, run it again, and reproduce that run")
    if run.tags.get("lowbit.git_dirty") != "false":
        raise LowbitError(
            f"run {run.run_id} was recorded from a tree with uncommitted changes (lowbit.git_dirty="
            f"{run.tags.get('lowbit.git_dirty')!r}), so commit {run.commit[:12]} does not hold what ran. "
            "Commit the changes, run the pipeline again (lowbit run), and reproduce that run"
        )
    if not run.variants:
        raise LowbitError(f"run {run.run_id} has no variant runs to compare with")


# --- 2. the worktree -------------------------------------------------------------------------------

def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise LowbitError(f"git {' '.join(args)} (in {cwd}) failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


def default_workdir(toplevel: Path, run_id: str) -> Path:
    return toplevel.parent / f"{toplevel.name}-reproduce-{run_id[:8]}"


def check_workdir(workdir: Path) -> None:
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise LowbitError(f"{workdir} already exists and is not empty: choose another --workdir, or remove it "
                          f"(a worktree: git worktree remove --force {workdir})")


def worktree_env(project: Path) -> dict[str, str]:
    """This interpreter's tools first on PATH, the worktree's code first on the import path."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(project), *filter(None, [env.get("PYTHONPATH")])])
    env.pop(EXCLUDE_ENV, None)  # a complete run: no stage left out
    return env


PROBE = ("import json, lowbit, tasks; from lowbit.config import load_params; "
         "print(json.dumps({'lowbit': lowbit.__file__, 'tasks': tasks.__file__, "
         "'params_hash': load_params('params.yaml').digest()}))")


def check_worktree_code_and_params(project: Path, env: dict[str, str], recorded_hash: str) -> None:
    """In the worktree, by the worktree's code: its packages are the ones imported, its params hash the recorded one."""
    missing = [package for package in ("lowbit", "tasks") if not (project / package).is_dir()]
    if missing:
        raise LowbitError(f"the recorded commit has no {', '.join(missing)} package in {project}: not a lowbit project")
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=project, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise LowbitError(f"the recorded commit's code could not read its params.yaml: {done.stderr.strip()[-800:]}")
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    for package in ("lowbit", "tasks"):
        if not Path(probe[package]).resolve().is_relative_to(project.resolve()):
            raise LowbitError(f"in the worktree, `import {package}` found {probe[package]}, not the worktree's own code: "
                              "a .pth file or an import hook of this interpreter comes before PYTHONPATH")
    if probe["params_hash"] != recorded_hash:
        raise LowbitError(
            f"params.yaml at the recorded commit hashes to {probe['params_hash'][:12]}, the run recorded "
            f"{recorded_hash[:12]}: the run used params that were not committed. Commit params.yaml, run the "
            "pipeline again, and reproduce that run"
        )


def remove_worktree(toplevel: Path, workdir: Path, created: bool) -> None:
    """Undo `git worktree add`: the worktree and git's record of it; an empty folder given as --workdir stays."""
    subprocess.run(["git", "worktree", "remove", "--force", str(workdir)], cwd=toplevel, capture_output=True)
    if created:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        workdir.mkdir(exist_ok=True)


# --- 3. dvc pull -----------------------------------------------------------------------------------

def dvc(project: Path, env: dict[str, str], *args: str, stream: bool = False) -> tuple[int, str]:
    """(exit status, last lines of its output); `stream` passes the output on to stderr as it comes."""
    tail: deque[str] = deque(maxlen=15)
    with subprocess.Popen(["dvc", *args], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as process:
        for line in process.stdout:
            if stream:
                sys.stderr.write(line)
            if line.strip():
                tail.append(line.rstrip())
    return process.returncode, "\n".join(tail)


def dvc_tracked(project: Path) -> tuple[list[str], list[str]]:
    """(paths that .dvc files track: source data, paths dvc.lock lists as stage outputs), at the commit."""
    sources = []
    for name in filter(None, git(project, "ls-files", "--", "*.dvc").splitlines()):
        spec = yaml.safe_load((project / name).read_text()) or {}
        sources += [str(Path(name).parent / out["path"]) for out in spec.get("outs", [])]
    lock = project / "dvc.lock"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    outputs = [out["path"] for stage in stages.values() for out in stage.get("outs", [])]
    return sources, outputs


def dvc_remotes(path: Path) -> tuple[dict[str, str], str | None]:
    """({remote name: url as DVC resolves it from `path`}, the default remote)."""
    from dvc.repo import Repo

    with Repo(str(path)) as repo:
        config = repo.config
        return {name: str(spec.get("url", "")) for name, spec in config["remote"].items()}, config["core"].get("remote")


def is_local(url: str) -> bool:
    return "://" not in url


def share_local_remotes(project: Path, root: Path, env: dict[str, str]) -> None:
    """A local-folder remote is the project's folder: point the worktree's remote of that name at it
    (in .dvc/config.local, untracked), where a relative url would resolve inside the worktree."""
    from dvc.exceptions import NotDvcRepoError

    here, _ = dvc_remotes(project)
    try:
        there, _ = dvc_remotes(root)
    except NotDvcRepoError:
        return
    for name, url in here.items():
        theirs = there.get(name)
        if theirs and is_local(url) and is_local(theirs) and Path(url) != Path(theirs):
            code, out = dvc(project, env, "remote", "modify", "--local", name, "url", theirs)
            if code != 0:
                raise LowbitError(f"could not point the worktree's DVC remote {name!r} at {theirs}: {out}")


def pull(project: Path, root: Path, env: dict[str, str]) -> str:
    """What `dvc pull` did, in one line; an error where the run's inputs cannot be had.

    DVC reports a file it cannot fetch as missing, whether the remote lacks it or could not be
    reached (an HTTP remote that refuses connections reads as empty), so the outcome is judged by
    what arrived: source data (.dvc files) must all be there; a stage output that did not arrive
    is computed by dvc repro, and the line says how many did.
    """
    sources, outputs = dvc_tracked(project)
    if not sources and not outputs:
        return "nothing to pull: the commit has no dvc.lock and no .dvc files, so dvc repro computes every stage"
    share_local_remotes(project, root, env)
    remotes, default = dvc_remotes(project)
    if not remotes or not default:
        if sources:
            raise LowbitError(f"the commit tracks {', '.join(sources)} in DVC but configures no default DVC remote "
                              "to fetch them from: add one (dvc remote add -d), commit, run and reproduce again")
        return "no DVC remote configured: dvc repro computes the stage outputs that dvc.lock lists"
    where = f"DVC remote {default!r} ({remotes[default]})"
    code, out = dvc(project, env, "pull", "--allow-missing")  # missing files are judged below, not by DVC's exit
    if code != 0:
        raise LowbitError(f"dvc pull from {where} failed (exit {code}):\n{out}")
    missing = [path for path in sources if not (project / path).exists()]
    if missing:
        raise LowbitError(f"{', '.join(missing)}: tracked by the commit's .dvc files but not fetched from {where}: "
                          "is it reachable? Were they pushed (`dvc push` where they were added)? Then reproduce again")
    fetched = sum((project / path).exists() for path in outputs)
    line = f"dvc pull from {where}: {fetched} of {len(outputs)} stage outputs in dvc.lock present"
    line += f", {len(sources)} source files" if sources else ""
    return line + ("" if fetched == len(outputs) else "; dvc repro computes the others")


# --- 4-5. repro and comparison ---------------------------------------------------------------------

def repro(project: Path, env: dict[str, str], force: bool) -> None:
    # --no-run-cache: a stage that has to run is computed, never restored from DVC's run cache
    # (a cache shared between checkouts would otherwise hand back the original run's outputs).
    code, out = dvc(project, env, "repro", "--no-run-cache", *(["--force"] if force else []), stream=True)
    if code != 0:
        raise LowbitError(f"dvc repro failed in {project} (exit {code}):\n{out}")


def reproduced_metrics(project: Path, variants) -> dict[str, dict[str, float] | None]:
    files = {name: project / "metrics" / f"{name}.json" for name in variants}
    return {name: read_json(path)["metrics"] if path.is_file() else None for name, path in files.items()}


def compare(original: dict[str, dict[str, float]], reproduced: dict[str, dict[str, float] | None],
            tolerance: float) -> list[dict]:
    """One row per variant and quality metric the original has: both figures, |difference|, within tolerance.

    A variant or figure missing from the reproduction is a row that is not ok."""
    rows = []
    for variant, metrics in sorted(original.items()):
        again = reproduced.get(variant) or {}
        for name in (m for m in QUALITY_METRICS if m in metrics):
            before, after = float(metrics[name]), again.get(name)
            if after is None:
                difference, ok = None, False
            elif math.isnan(before) or math.isnan(after):
                difference, ok = None, math.isnan(before) and math.isnan(after)
            else:
                difference = abs(float(after) - before)
                ok = difference <= tolerance
            rows.append({"variant": variant, "metric": name, "original": before, "reproduced": after,
                         "difference": difference, "tolerance": tolerance, "ok": ok})
    return rows


def number(value) -> str:
    return "–" if value is None else f"{value:.8g}"


def largest_difference(rows: list[dict]) -> float:
    return max((row["difference"] for row in rows if row["difference"] is not None), default=0.0)


def format_report(run: RecordedRun, comparison: dict) -> str:
    rows, data = comparison["rows"], comparison["data_hash"]
    lines = [
        f"Reproduction of MLflow run {run.run_id} (commit {run.commit[:12]}, params hash "
        f"{run.tags.get('lowbit.params_hash', '')[:12]}) in {comparison['workdir']}",
        comparison["pull"],
        "",
        "| variant | metric | original | reproduced | abs diff | tolerance | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        state = "ok" if row["ok"] else ("MISSING" if row["reproduced"] is None else "NOT OK")
        difference = "–" if row["difference"] is None else format(row["difference"], ".3g")
        lines.append(f"| {row['variant']} | {row['metric']} | {number(row['original'])} | {number(row['reproduced'])} | "
                     f"{difference} | {row['tolerance']:g} | {state} |")
    if data["original"]:
        lines.append(f"\nprepared data hash: {data['original'][:12]} recorded, {str(data['reproduced'])[:12]} reproduced: "
                     + ("same" if data["ok"] else "DIFFERENT"))
    bad = [row for row in rows if not row["ok"]]
    if comparison["ok"]:
        lines.append(f"Reproduced: all {len(rows)} figures within {comparison['tolerance']:g} "
                     f"(largest difference {largest_difference(rows):.3g}).")
    else:
        named = ", ".join(f"{row['variant']} {row['metric']}" for row in bad[:8]) + (" ..." if len(bad) > 8 else "")
        lines.append(f"NOT reproduced: {len(bad)} of {len(rows)} figures outside the tolerance or missing ({named})"
                     + ("" if data["ok"] else "; the prepared data differ") + ".")
    lines.append(f"comparison: {comparison['report']}")
    return "\n".join(lines)


def tag_outcome(run: RecordedRun, comparison: dict) -> str | None:
    """Record the outcome on the original run; a store gone away since is reported, not fatal."""
    rows = comparison["rows"]
    detail = (f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}: {sum(r['ok'] for r in rows)} of {len(rows)} figures within "
              f"{comparison['tolerance']:g}, largest difference {largest_difference(rows):.3g}, in {comparison['workdir']}")
    try:
        client = open_store(run.uri)
        client.set_tag(run.run_id, "lowbit.reproduced", "ok" if comparison["ok"] else "mismatch")
        client.set_tag(run.run_id, "lowbit.reproduced_detail", detail)
    except Exception as err:  # noqa: BLE001 - the comparison stands whatever the store does now
        return f"(the outcome was not tagged on the run: {str(err)[:200]})"
    return None


def reproduce(root: Path, run_id: str, workdir: Path | None = None, tolerance: float = DEFAULT_TOLERANCE,
              force: bool = False) -> tuple[dict, str]:
    """Re-create `run_id` in a worktree; returns (the comparison, the printed report)."""
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise LowbitError(f"--tolerance {tolerance}: must be a number >= 0")
    from flows.tracking import resolve_uri  # imports MLflow: only for this command, not every `lowbit` call

    root = root.resolve()
    params = load_params(root / "params.yaml")
    run = find_run(resolve_uri(params.tracking.uri, root), run_id)
    check_reproducible(run)
    toplevel = Path(git(root, "rev-parse", "--show-toplevel")).resolve()
    if subprocess.run(["git", "cat-file", "-e", f"{run.commit}^{{commit}}"], cwd=toplevel, capture_output=True).returncode:
        raise LowbitError(f"commit {run.commit} (run {run_id}) is not in the repository at {toplevel}: "
                          "fetch it (git fetch origin), then reproduce again")
    workdir = (workdir or default_workdir(toplevel, run_id)).resolve()
    check_workdir(workdir)

    created = not workdir.exists()
    git(toplevel, "worktree", "add", "--detach", str(workdir), run.commit)
    project = workdir / root.relative_to(toplevel)  # the project may be a folder inside the repository
    env = worktree_env(project)
    try:
        check_worktree_code_and_params(project, env, run.tags.get("lowbit.params_hash", ""))
    except LowbitError:
        remove_worktree(toplevel, workdir, created)  # the check failed before any work: leave nothing behind
        raise
    print(f"reproducing run {run_id} at commit {run.commit[:12]} in {workdir}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        pulled = pull(project, root, env)
        print(pulled, file=sys.stderr, flush=True)
        repro(project, env, force)
    except LowbitError as err:  # the work so far stays for inspection; say how to drop it
        raise LowbitError(f"{err}\nThe worktree {workdir} is kept; remove it with: "
                          f"git worktree remove --force {workdir}") from None

    rows = compare(run.variants, reproduced_metrics(project, run.variants), tolerance)
    meta = project / "data" / "prepared" / "meta.json"
    recorded_data = run.tags.get("lowbit.data_hash", "")
    reproduced_data = read_json(meta).get("data_hash") if meta.is_file() else None
    data = {"original": recorded_data, "reproduced": reproduced_data,
            "ok": not recorded_data or recorded_data == reproduced_data}
    comparison = {
        "run_id": run_id, "commit": run.commit, "params_hash": run.tags.get("lowbit.params_hash"),
        "workdir": str(workdir), "pull": pulled, "forced": force, "seconds": time.perf_counter() - started,
        "tolerance": tolerance,
        "ok": bool(rows) and all(row["ok"] for row in rows) and data["ok"],
        "data_hash": data, "rows": rows, "report": str(project / REPORT_FILE),
    }
    write_json(project / REPORT_FILE, comparison)
    report = format_report(run, comparison)
    note = tag_outcome(run, comparison)
    return comparison, report + (f"\n{note}" if note else "")


# --- the command line ------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_id", metavar="RUN_ID", help="the MLflow pipeline run to re-create (`lowbit run` prints it)")
    parser.add_argument("--workdir", type=Path, metavar="DIR",
                        help="where the worktree goes (default: <repository>-reproduce-<run id prefix> beside it); "
                             "must not exist or be empty")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, metavar="ABS",
                        help=f"largest absolute difference accepted per figure (default {DEFAULT_TOLERANCE:g}: "
                             "identical up to float round-off, as determinism gives on the same CPU kind)")
    parser.add_argument("--force", action="store_true",
                        help="dvc repro --force: recompute every stage, also those the pulled outputs make up to date")


def reproduce_command(args: argparse.Namespace, paths) -> int:
    """0: every figure within tolerance; 1: some are not (bad input and failed steps raise: 2)."""
    comparison, report = reproduce(paths.root, args.run_id, args.workdir, args.tolerance, args.force)
    print(report)
    return 0 if comparison["ok"] else 1
