"""Promotion, rejection, re-scoring on another split, rollback and two promotions at once,
against a real MLflow store and registry, the real pyfunc and a real Prefect concurrency limit.

The pipeline runs here are recorded through flows.tracking.Tracker from tiny real models whose
figures are measured in the test (a whole pipeline per scenario would take minutes)."""

from __future__ import annotations

import contextlib
import contextvars
import signal
import subprocess
import sys
import threading
import time
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import torch

import flows.promote
from flows.cli import main as lowbit_main
from flows.promote import promote
from flows.registry import CHAMPION, PREVIOUS, Registry, rollback
from flows.tracking import Tracker
from lowbit.config import load_params
from lowbit.data import split_digest
from lowbit.errors import LowbitError
from lowbit.evaluation import predict_probabilities
from lowbit.formats import load_variant
from lowbit.io import sha256_tree, write_json
from lowbit.measure import weight_bytes
from lowbit.statistics import point_metrics
from lowbit.variants import write_card
from tasks.plumbing import Paths
from tests.conftest import REPO, TINY, make_project, set_params, venv_env
from tests.tiny_model import tiny_classifier_dir

LABELS = ["negative", "neutral", "positive"]
WORDS = ["great", "fine", "awful", "superb", "dull", "okay", "lovely", "bad", "decent"]


def review_frame(rows: int, offset: int = 0) -> pd.DataFrame:
    texts = [f"a {WORDS[(i + offset) % 9]} film, {WORDS[(3 * i + offset) % 9]} acting, scene {i}" for i in range(rows)]
    return pd.DataFrame({"text": texts, "label": [(i + offset) % 3 for i in range(rows)]})


def project(tmp_path: Path, **params) -> Path:
    root = tmp_path / "project"
    (root / "data" / "prepared").mkdir(parents=True)
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    # random tiny models are at chance: the accuracy gate is tested in the unit tests
    set_params(root / "params.yaml", {"promote.max_accuracy_drop": 100.0, "tracking.dvc_push": False, **params})
    return root


def save_variant(root: Path, name: str, seed: int, hidden: int, dtype: torch.dtype) -> Path:
    """A real saved classifier directory, in the `hf` storage format with its card."""
    out = root / "models" / name
    tiny_classifier_dir(out, num_labels=3, seed=seed, hidden_size=hidden)
    if dtype != torch.float32:
        model, _ = load_variant_dir(out)
        model.to(dtype).save_pretrained(out, safe_serialization=True)
    write_card(out, name.split("-")[0], "hf", "baseline" if dtype == torch.float32 else "ptq", dtype=str(dtype).removeprefix("torch."))
    return out


