"""Promotion: pick the best variant of a pipeline run under the `promote` policy, register it,
and move `@champion` only if it beats the current champion on the same test split.

    lowbit promote [--run RUN_ID]       # the latest finished pipeline run by default
    lowbit retrain                      # pipeline, then this step (flows/retrain.py)

1. Eligible variants: at most `max_accuracy_drop` points below their own run's fp32
   (`accuracy_delta`), within `max_weight_bytes` / `max_latency_ms_p50` when set.
2. The challenger is the eligible variant with the best `objective`.
3. It is registered as a model version with its lineage (a version holding the same files is
   reused: a retrain that changed nothing registers nothing new).
4. Inside a Prefect global concurrency limit (strict: no limit, no promotion), the champion is
   read again (MLflow has no compare-and-set on aliases: two runs at once must not both move
   it), and the gate decides with mlflow.validate_evaluation_results: the objective at least
   `min_improvement` (relative) better, and accuracy at most `accuracy_tolerance` points below
   the champion's. Both are scored on the same test split: when the champion was scored on
   another split (its version's lowbit.test_digest differs), it is re-scored on this run's
   test split first through its registered pyfunc. Size figures do not depend on the split;
   latency and throughput are compared as recorded, so they are only meaningful between runs
   on the same kind of machine.
5. Promoted: @previous <- old champion, @champion <- challenger, both moves recorded.
   Rejected: no alias changes; the version and the pipeline run get lowbit.promotion=rejected
   and lowbit.promotion_reason.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.models import MetricThreshold
from mlflow.models.evaluation import EvaluationResult

from flows.mlflow_store import VariantRun, variant_runs
from flows.registry import Registry
from lowbit.config import PROMOTION_OBJECTIVES, Params, PromoteParams
from lowbit.errors import LowbitError
from lowbit.io import read_json, sha256_tree
from lowbit.statistics import point_metrics
from tasks.plumbing import Paths

# Copied from the variant's run onto its model version, so the registry alone says what a version is.
LINEAGE_TAGS = ("lowbit.git_commit", "lowbit.git_dirty", "lowbit.params_hash", "lowbit.data_hash",
                "lowbit.prefect_flow_run_id", "lowbit.prefect_deployment_id")
VARIANT_TAGS = ("lowbit.variant", "lowbit.format", "lowbit.test_digest", "lowbit.model_dir", "lowbit.model_sha256",
                "lowbit.dvc_out", "lowbit.dvc_out_md5")
KEY_METRICS = ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "f1_macro", "accuracy_delta", "weight_bytes",
               "latency_ms_p50", "throughput_samples_s")
QUALITY_METRICS = ("accuracy", "f1_macro")  # what re-scoring on another split replaces
PROMOTION_LIMIT_WAIT_S = 1800


@dataclass
class Decision:
    promoted: bool
    reason: str
    challenger: VariantRun | None = None
    version: str | None = None
    champion_version: str | None = None
    skipped: list[str] = field(default_factory=list)

    @property
    def outcome(self) -> str:
        return "promoted" if self.promoted else "rejected"

    def line(self, model: str) -> str:
        if self.challenger is None:
            return f"promotion: rejected — {self.reason}"
        what = f"{self.challenger.variant} (v{self.version})"
        if self.promoted:
            return f"promotion: {what} is now {model}@champion — {self.reason}"
        return f"promotion: rejected {what}; {model}@champion stays v{self.champion_version or '-'} — {self.reason}"


# --- the policy (pure) -------------------------------------------------------------------------


def ineligibility(candidate: VariantRun, policy: PromoteParams) -> str | None:
    """Why a variant cannot be promoted under the policy, or None."""
    m = candidate.metrics
    for needed in (policy.objective, "accuracy", "accuracy_delta"):
        if needed not in m or not math.isfinite(m[needed]):
            return f"no {needed} recorded"
    if m["accuracy_delta"] < -policy.max_accuracy_drop:
        return f"{-m['accuracy_delta']:.2f} points below fp32 > promote.max_accuracy_drop {policy.max_accuracy_drop}"
    if policy.max_weight_bytes is not None and m.get("weight_bytes", math.inf) > policy.max_weight_bytes:
        return f"weight_bytes {m.get('weight_bytes'):.0f} > promote.max_weight_bytes {policy.max_weight_bytes}"
    if policy.max_latency_ms_p50 is not None and m.get("latency_ms_p50", math.inf) > policy.max_latency_ms_p50:
        return f"latency_ms_p50 {m.get('latency_ms_p50'):.2f} > promote.max_latency_ms_p50 {policy.max_latency_ms_p50}"
    return None


def pick_challenger(candidates: list[VariantRun], policy: PromoteParams) -> tuple[VariantRun | None, list[str]]:
    """The eligible variant with the best objective (ties: higher accuracy, then name) and why others were skipped."""
    skipped, eligible = [], []
    for candidate in candidates:
        why = ineligibility(candidate, policy)
        (skipped.append(f"{candidate.variant}: {why}") if why else eligible.append(candidate))
    if not eligible:
        return None, skipped
    sign = 1.0 if PROMOTION_OBJECTIVES[policy.objective] else -1.0
    best = max(eligible, key=lambda c: (sign * c.metrics[policy.objective], c.metrics["accuracy"], c.variant))
    return best, skipped


def gate(challenger: dict[str, float], champion: dict[str, float], policy: PromoteParams) -> str | None:
    """None if the challenger beats the champion under the policy, else the reason it does not."""
    thresholds = {policy.objective: MetricThreshold(min_relative_change=float(policy.min_improvement),
                                                    greater_is_better=PROMOTION_OBJECTIVES[policy.objective])}
    if policy.objective != "accuracy":  # an objective other than accuracy must not cost accuracy beyond the tolerance
        thresholds["accuracy"] = MetricThreshold(threshold=champion["accuracy"] - policy.accuracy_tolerance / 100,
                                                 greater_is_better=True)
    try:
        mlflow.validate_evaluation_results(thresholds, EvaluationResult(challenger, {}), EvaluationResult(champion, {}))
    except MlflowException as err:
        return " ".join(str(err.message).split())
    return None


# --- reading a pipeline run ----------------------------------------------------------------------


def pipeline_run(client: MlflowClient, experiment: str, run_id: str | None) -> Run:
    """The given pipeline run, or the latest finished one in `experiment`."""
    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise LowbitError(f"MLflow run {run_id!r} does not exist in {client.tracking_uri}") from None
        if run.data.tags.get("lowbit.kind") != "pipeline":
            raise LowbitError(f"MLflow run {run_id} is not a lowbit pipeline run (tag lowbit.kind=pipeline)")
        return run
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], "tags.`lowbit.kind` = 'pipeline' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1) if found else []
    if not runs:
        raise LowbitError(f"no finished pipeline run in MLflow experiment {experiment!r} ({client.tracking_uri}); "
                          "run `lowbit run` first")
    return runs[0]


def candidates_of(client: MlflowClient, run: Run) -> list[VariantRun]:
    """The run's variants that carry lineage (every variant run lowbit logs is tagged lowbit.variant)."""
    return [v for v in variant_runs(client, run) if "lowbit.variant" in v.tags]


