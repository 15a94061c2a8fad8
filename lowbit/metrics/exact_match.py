"""Exact match: the share of predictions equal to their reference once surrounding whitespace is stripped."""

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references: strings",
            features=datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        hits = [p.strip() == r.strip() for p, r in zip(predictions, references)]
        return {"exact_match": float(sum(hits) / len(hits)) if hits else 0.0}
