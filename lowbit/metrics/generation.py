"""Generation-quality metrics for instruction-following outputs: exact match, ROUGE-L, chrF.

    generation_metrics(predictions, references)   # {"exact_match", "rouge_l", "chrf"} via load_metric
    per_example_scores(predictions, references)   # per-pair lists, for bootstrap intervals

Corpus chrF pools n-gram statistics over all pairs (sacrebleu's corpus_chrf), so it is not the
mean of the per-example sentence chrF; exact match and ROUGE-L are means of their per-example values.
"""

from __future__ import annotations

from lowbit.metrics import load_metric
from lowbit.metrics.chrf import sentence_chrf
from lowbit.metrics.rouge_l import rouge_l_f


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


def per_example_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    _check(predictions, references)
    pairs = list(zip(predictions, references))
    return {
        "exact_match": [float(p.strip() == r.strip()) for p, r in pairs],
        "rouge_l": [rouge_l_f(p, r) for p, r in pairs],
        "chrf": [sentence_chrf(p, r) for p, r in pairs],
    }
