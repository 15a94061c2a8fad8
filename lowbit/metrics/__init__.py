"""lowbit's own `evaluate` metric modules, loaded by file path (the Hub copies are unreachable offline).

    from lowbit.metrics import load_metric
    load_metric("ece").compute(probabilities=probs, references=labels)
"""

from __future__ import annotations

import functools
from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("accuracy", "f1_macro", "ece", "loss")


@functools.cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; lowbit ships {', '.join(METRIC_NAMES)}")
    return evaluate.load(str(METRICS_DIR / f"{name}.py"))
