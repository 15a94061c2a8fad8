"""`lowbit compare` against a real MLflow SQLite store written by flows.tracking.Tracker."""

from __future__ import annotations

import os
import shutil
import socket
import time
from datetime import datetime, timezone
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from mlflow import MlflowClient
from mlflow.entities import Param

from flows.cli import main
from flows.compare import (
    PipelineRun, Selection, build_frame, differing_params, fetch_runs, parse_date, refuse_incomparable,
)
from flows.mlflow_store import HTTP_LIMITS, VariantRun
from flows.tracking import Tracker
from lowbit.config import Params, flatten, parse_override, read_yaml_mapping, set_dotted
from lowbit.errors import LowbitError
from tests.conftest import REPO

MIB = 1024 * 1024
DIGEST_A, DIGEST_B = "a" * 64, "b" * 64


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp() * 1000)


class ClockedClient(MlflowClient):
    """Tracker's client with a chosen clock: runs get known start times (one second apart),
    so the date filters and "the last N" have fixed answers."""

    def __init__(self, uri: str, start_ms: int) -> None:
        super().__init__(tracking_uri=uri)
        self.now = start_ms - 1000

    def create_run(self, experiment_id, start_time=None, tags=None, run_name=None):
        self.now += 1000
        return super().create_run(experiment_id, start_time=self.now, tags=tags, run_name=run_name)


def metrics(accuracy: float, weight_bytes: float, base_accuracy: float, p50: float) -> dict:
    return {"accuracy": accuracy, "accuracy_ci_low": accuracy - 0.02, "accuracy_ci_high": accuracy + 0.015,
            "accuracy_delta": (accuracy - base_accuracy) * 100, "accuracy_delta_significant": 0.0,
            "f1_macro": accuracy - 0.001, "ece": 0.03, "weight_bytes": weight_bytes, "disk_bytes": weight_bytes + 4096,
            "bits_per_param": 32.0 * weight_bytes / (90 * MIB), "latency_ms_p50": p50, "throughput_samples_s": 1000 / p50,
            "peak_rss_bytes": 900 * MIB}


# run name -> (start, overrides, status, test digest, git commit, {variant: (format, stage, metrics)})
RUNS = {
    "r1": ("2025-03-01T10:00:00", [], "FINISHED", DIGEST_A, "1" * 40, {
        "fp32": ("hf", "baseline", metrics(0.9100, 90 * MIB, 0.9100, 14.0)),
        "ptq_int8_dynamic": ("int8_dynamic", "ptq", metrics(0.9050, 22 * MIB, 0.9100, 5.0)),
        "qat_int8": ("int8_static", "qat", metrics(0.9000, 22.5 * MIB, 0.9100, 9.0)),
    }),
    "r2": ("2025-03-02T10:00:00", ["qat.learning_rate=2.0e-5"], "FINISHED", DIGEST_A, "1" * 40, {
        "fp32": ("hf", "baseline", metrics(0.9100, 90 * MIB, 0.9100, 13.5)),
        "ptq_int8_dynamic": ("int8_dynamic", "ptq", metrics(0.9050, 22 * MIB, 0.9100, 5.2)),
        "qat_int8": ("int8_static", "qat", metrics(0.9150, 22.5 * MIB, 0.9100, 9.1)),
    }),
    "r3": ("2025-03-03T10:00:00", ["data.seed=1"], "FINISHED", DIGEST_B, "2" * 40, {
        "fp32": ("hf", "baseline", metrics(0.8800, 90 * MIB, 0.8800, 14.2)),
        "ptq_int8_dynamic": ("int8_dynamic", "ptq", metrics(0.8700, 22 * MIB, 0.8800, 5.1)),
    }),
    "r4": ("2025-03-04T10:00:00", [], "FAILED", DIGEST_A, "2" * 40, {
        "fp32": ("hf", "baseline", metrics(0.9000, 90 * MIB, 0.9000, 14.0)),
    }),
}
OLD_START = "2025-02-01T09:00:00"  # a run from before the lowbit.kind and test-digest tags


