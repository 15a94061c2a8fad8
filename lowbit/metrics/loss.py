"""Loss: mean cross-entropy (negative log-likelihood, nats) of the reference labels.

Probabilities are clipped at 1e-12 so that one confident mistake gives a large,
finite loss rather than infinity.
"""

import datasets
import evaluate
import numpy as np


class CrossEntropyLoss(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="probabilities: [n, classes] floats; references: int class ids",
            features=datasets.Features({
                "probabilities": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Value("int64"),
            }),
        )

    def _compute(self, probabilities, references):
        probs, ref = np.asarray(probabilities, dtype=np.float64), np.asarray(references)
        picked = np.clip(probs[np.arange(len(ref)), ref], 1e-12, 1.0)
        return {"loss": float(-np.log(picked).mean())}
