"""Reaching an MLflow store from an operation: bounded waits, and errors that say what to set.

    client = open_store(uri)        # a store that exists and answered, or a LowbitError saying why not
    with store_errors(uri):         # MLflow's exceptions in the block become such LowbitErrors too
        client.search_runs(...)

`lowbit compare`, `lowbit reproduce` and the model registry open their store here. The command
line imports this module (through compare and reproduce) to build its parser, so MLflow is
imported inside the functions: the other commands should not pay its ~2 s import time.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from lowbit.errors import LowbitError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

# MLflow retries a request that gets no answer 7 times with exponential backoff and waits up to
# 120 s for each: many minutes of silence before any error. These give 3 tries (the second at
# once, the third 2-3 s later), each waiting up to 30 s for a reply: a server that is down refuses
# at once, so that fails in seconds; 30 s is for the slowest real answer, a model upload to a
# server that stores the files (in S3, say) before it replies. A hung server: about 1.5 minutes.
#
# They are set process-wide with setdefault, not for the length of a `with` block:
# - every request of an operation must be bounded, also the many made long after the store was
#   opened, through the client or mlflow.* (a promotion registers, moves aliases and loads models
#   through the global URI): a scope would have to wrap each of those call sites;
# - os.environ belongs to the whole process: a block that sets and then removes the variables
#   changes them under any other thread's request (Prefect runs tasks in threads); set once,
#   they never change again;
# - setdefault leaves a variable the user set alone.
# One lowbit process talks to one store, so the limits hold for the rest of the process and for
# the processes it starts.
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
WHAT_TO_SET = "tracking.uri in params.yaml or MLFLOW_TRACKING_URI"
SQLITE = "sqlite:///"
# MLflow's wording when no HTTP response came at all (refused, unreachable, timed out, only 5xx).
NO_ANSWER = re.compile(r"failed with (timeout )?exception")
# Answers about the caller's credentials: from an MLflow server, not proof of another kind of server.
NOT_ALLOWED = ("UNAUTHENTICATED", "PERMISSION_DENIED", "CUSTOMER_UNAUTHORIZED")


def open_store(uri: str) -> MlflowClient:
    """A client for the existing store at `uri`, which has answered; HTTP_LIMITS bound every wait."""
    from mlflow import MlflowClient

    # MLflow creates an empty SQLite store where none exists: a typo in the path would then
    # read as "no such run" and leave a stray mlflow.db behind.
    if uri.startswith(SQLITE) and not Path(uri.removeprefix(SQLITE)).is_file():
        raise LowbitError(f"no MLflow store at {uri.removeprefix(SQLITE)} ({WHAT_TO_SET}): run `lowbit run` first, "
                          "or point one of them at the store that holds the runs")
    bound_http_waits()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with store_errors(uri):
        client.search_experiments(max_results=1)
    return client


def bound_http_waits() -> None:
    """HTTP_LIMITS for this process and those it starts, unless the user set them."""
    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """MLflow's exceptions raised in the block, as LowbitErrors that name `uri` and what to set."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        raise LowbitError(describe(err, uri)) from None


def describe(err: MlflowException, uri: str) -> str:
    """Whether the store did not answer, answered but is not MLflow, or answered with an error."""
    from mlflow.exceptions import RestException

    detail = err.message.split(". Response body")[0][:300]
    if err.error_code in NOT_ALLOWED:
        user = os.environ.get("MLFLOW_TRACKING_USERNAME")
        who = f"user {user!r} (MLFLOW_TRACKING_USERNAME)" if user else "no user (MLFLOW_TRACKING_USERNAME is not set)"
        return (f"the MLflow server at {uri} refused lowbit's request as {who}: {detail}. Set MLFLOW_TRACKING_USERNAME "
                "and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) to credentials it accepts, or point lowbit at "
                f"another store with {WHAT_TO_SET}")
    if isinstance(err, RestException):
        return f"the MLflow server at {uri} answered with an error: {detail}"
    if not uri.startswith(("http://", "https://")):
        return f"MLflow store {uri}: {err.message}"
    if NO_ANSWER.search(err.message):
        tries = int(os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_LIMITS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])) + 1
        timeout = os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_LIMITS["MLFLOW_HTTP_REQUEST_TIMEOUT"])
        return (f"the MLflow tracking server at {uri} did not answer ({no_answer_reason(err.message)}; "
                f"{tries} {'try' if tries == 1 else 'tries'} of up to {timeout} s). Start it, or point lowbit at "
                f"another store with {WHAT_TO_SET} (MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT "
                "wait longer)")
    return f"{uri} answered, but not as an MLflow tracking server: {detail}. Set {WHAT_TO_SET} to the MLflow server"


def no_answer_reason(message: str) -> str:
    """The cause inside MLflow's "API request ... failed with exception ... Caused by ..." text."""
    errno = re.search(r"\[Errno -?\d+\] [^'\")]+", message)
    if errno:
        return errno.group(0)
    cause = re.search(r"Caused by (\w+)\('?([^'()]*)", message)
    if cause is None:
        return message.splitlines()[0][:200]
    reasons = {"ReadTimeoutError": "no reply in time", "ConnectTimeoutError": "no connection in time"}
    return reasons.get(cause.group(1), cause.group(2) or cause.group(1))  # ResponseError('too many 503 error responses')


@dataclass(frozen=True)
class VariantRun:
    """One variant's nested run, as flows/tracking.py logs it under its pipeline run."""

    run_id: str
    variant: str
    metrics: dict[str, float]
    tags: dict[str, str]


def all_runs(client: MlflowClient, experiment_id: str, filter_string: str, order: str, page_size: int) -> Iterator:
    """The matching runs by start time (`order` ASC or DESC), fetching a page of `page_size` when needed."""
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=page_size,
                                  order_by=[f"attributes.start_time {order}"], page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def variant_runs(client: MlflowClient, run) -> list[VariantRun]:
    """The variant runs nested under pipeline run `run`, in logging (report) order."""
    children = all_runs(client, run.info.experiment_id, f"tags.`mlflow.parentRunId` = '{run.info.run_id}'", "ASC",
                        page_size=1000)
    variants: dict[str, VariantRun] = {}
    for child in children:  # a variant logged twice keeps its last run
        name = child.data.tags.get("lowbit.variant") or child.info.run_name
        variants[name] = VariantRun(child.info.run_id, name, dict(child.data.metrics), dict(child.data.tags))
    return list(variants.values())
