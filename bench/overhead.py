"""What orchestration costs: the same stages and params through `lowbit run` and as one plain script.

Run: python -m bench.overhead [--preset default|tiny] [--out bench/results/overhead.json]
(default preset: two full pipelines, about 2 × 8 minutes on 2 cores; tiny: about 3 minutes)

- lowbit: a fresh git + DVC project, `lowbit run` as a user runs it: Prefect's temporary API,
  each stage in a process of its own (forked from the stage host, which imports the libraries
  once per run: flows/stage_host.py), DVC status and commit around it, MLflow logging, a DVC
  push. Then `lowbit run` again with nothing changed (the no-op rerun).
- plain: the same params in a fresh folder, one Python process that imports the stage
  modules and calls tasks.<stage>.run(params, paths) in pipeline order: the same library
  functions with no Prefect, MLflow or DVC, as a hand-written script would.
Each gets a fresh Inductor cache (the compiled int8 variant would otherwise reuse the other's
kernels). `stage_seconds` are what each stage measured inside itself, so the difference
between the two totals is the orchestration. Where it goes is measured piece by piece: the
stage host's imports (once per run), Prefect's temporary API, DVC's status and commit per
stage, MLflow logging of the finished run into a fresh store; and, for comparison, what each
stage imports when it runs as a subprocess of its own (`dvc repro`, Dask workers).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import emit
from bench.runners import fresh_project, preset_arguments, run_pipeline
from lowbit.hardware import detect
from tasks import STAGES
from tasks.plumbing import Paths

PLAIN_SCRIPT = """
import importlib, json, sys, time
from pathlib import Path
started = time.perf_counter()
from lowbit.config import load_params
from tasks.plumbing import Paths
paths = Paths(Path(sys.argv[1]))
params = load_params(paths.params)
seconds = {}
for stage in sys.argv[2:]:
    begin = time.perf_counter()
    importlib.import_module(f"tasks.{stage}").run(params, paths)
    seconds[stage] = time.perf_counter() - begin
print(json.dumps({"stage_wall_s": seconds, "process_s": time.perf_counter() - started}))
"""


def fresh_env() -> dict[str, str]:
    """The project's own store and a temporary Prefect API, whatever this shell points at (as run_pipeline)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    return env | {"CI": "1"}


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def plain_run(root: Path, env: dict[str, str]) -> dict:
    import json

    wall, out = timed([sys.executable, "-c", PLAIN_SCRIPT, str(root), *STAGES], root, env)
    inner = json.loads(out.strip().splitlines()[-1])
    paths = Paths(root)
    stage_seconds = {stage: json.loads(paths.result(stage).read_text()).get("stage_seconds") for stage in STAGES}
    return {"wall_s": round(wall, 1), "stage_wall_s": inner["stage_wall_s"], "stage_seconds": stage_seconds}


def median_seconds(command: list[str], cwd: Path, env: dict[str, str], repeats: int = 3) -> float:
    return statistics.median(timed(command, cwd, env)[0] for _ in range(repeats))


def fixed_costs(root: Path, env: dict[str, str]) -> dict:
    """Each piece of lowbit's fixed cost, measured on its own on the finished project."""
    python = [sys.executable, "-c"]
    bare = median_seconds([*python, "pass"], root, env)
    imports = {stage: median_seconds([*python, f"import tasks.{stage}"], root, env) - bare for stage in STAGES}
    host = median_seconds([*python, "import lowbit.isolation, " + ", ".join(f"tasks.{s}" for s in STAGES)], root, env) - bare
    prefect_import = median_seconds([*python, "import prefect"], root, env)
    prefect_api = median_seconds([*python, "from prefect import flow\nflow(lambda: None)()"], root, env, repeats=2)
    dvc = median_seconds([*python, "from flows.dvc_stages import commit_stage, stage_changed\nfrom pathlib import Path\n"
                                   f"for s in {list(STAGES)!r}:\n    stage_changed(Path('.'), s)\n    commit_stage(Path('.'), s)"],
                         root, env, repeats=2)
    dvc_import = median_seconds([*python, "import flows.dvc_stages"], root, env)
    with tempfile.TemporaryDirectory() as store:
        mlflow = median_seconds([*python, LOG_AGAIN], root, env | {"MLFLOW_TRACKING_URI": f"sqlite:///{store}/m.db"}, repeats=1)
    tracking_import = median_seconds([*python, "import flows.pipeline"], root, env)
    return {
        "python_start_s": round(bare, 2),
        "stage_host_imports_s": round(host, 1),  # paid once per `lowbit run`
        "subprocess_stage_imports_s": {k: round(v, 2) for k, v in imports.items()},  # paid per stage by `dvc repro`
        "subprocess_stages_s": round(sum(imports.values()) + len(STAGES) * bare, 1),
        "prefect_temporary_api_s": round(prefect_api - prefect_import, 1),
        "dvc_status_and_commit_all_stages_s": round(dvc - dvc_import, 1),
        "mlflow_logging_s": round(mlflow - tracking_import, 1),
    }


# What the flow logs after the stages (flows.pipeline.track_results), into the store the env names.
LOG_AGAIN = """
from pathlib import Path
from flows.pipeline import track_results, test_digest
from flows.tracking import Tracker
from lowbit.config import load_params
from tasks.plumbing import Paths
from tasks import STAGES
import json
paths = Paths(Path('.').resolve())
tracker = Tracker(load_params(paths.params), paths.root)
tracker.start({})
outcomes = {s: {"result": json.loads(paths.result(s).read_text()), "ran": True} for s in STAGES}
track_results(tracker, paths, outcomes, test_digest(paths))
tracker.finish("FINISHED")
"""


def main() -> None:
    args = preset_arguments(__doc__, default="default")
    runs = {}
    for name in ("plain", "lowbit"):
        root = fresh_project(f"overhead-{args.preset}-{name}", args.preset)
        cache = Path(tempfile.mkdtemp(prefix="inductor-"))
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)  # read by every process started from here on
        env = fresh_env()
        if name == "plain":
            runs[name] = plain_run(root, env)
        else:
            runs[name] = run_pipeline(root, [])
            started = time.perf_counter()
            runs["lowbit_noop_rerun"] = run_pipeline(root, []) | {"wall_s": round(time.perf_counter() - started, 1)}
            runs["fixed_costs"] = fixed_costs(root, env)
        shutil.rmtree(cache, ignore_errors=True)
    ratio = runs["lowbit"]["wall_s"] / runs["plain"]["wall_s"]
    emit({
        "benchmark": "overhead", "preset": args.preset, "hardware": detect().describe(), **runs,
        "lowbit_over_plain_wall_ratio": round(ratio, 3),
        "targets": {"within_10pct_of_plain": ratio <= 1.10,
                    "noop_rerun_under_10_s": runs["lowbit_noop_rerun"]["wall_s"] < 10.0},
    }, args.out)


if __name__ == "__main__":
    main()
