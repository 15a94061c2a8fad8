"""Macro F1: the unweighted mean over classes of F1 = 2·P·R / (P + R).

Classes are those seen in predictions or references; a class with no true
positives scores 0 (no division by zero).
"""

import datasets
import evaluate
import numpy as np


class F1Macro(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="predictions, references: int class ids",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        pred, ref = np.asarray(predictions), np.asarray(references)
        scores = []
        for cls in np.union1d(pred, ref):
            tp = np.sum((pred == cls) & (ref == cls))
            denom = np.sum(pred == cls) + np.sum(ref == cls)
            scores.append(2 * tp / denom if denom else 0.0)
        return {"f1_macro": float(np.mean(scores))}
