"""Stage plumbing shared by tasks/<stage>.py: output paths and the `python -m tasks.<stage>` entry.

A stage is `run(params, paths) -> dict`: importable and testable without Prefect,
MLflow or DVC. Its result dict is also written next to its outputs
(`paths.result(stage)`), so the flow can read what a DVC-run stage produced.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lowbit.config import Params, load_params
from lowbit.errors import LowbitError

RESULT_FILE = "lowbit_stage.json"

# Set by the flow when stages failed (JSON {stage: why}): evaluate leaves their variants out.
EXCLUDE_ENV = "LOWBIT_EXCLUDE_STAGES"


def excluded_stages() -> dict[str, str]:
    raw = os.environ.get(EXCLUDE_ENV)
    return json.loads(raw) if raw else {}


@dataclass(frozen=True)
class Paths:
    """The project layout every stage reads and writes, relative to one root."""

    root: Path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def result(self, stage: str) -> Path:
        outputs = {"prepare": self.prepared, "evaluate": self.metrics}
        if stage == "report":
            return self.reports / "summary.json"
        return outputs.get(stage, self.models / stage) / RESULT_FILE


class StageClock:
    """Wall-clock seconds since the stage started: `stage_seconds` in every result."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


# Libraries' phone-home calls fail slowly and noisily offline; none is needed to run lowbit.
NO_TELEMETRY = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def quiet_libraries() -> None:
    """Keep stage logs readable: telemetry off, expected library warnings silenced."""
    for key, value in NO_TELEMETRY.items():
        os.environ.setdefault(key, value)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def stage_main(stage: str, run: Callable[[Params, Paths], dict], argv: list[str] | None = None) -> None:
    """Entry point of `python -m tasks.<stage>` (the command dvc.yaml runs)."""
    root = Path(argv[0] if argv else os.getcwd()).resolve()
    quiet_libraries()
    try:
        params = load_params(root / "params.yaml")
        result = run(params, Paths(root))
    except LowbitError as err:
        print(f"lowbit {stage}: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"stage": stage, **result}, default=str))
