"""Running a dvc.yaml stage from Prefect so that DVC and the flow agree.

A Prefect task runs a stage only when DVC says it changed (or when forced), by
executing the stage's own `cmd` from dvc.yaml in a process of its own (identical code,
fresh memory for each stage: forked from the warm stage host of flows/stage_host.py, or a
subprocess), then `dvc commit`s it: dvc.lock and the DVC cache end up exactly as after
`dvc repro`, so `dvc status` is clean after `lowbit run`.
DVC calls are serialised: branches of the flow may run concurrently, DVC's repo may not.
Branches run in threads of one process (`--runner threads`) or in Dask worker processes,
possibly on other machines sharing the project folder (`--runner dask`), so the guard is a
lock file in the project, not a lock in memory.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Iterator

import yaml
from dvc.repo import Repo
from filelock import FileLock, Timeout

from flows.stage_host import FORKABLE, run_in_host, stage_env
from lowbit.errors import LowbitError
from lowbit.io import read_json
from tasks.plumbing import Paths

# Where lowbit's DVC calls queue: inside DVC's own tmp folder (never tracked, never pushed).
LOCK_FILE = Path(".dvc") / "tmp" / "lowbit-dvc.lock"
# A DVC call holds the lock for seconds (hashing a model's files for a commit, a push); a wait
# this long means a process that hangs or died holding it on a file system without locks.
LOCK_WAIT_S = 900.0


def stage_command(root: Path, stage: str) -> str:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    if stage not in stages:
        raise LowbitError(f"{root / 'dvc.yaml'}: no stage {stage!r}; stages: {', '.join(stages)}")
    return stages[stage]["cmd"]


@contextlib.contextmanager
def dvc_repo(root: Path) -> Iterator[Repo]:
    """The project's DVC repo, one caller at a time across threads and processes (each call opens
    the lock file anew, so threads of one process exclude each other too); DVC resolves stage
    paths against the cwd."""
    lock_path = root / LOCK_FILE
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(lock_path, timeout=LOCK_WAIT_S):
            with contextlib.chdir(root), Repo(str(root)) as repo:
                yield repo
    except Timeout:
        raise LowbitError(f"waited {LOCK_WAIT_S:.0f} s for {lock_path}, held by another lowbit process on this project; "
                          "let it finish (or stop it) and run again") from None


def stage_changed(root: Path, stage: str) -> bool:
    with dvc_repo(root) as repo:
        return bool(repo.status(targets=[stage]))


def commit_stage(root: Path, stage: str) -> None:
    with dvc_repo(root) as repo:
        repo.commit(stage, force=True)


# tracking.dvc_remote is registered under this name in .dvc/config.local: a machine's own
# setting (its bucket, its endpoint), never committed, so params.yaml alone says where pushes go.
REMOTE = "lowbit"
S3_KEYS = ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL "
           "for an S3-compatible server such as MinIO)")


class RemoteRefused(LowbitError):
    """The DVC remote refused lowbit or could not be reached: a setting to change, which a retry repeats."""


def push_outputs(root: Path) -> int:
    """Push every output to tracking.dvc_remote, or to the project's default remote when it is "".

    Credentials and the endpoint come from the environment, as for any boto3 program (s3fs and
    aiobotocore honour AWS_ENDPOINT_URL_S3 and AWS_ENDPOINT_URL). A push reads outputs and the
    DVC cache and writes only to the remote: when it fails, nothing here has changed."""
    from lowbit.config import load_params

    url = load_params(Paths(root).params).tracking.dvc_remote
    with dvc_repo(root) as repo:
        name = use_remote(repo, url) if url else repo.config["core"].get("remote")
        try:
            return repo.push(remote=name)
        except refusals() as err:
            raise RemoteRefused(refused_message(repo, name, url, err)) from None


def use_remote(repo: Repo, url: str) -> str:
    """Point the remote `lowbit` of .dvc/config.local at `url`, keeping its other options
    (e.g. `dvc remote modify --local lowbit profile ...`)."""
    from dvc.config import ConfigError

    if repo.config["remote"].get(REMOTE, {}).get("url") != url:
        try:
            with repo.config.edit("local") as config:
                config["remote"].setdefault(REMOTE, {})["url"] = url
        except ConfigError as err:
            raise LowbitError(f"tracking.dvc_remote {url!r}: DVC refused it as a remote ({err}); "
                              "give a URL DVC can push to, e.g. s3://bucket/lowbit-dvc") from None
    return REMOTE


def refusals() -> tuple[type[BaseException], ...]:
    """What a remote that refuses the credentials, lacks the bucket or does not answer raises
    through DVC: s3fs turns 403 into PermissionError and 404 into FileNotFoundError; botocore's
    own errors (no credentials, no connection) come through as they are."""
    kinds: tuple[type[BaseException], ...] = (PermissionError, FileNotFoundError, ConnectionError, TimeoutError)
    with contextlib.suppress(ImportError):  # botocore comes with dvc-s3
        from botocore.exceptions import BotoCoreError, ClientError

        kinds += (BotoCoreError, ClientError)
    return kinds


def refused_message(repo: Repo, name: str | None, url: str, err: BaseException) -> str:
    where = (f"tracking.dvc_remote {url} (DVC remote {REMOTE!r} in .dvc/config.local)" if url else
             f"the project's default DVC remote {name!r} "
             f"({repo.config['remote'].get(name, {}).get('url', '?') if name else 'none set'})")
    target = url or (repo.config["remote"].get(name, {}).get("url", "") if name else "")
    check = (f"check {S3_KEYS}" if target.startswith("s3://") else
             "check that remote's credentials and that it is reachable")
    return (f"dvc push to {where} failed: {type(err).__name__}: {str(err)[:300] or 'no detail'}. Fix: {check}, "
            "or set tracking.dvc_remote in params.yaml to another remote (\"\" = the project's default). "
            f"Outputs, dvc.lock and the DVC cache are unchanged; `dvc push{f' -r {name}' if name else ''}` "
            "pushes them later")


def retry_unless_refused(task, task_run, state) -> bool:
    """Prefect's retry_condition_fn for the push: a transient failure is retried, a refusal is
    not (the same credentials are refused again, 10 s later)."""
    return not isinstance(state.data, RemoteRefused)


def execute_stage(root: Path, stage: str, extra_env: dict[str, str] | None = None, stdout=None,
                  host: str | None = None) -> None:
    """Run the stage's dvc.yaml command: forked from the stage host at `host` when it is the
    plain `python -m tasks.<stage>` (flows/stage_host.py), else in a subprocess.

    Its stderr is passed through as it comes and its last line kept: a failure names the
    stage's own error (e.g. `RuntimeError: ...`), so the report and MLflow can say why."""
    env = stage_env(extra_env)
    command = stage_command(root, stage)
    tail: deque[str] = deque(maxlen=1)

    def relay(line: str) -> None:
        sys.stderr.write(line)
        if line.strip():
            tail.append(line.strip())

    code = None
    if host and stdout is None and command == FORKABLE.get(stage):
        code = run_in_host(host, stage, root, env, relay)
    if code is None:
        with subprocess.Popen(command, shell=True, cwd=root, env=env, stdout=stdout,
                              stderr=subprocess.PIPE, text=True, errors="replace") as process:
            for line in process.stderr:
                relay(line)
        code = process.returncode
    if code != 0:
        cause = f": {tail[0]}" if tail else ""
        raise LowbitError(
            f"stage {stage} failed (exit {code}){cause}. "
            "Earlier stages' outputs, the DVC cache and MLflow history are untouched."
        )


def run_stage(root: Path, stage: str, force: bool = False, host: str | None = None) -> dict:
    """Run `stage` if DVC says it changed (or `force`); return its result and whether it ran."""
    ran = force or stage_changed(root, stage)
    if ran:
        execute_stage(root, stage, host=host)
        commit_stage(root, stage)
    return {"stage": stage, "ran": ran, "result": read_json(Paths(root).result(stage))}


def run_stage_uncommitted(root: Path, stage: str, extra_env: dict[str, str], host: str | None = None) -> dict:
    """Run `stage` on partial inputs and leave it out of dvc.lock: `dvc status` keeps reporting
    it (and the stage that failed) as changed until a complete run commits them."""
    execute_stage(root, stage, extra_env, host=host)
    return {"stage": stage, "ran": True, "result": read_json(Paths(root).result(stage))}