def load_variant_dir(path: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    return AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def measured(model_dir: Path, frame: pd.DataFrame, params) -> dict[str, float]:
    model, tokenizer = load_variant(model_dir, params.model)
    probabilities = predict_probabilities(model, tokenizer, frame["text"].tolist(), params.model.max_length)
    scores = point_metrics(probabilities, frame["label"].to_numpy())
    return {"accuracy": scores["accuracy"], "f1_macro": scores["f1_macro"], "weight_bytes": float(weight_bytes(model)),
            "latency_ms_p50": 1.0, "throughput_samples_s": 100.0}


def record_run(root: Path, variants: dict[str, Path], frame: pd.DataFrame) -> str:
    """A pipeline run as flows/pipeline.py records it: parent run, one nested run per variant, lineage tags."""
    frame.to_parquet(root / "data" / "prepared" / "test.parquet", index=False)
    write_json(root / "data" / "prepared" / "meta.json", {"labels": LABELS})
    params = load_params(root / "params.yaml")
    digest = split_digest(frame, LABELS)
    tracker = Tracker(params, root)
    tracker.start({"lowbit.prefect_flow_run_id": "test", "lowbit.test_digest": digest, "lowbit.data_hash": digest})
    figures = {name: measured(path, frame, params) for name, path in variants.items()}
    for name, path in variants.items():
        metrics = figures[name] | {"accuracy_delta": 100 * (figures[name]["accuracy"] - figures["fp32"]["accuracy"])}
        record = {"variant": name, "format": "hf", "producer": {}}
        lineage = {"lowbit.model_dir": str(path.relative_to(root)), "lowbit.model_sha256": sha256_tree(path),
                   "lowbit.test_digest": digest}
        tracker.log_variant(record, metrics, "baseline", False, [], lineage)
    tracker.finish("FINISHED")
    return tracker.run_id


def test_promote_reject_rescore_and_rollback(tmp_path, capsys):
    root = project(tmp_path, **{"promote.objective": "weight_bytes", "promote.min_improvement": 0.05})
    params = load_params(root / "params.yaml")
    paths_ = Paths(root)
    first = {"fp32": save_variant(root, "fp32-a", 0, 32, torch.float32),
             "half_bf16": save_variant(root, "half_bf16-a", 0, 32, torch.bfloat16)}
    run1 = record_run(root, first, review_frame(45))

    # No champion yet: the smallest eligible variant is registered and becomes @champion.
    decision = promote(paths_, params, run1)
    assert decision.promoted and decision.challenger.variant == "half_bf16" and decision.version == "1"
    registry = Registry.open(params, root)
    champion = registry.version_at(CHAMPION)
    assert champion.version == 1 and registry.version_at(PREVIOUS) is None
    tags = champion.tags
    assert tags["lowbit.variant"] == "half_bf16" and tags["lowbit.model_sha256"] == sha256_tree(first["half_bf16"])
    assert tags["lowbit.test_digest"] == split_digest(review_frame(45), LABELS) and tags["lowbit.pipeline_run_id"] == run1
    assert len(tags["lowbit.git_commit"]) >= 7 and tags["lowbit.params_hash"] == params.digest()
    assert float(tags["lowbit.metric.weight_bytes"]) == pytest.approx(measured(first["half_bf16"], review_frame(45), params)["weight_bytes"])
    assert registry.client.get_run(run1).data.tags["lowbit.promotion"] == "promoted"

    # The champion loads by URI and scores what the variant scored.
    import mlflow

    served = mlflow.pyfunc.load_model(f"models:/{registry.name}@champion").predict(review_frame(45)[["text"]])
    accuracy = float((served["label_id"].to_numpy() == review_frame(45)["label"].to_numpy()).mean())
    assert accuracy == pytest.approx(float(tags["lowbit.metric.accuracy"]), abs=1e-6)

    # The same run again: the same files are the champion already; nothing registered, nothing moved.
    again = promote(paths_, params, run1)
    assert not again.promoted and "already the champion" in again.reason and len(registry.versions()) == 1

    # Another test split and a model of the same size: the champion is re-scored on the new split
    # first, and the challenger is rejected (not 5% smaller); no alias changes.
    second = {"fp32": save_variant(root, "fp32-b", 1, 32, torch.float32),
              "half_bf16": save_variant(root, "half_bf16-b", 1, 32, torch.bfloat16)}
    new_split = review_frame(60, offset=1)
    run2 = record_run(root, second, new_split)
    rejected = promote(paths_, params, run2)
    assert not rejected.promoted and rejected.version == "2" and "re-scored" in rejected.reason
    assert "weight_bytes" in rejected.reason
    digest2 = split_digest(new_split, LABELS)
    rescored = float(registry.version("1").tags[f"lowbit.rescored.{digest2[:12]}.accuracy"])
    assert rescored == pytest.approx(measured(first["half_bf16"], new_split, params)["accuracy"], abs=1e-6)
    assert registry.version_at(CHAMPION).version == 1 and registry.version_at(PREVIOUS) is None
    assert registry.version("2").tags["lowbit.promotion"] == "rejected"
    run2_tags = registry.client.get_run(run2).data.tags
    assert run2_tags["lowbit.promotion"] == "rejected" and run2_tags["lowbit.promotion_version"] == "2"

    # A smaller model wins: @previous keeps the old champion.
    third = {"fp32": save_variant(root, "fp32-c", 2, 16, torch.float32),
             "half_bf16": save_variant(root, "half_bf16-c", 2, 16, torch.bfloat16)}
    run3 = record_run(root, third, new_split)
    won = promote(paths_, params, run3)
    assert won.promoted and won.version == "3"
    assert registry.version_at(CHAMPION).version == 3 and registry.version_at(PREVIOUS).version == 1

    # Rollback: back to @previous, and the replaced champion becomes @previous; each move recorded.
    capsys.readouterr()
    assert lowbit_main(["--root", str(root), "rollback", "--reason", "v3 misroutes refunds"]) == 0
    assert "lowbit-classifier@champion: v3 -> v1 (v3 misroutes refunds)" in capsys.readouterr().out
    assert registry.version_at(CHAMPION).version == 1 and registry.version_at(PREVIOUS).version == 3
    moves = registry.history()
    assert [(m["alias"], m["from_version"], m["to_version"], m["actor"]) for m in moves] == [
        ("champion", "3", "1", "rollback"), ("previous", "1", "3", "rollback"),
        ("champion", "1", "3", "promote"), ("previous", "", "1", "promote"), ("champion", "", "1", "promote")]
    assert moves[0]["reason"] == "v3 misroutes refunds"
    assert lowbit_main(["--root", str(root), "champion"]) == 0
    out = capsys.readouterr().out
    assert "@champion: v1 half_bf16" in out and "@previous: v3 half_bf16" in out and "by rollback: v3 misroutes refunds" in out

    # Bad input: a version that does not exist, a registered model that does not exist.
    with pytest.raises(LowbitError, match="has no version '99'"):
        rollback(registry, "typo", "99")
    set_params(root / "params.yaml", {"promote.registered_model": "no-such-model"})
    assert lowbit_main(["--root", str(root), "rollback", "--reason", "x"]) == 2
    assert "registered model 'no-such-model' does not exist (promote.registered_model" in capsys.readouterr().err
    with pytest.raises(LowbitError, match="does not exist"):
        promote(paths_, params, "0123456789abcdef0123456789abcdef")


def test_two_promotions_at_once_move_the_champion_once(tmp_path, monkeypatch):
    root = project(tmp_path, **{"promote.registered_model": "race", "promote.objective": "weight_bytes"})
    params = load_params(root / "params.yaml")
    paths_ = Paths(root)
    frame = review_frame(30)
    runs = [record_run(root, {"fp32": save_variant(root, f"fp32-{seed}", seed, 32, torch.float32),
                              "half_bf16": save_variant(root, f"half_bf16-{seed}", seed, 32, torch.bfloat16)}, frame)
            for seed in (0, 1)]
    # Both have registered their challenger and seen no champion before either enters the lock
    # (the barrier forces that interleaving); inside it, the second must re-read the champion.
    barrier, real_lock = threading.Barrier(2), flows.promote.promotion_lock

    @contextlib.contextmanager
    def lock_once_both_are_ready(name):
        barrier.wait(timeout=300)
        with real_lock(name):
            yield

    monkeypatch.setattr(flows.promote, "promotion_lock", lock_once_both_are_ready)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(contextvars.copy_context().run, promote, paths_, params, run) for run in runs]
        decisions = [f.result() for f in futures]
    assert sorted(d.promoted for d in decisions) == [False, True]
    loser = next(d for d in decisions if not d.promoted)
    assert "weight_bytes" in loser.reason and loser.champion_version is not None
    registry = Registry.open(params, root)
    assert [m["alias"] for m in registry.history()] == ["champion"]  # one move, no @previous churn


