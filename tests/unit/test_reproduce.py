"""`lowbit reproduce`: every bad input is a clear error before anything changes; the comparison catches a changed figure.

Real pieces: a temp git repository holding params.yaml, a SQLite MLflow store written by the
pipeline's own Tracker, a local HTTP server standing in for a tracking server that does not answer.
"""

from __future__ import annotations

import http.server
import importlib.util
import os
import shutil
import subprocess
import threading
from unittest import mock

import pytest

from flows.cli import main
from flows.mlflow_store import HTTP_LIMITS
from flows.reproduce import RecordedRun, compare, format_report
from flows.tracking import Tracker
from lowbit.config import load_params
from tests.conftest import REPO, git

FP32 = {"accuracy": 0.75, "f1_macro": 0.7, "loss": 0.61, "ece": 0.05, "weight_bytes": 1000.0}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A committed git repository with lowbit's code and params.yaml (tracking: its own mlflow.db)."""
    for key in ("MLFLOW_TRACKING_URI", *HTTP_LIMITS):
        monkeypatch.delenv(key, raising=False)
    root = tmp_path / "project"
    root.mkdir()
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    for package in ("lowbit", "tasks"):  # the worktree's own code computes its params hash
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    git(root, "init", "-q")
    git(root, "config", "user.email", "ci@lowbit.invalid")
    git(root, "config", "user.name", "lowbit ci")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    with mock.patch.dict(os.environ):  # the HTTP limits a command sets for its process end with the test
        yield root


def record_run(root, overrides=(), variants={"fp32": FP32}, status="FINISHED") -> str:
    """A pipeline run as the flow records it: the Tracker's parent run and one nested run per variant."""
    tracker = Tracker(load_params(root / "params.yaml", overrides), root)
    tracker.start({"lowbit.overrides": " ".join(overrides)})
    tracker.tag("lowbit.data_hash", "d" * 64)
    for variant, metrics in variants.items():
        tracker.log_variant({"variant": variant, "format": "hf"}, metrics, "baseline", False, [], {})
    tracker.finish(status)
    return tracker.run_id


def reproduce(root, *args) -> int:
    return main(["--root", str(root), "reproduce", *args])


def nothing_changed(root, workdir=None) -> bool:
    worktrees = git(root, "worktree", "list", "--porcelain").count("worktree ")
    clean = git(root, "status", "--porcelain") in ("", "?? mlflow.db\n?? mlartifacts/\n", "?? mlflow.db\n")
    return worktrees == 1 and clean and (workdir is None or not workdir.exists())


def test_a_run_id_that_does_not_exist(project, capsys):
    record_run(project)
    assert reproduce(project, "0123456789abcdef0123456789abcdef") == 2
    err = capsys.readouterr().err
    assert "no MLflow run '0123456789abcdef0123456789abcdef' in sqlite:///" in err and "lowbit run` prints" in err
    assert nothing_changed(project, project.parent / "project-reproduce-01234567")


def test_no_store_at_all_is_not_created_empty(project, capsys):
    assert reproduce(project, "0123456789abcdef0123456789abcdef") == 2
    assert f"no MLflow store at {project / 'mlflow.db'}" in capsys.readouterr().err
    assert not (project / "mlflow.db").exists()


def test_a_run_from_a_dirty_tree_is_refused_with_what_to_do(project, capsys):
    with (project / "params.yaml").open("a") as handle:
        handle.write("# an edit not committed\n")
    run_id = record_run(project)
    assert reproduce(project, run_id) == 2
    err = capsys.readouterr().err
    assert "recorded from a tree with uncommitted changes (lowbit.git_dirty='true')" in err
    assert "Commit the changes, run the pipeline again (lowbit run), and reproduce that run" in err
    assert git(project, "worktree", "list", "--porcelain").count("worktree ") == 1


def test_params_that_were_not_committed_are_found_by_the_worktree_code_and_the_worktree_removed(project, capsys):
    # A clean tree, but the run's params came with an override that never reached params.yaml.
    run_id = record_run(project, overrides=("baseline.epochs=4",))
    workdir = project.parent / "elsewhere"
    assert reproduce(project, run_id, "--workdir", str(workdir)) == 2
    err = capsys.readouterr().err
    committed, recorded = load_params(project / "params.yaml"), load_params(project / "params.yaml", ["baseline.epochs=4"])
    assert (f"params.yaml at the recorded commit hashes to {committed.digest()[:12]}, the run recorded "
            f"{recorded.digest()[:12]}: the run used params that were not committed") in err
    assert nothing_changed(project, workdir)  # the worktree made for the check is gone again


