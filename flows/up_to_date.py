"""A rerun with nothing to do, answered without starting Prefect.

    run_id = recorded_run(paths, params)   # None: something changed, run the flow

`lowbit run` after a successful run with nothing changed used to spend about 25 s on
starting Prefect's temporary API, asking DVC about each stage one task at a time, and logging
a new MLflow run identical to the last one. When DVC finds every stage up to date and the
MLflow store already holds a FINISHED pipeline run made from this exact dvc.lock and these
params, there is nothing to run, log or push: the caller prints that run's report and stops.
Anything else (a changed param, a failed or partial last run, another MLflow store) goes
through the flow as before.
"""

from __future__ import annotations

from flows.dvc_stages import dvc_repo
from lowbit.config import Params
from lowbit.io import sha256_file
from tasks.plumbing import Paths

# Set on the parent MLflow run when a pipeline run finishes: the dvc.lock its outputs are recorded in.
LOCK_TAG = "lowbit.dvc_lock_sha256"


def lock_digest(paths: Paths) -> str | None:
    lock = paths.root / "dvc.lock"
    return sha256_file(lock) if lock.is_file() else None


def recorded_run(paths: Paths, params: Params) -> str | None:
    """The id of a FINISHED pipeline run recording exactly the current outputs, if every stage is up to date."""
    digest = lock_digest(paths)
    if digest is None:
        return None
    with dvc_repo(paths.root) as repo:
        if repo.status():
            return None
    from flows.tracking import finished_pipeline_run  # MLflow's import is slow: only when DVC found nothing to do

    return finished_pipeline_run(params, paths.root, {LOCK_TAG: digest, "lowbit.params_hash": params.digest()})
