"""The lowbit pipeline as one Prefect flow; it reads like the pipeline diagram in README.md.

Run: lowbit run        (or: python -m flows.pipeline)

    prepare ──> baseline ──> ptq  ──┐
       │           └──────> qat  ──┤
       ├──────────────────> lora ──┼──> evaluate ──> report ──> track, push
       └──────────────────> qlora ─┘

Each box is a dvc.yaml stage run by `stage_task` (skipped when DVC says it is up
to date). Independent branches run concurrently on Prefect's task runner: threads of this
process, or Dask worker processes (flows/runners.py).

One failing branch does not hide the others: the rest finish, evaluate and report run on
the variants that exist (outside dvc.lock, so `dvc status` still shows what is missing),
the MLflow run ends FAILED with the reasons, and the flow raises StagesFailed.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pandas as pd

from prefect import flow, task
from prefect.runtime import deployment, flow_run

from flows.dvc_stages import push_outputs, retry_unless_refused, run_stage, run_stage_uncommitted
from flows.runners import RunnerChoice, task_runner
from flows.stage_host import stage_env, stage_host
from flows.tracking import Tracker, dvc_lock_outputs, dvc_output_of
from flows.up_to_date import LOCK_TAG, lock_digest
from lowbit.calibration import check_calibration_data
from lowbit.config import Params, load_params
from lowbit.errors import LowbitError, StagesFailed
from lowbit.data import split_digest
from lowbit.io import read_json, sha256_tree
from tasks.plumbing import EXCLUDE_ENV, RESULT_FILE, Paths


# Independent branches, run concurrently up to the task runner's width (`lowbit run --parallel N`):
# ptq and qat start from the FP32 baseline, the adapters from the pretrained model.
BASELINE_BRANCHES = ("ptq", "qat")
ADAPTER_BRANCHES = ("lora", "qlora")
VARIANT_STAGES = ("baseline", *BASELINE_BRANCHES, *ADAPTER_BRANCHES)


@task(name="stage", task_run_name="{stage}")
def stage_task(root: Path, stage: str, force: bool = False, host: str | None = None) -> dict:
    # No retries: a failing stage fails for a reason (bad input, OOM) that a retry repeats.
    # The pid says which process ran it: a Dask worker's, or the flow's own with threads.
    return run_stage(root, stage, force, host) | {"pid": os.getpid()}


@task(name="stage-on-partial-inputs", task_run_name="{stage} (partial)")
def partial_stage_task(root: Path, stage: str, failures: dict[str, str], host: str | None = None) -> dict:
    return run_stage_uncommitted(root, stage, {EXCLUDE_ENV: json.dumps(failures)}, host)


# a remote (S3) can fail transiently; one that refuses the credentials is not retried
@task(name="dvc-push", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_refused)
def push_task(root: Path) -> int:
    return push_outputs(root)


@flow(name="lowbit-pipeline")
def pipeline(root: str = ".", force: bool = False, overrides: tuple[str, ...] = (), refresh_data: bool = False,
             runner: str = RunnerChoice().describe(), fork_stages: bool = True, stage_host_address: str = "") -> dict:
    """`refresh_data` re-reads the source even if DVC sees no change (an hf: dataset, a database
    export): the retraining flow's first step. Equal splits leave every later stage up to date.
    `runner` names where the branches run (recorded: concurrent stages share the cores and
    their timings show it); `pipeline_on` sets it together with the task runner. `fork_stages`:
    stages run in this process's threads are forked from one warm interpreter (flows/stage_host.py)
    instead of each importing the libraries anew; Dask workers run them as subprocesses.
    `stage_host_address`: a host already started (`lowbit run` starts it before Prefect's API, so
    its imports overlap that start-up); empty = start one here."""
    paths = Paths(Path(root).resolve())
    params = load_params(paths.params)
    if stage_host_address or not fork_stages:
        return run_pipeline(paths, params, stage_host_address or None, force, overrides, refresh_data, runner)
    with stage_host(paths.root, stage_env()) as host:
        return run_pipeline(paths, params, host, force, overrides, refresh_data, runner)


def run_pipeline(paths: Paths, params: Params, host: str | None, force: bool, overrides: tuple[str, ...], refresh_data: bool,
                 runner: str) -> dict:
    """The flow's body: stages in pipeline order, failures collected, results tracked."""
    tracker = Tracker(params, paths.root)
    tracker.start({"lowbit.prefect_flow_run_id": str(flow_run.id), "lowbit.overrides": " ".join(overrides),
                   "lowbit.prefect_deployment_id": str(deployment.id or flow_run.parent_deployment_id or ""),
                   "lowbit.runner": runner})
    try:
        outcomes = {"prepare": stage_task(paths.root, "prepare", force or refresh_data, host)}  # nothing can run without it
        tracker.tag("lowbit.data_hash", outcomes["prepare"]["result"]["data_hash"])
        digest = test_digest(paths)
        tracker.tag("lowbit.test_digest", digest)
        check_calibration_possible(paths, params.evaluate.calibration)  # before hours of training, not after
        failures: dict[str, str] = {}
        baseline = stage_task.submit(paths.root, "baseline", force, host)
        adapters = {name: stage_task.submit(paths.root, name, force, host) for name in ADAPTER_BRANCHES}
        collect({"baseline": baseline}, outcomes, failures)
        if "baseline" in failures:
            failures |= {name: "not run: the baseline stage it starts from failed" for name in BASELINE_BRANCHES}
            quantized = {}
        else:
            quantized = {name: stage_task.submit(paths.root, name, force, host) for name in BASELINE_BRANCHES}
        collect(quantized | adapters, outcomes, failures)
        if failures and not any(stage in outcomes for stage in VARIANT_STAGES):
            raise StagesFailed(failures, "No report: every stage that produces a variant failed.")
        for stage in ("evaluate", "report"):
            outcomes[stage] = (partial_stage_task(paths.root, stage, failures, host) if failures
                               else stage_task(paths.root, stage, force, host))
        track_results(tracker, paths, outcomes, digest)
        if failures:
            tracker.tag("lowbit.failed_stages", ",".join(failures))
            raise StagesFailed(failures, (paths.reports / "summary.md").read_text())
        if params.tracking.dvc_push:
            tracker.tag("lowbit.dvc_pushed_files", str(push_task(paths.root)))
    except BaseException as err:
        reasons = err.failures if isinstance(err, StagesFailed) else {}
        tracker.finish("FAILED", "; ".join(f"{k}: {v}" for k, v in reasons.items()) or f"{type(err).__name__}: {err}")
        raise
    tracker.tag(LOCK_TAG, lock_digest(paths))  # what a rerun with nothing changed finds (flows/up_to_date.py)
    tracker.finish("FINISHED")
    return {
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": tracker.uri,
        "ran": [name for name, outcome in outcomes.items() if outcome["ran"]],
        "stage_pids": {name: outcome["pid"] for name, outcome in outcomes.items() if "pid" in outcome},
        "report": (paths.reports / "summary.md").read_text(),
    }


