"""The runner choice (params, command line), the scheduler check, and the cross-process DVC lock."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.dvc_stages import LOCK_FILE, dvc_repo
from flows.runners import CONCURRENT_BRANCHES, RunnerChoice, check_scheduler_answers, stage_threads, task_runner
from lowbit.config import RunnerParams
from lowbit.errors import LowbitError
from tests.conftest import venv_env

THREADS = RunnerParams(kind="threads", parallel=0, dask_address="")


def test_command_line_values_override_params_and_an_address_implies_dask():
    assert RunnerChoice.from_params(THREADS).workers == 1
    assert RunnerChoice.from_params(THREADS, kind="dask").workers == CONCURRENT_BRANCHES
    assert RunnerChoice.from_params(THREADS, parallel=3).workers == 3
    choice = RunnerChoice.from_params(THREADS, dask_address="tcp://10.0.0.5:8786")
    assert (choice.kind, choice.dask_address) == ("dask", "tcp://10.0.0.5:8786")
    assert choice.describe() == "dask scheduler tcp://10.0.0.5:8786"
    on_dask = RunnerParams(kind="dask", parallel=2, dask_address="tcp://s:8786")
    assert RunnerChoice.from_params(on_dask).describe() == "dask scheduler tcp://s:8786"
    assert RunnerChoice.from_params(on_dask, dask_address="").describe() == "dask local cluster (2 worker processes)"
    with pytest.raises(LowbitError, match="needs the dask runner"):
        RunnerChoice.from_params(on_dask, kind="threads")
    with pytest.raises(LowbitError, match="--parallel 0: must be 1 or more"):
        RunnerChoice.from_params(THREADS, parallel=0)


def test_params_refuse_an_address_without_the_dask_runner():
    with pytest.raises(ValueError, match="set kind: dask"):
        RunnerParams(kind="threads", parallel=0, dask_address="tcp://s:8786")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_scheduler_that_does_not_answer_is_named_with_the_key_within_the_timeout():
    address = f"tcp://127.0.0.1:{closed_port()}"
    started = time.perf_counter()
    with pytest.raises(LowbitError) as caught:
        check_scheduler_answers(address, timeout_s=3)
    assert time.perf_counter() - started < 15
    assert address in str(caught.value) and "runner.dask_address" in str(caught.value)
    with pytest.raises(LowbitError, match="is not a scheduler address"):
        check_scheduler_answers("dask-scheduler")


HOLD_LOCK = """
import sys, time
from pathlib import Path
from flows.dvc_stages import dvc_repo
with dvc_repo(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_dvc_lock_excludes_another_process(tmp_path: Path):
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True, env=venv_env())
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path), "3"], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.perf_counter()
        with dvc_repo(tmp_path):
            waited = time.perf_counter() - started
    finally:
        holder.wait(30)
    assert holder.returncode == 0
    assert (tmp_path / LOCK_FILE).exists()
    assert 1.5 < waited < 20  # it waited for the other process's 3 s, not for nothing and not forever


def test_threads_of_one_process_exclude_each_other_and_a_stuck_holder_times_out(tmp_path: Path, monkeypatch):
    import threading

    import flows.dvc_stages

    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True, env=venv_env())
    inside, overlaps = [], []

    def hold():
        with dvc_repo(tmp_path):
            overlaps.append(len(inside))
            inside.append(1)
            time.sleep(0.5)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert overlaps == [0, 0, 0]

    monkeypatch.setattr(flows.dvc_stages, "LOCK_WAIT_S", 0.5)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path), "5"], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LowbitError, match=r"waited 0 s for .*lowbit-dvc\.lock, held by another lowbit process"):
            with dvc_repo(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait(30)


@pytest.mark.parametrize(("cores", "stages", "threads"), [(2, 4, 1), (16, 4, 4), (8, 3, 2), (1, 1, 1), (64, 1, 64)])
def test_concurrent_stages_share_the_cores_without_oversubscribing(cores, stages, threads):
    assert stage_threads(cores, stages) == threads


def test_a_local_cluster_leaves_the_flow_process_environment_alone():
    """Its stages run in this process's environment: Dask's single-thread settings must stay in the workers."""
    before = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    runner = task_runner(RunnerChoice(kind="dask", parallel=2))
    with runner:
        worker_threads = runner.client.run(lambda: os.environ.get("OMP_NUM_THREADS"))
    assert {key: os.environ.get(key) for key in before} == before
    assert set(worker_threads.values()) == {str(stage_threads(os.cpu_count() or 1, 2))}
