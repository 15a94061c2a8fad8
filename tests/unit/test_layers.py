"""The house plan: lowbit/ (library) < tasks/ (stages) < flows/ (operations); no import runs up, no cycles.

Every import statement counts, wherever it sits (a function-level import is still a dependency),
except type-only imports under `if TYPE_CHECKING:`.
"""

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.imports import imported_names

LAYERS = {"lowbit": 0, "tasks": 1, "flows": 2}
# Orchestration, data versioning and tracking belong to the operations layer alone.
OPERATIONS_ONLY = ("prefect", "mlflow", "dvc")


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in LAYERS:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def project_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    return {name for name in imported_names(path) if name in modules}


def test_no_import_runs_up_a_layer_and_operations_libraries_stay_in_operations():
    modules = project_modules()
    wrong = []
    for name, path in modules.items():
        layer = LAYERS[name.split(".")[0]]
        for target in project_imports(path, modules):
            if LAYERS[target.split(".")[0]] > layer:
                wrong.append(f"{name} imports {target} (a higher layer)")
        if layer < LAYERS["flows"]:
            wrong += [f"{name} imports {lib}" for lib in imported_names(path) if lib.split(".")[0] in OPERATIONS_ONLY]
    assert wrong == []


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: project_imports(path, modules) - {name} for name, path in modules.items()}
    # a package's __init__ is imported with each of its modules: that is not a cycle
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, str] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = "open"
        for target in graph[name]:
            assert state.get(target) != "open", "import cycle: " + " -> ".join(stack + [name, target])
            if target not in state:
                visit(target, stack + [name])
        state[name] = "done"

    for name in graph:
        if name not in state:
            visit(name, [])


NOTEBOOK = """
import sys
from lowbit.data import prepare_splits
from lowbit.models import load_classifier
from lowbit.quant.schemes import SCHEMES
from lowbit.formats import load_variant
from lowbit.evaluation import evaluate_model
from lowbit.adapters import lora_model
loaded = sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'dvc', 'mlflow', 'tasks', 'flows'})
print('loaded:', ','.join(loaded))
"""


def test_a_notebook_uses_the_library_without_prefect_dvc_or_mlflow():
    done = subprocess.run([sys.executable, "-c", NOTEBOOK], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "loaded:", done.stdout + done.stderr[-2000:]
