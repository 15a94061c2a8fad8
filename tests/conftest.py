"""Shared fixtures: a copy of the project in a temp git repo, tiny params, real SST-2 path."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from ruamel.yaml import YAML
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

from lowbit.config import load_params

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "sst2"
PROJECT_FILES = ["lowbit", "tasks", "flows", "presets", "params.yaml", "dvc.yaml", "prefect.yaml", ".dvcignore", ".gitignore",
                 "data/raw"]

# Small enough for CI, big enough that every stage does real work.
TINY = {
    "data.builtin_rows": 240,
    "prepare.calib_size": 32,
    "model.max_length": 32,
    "baseline.epochs": 1,
    "baseline.batch_size": 16,
    "ptq.schemes": ["half_bf16", "int8_dynamic", "int8_static", "nf4"],
    "ptq.observers": ["minmax"],
    "ptq.calib_rows": 32,
    "qat.batch_size": 16,
    "lora.epochs": 1,
    "lora.batch_size": 16,
    "qlora.epochs": 1,
    "qlora.batch_size": 16,
    "export.max_merge_drop": 100.0,  # a 1-epoch adapter on 200 rows is noise: the drop check has its own test
    "evaluate.latency_samples": 5,
    "evaluate.warmup_batches": 1,
}

os.environ.setdefault("CI", "1")  # quiet progress bars in test logs
# `lowbit` points Inductor's cache into the project it runs in; tests calling flows.cli.main share torch's
# default cache instead, so a compile test after them does not start from an empty one
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
for key, value in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                   "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}.items():
    os.environ.setdefault(key, value)


def set_params(path: Path, values: dict) -> None:
    yaml = YAML()
    doc = yaml.load(path.read_text())
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = doc
        for part in parents:
            node = node[part]
        node[leaf] = value
    with path.open("w") as handle:
        yaml.dump(doc, handle)


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def make_project(root: Path, params: dict) -> Path:
    """A fresh git + DVC project holding lowbit's code and params (with overrides)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src, dst = REPO / name, root / name
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    set_params(root / "params.yaml", params)
    git(root, "init", "-q")
    git(root, "config", "user.email", "ci@lowbit.invalid")
    git(root, "config", "user.name", "lowbit ci")
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True, env=venv_env())
    subprocess.run(["dvc", "config", "core.analytics", "false"], cwd=root, check=True, env=venv_env())
    subprocess.run(["dvc", "remote", "add", "-d", "local", str(root / ".dvc-remote")], cwd=root, check=True, env=venv_env())
    git(root, "add", "-A")
    git(root, "commit", "-qm", "project")
    return root


def venv_env() -> dict:
    import sys

    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


@pytest.fixture
def params():
    return load_params(REPO / "params.yaml")


@pytest.fixture
def tiny_project(tmp_path):
    return make_project(tmp_path / "project", TINY)


@pytest.fixture
def sst2_dir():
    if not (SST2 / "train.tsv").is_file():
        pytest.skip(f"SST-2 data not found at {SST2} (../shared/data/sst2 beside the repo)")
    return SST2


@pytest.fixture(autouse=True)
def mlflow_global_uri_restored():
    """Operations set MLflow's process-wide tracking URI (registration resolves logged models
    through it); one test's store must not become the next test's."""
    yield
    import mlflow

    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