def check_calibration_possible(paths: Paths, method: str) -> None:
    """evaluate.calibration is fitted on the val split: refuse one it cannot be fitted on now."""
    labels = read_json(paths.prepared / "meta.json")["labels"]
    if not labels:  # a causal LM: next-token probabilities are not calibrated per class
        return
    check_calibration_data(method, pd.read_parquet(paths.prepared / "val.parquet")["label"].to_numpy(), len(labels))


def test_digest(paths: Paths) -> str:
    """The test split's content digest: promotion compares models only on equal digests."""
    labels = read_json(paths.prepared / "meta.json")["labels"]
    return split_digest(pd.read_parquet(paths.prepared / "test.parquet"), labels)


def collect(futures: dict, outcomes: dict, failures: dict[str, str]) -> None:
    """Wait for each branch; a failed one goes into `failures` with its error instead of stopping the flow."""
    for name, future in futures.items():
        result = future.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            failures[name] = str(result) if isinstance(result, LowbitError) else f"{type(result).__name__}: {result}"
        else:
            outcomes[name] = result


def track_results(tracker: Tracker, paths: Paths, outcomes: dict, digest: str) -> None:
    """Stage figures on the parent run, one nested run per variant, report artifacts."""
    for stage, outcome in outcomes.items():
        tracker.log_stage(stage, outcome["result"], outcome["ran"])
    rows = {row["variant"]: row["metrics"] for row in read_json(paths.reports / "summary.json")["rows"]}
    dvc_outputs = dvc_lock_outputs(paths.root)
    for variant, metrics in rows.items():
        record = read_json(paths.metrics / f"{variant}.json")
        stage = record["stage"]
        reused = not (outcomes.get(stage, {}).get("ran") or outcomes["evaluate"]["ran"])
        card = paths.root / record["model_dir"] / "lowbit_variant.json"
        calibrator = paths.metrics / "calibrators" / f"{variant}.json"
        dvc_out, dvc_md5 = dvc_output_of(dvc_outputs, record["model_dir"])
        lineage = {"lowbit.model_dir": record["model_dir"], "lowbit.model_sha256": sha256_tree(card.parent),
                   "lowbit.dvc_out": dvc_out, "lowbit.dvc_out_md5": dvc_md5, "lowbit.test_digest": digest}
        tracker.log_variant(record, metrics, stage, reused, [paths.metrics / f"{variant}.json", card, calibrator], lineage)
    tracker.log_artifacts([
        paths.params, paths.root / "dvc.lock", paths.reports / "summary.md", paths.reports / "pareto.png",
        paths.reports / "reliability.png", paths.reports / "confusion.png", paths.reports / "summary.json",
        paths.prepared / "meta.json", paths.prepared / RESULT_FILE,
    ])


def pipeline_on(runner: RunnerChoice):
    """The flow with its branches on `runner` (params.yaml `runner`, or the command line's)."""
    return functools.partial(pipeline.with_options(task_runner=task_runner(runner)), runner=runner.describe(),
                             fork_stages=runner.kind == "threads")


if __name__ == "__main__":
    print(pipeline_on(RunnerChoice())()["report"])
