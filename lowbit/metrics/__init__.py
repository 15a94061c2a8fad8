"""lowbit's own `evaluate` metric modules, loaded by file path (the Hub copies are unreachable offline).

    from lowbit.metrics import load_metric, quality_metrics
    load_metric("ece").compute(probabilities=probs, references=labels)
    quality_metrics(logits, labels)   # accuracy, f1_macro, ece, loss: what every stage and the harness report
"""

from __future__ import annotations

import functools
from pathlib import Path

import evaluate
import numpy as np

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("accuracy", "f1_macro", "ece", "loss", "exact_match", "rouge_l", "chrf")


@functools.cache
def load_metric(name: str) -> evaluate.EvaluationModule:
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}; lowbit ships {', '.join(METRIC_NAMES)}")
    return evaluate.load(str(METRICS_DIR / f"{name}.py"))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def quality_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    probs = softmax(logits.astype(np.float64))
    preds = probs.argmax(axis=1)
    out: dict[str, float] = {}
    out |= load_metric("accuracy").compute(predictions=preds, references=labels)
    out |= load_metric("f1_macro").compute(predictions=preds, references=labels)
    out |= load_metric("ece").compute(probabilities=probs, references=labels)
    out |= load_metric("loss").compute(probabilities=probs, references=labels)
    return out
