"""dvc.yaml, params.yaml, tasks/ and the CLI must agree on stage names and params."""

import ast
from pathlib import Path

import yaml

from lowbit.cli import STAGES
from tests.conftest import REPO

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def test_every_stage_runs_its_own_task_module_and_depends_on_it():
    for name, stage in DVC.items():
        assert stage["cmd"] == f"python -m tasks.{name}"
        assert f"tasks/{name}.py" in stage["deps"]
        assert (REPO / "tasks" / f"{name}.py").is_file()


def test_every_declared_param_exists_in_params_yaml():
    for name, stage in DVC.items():
        for key in stage.get("params", []):
            node = PARAMS
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"dvc.yaml {name}: params key {key} not in params.yaml"
                node = node[part]


def test_every_stage_section_is_declared_by_its_stage():
    for name, stage in DVC.items():
        if name in PARAMS:
            assert name in stage["params"], f"stage {name} must list its own params section"


def test_cli_task_modules_and_dvc_stages_match():
    modules = {p.stem for p in (REPO / "tasks").glob("*.py") if not p.stem.startswith("_")}
    assert modules == set(DVC) == set(STAGES)


def test_every_dependency_path_exists():
    for name, stage in DVC.items():
        for dep in stage["deps"]:
            produced = any(dep == out or dep.startswith(f"{out}/") for s in DVC.values() for out in map(_out, s.get("outs", [])))
            assert produced or (REPO / dep).exists(), f"{name}: dependency {dep} neither exists nor is produced"


def _out(entry) -> str:
    return entry if isinstance(entry, str) else next(iter(entry))


# Plumbing that cannot change what a stage produces: validation, errors, atomic writes, the
# stage entry point, the Hub probe, package markers. Everything else a stage imports is code
# whose change must make DVC rerun it, or an old result would pass for the new code's.
PLUMBING = {"lowbit/__init__.py", "lowbit/config.py", "lowbit/errors.py", "lowbit/io.py", "lowbit/stages.py",
            "lowbit/hub.py", "lowbit/quant/__init__.py", "lowbit/metrics/__init__.py", "tasks/__init__.py"}


def imported_project_files(path: Path, seen: set[str] | None = None) -> set[str]:
    """Repo files `path` imports, transitively (static: every import statement, wherever it sits)."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in ("lowbit", "tasks"):
                continue
            for candidate in (f"{name.replace('.', '/')}.py", f"{name.replace('.', '/')}/__init__.py"):
                if (REPO / candidate).is_file() and candidate not in seen:
                    seen.add(candidate)
                    imported_project_files(REPO / candidate, seen)
    return seen


def test_every_stage_depends_on_the_code_it_imports():
    for name, stage in DVC.items():
        needed = imported_project_files(REPO / "tasks" / f"{name}.py") - PLUMBING
        covered = {dep for dep in needed if any(dep == d or dep.startswith(d.rstrip("/") + "/") for d in stage["deps"])}
        assert needed == covered, f"dvc.yaml {name}: add to deps {sorted(needed - covered)}"
