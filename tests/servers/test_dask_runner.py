"""The pipeline's branches on a real Dask scheduler, pointed at by params.yaml alone.

A `dask scheduler` and `dask worker` processes are started here, as a cluster would run them;
the project says `runner.kind: dask` and `runner.dask_address`. The branches must run in the
workers' processes, at the same time, and leave dvc.lock, the DVC cache and MLflow as a
sequential run would."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from dvc.repo import Repo
from mlflow import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.pipeline import BASELINE_BRANCHES, ADAPTER_BRANCHES, pipeline_on
from flows.runners import RunnerChoice
from lowbit.config import load_params
from lowbit.io import read_json
from tests.conftest import TINY, make_project, venv_env

pytestmark = pytest.mark.servers
BRANCHES = (*BASELINE_BRANCHES, *ADAPTER_BRANCHES)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def dask_cluster():
    """A scheduler and 4 single-threaded worker processes, each its own OS process tree."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{free_port()}"
    env = venv_env() | {"DASK_LOGGING__DISTRIBUTED": "warning"}
    started = time.perf_counter()
    scheduler = subprocess.Popen(["dask", "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                                  "--no-dashboard"], env=env)
    worker = subprocess.Popen(["dask", "worker", address, "--nworkers", "4", "--nthreads", "1", "--no-dashboard"], env=env)
    try:
        client = Client(address, timeout=60)
        client.wait_for_workers(4, timeout=120)
        print(f"dask scheduler and 4 workers up in {time.perf_counter() - started:.1f} s")
        yield address, set(client.run(os.getpid).values())
        client.close()
    finally:
        for process in (worker, scheduler):
            process.terminate()
        for process in (worker, scheduler):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()


def task_run_intervals(flow_run_id: str) -> dict[str, tuple[float, float]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                               sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100)

    return {run.name: (run.start_time.timestamp(), run.end_time.timestamp()) for run in asyncio.run(read())}


def test_branches_run_concurrently_in_the_workers_and_leave_dvc_and_mlflow_consistent(tmp_path: Path, dask_cluster):
    address, worker_pids = dask_cluster
    root = make_project(tmp_path / "project", TINY | {"runner.kind": "dask", "runner.dask_address": address})
    choice = RunnerChoice.from_params(load_params(root / "params.yaml").runner)
    with prefect_test_harness(server_startup_timeout=120):
        outcome = pipeline_on(choice)(root=str(root))
        intervals = task_run_intervals(
            MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(outcome["mlflow_run_id"]).data.tags["lowbit.prefect_flow_run_id"])

    # the submitted stages (baseline and the branches) ran in worker processes, the branches in more
    # than one of them; prepare, evaluate and report are called in the flow's own process
    pids = outcome["stage_pids"]
    assert {pids[name] for name in ("baseline", *BRANCHES)} <= worker_pids
    assert len({pids[name] for name in BRANCHES}) >= 2
    assert {pids[name] for name in ("prepare", "evaluate", "report")} == {os.getpid()}
    # ... and at the same time: some branch started before another had ended
    spans = sorted(intervals[name] for name in BRANCHES)
    assert any(later_start < earlier_end for (_, earlier_end), (later_start, _) in zip(spans, spans[1:])), spans

    # dvc.lock holds every stage, the cache every output: nothing to rerun, nothing missing
    lock = (root / "dvc.lock").read_text()
    for stage in ("prepare", "baseline", *BRANCHES, "evaluate", "report"):
        assert f"\n  {stage}:\n" in lock, stage
    with Repo(str(root)) as repo:
        assert repo.status() == {}
        assert repo.status(cloud=True) == {}  # pushed: the remote has every cached output
    run = MlflowClient(f"sqlite:///{root}/mlflow.db").get_run(outcome["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["lowbit.runner"] == f"dask scheduler {address}"
    variants = {row["variant"] for row in read_json(root / "reports" / "summary.json")["rows"]}
    children = MlflowClient(f"sqlite:///{root}/mlflow.db").search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {child.data.tags["lowbit.variant"] for child in children} == variants
    assert {"fp32", "ptq_int8_dynamic", "qat_int8", "lora", "qlora"} <= variants
