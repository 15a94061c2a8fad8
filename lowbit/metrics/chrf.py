"""chrF as sacrebleu's default `CHRF()`: character n-grams of order 1..6, no word n-grams,
beta 2, case-sensitive, whitespace removed before extracting n-grams; 0-100 scale.

Per order n and pair, the statistics are [hyp n-grams, ref n-grams, matches] (clipped
counts); as in sacrebleu, a hypothesis's n-grams of an order count 0 when the reference
has none of that order. The corpus score (`compute`) sums these statistics over all pairs
and computes F once from the sums, as `sacrebleu.corpus_chrf`. From statistics: for each
order with both counts > 0 ("effective order") take P_n = matches/hyp and R_n = matches/ref,
average P and R over the effective orders, and chrF = 100 (1+b^2) P R / (b^2 P + R), or 0
when P + R = 0 (sacrebleu >= 2.0 without eps smoothing). `sentence_chrf` is the same on
one pair's statistics (`sacrebleu.sentence_chrf`). Self-contained (no package imports):
`evaluate.load` copies this file into its module cache.
"""

from collections import Counter

import datasets
import evaluate

CHAR_ORDER = 6
BETA = 2


def char_ngrams(text: str, order: int) -> Counter:
    line = "".join(text.split())
    return Counter(line[i:i + order] for i in range(len(line) - order + 1))


def chrf_statistics(hypothesis: str, reference: str) -> list[int]:
    """Flat [hyp, ref, match] * CHAR_ORDER counts of one pair."""
    stats: list[int] = []
    for order in range(1, CHAR_ORDER + 1):
        hyp, ref = char_ngrams(hypothesis, order), char_ngrams(reference, order)
        matches = sum(min(count, ref[gram]) for gram, count in hyp.items() if gram in ref)
        stats += [sum(hyp.values()) if ref else 0, sum(ref.values()), matches]
    return stats


def chrf_from_statistics(stats: list[int]) -> float:
    factor = BETA**2
    precision = recall = 0.0
    effective = 0
    for order in range(CHAR_ORDER):
        n_hyp, n_ref, n_match = stats[3 * order: 3 * order + 3]
        if n_hyp > 0 and n_ref > 0:
            precision += n_match / n_hyp
            recall += n_match / n_ref
            effective += 1
    if effective == 0:
        return 0.0
    precision, recall = precision / effective, recall / effective
    if precision + recall == 0:
        return 0.0
    return 100 * (1 + factor) * precision * recall / (factor * precision + recall)


def sentence_chrf(hypothesis: str, reference: str) -> float:
    return chrf_from_statistics(chrf_statistics(hypothesis, reference))


def corpus_chrf(hypotheses: list[str], references: list[str]) -> float:
    total = [0] * (3 * CHAR_ORDER)
    for hyp, ref in zip(hypotheses, references):
        total = [a + b for a, b in zip(total, chrf_statistics(hyp, ref))]
    return chrf_from_statistics(total)


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references: strings",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        return {"chrf": float(corpus_chrf(predictions, references))}
