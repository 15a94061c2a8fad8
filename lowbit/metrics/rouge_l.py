"""ROUGE-L: F-measure of the longest common subsequence of tokens, averaged over pairs.

Tokenized like Google's rouge_score default tokenizer without stemming: lowercase, every
run of characters outside [a-z0-9] becomes a space (so accented letters split words, as
there), split on whitespace. P = LCS / len(prediction), R = LCS / len(reference),
F = 2PR / (P + R); a pair where either side has no tokens scores 0. Self-contained (no
package imports): `evaluate.load` copies this file into its module cache.
"""

import re

import datasets
import evaluate

NON_ALPHANUM = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    return NON_ALPHANUM.sub(" ", text.lower()).split()


def lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_f(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of one pair, as rouge_score's `RougeScorer(["rougeL"]).score(reference, prediction)`."""
    pred, ref = tokenize(prediction), tokenize(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(ref, pred)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references: strings",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [rouge_l_f(p, r) for p, r in zip(predictions, references)]
        return {"rouge_l": float(sum(scores) / len(scores)) if scores else 0.0}