def test_an_existing_workdir_is_refused_and_left_as_it_was(project, capsys):
    run_id = record_run(project)
    workdir = project.parent / "busy"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    assert reproduce(project, run_id, "--workdir", str(workdir)) == 2
    assert f"{workdir} already exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in workdir.iterdir()] == ["notes.txt"] and nothing_changed(project)


def test_a_variant_run_a_failed_run_and_an_unknown_commit_are_each_explained(project, capsys):
    from mlflow import MlflowClient

    run_id = record_run(project)
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    child = client.search_runs([client.get_run(run_id).info.experiment_id],
                               filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'")[0]
    assert reproduce(project, child.info.run_id) == 2
    assert f"nested run of variant 'fp32'; reproduce its pipeline run: lowbit reproduce {run_id}" in capsys.readouterr().err

    failed = record_run(project, status="FAILED")
    assert reproduce(project, failed) == 2
    assert f"run {failed} ended FAILED: only a finished run" in capsys.readouterr().err

    client.set_tag(run_id, "lowbit.git_commit", "f" * 40)  # e.g. made in a clone whose commits were never pushed
    assert reproduce(project, run_id) == 2
    assert f"commit {'f' * 40} (run {run_id}) is not in the repository at {project}: fetch it" in capsys.readouterr().err
    assert nothing_changed(project)

    assert reproduce(project, run_id, "--tolerance", "-1") == 2
    assert "--tolerance -1.0: must be a number >= 0" in capsys.readouterr().err


def test_a_tracking_server_that_does_not_answer_is_asked_a_bounded_number_of_times(project, capsys, monkeypatch):
    requests = []

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            requests.append(self.path)
            self.send_response(503)
            self.end_headers()

        do_POST = do_GET  # noqa: N815 - unavailable for every method

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")  # set by the user: kept (and keeps this test fast)
    try:
        assert reproduce(project, "0123456789abcdef0123456789abcdef") == 2
    finally:
        server.shutdown()
    err = capsys.readouterr().err
    tries = int(HTTP_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) + 1
    assert (f"the MLflow tracking server at http://127.0.0.1:{server.server_port} did not answer "
            f"(too many 503 error responses; {tries} tries of up to 30 s)") in err
    assert "Start it, or point lowbit at another store with tracking.uri in params.yaml or MLFLOW_TRACKING_URI" in err
    assert len(requests) == tries == 3
    assert nothing_changed(project)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens: refused at once
    assert reproduce(project, "0123456789abcdef0123456789abcdef") == 2
    assert "did not answer ([Errno 111] Connection refused; 3 tries of up to 30 s)" in capsys.readouterr().err


def test_the_comparison_catches_a_changed_figure_and_a_missing_variant():
    original = {"fp32": FP32, "lora": {"accuracy": 0.5, "f1_macro": 0.4, "loss": 1.0, "ece": 0.1}}
    same = compare(original, {"fp32": dict(FP32), "lora": dict(original["lora"])}, 1e-6)
    assert len(same) == 8 and all(row["ok"] and row["difference"] == 0.0 for row in same)
    assert {row["metric"] for row in same} == {"accuracy", "f1_macro", "loss", "ece"}  # weight_bytes is not quality

    one_flip = dict(FP32, accuracy=FP32["accuracy"] - 1 / 24)  # one of 24 test rows predicted otherwise
    rows = compare(original, {"fp32": one_flip, "lora": None}, 1e-6)
    bad = {(row["variant"], row["metric"]): row for row in rows if not row["ok"]}
    assert set(bad) == {("fp32", "accuracy"), ("lora", "accuracy"), ("lora", "f1_macro"), ("lora", "loss"), ("lora", "ece")}
    assert bad["fp32", "accuracy"]["difference"] == pytest.approx(1 / 24)
    assert bad["lora", "loss"]["reproduced"] is None
    assert all(row["ok"] for row in compare(original, {"fp32": one_flip, "lora": original["lora"]}, 0.05))
    last_bits = dict(FP32, loss=FP32["loss"] + 3e-8)
    assert all(row["ok"] for row in compare({"fp32": FP32}, {"fp32": last_bits}, 1e-6))
    assert not all(row["ok"] for row in compare({"fp32": FP32}, {"fp32": last_bits}, 0.0))

    run = RecordedRun("r" * 32, "sqlite:///x", "FINISHED", {"lowbit.git_commit": "c" * 40, "lowbit.params_hash": "p" * 64})
    report = format_report(run, {"rows": rows, "ok": False, "tolerance": 1e-6, "workdir": "/w", "pull": "nothing to pull",
                                 "report": "/w/r.json",
                                 "data_hash": {"original": "d" * 64, "reproduced": "d" * 64, "ok": True}})
    assert "| fp32 | accuracy | 0.75 | 0.70833333 | 0.0417 | 1e-06 | NOT OK |" in report
    assert "| lora | loss | 1 | – | – | 1e-06 | MISSING |" in report
    assert "NOT reproduced: 5 of 8 figures outside the tolerance or missing (fp32 accuracy, lora accuracy" in report


# dvc pull: nothing to pull, source data that cannot be fetched, stage outputs that dvc repro makes.

def dvc_project(root, remote: str | None):
    """A git + DVC repository with one file under DVC control, as a worktree of its commit starts (nothing fetched)."""
    from tests.conftest import venv_env

    env = venv_env()
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.email", "ci@lowbit.invalid")
    git(root, "config", "user.name", "lowbit ci")
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True, env=env)
    if remote:
        subprocess.run(["dvc", "remote", "add", "-d", "store", remote], cwd=root, check=True, env=env, capture_output=True)
    return env


