"""MLflow tracking: one parent run per pipeline run, one nested run per variant.

The only module in lowbit/ that imports MLflow. The store is `tracking.uri` from
params.yaml (a local SQLite file by default) unless MLFLOW_TRACKING_URI is set.

Parent run tags: lowbit.kind=pipeline, lowbit.git_commit, lowbit.git_dirty, lowbit.params_hash,
lowbit.data_hash, lowbit.test_digest, lowbit.prefect_flow_run_id, lowbit.prefect_deployment_id,
lowbit.overrides. Nested run per variant: its stage's params, its evaluation metrics (the names
in metrics/<variant>.json), the producing stage's figures (a name that collides with an
evaluation metric gets a `train_` prefix, e.g. train_peak_rss_bytes), its metrics JSON and card
as artifacts, and lineage tags: lowbit.variant, lowbit.format, lowbit.stage, lowbit.model_dir,
lowbit.model_sha256 (its files), lowbit.dvc_out / lowbit.dvc_out_md5 (the DVC output holding it,
as in dvc.lock), lowbit.test_digest.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from flows.mlflow_store import bound_http_waits, store_errors
from lowbit.config import Params, flatten

MAX_PARAM_CHARS = 6000


def resolve_uri(uri: str, root: Path) -> str:
    """MLFLOW_TRACKING_URI wins; a relative sqlite path is taken relative to the project root."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.removeprefix(prefix).startswith("/"):
        return prefix + str((root / uri.removeprefix(prefix)).resolve())
    return uri


def git_state(root: Path) -> tuple[str, bool]:
    """(commit sha or 'unknown', whether tracked files differ from it)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown", True


def dvc_lock_outputs(root: Path) -> dict[str, str]:
    """Every output path in dvc.lock with its md5; empty without dvc.lock."""
    lock = root / "dvc.lock"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.is_file() else {}
    return {out["path"].rstrip("/"): out.get("md5", "") for stage in stages.values() for out in stage.get("outs", [])}


def dvc_output_of(outputs: dict[str, str], model_dir: str) -> tuple[str, str]:
    """(path, md5) of the dvc.lock output that holds `model_dir` (e.g. models/ptq for
    models/ptq/ptq_int8_dynamic); ("", "") when dvc.lock does not list it (a partial run)."""
    for path, md5 in outputs.items():
        if model_dir == path or model_dir.startswith(path + "/"):
            return path, md5
    return "", ""


def numeric_items(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def finished_pipeline_run(params: Params, root: Path, tags: dict[str, str]) -> str | None:
    """The newest FINISHED pipeline run in the project's experiment carrying all `tags`, or None."""
    uri = resolve_uri(params.tracking.uri, root)
    bound_http_waits()
    client = MlflowClient(tracking_uri=uri)
    with store_errors(uri):
        experiment = client.get_experiment_by_name(params.tracking.experiment)
        if experiment is None:
            return None
        conditions = ["tags.`lowbit.kind` = 'pipeline'", "attributes.status = 'FINISHED'",
                      *(f"tags.`{key}` = '{value}'" for key, value in tags.items())]
        runs = client.search_runs([experiment.experiment_id], " and ".join(conditions), max_results=1,
                                  order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


class Tracker:
    """Writes one pipeline run to MLflow through an explicit client (thread-safe, no global active run)."""

    def __init__(self, params: Params, root: Path) -> None:
        self.root = root
        self.params = params
        self.uri = resolve_uri(params.tracking.uri, root)
        bound_http_waits()
        self.client = MlflowClient(tracking_uri=self.uri)
        # the run's first request: a store that is down or refuses the user is said here, with what to set
        with store_errors(self.uri):
            self.experiment_id = self._experiment(params.tracking.experiment, params.tracking.artifact_location)
        self.run_id: str | None = None

    def _experiment(self, name: str, artifact_location: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        # a URI (s3://..., mlflow-artifacts:/prefix for the server's --artifacts-destination) as it
        # is; anything else is a folder relative to the project
        is_uri = re.match(r"[A-Za-z][A-Za-z0-9+.-]+:", artifact_location) is not None
        location = artifact_location if is_uri else (self.root / artifact_location).resolve().as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def start(self, tags: dict[str, str]) -> str:
        commit, dirty = git_state(self.root)
        all_tags = {
            "lowbit.kind": "pipeline",
            "lowbit.git_commit": commit,
            "lowbit.git_dirty": str(dirty).lower(),
            "lowbit.params_hash": self.params.digest(),
            "mlflow.source.git.commit": commit,
            **tags,
        }
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=f"pipeline-{time.strftime('%Y%m%d-%H%M%S')}")
        self.run_id = run.info.run_id
        self._log(self.run_id, params=flatten("", self.params.model_dump()))
        return self.run_id

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_stage(self, stage: str, result: dict, ran: bool) -> None:
        """Stage-level figures on the parent run, prefixed by the stage name (prepare.stage_seconds, ...)."""
        self._log(self.run_id, metrics=numeric_items(flatten(stage, result)))
        self.tag(f"lowbit.stage.{stage}", "ran" if ran else "up-to-date")

    def log_variant(self, record: dict, row_metrics: dict, stage: str, reused: bool, artifacts: list[Path],
                    lineage: dict[str, str]) -> str:
        variant = record["variant"]
        run = self.client.create_run(
            self.experiment_id, run_name=variant,
            tags={"mlflow.parentRunId": self.run_id, "lowbit.kind": "variant", "lowbit.variant": variant,
                  "lowbit.format": record["format"], "lowbit.stage": stage, "lowbit.reused": str(reused).lower(),
                  **lineage},
        )
        sections = ["model", "determinism", stage] if stage in Params.model_fields else ["model", "determinism"]
        params = {k: v for s in sections for k, v in flatten(s, self.params.section(s)).items()}
        evaluation = numeric_items(row_metrics)
        producer = {
            (f"train_{k}" if k in evaluation else k): v
            for k, v in numeric_items(record.get("producer", {})).items()
        }
        self._log(run.info.run_id, params=params, metrics=evaluation | producer)
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(run.info.run_id, str(path))
        self.client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if path.exists():
                self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str, error: str | None = None) -> None:
        if error:
            self.tag("lowbit.error", error[:5000])
        self.client.set_terminated(self.run_id, status)

    def _log(self, run_id: str, params: dict | None = None, metrics: dict | None = None) -> None:
        now = int(time.time() * 1000)
        metric_list = [Metric(k, v, now, 0) for k, v in (metrics or {}).items()]
        param_list = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in (params or {}).items()]
        for start in range(0, max(len(metric_list), len(param_list)), 100):  # MLflow batch limit: 100 params
            self.client.log_batch(run_id, metrics=metric_list[start:start + 100], params=param_list[start:start + 100])

