"""The real pipeline on a tiny builtin dataset: dvc repro, Prefect flow runs, MLflow store, failures."""

import subprocess
import time

import numpy as np
import pytest
from dvc.repo import Repo
from mlflow import MlflowClient

from flows.pipeline import pipeline
from flows.cli import main as lowbit_main
from lowbit.errors import LowbitError
from lowbit.io import read_json, sha256_tree
from tests.conftest import set_params, venv_env


def dvc_clean(root) -> bool:
    with Repo(str(root)) as repo:
        return repo.status() == {}


def pipeline_runs(root):
    client = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    experiment = client.get_experiment_by_name("lowbit")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_dvc_repro_and_the_flow_share_one_lock_and_rerun_only_what_changed(tiny_project, capsys):
    root = tiny_project
    subprocess.run(["dvc", "repro"], cwd=root, check=True, env=venv_env())
    fp32 = read_json(root / "metrics" / "fp32.json")
    # the accuracy metric module and sklearn's confusion matrix, computed apart, must agree on every variant
    for path in (root / "metrics").glob("*.json"):
        if path.stem != "lowbit_stage":
            record = read_json(path)
            matrix = np.array(record["per_class"]["confusion_matrix"])
            assert record["metrics"]["accuracy"] == pytest.approx(np.trace(matrix) / matrix.sum()), path.stem
    assert fp32["metrics"]["weight_bytes"] > 80 * 2**20
    m = fp32["metrics"]
    assert m["accuracy_ci_low"] <= m["accuracy"] <= m["accuracy_ci_high"] and m["accuracy_ci_high"] - m["accuracy_ci_low"] > 0.01
    assert m["accuracy_delta"] == 0.0 and m["mcnemar_p_value"] == 1.0 and m["accuracy_delta_significant"] == 0.0
    assert m["serving_memory_bytes"] == m["peak_rss_bytes"] - m["import_floor_bytes"] >= m["weight_bytes"]
    assert m["ece_calibrated"] >= 0 and read_json(root / "metrics" / "calibrators" / "fp32.json")["method"] == "temperature"
    assert sum(fp32["per_class"]["per_class"][name]["support"] for name in fp32["per_class"]["labels"]) == m["n_test"]
    assert (root / "reports" / "reliability.png").stat().st_size > 10_000 and (root / "reports" / "confusion.png").is_file()
    assert (root / "reports" / "pareto.png").is_file() and dvc_clean(root)

    # The flow sees dvc repro's lock as its own: nothing reruns.
    started = time.perf_counter()
    outcome = pipeline(root=str(root))
    assert outcome["ran"] == []
    assert time.perf_counter() - started < 60
    assert "| fp32 |" in outcome["report"]

    # One evaluate param changed: only evaluate and report rerun; override recorded in MLflow.
    assert lowbit_main(["--root", str(root), "run", "-P", "evaluate.latency_samples=6"]) == 0
    parents, children = pipeline_runs(root)
    assert [p.data.tags["lowbit.stage.baseline"] for p in parents] == ["up-to-date", "up-to-date"]
    assert parents[-1].data.tags["lowbit.stage.evaluate"] == "ran"
    assert parents[-1].data.tags["lowbit.stage.prepare"] == "up-to-date"
    assert parents[-1].data.tags["lowbit.overrides"] == "evaluate.latency_samples=6"
    assert "latency_samples: 6" in (root / "params.yaml").read_text()
    assert dvc_clean(root)

    # Nothing changed since that finished run: answered from DVC and MLflow, without Prefect or a new run.
    capsys.readouterr()
    assert lowbit_main(["--root", str(root), "run"]) == 0
    assert f"stages run: nothing (dvc status: every stage up to date; MLflow run {parents[-1].info.run_id}" in capsys.readouterr().out
    assert len(pipeline_runs(root)[0]) == len(parents)

    # What MLflow holds is what the metrics files say, tagged for traceability.
    parent = parents[-1]
    meta = read_json(root / "data" / "prepared" / "meta.json")
    assert parent.data.tags["lowbit.data_hash"] == meta["data_hash"]
    assert len(parent.data.tags["lowbit.params_hash"]) == 64
    assert len(parent.data.tags["lowbit.git_commit"]) == 40
    assert parent.data.tags["lowbit.prefect_flow_run_id"] not in ("", "None")
    assert parent.info.status == "FINISHED"
    child = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    by_variant = {c.data.tags["lowbit.variant"]: c for c in child}
    assert set(by_variant) == {"fp32", "half_bf16", "ptq_int8_dynamic", "ptq_int8_static_minmax", "ptq_nf4", "qat_int8",
                               "lora", "lora_merged", "qlora", "qlora_merged"}
    for variant, run in by_variant.items():
        latest = read_json(root / "metrics" / f"{variant}.json")["metrics"]
        assert run.data.metrics["accuracy"] == pytest.approx(latest["accuracy"])
        assert run.data.metrics["weight_bytes"] == latest["weight_bytes"]
    fp32, qat = by_variant["fp32"], by_variant["qat_int8"]
    assert fp32.data.metrics["accuracy_delta"] == 0.0
    assert fp32.data.params["baseline.epochs"] == "1" and qat.data.params["qat.init_observer"] == "percentile"
    assert "train_samples_s" in fp32.data.metrics and "train_peak_rss_bytes" in fp32.data.metrics
    assert by_variant["ptq_int8_dynamic"].data.metrics["weight_bytes"] < 0.3 * fp32.data.metrics["weight_bytes"]
    lora = by_variant["lora"].data.metrics
    assert lora["trainable_params"] < 0.01 * lora["total_params"] and lora["disk_bytes"] < 2 * 2**20  # adapter only
    assert by_variant["qlora"].data.params["qlora.compute_dtype"] == "auto"


