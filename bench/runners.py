"""Wall time of the whole pipeline, branches on threads (one at a time) vs on a Dask local cluster.

Run: python -m bench.runners [--preset tiny|default] [--out bench/results/runners.json]

Each runner gets a fresh git + DVC project with the same params and runs `lowbit run` from
scratch as a user would (its own process, Prefect's temporary API included): `wall_s` is that
command's wall time, `stage_seconds` what each stage's own process measured. On a machine with
few cores the branches mostly share them, so the gain is bounded by what one stage leaves idle
(data loading, process start, DVC hashing); concurrent stages also slow each other's timed
figures, which is why threads one at a time stay the default.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import WORK, emit
from lowbit.hardware import detect
from tasks.plumbing import Paths
from tests.conftest import TINY, make_project  # the integration tests' project: lowbit's code, git, DVC

RUNNERS = {"threads": [], "dask": ["--runner", "dask"]}
PRESETS = {"tiny": TINY, "default": {}}
STAGES = ("prepare", "baseline", "ptq", "qat", "lora", "qlora", "evaluate", "report")


def run_pipeline(root: Path, flags: list[str]) -> dict:
    started = time.perf_counter()
    # the project's own store and a temporary Prefect API, whatever this shell points at
    env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    done = subprocess.run([str(Path(sys.executable).parent / "lowbit"), "--root", str(root), "run", *flags],
                          capture_output=True, text=True, env=env | {"CI": "1"})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"lowbit run {' '.join(flags)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    ran = re.search(r"stages run: (.*); ", done.stdout).group(1).split(", ")
    paths = Paths(root)
    stage_seconds = {stage: json.loads(paths.result(stage).read_text()).get("stage_seconds") for stage in STAGES}
    return {"wall_s": round(wall, 1), "stages_run": ran, "stage_seconds": stage_seconds}


def preset_arguments(doc: str, default: str) -> argparse.Namespace:
    """--preset (tiny: the integration tests' params; default: params.yaml) and --out, for whole-pipeline benchmarks."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default=default, help="tiny: the integration tests' params; default: params.yaml")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args()


def fresh_project(name: str, preset: str) -> Path:
    """A new git + DVC project under bench/.work (an earlier one of that name removed) with the preset's params."""
    root = WORK / name
    shutil.rmtree(root, ignore_errors=True)
    return make_project(root, PRESETS[preset])


def main() -> None:
    args = preset_arguments(__doc__, default="tiny")
    runs = {}
    for name, flags in RUNNERS.items():
        root = fresh_project(f"runners-{args.preset}-{name}", args.preset)
        runs[name] = run_pipeline(root, flags)
    emit({
        "benchmark": "runners", "preset": args.preset, "hardware": detect().describe(), "runs": runs,
        "dask_vs_threads_wall_ratio": round(runs["dask"]["wall_s"] / runs["threads"]["wall_s"], 3),
    }, args.out)


if __name__ == "__main__":
    main()
