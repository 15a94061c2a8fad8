"""The retraining flow against real servers over HTTP: `lowbit retrain` on a tiny project whose
params.yaml points at an `mlflow server` (PostgreSQL store, artifacts in S3), an S3 DVC remote
(moto's standalone server) and, through PREFECT_API_URL, a `prefect server`. Everything is then
read back from the servers: runs and their lineage, the registered version, @champion, version
tags, the objects in the bucket, the flow runs. One retrain (minutes on 2 cores) serves every
assertion; the last test runs the pipeline again with a wrong S3 secret."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from lowbit.config import load_params
from lowbit.io import read_json, sha256_tree
from tests.conftest import TINY, make_project
from tests.servers.conftest import client_env, lowbit
from tests.tiny_model import tiny_classifier_dir

pytestmark = pytest.mark.servers
MODEL = "lowbit-classifier"
# An mlflow server storing artifacts in S3 offers clients presigned S3 URLs for large downloads;
# moto 5.2.5 with IAM authentication on answers those with a 500 (it looks for an Authorization
# header), so clients here download through the server instead. Real S3 serves them.
THROUGH_THE_SERVER = {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, mlflow_server, prefect_server, s3):
    """One `lowbit retrain`, configured by params.yaml (tracking.uri, artifact_location,
    dvc_remote) and the environment (PREFECT_API_URL, AWS_*) only."""
    tmp = tmp_path_factory.mktemp("retrain")
    model = tiny_classifier_dir(tmp / "tiny", num_labels=2, hidden_size=64, init_std=0.2)
    root = make_project(tmp / "project", TINY | {
        "model.name": str(model), "ptq.schemes": ["int8_dynamic"], "promote.max_accuracy_drop": 100.0,
        "tracking.uri": mlflow_server.url, "tracking.artifact_location": "mlflow-artifacts:/lowbit",
        "tracking.dvc_push": True, "tracking.dvc_remote": f"s3://{s3.bucket}/dvc"})
    env = client_env(tmp, PREFECT_API_URL=prefect_server.api_url, **s3.env(), **THROUGH_THE_SERVER)
    status, out, err, seconds = lowbit(root, "retrain", env=env)
    assert status == 0, f"{out[-3000:]}\n{err[-5000:]}"
    print(f"\nlowbit retrain against the servers: {seconds:.0f} s")
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name("lowbit")
    [run] = client.search_runs([experiment.experiment_id], "tags.`lowbit.kind` = 'pipeline'")
    return SimpleNamespace(root=root, out=out, env=env, client=client, experiment=experiment, run=run, tmp=tmp)


def test_the_pipeline_run_and_its_variant_runs_are_on_the_mlflow_server(retrained, mlflow_server):
    run, client = retrained.run, retrained.client
    assert "is now lowbit-classifier@champion — no champion yet" in retrained.out
    assert retrained.experiment.artifact_location == "mlflow-artifacts:/lowbit"  # through the server
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    params = load_params(retrained.root / "params.yaml")
    assert tags["lowbit.params_hash"] == params.digest() and len(tags["lowbit.git_commit"]) == 40
    assert tags["lowbit.git_dirty"] == "false" and len(tags["lowbit.data_hash"]) == 64
    assert len(tags["lowbit.test_digest"]) == 64 and tags["lowbit.promotion"] == "promoted"
    assert int(tags["lowbit.dvc_pushed_files"]) > 0
    children = client.search_runs([retrained.experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    variants = {child.data.tags["lowbit.variant"]: child for child in children}
    assert {"fp32", "ptq_int8_dynamic", "lora", "qlora"} <= set(variants), sorted(variants)
    lock = dvc_lock(retrained.root)
    for name, child in variants.items():
        lineage = child.data.tags
        assert child.info.status == "FINISHED" and lineage["lowbit.test_digest"] == tags["lowbit.test_digest"]
        assert lineage["lowbit.model_sha256"] == sha256_tree(retrained.root / lineage["lowbit.model_dir"]), name
        assert lock[lineage["lowbit.dvc_out"]] == lineage["lowbit.dvc_out_md5"], name
        assert 0.0 <= child.data.metrics["accuracy"] <= 1.0
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"params.yaml", "dvc.lock", "summary.md"} <= artifacts


def test_the_champion_is_registered_with_its_lineage_and_serves(retrained, mlflow_server):
    import mlflow

    client, run = retrained.client, retrained.run
    assert [int(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")] == [1]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert int(champion.version) == 1
    tags = champion.tags
    assert tags["lowbit.pipeline_run_id"] == run.info.run_id and tags["lowbit.promotion"] == "promoted"
    assert tags["lowbit.params_hash"] == run.data.tags["lowbit.params_hash"]
    assert tags["lowbit.prefect_flow_run_id"] == run.data.tags["lowbit.prefect_flow_run_id"]
    assert tags["lowbit.dvc_out_md5"] == dvc_lock(retrained.root)[tags["lowbit.dvc_out"]]
    assert float(tags["lowbit.metric.weight_bytes"]) > 0
    history = client.get_experiment_by_name("lowbit-registry")
    [move] = client.search_runs([history.experiment_id])
    assert move.data.tags["lowbit.alias"] == "champion" and move.data.tags["lowbit.to_version"] == "1"
    # the registered pyfunc comes back from S3 through the server and predicts
    mlflow.set_tracking_uri(mlflow_server.url)
    with mock.patch.dict(os.environ, THROUGH_THE_SERVER):
        served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(
            pd.DataFrame({"text": ["a great film", "an awful film"]}))
    probabilities = served[[c for c in served.columns if c.startswith("prob_")]]
    labels = read_json(retrained.root / "data" / "prepared" / "meta.json")["labels"]
    assert list(probabilities.columns) == [f"prob_{label}" for label in labels]
    assert ((probabilities.sum(axis=1) - 1).abs() < 1e-4).all()


def test_artifacts_and_dvc_objects_are_in_the_bucket(retrained, s3):
    run_id = retrained.run.info.run_id
    mlflow_keys = s3.keys("mlflow/")
    assert any(key.startswith("mlflow/lowbit/") and run_id in key and key.endswith("/summary.md") for key in mlflow_keys)
    assert any(key.endswith("/MLmodel") for key in mlflow_keys)  # the registered pyfunc
    dvc_keys = set(s3.keys("dvc/"))
    uncached = not_cached(retrained.root)
    outputs = {path: md5 for path, md5 in dvc_lock(retrained.root).items() if path not in uncached}
    assert any(path.startswith("models/") for path in outputs)
    for path, md5 in outputs.items():  # every cached output, directories as their .dir lists
        assert f"dvc/files/md5/{md5[:2]}/{md5[2:]}" in dvc_keys, path


def test_the_flow_runs_are_on_the_prefect_server(retrained, prefect_server):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    pipeline_run_id = retrained.run.data.tags["lowbit.prefect_flow_run_id"]
    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}), get_client(sync_client=True) as client:
        # sort and limit given: the sync client sends None for them, which the server refuses (422)
        retrains = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["lowbit-retrain"])),
                                         sort=FlowRunSort.START_TIME_DESC, limit=50)
        [pipeline] = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[pipeline_run_id])),
                                           sort=FlowRunSort.START_TIME_DESC, limit=50)
        flow = client.read_flow(pipeline.flow_id)
        limit = client.read_global_concurrency_limit_by_name(f"lowbit-promote-{MODEL}")
    [retrain] = [r for r in retrains if r.parameters.get("root") == str(retrained.root)]
    assert retrain.state.is_completed() and pipeline.state.is_completed()
    assert flow.name == "lowbit-pipeline" and pipeline.parent_task_run_id is not None  # a subflow of the retrain
    assert limit.limit == 1 and limit.active_slots == 0


def test_the_deployment_in_prefect_yaml_runs_from_a_work_pool_and_a_retrain_with_nothing_changed_moves_nothing(
        retrained, prefect_server):
    """prefect.yaml as a user deploys it: a process work pool, `prefect deploy --all`, a run of the
    deployment, a worker that picks it up. The data did not change since the first retrain, so
    every training stage is up to date and promotion finds the champion's own files."""
    import subprocess

    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root, client = retrained.root, retrained.client
    env = retrained.env | {"LOWBIT_ROOT": str(root)}

    def prefect(*args: str, timeout: float = 120) -> str:
        done = subprocess.run(["prefect", "--no-prompt", *args], cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    prefect("work-pool", "create", "lowbit", "--type", "process", "--overwrite")
    prefect("deploy", "--all")
    queued = prefect("deployment", "run", "lowbit-retrain/weekly-retrain")
    flow_run_id = next(line.split()[-1] for line in queued.splitlines() if "UUID" in line)
    prefect("worker", "start", "--pool", "lowbit", "--run-once", timeout=900)

    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}), get_client(sync_client=True) as prefect_client:
        flow_run = prefect_client.read_flow_run(flow_run_id)
        deployment = prefect_client.read_deployment(flow_run.deployment_id)
    assert flow_run.state.is_completed(), flow_run.state
    assert deployment.name == "weekly-retrain" and deployment.work_pool_name == "lowbit"
    [latest, first] = client.search_runs([retrained.experiment.experiment_id], "tags.`lowbit.kind` = 'pipeline'",
                                         order_by=["attributes.start_time DESC"])
    assert first.info.run_id == retrained.run.info.run_id
    assert latest.info.status == "FINISHED" and latest.data.tags["lowbit.prefect_deployment_id"] == str(deployment.id)
    assert latest.data.tags["lowbit.promotion"] == "rejected"  # the same files as @champion: nothing to promote
    assert [int(v.version) for v in client.search_model_versions(f"name = '{MODEL}'")] == [1]
    assert int(client.get_model_version_by_alias(MODEL, "champion").version) == 1


