"""Expected calibration error (ECE), equal-width confidence bins (15 by default).

ECE = sum over bins b of (|b| / n) · |accuracy(b) − mean confidence(b)|, where a
sample's confidence is its top predicted probability and bins are (i/B, (i+1)/B]
(the first bin includes 0). 0 is perfectly calibrated.
"""

import datasets
import evaluate
import numpy as np


class ExpectedCalibrationError(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__, citation="", inputs_description="probabilities: [n, classes] floats; references: int class ids",
            features=datasets.Features({
                "probabilities": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Value("int64"),
            }),
        )

    def _compute(self, probabilities, references, n_bins: int = 15):
        probs, ref = np.asarray(probabilities, dtype=np.float64), np.asarray(references)
        confidence = probs.max(axis=1)
        correct = probs.argmax(axis=1) == ref
        bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
        ece = 0.0
        for b in range(n_bins):
            in_bin = bins == b
            if in_bin.any():
                ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
        return {"ece": float(ece)}