def test_retrain_runs_the_pipeline_and_promotes_and_a_retrain_with_nothing_changed_moves_nothing(tmp_path, capsys):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    model = tiny_classifier_dir(tmp_path / "tiny", num_labels=2, hidden_size=64, init_std=0.2)
    root = make_project(tmp_path / "project", TINY | {
        "model.name": str(model), "ptq.schemes": ["int8_dynamic"], "promote.max_accuracy_drop": 100.0,
        "tracking.dvc_push": False})
    assert lowbit_main(["--root", str(root), "retrain"]) == 0
    out = capsys.readouterr().out
    assert "stages run: prepare, baseline, ptq, qat, lora, qlora, evaluate, report" in out
    assert "is now lowbit-classifier@champion — no champion yet" in out

    assert lowbit_main(["--root", str(root), "retrain"]) == 0  # exactly what the schedule fires
    out = capsys.readouterr().out
    assert "stages run: prepare;" in out  # the source was re-read; equal splits leave the rest up to date
    assert "promotion: rejected" in out and "already the champion (same model files)" in out
    params = load_params(root / "params.yaml")
    registry = Registry.open(params, root)
    assert len(registry.versions()) == 1 and registry.version_at(CHAMPION).version == 1
    assert [m["alias"] for m in registry.history()] == ["champion"]
    version_tags = registry.version("1").tags
    assert version_tags["lowbit.dvc_out"].startswith("models/") and len(version_tags["lowbit.dvc_out_md5"]) >= 32
    assert version_tags["lowbit.prefect_flow_run_id"] not in ("", "None")
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["lowbit-retrain"])),
                                     sort=FlowRunSort.START_TIME_DESC, limit=50)
    assert sum(r.state.is_completed() for r in runs if r.parameters.get("root") == str(root)) == 2


def test_a_cron_that_does_not_parse_is_refused_before_anything_starts(tmp_path, capsys):
    root = project(tmp_path)
    started = time.perf_counter()
    assert lowbit_main(["--root", str(root), "schedule", "--cron", "0 25 * * *"]) == 2
    assert "--cron '0 25 * * *' is not a cron expression" in capsys.readouterr().err
    assert time.perf_counter() - started < 10


@pytest.mark.slow
def test_a_served_schedule_fires_a_retrain_that_promotes(tmp_path):
    """`lowbit schedule` on a real local Prefect server (the temporary API runs no scheduler):
    a cron of every minute fires one retraining run, which promotes; then serving stops."""
    model = tiny_classifier_dir(tmp_path / "tiny", num_labels=2, hidden_size=64, init_std=0.2)
    root = make_project(tmp_path / "project", TINY | {
        "model.name": str(model), "ptq.schemes": ["int8_dynamic"], "promote.max_accuracy_drop": 100.0,
        "tracking.dvc_push": False})
    env = {k: v for k, v in venv_env().items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path / "prefect")}
    log = (tmp_path / "schedule.log").open("w")
    served = subprocess.Popen([str(Path(sys.executable).parent / "lowbit"), "--root", str(root), "schedule",
                               "--cron", "* * * * *"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 900
        while "is now lowbit-classifier@champion" not in (tmp_path / "schedule.log").read_text():
            assert served.poll() is None, (tmp_path / "schedule.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "schedule.log").read_text()[-3000:]
            time.sleep(5)
    finally:
        served.send_signal(signal.SIGINT)
        served.wait(timeout=60)
    registry = Registry.open(load_params(root / "params.yaml"), root)
    assert registry.version_at(CHAMPION).version == 1