def params_with(path, overrides) -> Params:
    """params.yaml with overrides, built without validation: validating ptq.schemes imports torch
    (~7 s), and these runs need only the params' shape as Tracker logs it."""
    raw = read_yaml_mapping(path)
    for item in overrides:
        set_dotted(raw, *parse_override(item), path)
    return Params.model_construct(**{name: field.annotation.model_construct(**raw[name])
                                     for name, field in Params.model_fields.items()})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A project dir whose params.yaml points at mlflow.db holding RUNS and one old-style run."""
    root = tmp_path_factory.mktemp("compare")
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        ids = {}
        for name, (start, overrides, status, digest, commit, variants) in RUNS.items():
            tracker = Tracker(params_with(root / "params.yaml", overrides), root)
            tracker.client = ClockedClient(tracker.uri, ms(start))
            ids[name] = tracker.start({"lowbit.overrides": " ".join(overrides), "lowbit.git_commit": commit,
                                       "lowbit.git_dirty": "false"})
            tracker.tag("lowbit.test_digest", digest)
            for variant, (fmt, stage, values) in variants.items():
                record = {"variant": variant, "format": fmt, "producer": {"stage_seconds": 3.0}}
                tracker.log_variant(record, values, stage, reused=False, artifacts=[],
                                    lineage={"lowbit.test_digest": digest, "lowbit.model_dir": f"models/{variant}"})
            tracker.finish(status, "ptq: boom" if status == "FAILED" else None)
        client = ClockedClient(tracker.uri, ms(OLD_START))
        old = client.create_run(tracker.experiment_id, run_name="pipeline-old")
        # its params as Tracker logs them, less the sections added since (promote, determinism)
        logged = {k: str(v) for k, v in flatten("", tracker.params.model_dump()).items()
                  if not k.startswith(("promote.", "determinism."))}
        items = [Param(k, v) for k, v in logged.items()]
        for start in range(0, len(items), 100):
            client.log_batch(old.info.run_id, params=items[start:start + 100])
        child = client.create_run(tracker.experiment_id, run_name="fp32", tags={"mlflow.parentRunId": old.info.run_id})
        client.log_metric(child.info.run_id, "accuracy", 0.8)
        client.set_terminated(child.info.run_id)
        client.set_terminated(old.info.run_id)
        ids["old"] = old.info.run_id
        ids["r1_fp32"] = next(r.info.run_id for r in client.search_runs(
            [tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{ids['r1']}' and tags.`lowbit.variant` = 'fp32'"))
    return {"root": root, "uri": tracker.uri, "ids": ids}


@pytest.fixture(autouse=True)
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)
    with mock.patch.dict(os.environ):  # the HTTP limits a command sets for its process end with the test
        yield


def compare(store, *args, out=None):
    out = out or store["root"] / "out"
    shutil.rmtree(out, ignore_errors=True)
    return main(["--root", str(store["root"]), "compare", "--out", str(out), *args])


def read_csv(path):
    """Ids, commits, digests and param values as the text they are (a hex id can look like 1e5...)."""
    text = ["run_id", "run", "git_commit", "test_digest"]
    text += [c for c in pd.read_csv(path, nrows=0).columns if c.startswith("params.")]
    return pd.read_csv(path, dtype=dict.fromkeys(text, str))


def selected(store, path):
    """The pipeline runs in the CSV, as fixture names, in table order of first appearance."""
    names = {v: k for k, v in store["ids"].items()}
    return [names[i] for i in dict.fromkeys(read_csv(path)["run_id"])]


def test_table_values_equal_what_was_logged(store, capsys):
    ids = store["ids"]
    assert compare(store, "--run", ids["r1"][:10], "--run", ids["r2"]) == 0
    frame = read_csv(store["root"] / "out" / "comparison.csv")
    assert len(frame) == 6
    # grouped by variant in report order, the runs in the order given within each variant
    assert list(frame["variant"]) == ["fp32", "fp32", "ptq_int8_dynamic", "ptq_int8_dynamic", "qat_int8", "qat_int8"]
    assert list(frame["run_id"]) == [ids["r1"], ids["r2"]] * 3
    for row in frame.itertuples():
        name = "r1" if row.run_id == ids["r1"] else "r2"
        fmt, _, logged = RUNS[name][5][row.variant]
        assert row.format == fmt
        for key, value in logged.items():
            assert getattr(row, key) == pytest.approx(value, rel=1e-12), (name, row.variant, key)
        assert row.started == RUNS[name][0] + "Z"
        assert row.status == "FINISHED" and row.test_digest == DIGEST_A and row.split == "A" and row.comparable
    printed = capsys.readouterr().out
    # r2's qat_int8: accuracy with its interval, +0.50 points, 22.5 MiB, 9.10 ms, 1000/9.1 samples/s
    assert (f"| {ids['r2'][:8]} | 2025-03-02 10:00 | 2e-05 | qat_int8 | 0.9150 [0.895, 0.930] | +0.50 | 0.9140 | "
            "22.5 | 9.10 | 109.9 | A |") in printed
    assert printed.startswith((store["root"] / "out" / "comparison.md").read_text())


def test_differing_params_are_columns(store, capsys):
    ids = store["ids"]
    runs = fetch_runs(store["uri"], Selection(experiment="lowbit", run_ids=(ids["r1"], ids["r2"], ids["r3"])))
    assert differing_params(runs[:2]) == ["qat.learning_rate"]
    assert differing_params(runs) == ["data.seed", "qat.learning_rate"]
    assert runs[0].params["qat.learning_rate"] == "1e-05" and runs[1].params["qat.learning_rate"] == "2e-05"
    assert compare(store, "--run", ids["r1"], "--run", ids["r2"]) == 0
    frame = read_csv(store["root"] / "out" / "comparison.csv")
    assert [c for c in frame.columns if c.startswith("params.")] == ["params.qat.learning_rate"]
    assert dict(zip(frame["run_id"], frame["params.qat.learning_rate"])) == {ids["r1"]: "1e-05", ids["r2"]: "2e-05"}
    header = capsys.readouterr().out.splitlines()[2]
    assert header.startswith("| run | started | qat.learning_rate | variant |")


def test_other_test_split_is_flagged_and_strict_refuses(store, capsys):
    ids = store["ids"]
    assert compare(store, "--run", ids["r1"], "--run", ids["r3"]) == 0
    frame = read_csv(store["root"] / "out" / "comparison.csv")
    by_run = frame.groupby("run_id")
    assert set(by_run.get_group(ids["r1"])["split"]) == {"A"} and by_run.get_group(ids["r1"])["comparable"].all()
    assert set(by_run.get_group(ids["r3"])["split"]) == {"B"} and not by_run.get_group(ids["r3"])["comparable"].any()
    printed = capsys.readouterr().out
    assert printed.count(" | B ‡ |") == 2  # r3 has two variants
    assert f"‡ split B: run(s) {ids['r3'][:8]} were evaluated on another test split than split A" in printed
    assert "| commit |" in printed.splitlines()[2]  # r1 and r3 come from different commits

    out = store["root"] / "strict"
    assert compare(store, "--run", ids["r1"], "--run", ids["r3"], "--strict", out=out) == 2
    err = capsys.readouterr().err
    assert f"--strict: the test split of {ids['r3'][:8]} (split B) is not that of run {ids['r1'][:8]} (split A)" in err
    assert not out.exists()  # refused: nothing written
    assert compare(store, "--run", ids["r1"], "--run", ids["r2"], "--strict") == 0


def test_a_run_without_a_digest_is_not_comparable(store, capsys):
    ids = store["ids"]
    assert compare(store, "--run", ids["r1"], "--run", ids["old"]) == 0
    frame = read_csv(store["root"] / "out" / "comparison.csv")
    old = frame[frame["run_id"] == ids["old"]]
    assert list(old["variant"]) == ["fp32"] and list(old["split"]) == ["?"] and not old["comparable"].any()
    assert list(old["accuracy"]) == [0.8] and np.isnan(old["weight_bytes"]).all()
    printed = capsys.readouterr().out
    assert f"‡ split ?: run(s) {ids['old'][:8]} recorded no test-split digest" in printed
    # params it never had differ too (r1's qat.learning_rate is its own): they are why the runs may differ
    params = [c.removeprefix("params.") for c in frame.columns if c.startswith("params.")]
    assert params and all(p.startswith(("promote.", "determinism.")) for p in params)
    assert frame.loc[frame["run_id"] == ids["old"], "params.promote.objective"].isna().all()
    assert set(frame.loc[frame["run_id"] == ids["r1"], "params.promote.objective"]) == {"weight_bytes"}
    assert "| – | fp32 |" in printed  # the old run's missing params
    assert compare(store, "--run", ids["r1"], "--run", ids["old"], "--strict") == 2
    assert f"{ids['old'][:8]} (split ?, no digest recorded)" in capsys.readouterr().err


def test_last_defaults_to_the_two_newest_finished_runs(store, capsys):
    path = store["root"] / "out" / "comparison.csv"
    assert compare(store) == 0
    assert selected(store, path) == ["r3", "r2"]  # r4 FAILED; newest first, so r3 is the reference
    assert set(read_csv(path).query("run_id == @store['ids']['r2']")["split"]) == {"B"}
    assert compare(store, "--last", "3") == 0
    assert selected(store, path) == ["r3", "r2", "r1"]
    assert compare(store, "--last", "10") == 0
    assert selected(store, path) == ["r3", "r2", "r1", "old"]
    assert compare(store, "--last", "2", "--status", "any") == 0
    assert selected(store, path) == ["r4", "r3"]
    assert compare(store, "--status", "FAILED") == 0
    assert selected(store, path) == ["r4"]
    assert "| FAILED |" in capsys.readouterr().out  # a status column once a run is not FINISHED


def test_tag_and_date_filters(store):
    path = store["root"] / "out" / "comparison.csv"
    assert compare(store, "--tag", "lowbit.overrides=qat.learning_rate=2.0e-5") == 0
    assert selected(store, path) == ["r2"]
    assert compare(store, "--tag", f"lowbit.git_commit={'1' * 40}", "--tag", "lowbit.git_dirty=false") == 0
    assert selected(store, path) == ["r2", "r1"]
    assert compare(store, "--since", "2025-03-02", "--until", "2025-03-02") == 0  # a date is its whole day
    assert selected(store, path) == ["r2"]
    assert compare(store, "--since", "2025-03-01T10:00:01", "--until", "2025-03-03T10:00:00Z") == 0
    assert selected(store, path) == ["r3", "r2"]  # an exact time as upper bound is inclusive
    assert compare(store, "--since", "2025-03-01T11:00:00+01:00", "--last", "5") == 0  # = 10:00 UTC
    assert selected(store, path) == ["r3", "r2", "r1"]
    assert compare(store, "--until", "2025-02-28") == 0
    assert selected(store, path) == ["old"]
    assert compare(store, "--variant", "ptq_*", "--variant", "fp32") == 0
    assert list(dict.fromkeys(read_csv(path)["variant"])) == ["fp32", "ptq_int8_dynamic"]


@pytest.mark.parametrize("args, message", [
    (["--run", "0" * 32], f"--run {'0' * 32}: no such run in this MLflow store"),
    (["--run", "ffffffffff00"], "--run ffffffffff00: no pipeline run in experiment 'lowbit' has an id starting with it"),
    (["--run", "r1-typo"], "--run 'r1-typo': not a run id"),
    (["--experiment", "nope"], "experiment 'nope' not found in sqlite:///"),
    (["--since", "2025-13-01"], "--since '2025-13-01': not an ISO date"),
    (["--until", "last tuesday"], "--until 'last tuesday': not an ISO date"),
    (["--since", "2025-03-05", "--until", "2025-03-01"], "--since 2025-03-05 is not before --until 2025-03-01"),
    (["--tag", "nokey"], "--tag 'nokey': expected KEY=VALUE"),
    (["--tag", "lowbit.git_dirty=maybe"], "no pipeline run in experiment 'lowbit' matches status FINISHED, tag lowbit.git_dirty=maybe"),
    (["--last", "0"], "--last 0: must be 1 or more"),
    (["--run", "abc", "--last", "2"], "--run names the runs to compare; --last pick runs from the experiment"),
    (["--variant", "lora*"], "--variant lora*: no variant of the selected runs matches; they have: fp32, ptq_int8_dynamic, qat_int8"),
])
def test_bad_input_is_exit_2_with_a_message(store, capsys, args, message):
    assert compare(store, *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lowbit: error: ") and message in err


def test_unknown_experiment_lists_those_there(store, capsys):
    assert compare(store, "--experiment", "nope") == 2
    assert "experiments there: Default, lowbit (--experiment NAME" in capsys.readouterr().err


def test_a_variant_run_id_names_its_pipeline_run(store, capsys):
    ids = store["ids"]
    assert compare(store, "--run", ids["r1_fp32"]) == 2
    assert f"is the variant run 'fp32' of pipeline run {ids['r1']}; pass that one" in capsys.readouterr().err


def test_csv_round_trip(store):
    ids = store["ids"]
    runs = fetch_runs(store["uri"], Selection(experiment="lowbit", run_ids=(ids["r1"], ids["r2"], ids["r3"])))
    frame = build_frame(runs)
    assert compare(store, "--run", ids["r1"], "--run", ids["r2"], "--run", ids["r3"]) == 0
    back = read_csv(store["root"] / "out" / "comparison.csv")
    pd.testing.assert_frame_equal(back, frame, check_dtype=False)
    assert back["accuracy"].dtype == np.float64 and back["comparable"].dtype == bool
    assert len(back) == 8 and back["weight_bytes"].isna().sum() == 0


def test_pareto_png_shows_each_run_in_its_colour(store):
    ids = store["ids"]
    assert compare(store, "--run", ids["r1"], "--run", ids["r3"]) == 0
    path = store["root"] / "out" / "pareto.png"
    assert path.stat().st_size > 20_000
    pixels = (imread(path)[..., :3] * 255).round()

    def count(rgb):
        return int((np.abs(pixels - np.array(rgb)).sum(axis=-1) < 30).sum())

    assert count((31, 119, 180)) > 100   # tab:blue, the first run
    assert count((255, 127, 14)) > 100   # tab:orange, the second
    assert count((44, 160, 44)) == 0     # tab:green: no third run


def test_missing_sqlite_store_is_not_created(tmp_path, capsys):
    shutil.copy2(REPO / "params.yaml", tmp_path / "params.yaml")
    assert main(["--root", str(tmp_path), "compare"]) == 2
    assert f"no MLflow store at {tmp_path / 'mlflow.db'}" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_a_server_that_does_not_answer_fails_fast_naming_the_uri(store, monkeypatch, capsys):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # set by the user: kept (and keeps this test fast)
    started = time.monotonic()
    assert compare(store) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert f"the MLflow tracking server at {uri} did not answer (" in err and "Connection refused; 3 tries" in err
    assert "tracking.uri in params.yaml or MLFLOW_TRACKING_URI" in err
    # the defaults filled in what the user did not set, and stay for the process
    assert {key: os.environ[key] for key in HTTP_LIMITS} == {**HTTP_LIMITS, "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}


def test_parse_date_is_utc_and_until_a_date_means_its_end():
    assert parse_date("2025-03-02", "--since") == ms("2025-03-02T00:00:00")
    assert parse_date("2025-03-02", "--until", end_of_day=True) == ms("2025-03-03T00:00:00")
    assert parse_date("2025-03-02T10:00", "--since") == ms("2025-03-02T10:00:00")
    assert parse_date("2025-03-02T12:00+02:00", "--since") == ms("2025-03-02T10:00:00")
    with pytest.raises(LowbitError, match="--since '03/02/2025': not an ISO date"):
        parse_date("03/02/2025", "--since")


def test_frame_of_plain_runs_without_mlflow():
    """The pure part: the first run's digest is split A even when only its variant runs carry it."""
    def run(run_id, digest_on_parent, digest, lr, accuracy):
        tags = {"lowbit.test_digest": digest} if digest_on_parent else {}
        return PipelineRun(run_id, "lowbit", ms("2025-01-01T00:00:00"), "FINISHED", {"qat.learning_rate": lr, "seed": "0"},
                           tags, [VariantRun("v" + run_id, "fp32", {"accuracy": accuracy}, {"lowbit.test_digest": digest})])

    runs = [run("1" * 32, False, DIGEST_B, "1e-05", 0.5), run("2" * 32, True, DIGEST_A, "2e-05", 0.6),
            run("3" * 32, True, DIGEST_B, "1e-05", 0.7)]
    frame = build_frame(runs)
    assert list(frame["split"]) == ["A", "B", "A"] and list(frame["comparable"]) == [True, False, True]
    assert list(frame["params.qat.learning_rate"]) == ["1e-05", "2e-05", "1e-05"]
    assert "params.seed" not in frame.columns
    assert list(frame["accuracy"]) == [0.5, 0.6, 0.7] and frame["f1_macro"].isna().all()
    # A first run with no digest anywhere: nothing is known comparable, and no split is called A
    runs = [run("4" * 32, False, "", "1e-05", 0.4), *runs]
    undigested = build_frame(runs)
    assert list(undigested["split"]) == ["?", "B", "C", "B"] and not undigested["comparable"].any()
    with pytest.raises(LowbitError, match=f"is not that of run {'4' * 8}, which recorded no test-split digest"):
        refuse_incomparable(undigested, runs)
