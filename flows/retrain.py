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

from pathlib import Path

from prefect import flow, task
from prefect.client.schemas.schedules import CronSchedule

from flows.pipeline import pipeline
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
def retrain(root: str = ".", refresh_data: bool = True) -> dict:
    outcome = pipeline(root=root, refresh_data=refresh_data)
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
    retrain.serve(name=DEPLOYMENT, cron=check_cron(cron), parameters={"root": str(root)}, global_limit=1,
                  pause_on_shutdown=False)