def test_pull_with_nothing_tracked_has_nothing_to_do(tmp_path):
    from flows.reproduce import pull

    env = dvc_project(tmp_path / "p", str(tmp_path / "remote"))
    assert pull(tmp_path / "p", tmp_path / "p", env).startswith("nothing to pull: the commit has no dvc.lock")


def test_pull_fetches_source_data_and_refuses_to_go_on_without_it(tmp_path):
    from flows.reproduce import pull
    from lowbit.errors import LowbitError

    root = tmp_path / "p"
    env = dvc_project(root, str(tmp_path / "remote"))
    (root / "data").mkdir()
    (root / "data" / "tickets.csv").write_text("text,label\nhello,a\n")
    subprocess.run(["dvc", "add", "-q", "data/tickets.csv"], cwd=root, check=True, env=env)
    (root / "dvc.lock").write_text("schema: '2.0'\nstages:\n  prepare:\n    cmd: python -m tasks.prepare\n"
                                   "    outs:\n    - path: data/prepared\n      md5: 0123456789abcdef0123456789abcdef.dir\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "data under DVC")

    def fresh_checkout():  # what a new worktree has: the .dvc file, neither the data nor a cache
        shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)
        (root / "data" / "tickets.csv").unlink(missing_ok=True)

    fresh_checkout()  # never pushed: the source data cannot be had
    with pytest.raises(LowbitError, match=r"data/tickets.csv: tracked by the commit's .dvc files but not fetched from "
                                          r"DVC remote 'store' \(.*remote\): is it reachable\? Were they pushed"):
        pull(root, root, env)

    (root / "data" / "tickets.csv").write_text("text,label\nhello,a\n")
    subprocess.run(["dvc", "commit", "-q", "-f", "data/tickets.csv.dvc"], cwd=root, check=True, env=env)
    subprocess.run(["dvc", "push", "-q"], cwd=root, check=True, env=env)
    fresh_checkout()
    line = pull(root, root, env)  # the stage output listed in dvc.lock was never pushed: dvc repro will make it
    assert line == (f"dvc pull from DVC remote 'store' ({tmp_path / 'remote'}): 0 of 1 stage outputs in dvc.lock present, "
                    "1 source files; dvc repro computes the others")
    assert (root / "data" / "tickets.csv").read_text() == "text,label\nhello,a\n"


def test_pull_without_a_remote_or_from_one_that_cannot_be_used(tmp_path):
    from flows.reproduce import pull
    from lowbit.errors import LowbitError

    root = tmp_path / "p"
    env = dvc_project(root, None)
    (root / "tickets.csv").write_text("x\n")
    subprocess.run(["dvc", "add", "-q", "tickets.csv"], cwd=root, check=True, env=env)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "data under DVC")
    with pytest.raises(LowbitError, match=r"tracks tickets.csv in DVC but configures no default DVC remote"):
        pull(root, root, env)
    # a remote DVC cannot use here (its plugin is not installed): dvc pull itself fails
    if importlib.util.find_spec("dvc_azure"):
        pytest.skip("dvc-azure is installed here: the remote would be tried over the network")
    subprocess.run(["dvc", "remote", "add", "-d", "cloud", "azure://lowbit/store"], cwd=root, check=True, env=env,
                   capture_output=True)
    with pytest.raises(LowbitError, match=r"(?s)dvc pull from DVC remote 'cloud' \(azure://lowbit/store\) failed "
                                          r"\(exit \d+\):\n.*requires 'dvc-azure'"):
        pull(root, root, env)
