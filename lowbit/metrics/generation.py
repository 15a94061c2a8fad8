"""Generation-quality metrics for instruction-following outputs: exact match, ROUGE-L, chrF.

    generation_metrics(predictions, references)   # {"exact_match", "rouge_l", "chrf"} via load_metric
    chrf_interval(predictions, references, resamples=1000, seed=0)   # bootstrap of corpus chrF: (low, high)

Corpus chrF pools n-gram statistics over all pairs (sacrebleu's corpus_chrf), so it is not the
mean of the per-example sentence chrF (nor is its interval that mean's); exact match and ROUGE-L are
means of their per-example values.
"""

from __future__ import annotations

import numpy as np

from lowbit.metrics import load_metric
from lowbit.metrics.chrf import chrf_from_statistics, chrf_statistics


def _check(predictions: list[str], references: list[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    _check(predictions, references)
    out: dict[str, float] = {}
    for name in ("exact_match", "rouge_l", "chrf"):
        out |= load_metric(name).compute(predictions=list(predictions), references=list(references))
    return out


def chrf_interval(predictions: list[str], references: list[str], resamples: int, seed: int,
                  confidence: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of corpus chrF: each resample draws the pairs with replacement
    (seeded), sums their n-gram statistics and computes chrF from the sums, the same statistic as the
    point value (not a mean of sentence scores, whose interval need not contain it)."""
    _check(predictions, references)
    stats = np.array([chrf_statistics(p, r) for p, r in zip(predictions, references)])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(stats), size=(resamples, len(stats)))
    scores = [chrf_from_statistics(stats[rows].sum(axis=0).tolist()) for rows in draws]
    tail = (1.0 - confidence) / 2
    return float(np.quantile(scores, tail)), float(np.quantile(scores, 1.0 - tail))
