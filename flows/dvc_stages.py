"""Running a dvc.yaml stage from Prefect so that DVC and the flow agree.

A Prefect task runs a stage only when DVC says it changed (or when forced), by
executing the stage's own `cmd` from dvc.yaml in a subprocess (identical code,
fresh memory for each stage), then `dvc commit`s it: dvc.lock and the DVC cache
end up exactly as after `dvc repro`, so `dvc status` is clean after `lowbit run`.
DVC calls are serialised: branches of the flow may run concurrently, DVC's repo may not.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Iterator

import yaml
from dvc.repo import Repo

from lowbit.errors import LowbitError
from lowbit.io import read_json
from tasks.plumbing import Paths

_DVC_LOCK = threading.Lock()


def stage_command(root: Path, stage: str) -> str:
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    if stage not in stages:
        raise LowbitError(f"{root / 'dvc.yaml'}: no stage {stage!r}; stages: {', '.join(stages)}")
    return stages[stage]["cmd"]


@contextlib.contextmanager
def dvc_repo(root: Path) -> Iterator[Repo]:
    """The project's DVC repo, one caller at a time; DVC resolves stage paths against the cwd."""
    with _DVC_LOCK, contextlib.chdir(root), Repo(str(root)) as repo:
        yield repo


def stage_changed(root: Path, stage: str) -> bool:
    with dvc_repo(root) as repo:
        return bool(repo.status(targets=[stage]))


def commit_stage(root: Path, stage: str) -> None:
    with dvc_repo(root) as repo:
        repo.commit(stage, force=True)


def push_outputs(root: Path) -> int:
    with dvc_repo(root) as repo:
        return repo.push()


def execute_stage(root: Path, stage: str, extra_env: dict[str, str] | None = None, stdout=None) -> None:
    """Run the stage's dvc.yaml command with this interpreter's environment first on PATH.

    Its stderr is passed through as it comes and its last line kept: a failure names the
    stage's own error (e.g. `RuntimeError: ...`), so the report and MLflow can say why."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **(extra_env or {}))
    tail: deque[str] = deque(maxlen=1)
    with subprocess.Popen(stage_command(root, stage), shell=True, cwd=root, env=env, stdout=stdout,
                          stderr=subprocess.PIPE, text=True, errors="replace") as process:
        for line in process.stderr:
            sys.stderr.write(line)
            if line.strip():
                tail.append(line.strip())
    if process.returncode != 0:
        cause = f": {tail[0]}" if tail else ""
        raise LowbitError(
            f"stage {stage} failed (exit {process.returncode}){cause}. "
            "Earlier stages' outputs, the DVC cache and MLflow history are untouched."
        )


def run_stage(root: Path, stage: str, force: bool = False) -> dict:
    """Run `stage` if DVC says it changed (or `force`); return its result and whether it ran."""
    ran = force or stage_changed(root, stage)
    if ran:
        execute_stage(root, stage)
        commit_stage(root, stage)
    return {"stage": stage, "ran": ran, "result": read_json(Paths(root).result(stage))}


def run_stage_uncommitted(root: Path, stage: str, extra_env: dict[str, str]) -> dict:
    """Run `stage` on partial inputs and leave it out of dvc.lock: `dvc status` keeps reporting
    it (and the stage that failed) as changed until a complete run commits them."""
    execute_stage(root, stage, extra_env)
    return {"stage": stage, "ran": True, "result": read_json(Paths(root).result(stage))}