def test_a_push_with_a_wrong_s3_secret_fails_clearly_in_bounded_time_and_loses_nothing(retrained, s3, prefect_server):
    root, client = retrained.root, retrained.client
    before = {"dvc.lock": digest(root / "dvc.lock"), "models": sha256_tree(root / "models"),
              "versions": len(client.search_model_versions(f"name = '{MODEL}'"))}
    env = retrained.env | s3.env(AWS_SECRET_ACCESS_KEY="not-the-secret")
    # A param no DVC stage reads: every stage stays up to date, but this is not the recorded run
    # (params hash), so the flow runs, logs, and pushes. With nothing changed at all, `lowbit run`
    # would answer from the finished run that already pushed these outputs, and push nothing.
    status, out, err, seconds = lowbit(root, "run", "-P", "runner.parallel=1", env=env, timeout=600)
    assert status == 2, f"{out[-2000:]}\n{err[-4000:]}"
    assert f"lowbit: error: dvc push to tracking.dvc_remote s3://{s3.bucket}/dvc (DVC remote 'lowbit' in .dvc/config.local) failed" in err
    assert "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL" in err
    assert "or set tracking.dvc_remote in params.yaml" in err
    print(f"\nlowbit run with a wrong S3 secret: exit 2 after {seconds:.0f} s:\n"
          + next(line for line in err.splitlines() if line.startswith("lowbit: error:")))
    assert seconds < 180  # Prefect, MLflow logging, DVC status: the push itself fails at once
    after = {"dvc.lock": digest(root / "dvc.lock"), "models": sha256_tree(root / "models"),
             "versions": len(client.search_model_versions(f"name = '{MODEL}'"))}
    assert after == before
    runs = client.search_runs([retrained.experiment.experiment_id], "tags.`lowbit.kind` = 'pipeline'",
                              order_by=["attributes.start_time DESC"])
    assert [r.info.status for r in runs][:2] == ["FAILED", "FINISHED"]
    assert "tracking.dvc_remote" in runs[0].data.tags["lowbit.error"]
    [push] = task_runs(prefect_server.api_url, runs[0].data.tags["lowbit.prefect_flow_run_id"], "dvc-push")
    assert push.state.is_failed() and push.run_count == 1  # a refusal is not retried (retries=2 are for transient errors)


def task_runs(api_url: str, flow_run_id: str, name: str) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, TaskRunFilter, TaskRunFilterName
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=name)),
                                     sort=TaskRunSort.EXPECTED_START_TIME_DESC, limit=50)


def dvc_lock(root: Path) -> dict[str, str]:
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {out["path"].rstrip("/"): out["md5"] for stage in stages.values() for out in stage.get("outs", [])}


def not_cached(root: Path) -> set[str]:
    """Outputs dvc.yaml keeps out of the cache (`cache: false`, e.g. reports/summary.json): git holds them."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    entries = [entry for stage in stages.values() for kind in ("outs", "metrics", "plots") for entry in stage.get(kind, [])]
    return {path for entry in entries if isinstance(entry, dict)
            for path, options in entry.items() if (options or {}).get("cache") is False}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
