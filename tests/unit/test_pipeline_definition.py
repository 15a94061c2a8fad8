"""dvc.yaml, params.yaml, tasks/ and the CLI must agree on stage names and params."""

from pathlib import Path

import yaml

from tasks import STAGES
from tests.conftest import REPO
from tests.imports import imported_project_files

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


def test_stage_registry_stage_modules_and_dvc_stages_match():
    entry_points = {p.stem for p in (REPO / "tasks").glob("*.py") if "\n    stage_main(" in p.read_text()}
    assert entry_points == set(DVC) == set(STAGES)
    assert list(DVC) == list(STAGES)  # dvc.yaml lists them in pipeline order too


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
PLUMBING = {"lowbit/__init__.py", "lowbit/config.py", "lowbit/declared.py", "lowbit/errors.py", "lowbit/io.py", "lowbit/hub.py",
            "lowbit/quant/__init__.py", "tasks/__init__.py", "tasks/plumbing.py"}
CODE_DIRS = ("lowbit/", "tasks/")
# Folders listed whole: evaluate loads the metric modules by file path; the scheme registry imports
# every module in its folder.
WHOLE_FOLDERS = ("lowbit/metrics", "lowbit/quant/schemes")


def code_dependencies(stage: str) -> set[str]:
    """What a stage's dvc.yaml deps must list for its code: each imported file, WHOLE_FOLDERS as one."""
    needed = imported_project_files(REPO / "tasks" / f"{stage}.py", REPO, ("lowbit", "tasks"), frozenset(PLUMBING))
    needed = needed - PLUMBING | {f"tasks/{stage}.py"}
    for folder in WHOLE_FOLDERS:
        if f"{folder}/__init__.py" in needed:
            needed = {f for f in needed if not f.startswith(folder + "/")} | {folder}
    return needed


def test_every_stage_depends_on_exactly_the_code_it_imports():
    for name, stage in DVC.items():
        listed = {dep for dep in stage["deps"] if dep.startswith(CODE_DIRS)}
        needed = code_dependencies(name)
        assert not needed - listed, f"dvc.yaml {name}: add to deps {sorted(needed - listed)}"
        assert not listed - needed, f"dvc.yaml {name}: remove from deps {sorted(listed - needed)} (the stage does not import it)"
