"""`lowbit reproduce` end to end: a real run through the flow, re-created in a worktree by dvc pull + dvc repro.

A tiny random BERT, 120 rows, one epoch, one PTQ scheme: the flow and each reproduction run every
stage in fresh processes. Marked slow: about 3-4 minutes on 2 cores (two flow runs, two reproductions).
"""

from __future__ import annotations

import subprocess

import pytest
import yaml
from mlflow import MlflowClient

from flows.cli import main
from flows.pipeline import pipeline
from flows.reproduce import compare, find_run, reproduced_metrics
from lowbit.io import read_json
from tests.conftest import TINY, git, make_project, venv_env
from tests.tiny_model import tiny_classifier_dir

QUICK = {
    "data.builtin_rows": 120,
    "prepare.calib_size": 16,
    "ptq.schemes": ["int8_dynamic"],
    "ptq.calib_rows": 16,
    "evaluate.bootstrap_resamples": 100,
    "determinism.enabled": True,
    "tracking.dvc_push": True,
}


@pytest.mark.slow
def test_a_recorded_run_is_reproduced_figure_for_figure(tmp_path, capsys):
    model = tiny_classifier_dir(tmp_path / "tiny-bert")  # outside the project: the worktree reads the same files
    root = make_project(tmp_path / "project", TINY | QUICK | {"model.name": str(model)})
    # The project's own remote setting: a folder relative to .dvc/, which inside a worktree would point elsewhere.
    subprocess.run(["dvc", "remote", "modify", "local", "url", ".dvc-remote"], cwd=root, check=True, env=venv_env())
    assert "url = ../.dvc-remote" in (root / ".dvc" / "config").read_text()  # as this repository's .dvc/config has it
    git(root, "commit", "-qam", "DVC remote: the project's .dvc-remote folder")

    first = pipeline(root=str(root))
    run_id = first["mlflow_run_id"]
    assert any((root / ".dvc-remote").rglob("*")), "the run pushed its outputs"
    git(root, "add", "-A")
    git(root, "commit", "-qm", "dvc.lock and summary of the first run")
    capsys.readouterr()

    # 1. The first run's commit has no dvc.lock: nothing to pull, every stage is computed again.
    workdir = tmp_path / "again"
    assert main(["--root", str(root), "reproduce", run_id, "--workdir", str(workdir)]) == 0
    report = capsys.readouterr().out
    with capsys.disabled():  # the report, for a person reading the test log (-s)
        print(report)
    comparison = read_json(workdir / "reports" / "reproduction.json")
    variants = {"fp32", "ptq_int8_dynamic", "qat_int8", "lora", "lora_merged", "qlora", "qlora_merged"}
    assert {row["variant"] for row in comparison["rows"]} == variants
    assert len(comparison["rows"]) == 4 * len(variants)  # accuracy, f1_macro, loss, ece of each
    # determinism on, same machine: not just within the tolerance, identical
    assert all(row["ok"] and row["difference"] == 0.0 for row in comparison["rows"])
    assert comparison["ok"] and comparison["data_hash"]["ok"] and comparison["pull"].startswith("nothing to pull")
    assert f"Reproduced: all {4 * len(variants)} figures within 1e-06 (largest difference 0)." in report
    assert git(workdir, "rev-parse", "HEAD").strip() == comparison["commit"]
    baseline = read_json(workdir / "models" / "baseline" / "lowbit_stage.json")
    assert baseline["deterministic"] == 1
    recorded = MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db").get_run(run_id).data
    for stage in ("baseline", "ptq", "qat", "lora", "qlora"):  # each stage's determinism, as the flow logged it
        assert recorded.metrics[f"{stage}.deterministic"] == 1.0 and recorded.metrics[f"{stage}.torch_threads"] >= 1
    tags = recorded.tags
    assert tags["lowbit.reproduced"] == "ok"
    assert f"{4 * len(variants)} of {4 * len(variants)} figures within 1e-06" in tags["lowbit.reproduced_detail"]

    # A figure that changed would be caught: one test prediction flipped in the recorded accuracy.
    run = find_run(f"sqlite:///{root}/mlflow.db", run_id)
    n_test = read_json(workdir / "metrics" / "fp32.json")["metrics"]["n_test"]
    doctored = {name: dict(metrics) for name, metrics in run.variants.items()}
    doctored["fp32"]["accuracy"] += 1 / n_test
    rows = compare(doctored, reproduced_metrics(workdir, doctored), comparison["tolerance"])
    assert [(row["variant"], row["metric"]) for row in rows if not row["ok"]] == [("fp32", "accuracy")]

    # 2. A run whose commit holds its dvc.lock: dvc pull fetches every output from the project's remote,
    # through the relative remote setting, and dvc repro finds nothing to do.
    second = pipeline(root=str(root))
    assert second["ran"] == []
    capsys.readouterr()
    pulled = tmp_path / "pulled"
    assert main(["--root", str(root), "reproduce", second["mlflow_run_id"], "--workdir", str(pulled)]) == 0
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out)
    again = read_json(pulled / "reports" / "reproduction.json")
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    lock_outputs = sum(len(stage.get("outs", [])) for stage in lock["stages"].values())
    assert again["pull"] == (f"dvc pull from DVC remote 'local' ({root / '.dvc-remote'}): "
                             f"{lock_outputs} of {lock_outputs} stage outputs in dvc.lock present")
    assert again["ok"] and "Reproduced: all" in out
    assert (pulled / "models" / "baseline" / "model.safetensors").is_file()
    assert not (pulled / ".dvc-remote").exists()  # pulled from the project's folder, not one inside the worktree
    assert git(root, "status", "--porcelain", "--untracked-files=no") == ""  # the project itself is untouched