def version_tags(run: Run, candidate: VariantRun) -> dict[str, str]:
    tags = {key: run.data.tags.get(key, "") for key in LINEAGE_TAGS}
    tags |= {key: candidate.tags.get(key, "") for key in VARIANT_TAGS}
    tags |= {f"lowbit.metric.{name}": f"{candidate.metrics[name]:.6g}" for name in KEY_METRICS if name in candidate.metrics}
    tags |= {"lowbit.pipeline_run_id": run.info.run_id, "lowbit.variant_run_id": candidate.run_id}
    return tags


# --- the step ----------------------------------------------------------------------------------


@contextlib.contextmanager
def promotion_lock(registered_model: str):
    """One promotion of a registered model at a time, across processes and machines: a Prefect
    global concurrency limit of 1, strict (if Prefect cannot hold it, nothing is promoted)."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency

    from prefect.exceptions import ObjectAlreadyExists

    name = f"lowbit-promote-{registered_model}"
    with get_client(sync_client=True) as prefect, contextlib.suppress(ObjectAlreadyExists):
        prefect.upsert_global_concurrency_limit_by_name(name, 1)  # not atomic: a concurrent run may create it first
    with concurrency(name, occupy=1, strict=True, timeout_seconds=PROMOTION_LIMIT_WAIT_S):
        yield


def rescore(registry: Registry, version: str, paths: Paths) -> dict[str, float]:
    """The champion's quality on this workspace's test split, through its registered pyfunc."""
    test = pd.read_parquet(paths.prepared / "test.parquet")
    labels = read_json(paths.prepared / "meta.json")["labels"]
    model = mlflow.pyfunc.load_model(f"models:/{registry.name}/{version}")
    predicted = model.predict(test[["text"]])
    columns = [f"prob_{name}" for name in labels]
    missing = [c for c in columns if c not in predicted.columns]
    if missing:
        raise LowbitError(f"champion v{version} predicts other labels than this test split ({labels}); "
                          "it cannot be compared on it — promote by hand or roll back")
    metrics = point_metrics(predicted[columns].to_numpy(), test["label"].to_numpy())
    return {name: metrics[name] for name in QUALITY_METRICS}


def champion_metrics(registry: Registry, champion, digest: str, paths: Paths) -> tuple[dict[str, float], str]:
    recorded = dict(registry.client.get_run(champion.run_id).data.metrics)
    if champion.tags.get("lowbit.test_digest") == digest:
        return recorded, "same test split"
    rescored = rescore(registry, str(champion.version), paths)
    registry.tag(str(champion.version), {f"lowbit.rescored.{digest[:12]}.{k}": f"{v:.6g}" for k, v in rescored.items()})
    return recorded | rescored, f"champion re-scored on this run's test split (accuracy {rescored['accuracy']:.4f})"


def promote(paths: Paths, params: Params, run_id: str | None = None) -> Decision:
    """The promotion step on pipeline run `run_id` (default: the latest finished one)."""
    policy = params.promote  # validated at load: objective is a known metric, aliases usable
    if params.model.task != "sequence_classification":
        # eligibility, the gate and re-scoring a champion are defined on classification accuracy
        raise LowbitError(f"promotion ranks classifiers (accuracy on a labelled test split); params.yaml model.task is "
                          f"{params.model.task}: compare its variants in the report (reports/summary.md) instead")
    registry = Registry.open(params, paths.root)
    run = pipeline_run(registry.client, params.tracking.experiment, run_id)
    if run.info.status != "FINISHED":
        raise LowbitError(f"pipeline run {run.info.run_id} ended {run.info.status}: only a complete run is promoted")
    registry.check_writable(run)  # a server that would refuse a write refuses before anything is registered
    challenger, skipped = pick_challenger(candidates_of(registry.client, run), policy)
    if challenger is None:
        decision = Decision(False, "no variant is eligible: " + "; ".join(skipped))
    else:
        number = register_challenger(registry, run, challenger, paths, params)
        digest = run.data.tags.get("lowbit.test_digest", "")  # missing on runs older than the tag: re-scored
        with promotion_lock(registry.name):
            champion = registry.version_at(registry.champion)  # read again inside the lock: another run may have just moved it
            decision = decide(registry, champion, challenger, number, digest, paths, policy)
            context = {"lowbit.pipeline_run_id": run.info.run_id}
            if decision.promoted:
                if champion is not None:
                    registry.move(registry.previous, str(champion.version), "promote", f"replaced by v{number}", context)
                registry.move(registry.champion, number, "promote", decision.reason, context)
        registry.tag(number, {"lowbit.promotion": decision.outcome, "lowbit.promotion_reason": decision.reason})
    decision.skipped = skipped
    for key, value in {"lowbit.promotion": decision.outcome, "lowbit.promotion_reason": decision.reason[:5000],
                       "lowbit.promotion_version": decision.version or ""}.items():
        registry.client.set_tag(run.info.run_id, key, value)
    return decision


def register_challenger(registry: Registry, run: Run, challenger: VariantRun, paths: Paths, params: Params) -> str:
    """The challenger's model version: an existing one holding the same files (a retrain that
    changed nothing), else its files logged as a pyfunc and registered with their lineage."""
    from flows.model_artifacts import log_variant_model

    model_dir = paths.root / challenger.tags["lowbit.model_dir"]
    if not model_dir.is_dir() or sha256_tree(model_dir) != challenger.tags.get("lowbit.model_sha256"):
        raise LowbitError(f"{model_dir} is not the model run {run.info.run_id} evaluated (its files changed since); "
                          f"`git checkout {run.data.tags.get('lowbit.git_commit', '')[:12]} && dvc checkout` it, "
                          "or promote the latest run")
    version = registry.version_with_files(challenger.tags["lowbit.model_sha256"])
    if version is None:
        calibrator = paths.metrics / "calibrators" / f"{challenger.variant}.json"
        labels = read_json(paths.prepared / "meta.json")["labels"]
        uri = log_variant_model(registry.client.tracking_uri, challenger.run_id, model_dir, params.model, labels,
                                calibrator if calibrator.is_file() else None)
        version = registry.register(uri, challenger.run_id, version_tags(run, challenger))
    return str(version.version)  # MLflow 3 gives an int here, a str elsewhere


def decide(registry: Registry, champion, challenger: VariantRun, version: str, digest: str, paths: Paths,
           policy: PromoteParams) -> Decision:
    if champion is None:
        return Decision(True, "no champion yet", challenger, version)
    held = str(champion.version)
    if held == version:
        return Decision(False, f"v{version} is already the champion (same model files)", challenger, version,
                        held)
    reference, how = champion_metrics(registry, champion, digest, paths)
    why_not = gate(challenger.metrics, reference, policy)
    objective = policy.objective
    versus = f"{objective} {challenger.metrics[objective]:.6g} vs champion v{held} {reference.get(objective, float('nan')):.6g} ({how})"
    if why_not:
        return Decision(False, f"{versus}; {why_not}", challenger, version, held)
    return Decision(True, f"{versus}; beats it by at least promote.min_improvement {policy.min_improvement}",
                    challenger, version, held)

