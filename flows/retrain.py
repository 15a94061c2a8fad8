"""Scheduled retraining: re-read the data, run the pipeline (DVC skips what did not change), promote.

    lowbit retrain                          # once, exactly as the schedule fires it
    lowbit schedule --cron "0 3 * * 1"      # serve it here on a cron schedule (Ctrl-C stops serving)
    prefect deploy --all                    # prefect.yaml: the same flow from a work pool

A retrain with nothing changed re-reads the source, gets byte-identical splits, so every
training stage stays up to date; promotion then finds the champion's own files and moves no
alias. One retraining run at a time per deployment (`concurrency_limit: 1` / `global_limit=1`);
promotions of one registered model are serialised across processes by a Prefect global
concurrency limit (flows/promote.py), so two runs started at once move @champion once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from prefect import flow, task
from prefect.client.schemas.schedules import CronSchedule
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.pipeline import pipeline_on
from flows.runners import RunnerChoice
from flows.promote import promote
from lowbit.config import load_params
from lowbit.errors import LowbitError
from tasks.plumbing import Paths

DEPLOYMENT = "lowbit-retrain"


@task(name="promote")
def promote_task(root: str, run_id: str | None = None) -> dict:
    paths = Paths(Path(root).resolve())
    params = load_params(paths.params)
    decision = promote(paths, params, run_id)
    line = decision.line(params.promote.registered_model)
    print(line)
    return {"promoted": decision.promoted, "version": decision.version, "reason": decision.reason, "line": line,
            "variant": decision.challenger.variant if decision.challenger else None}


@flow(name="lowbit-promote")
def promote_flow(root: str = ".", run_id: str | None = None) -> dict:
    return promote_task(root, run_id)


@flow(name="lowbit-retrain")
def retrain(root: str = ".", refresh_data: bool = True, runner: str | None = None, parallel: int | None = None,
            dask_address: str | None = None) -> dict:
    """The runner arguments override params.yaml `runner` (unset: as configured there)."""
    section = load_params(Paths(Path(root).resolve()).params).runner
    choice = RunnerChoice.from_params(section, runner, parallel, dask_address)
    outcome = pipeline_on(choice)(root=root, refresh_data=refresh_data)
    return outcome | {"promotion": promote_task(root, outcome["mlflow_run_id"])}


def check_cron(cron: str) -> str:
    try:
        CronSchedule(cron=cron)
    except ValueError:  # pydantic's message repeats the string and links its docs: say what a cron is instead
        raise LowbitError(f"--cron {cron!r} is not a cron expression croniter accepts; "
                          "five fields: minute hour day-of-month month day-of-week, e.g. '0 3 * * 1' = Mondays 03:00") from None
    return cron


def serve(root: Path, cron: str) -> None:
    """Serve the retraining flow on `cron` from this process until interrupted."""
    check_cron(cron)  # before a server starts
    with prefect_server_for_schedules() as api, temporary_settings({PREFECT_API_URL: api}):
        print(f"serving {DEPLOYMENT} on '{cron}' for {root} (Prefect API {api}); "
              "Ctrl-C stops serving, the schedule stays active", flush=True)
        retrain.serve(name=DEPLOYMENT, cron=cron, parameters={"root": str(root)}, global_limit=1,
                      pause_on_shutdown=False, print_starting_message=False)


@contextlib.contextmanager
def prefect_server_for_schedules(wait_s: float = 300.0) -> Iterator[str]:
    """The Prefect API a schedule needs. Prefect's temporary API runs no scheduler (a served
    cron never fires on it), so without PREFECT_API_URL a local `prefect server start` is run
    for as long as the schedule is served, then stopped."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    prefect = Path(sys.executable).parent / "prefect"
    server = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + wait_s
        while not _answers(f"{url}/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise LowbitError(f"`prefect server start` did not answer on {url} within {wait_s:.0f} s "
                                  f"({(server.stderr.read() if server.poll() is not None else '')[-500:]}); "
                                  "start one yourself and set PREFECT_API_URL")
            time.sleep(1.0)
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=30)
        if server.poll() is None:
            server.kill()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