def dvc_changed(root) -> set[str]:
    with Repo(str(root)) as repo:
        return {name.split(":")[-1] for name in repo.status()}


def test_flow_from_scratch_then_failing_branch_and_bad_source_lose_nothing(tiny_project, capsys):
    root = tiny_project
    first = pipeline(root=str(root))
    assert first["ran"] == ["prepare", "baseline", "ptq", "qat", "lora", "qlora", "evaluate", "report"]
    assert dvc_clean(root)
    assert any((root / ".dvc-remote").rglob("*")), "outputs were pushed to the local DVC remote"

    # One branch fails: the others' results are still evaluated and reported, the failure is named,
    # the stale qlora models of the first run are left out, and DVC still shows what is missing.
    capsys.readouterr()
    assert lowbit_main(["--root", str(root), "run", "-P", "qlora.target_modules=[no_such_layer]"]) == 1
    out, err = capsys.readouterr()
    assert "**Incomplete run**" in out and "| lora_merged |" in out and "| qlora |" not in out
    assert "- **qlora** (earlier models left out: qlora, qlora_merged): stage qlora failed (exit 2)" in out
    assert "qlora.target_modules: ['no_such_layer'] match no layer" in out
    assert "1 stage(s) failed: qlora" in err
    assert not (root / "metrics" / "qlora.json").exists() and (root / "metrics" / "lora.json").exists()
    assert read_json(root / "reports" / "summary.json")["recommendation"]["variant"]
    assert dvc_changed(root) == {"qlora", "evaluate", "report"}
    parents, _ = pipeline_runs(root)
    assert parents[-1].info.status == "FAILED" and parents[-1].data.tags["lowbit.failed_stages"] == "qlora"
    assert "qlora: stage qlora failed" in parents[-1].data.tags["lowbit.error"]
    set_params(root / "params.yaml", {"qlora.target_modules": ["query", "key", "value"]})
    prepared, baseline = sha256_tree(root / "data" / "prepared"), sha256_tree(root / "models" / "baseline")
    cache_files = sorted(p.name for p in (root / ".dvc" / "cache").rglob("*") if p.is_file())

    set_params(root / "params.yaml", {"data.source": "data/raw/missing.csv"})
    with pytest.raises(LowbitError, match="stage prepare failed"):
        pipeline(root=str(root))
    assert sha256_tree(root / "data" / "prepared") == prepared
    assert sha256_tree(root / "models" / "baseline") == baseline
    assert sorted(p.name for p in (root / ".dvc" / "cache").rglob("*") if p.is_file()) == cache_files
    assert not [p for p in (root / "data").iterdir() if ".tmp-" in p.name]
    parents, _ = pipeline_runs(root)
    assert [p.info.status for p in parents] == ["FINISHED", "FAILED", "FAILED"]
    assert "stage prepare failed" in parents[-1].data.tags["lowbit.error"]


def test_bad_params_fail_before_any_work(tiny_project, capsys):
    root = tiny_project
    set_params(root / "params.yaml", {"baseline.epochs": 0})
    assert lowbit_main(["--root", str(root), "run"]) == 2
    err = capsys.readouterr().err
    assert "params.yaml" in err and "baseline.epochs" in err and "greater than or equal to 1" in err
    assert not (root / "data" / "prepared").exists() and not (root / "mlflow.db").exists()


def test_a_calibration_the_val_split_cannot_support_fails_before_any_training(tiny_project):
    root = tiny_project
    set_params(root / "params.yaml", {"evaluate.calibration": "isotonic"})  # ~24 val rows: under 20 per class
    with pytest.raises(LowbitError, match="evaluate.calibration: isotonic needs at least 20 validation rows per class"):
        pipeline(root=str(root))
    assert (root / "data" / "prepared" / "val.parquet").is_file() and not (root / "models").exists()
