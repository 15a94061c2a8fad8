"""Uncertainty over test rows: bootstrap confidence intervals and paired variant-vs-reference tests.

    metric_intervals(probabilities, labels, resamples=1000, seed=0)
        -> {"accuracy_ci_low": 0.871, "accuracy_ci_high": 0.902, ..., "loss_ci_high": 0.35}
    paired_comparison(correct_variant, correct_reference, resamples=1000, seed=0, alpha=0.05)
        -> {"accuracy_delta": -0.4, "accuracy_delta_ci_low": -1.1, ..., "mcnemar_p_value": 0.21, "significant": False}

The test rows are the unit that is resampled: each bootstrap resample draws n rows with
replacement (the same rows for every metric, and for both models in a paired comparison),
and an interval is the (1 − confidence)/2 and (1 + confidence)/2 percentiles of the metric
over the resamples. The metric definitions are those of lowbit/metrics/ (accuracy, f1_macro,
ece with 15 equal-width bins, loss = mean NLL clipped at 1e-12), written here so that they
run along the last axis of arrays with any leading batch dimensions, as
scipy.stats.bootstrap(vectorized=True) passes them; on the full data they equal
lowbit.metrics.quality_metrics (tests/unit/test_statistics.py checks it).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from lowbit.errors import LowbitError

ECE_BINS = 15  # the bin count of lowbit/metrics/ece.py and of the reported `ece`
PROBABILITY_FLOOR = 1e-12  # the clip of lowbit/metrics/loss.py: a confident mistake costs a large, finite loss
INTERVAL_METRICS = ("accuracy", "f1_macro", "ece", "loss")
# Elements per resampled array handed to one vectorized statistic call: bounds memory at
# about (6 arrays + temporaries) × 8 bytes × this, i.e. a few hundred MB, whatever n is.
_ELEMENTS_PER_BATCH = 2**22


# -- metrics along the last axis -------------------------------------------------------------


def batched_accuracy(predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Share of rows with prediction == label: [..., n] int, [..., n] int -> [...] float."""
    return np.mean(predictions == labels, axis=-1)


def batched_f1_macro(predictions: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro F1 over the classes seen in predictions or labels, as lowbit/metrics/f1_macro.py.

    For class c: F1_c = 2·TP_c / (#predicted c + #labelled c) (= 2PR / (P + R)); the mean
    runs over the classes with a non-zero denominator, so a class absent from both the
    predictions and the labels of a resample does not count, exactly as in the metric.
    Shapes: [..., n] int, [..., n] int -> [...] float.
    """
    f1_sum = np.zeros(predictions.shape[:-1])
    classes_seen = np.zeros(predictions.shape[:-1])
    for cls in range(n_classes):  # classes are few; rows and resamples are many
        predicted, labelled = predictions == cls, labels == cls
        true_positives = np.sum(predicted & labelled, axis=-1)
        denominator = np.sum(predicted, axis=-1) + np.sum(labelled, axis=-1)
        seen = denominator > 0
        f1_sum += np.where(seen, 2 * true_positives / np.maximum(denominator, 1), 0.0)
        classes_seen += seen
    return f1_sum / classes_seen


def confidence_bin(confidence: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Bin index of each confidence: bins are (i/B, (i+1)/B], the first one also holding 0.

    Same arithmetic as lowbit/metrics/ece.py, so a row on an edge lands in the same bin.
    """
    return np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)


def batched_ece(correct: np.ndarray, confidence: np.ndarray, bin_index: np.ndarray, n_bins: int = ECE_BINS) -> np.ndarray:
    """Expected calibration error: Σ_b (|b| / n) · |accuracy(b) − mean confidence(b)|.

    Written as Σ_b |Σ_{i∈b} (correct_i − confidence_i)| / n, which is the same sum without
    a division by an empty bin's size. Shapes: [..., n] (bool/float, float, int) -> [...] float.
    """
    gap = correct - confidence
    rows = correct.shape[-1]
    ece = np.zeros(correct.shape[:-1])
    for b in range(n_bins):
        ece += np.abs(np.sum(np.where(bin_index == b, gap, 0.0), axis=-1)) / rows
    return ece


def batched_loss(row_nll: np.ndarray) -> np.ndarray:
    """Mean negative log-likelihood (nats): [..., n] per-row NLL -> [...]."""
    return np.mean(row_nll, axis=-1)


# -- per-row quantities and point values ------------------------------------------------------


def _row_quantities(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Everything the four metrics need, one value per test row ([n] each), so rows can be resampled."""
    probs = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or labels.ndim != 1 or len(probs) != len(labels):
        raise LowbitError(f"metric intervals need probabilities [n, classes] and labels [n]; got shapes "
                          f"{probs.shape} and {labels.shape}: score the variant on the test split again (rerun evaluate)")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise LowbitError(f"labels must be class ids 0..{probs.shape[1] - 1} for {probs.shape[1]} probability columns; "
                          f"got ids {labels.min()}..{labels.max()}: the model's head and the prepared labels disagree")
    predictions = probs.argmax(axis=1)
    confidence = probs.max(axis=1)
    picked = np.clip(probs[np.arange(len(labels)), labels], PROBABILITY_FLOOR, 1.0)
    return {
        "predictions": predictions,
        "labels": labels,
        "correct": (predictions == labels).astype(np.float64),
        "confidence": confidence,
        "bin_index": confidence_bin(confidence),
        "row_nll": -np.log(picked),
    }


def _all_metrics(n_classes: int):
    """The statistic scipy calls: the six [..., n] row arrays -> [4, ...] (accuracy, f1_macro, ece, loss)."""

    def statistic(predictions, labels, correct, confidence, bin_index, row_nll, axis=-1):
        if axis != -1:  # scipy passes axis=-1; anything else would silently mix rows and resamples
            raise ValueError(f"statistics run along the last axis, got axis={axis}")
        return np.stack([
            batched_accuracy(predictions, labels),
            batched_f1_macro(predictions, labels, n_classes),
            batched_ece(correct, confidence, bin_index),
            batched_loss(row_nll),
        ])

    return statistic


def point_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, f1_macro, ece, loss on all rows, through the same vectorized code the bootstrap uses."""
    rows = _row_quantities(probabilities, labels)
    values = _all_metrics(np.asarray(probabilities).shape[1])(*rows.values())
    return {name: float(value) for name, value in zip(INTERVAL_METRICS, values)}


# -- validation -------------------------------------------------------------------------------


def _check_resamples(resamples: int) -> None:
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise LowbitError(f"params.yaml: evaluate.bootstrap_resamples: must be an integer >= 1 (got {resamples!r}); "
                          "1000 or more gives steady 95% intervals")


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise LowbitError(f"params.yaml: evaluate.significance_level: must be between 0 and 1, exclusive (got {alpha!r}); "
                          "0.05 is the usual choice")


def _check_rows(rows: int) -> None:
    if rows < 2:
        raise LowbitError(f"bootstrap intervals need at least 2 test rows; the test split has {rows}: "
                          "raise prepare.test_fraction (or give data.test_source more rows)")


# -- bootstrap --------------------------------------------------------------------------------


def _percentile_interval(samples: tuple[np.ndarray, ...], statistic, resamples: int, seed: int,
                         confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Seeded paired percentile bootstrap over rows (the last axis): (low, high), each shaped like the statistic.

    Where scipy gives a non-finite bound (a degenerate distribution, e.g. every resample has
    accuracy 1.0), the bound is taken from the bootstrap distribution itself, which then is
    that one value: low == high == value rather than NaN.
    """
    rows = len(samples[0])
    result = stats.bootstrap(
        samples, statistic, n_resamples=resamples, batch=max(1, _ELEMENTS_PER_BATCH // rows),
        vectorized=True, paired=True, method="percentile", confidence_level=confidence,
        rng=np.random.default_rng(seed),
    )
    low = np.atleast_1d(np.asarray(result.confidence_interval.low, dtype=np.float64)).copy()
    high = np.atleast_1d(np.asarray(result.confidence_interval.high, dtype=np.float64)).copy()
    distribution = np.asarray(result.bootstrap_distribution).reshape(len(low), -1)
    tail = (1.0 - confidence) / 2
    for i in range(len(low)):
        if not np.isfinite(low[i]):
            low[i] = np.quantile(distribution[i], tail)
        if not np.isfinite(high[i]):
            high[i] = np.quantile(distribution[i], 1.0 - tail)
    return low, high


def metric_intervals(probabilities: np.ndarray, labels: np.ndarray, resamples: int, seed: int,
                     confidence: float = 0.95) -> dict[str, float]:
    """Bootstrap confidence intervals of accuracy, f1_macro, ece and loss over test rows.

    probabilities: [n, classes] (rows sum to 1), labels: [n] class ids. Each of `resamples`
    resamples draws n rows with replacement (numpy Generator seeded with `seed`, so the same
    seed gives the same intervals); all four metrics are computed on the same resampled rows.
    Returns {"<metric>_ci_low", "<metric>_ci_high"} for each metric, at `confidence` (0.95 = 95%).
    Note that ECE is biased upwards on small samples, so its interval can sit above the point value.
    """
    _check_resamples(resamples)
    if not 0.0 < confidence < 1.0:
        raise LowbitError(f"params.yaml: evaluate.significance_level: the interval's confidence (1 − significance "
                          f"level) must be between 0 and 1, exclusive (got confidence {confidence!r})")
    rows = _row_quantities(probabilities, labels)
    _check_rows(len(rows["labels"]))
    statistic = _all_metrics(np.asarray(probabilities).shape[1])
    low, high = _percentile_interval(tuple(rows.values()), statistic, resamples, seed, confidence)
    out: dict[str, float] = {}
    for name, lo, hi in zip(INTERVAL_METRICS, low, high):
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(lo), float(hi)
    return out


# -- paired comparison ------------------------------------------------------------------------


def mcnemar_exact_p_value(reference_only_right: int, variant_only_right: int) -> float:
    """McNemar's exact test: two-sided binomial test of min(b, c) successes in b + c trials at p = 0.5.

    b = rows the reference gets right and the variant wrong, c = the reverse; rows both get
    right or both get wrong say nothing about which is better. With no disagreement (b + c = 0)
    there is no evidence of a difference: p = 1.
    """
    disagreements = reference_only_right + variant_only_right
    if disagreements == 0:
        return 1.0
    return float(stats.binomtest(min(reference_only_right, variant_only_right), disagreements, 0.5,
                                 alternative="two-sided").pvalue)


def _accuracy_delta_points(correct_variant: np.ndarray, correct_reference: np.ndarray, axis: int = -1) -> np.ndarray:
    """(accuracy of variant − accuracy of reference) × 100 along `axis`: [..., n] float 0/1 twice -> [...]."""
    return np.mean(correct_variant - correct_reference, axis=axis) * 100.0


def paired_comparison(correct_variant: np.ndarray, correct_reference: np.ndarray, resamples: int, seed: int,
                      alpha: float) -> dict:
    """Is the variant's accuracy different from the reference's on the same test rows?

    correct_variant, correct_reference: [n] bools, row i of both is the same test row.
    - accuracy_delta: (variant − reference) accuracy in points (× 100);
    - accuracy_delta_ci_low/high: paired percentile bootstrap of that delta (both models
      resampled on the same rows, seeded by `seed`) at confidence 1 − alpha;
    - mcnemar_b (reference right, variant wrong), mcnemar_c (reference wrong, variant right),
      mcnemar_p_value (exact, two-sided), significant: p < alpha.
    """
    _check_resamples(resamples)
    _check_alpha(alpha)
    variant = np.asarray(correct_variant, dtype=bool)
    reference = np.asarray(correct_reference, dtype=bool)
    if variant.ndim != 1 or variant.shape != reference.shape:
        raise LowbitError(f"paired comparison needs one correctness flag per test row for both models; got shapes "
                          f"{variant.shape} and {reference.shape}: score both on the same test split (rerun evaluate)")
    _check_rows(len(variant))
    reference_only_right = int(np.sum(reference & ~variant))
    variant_only_right = int(np.sum(~reference & variant))
    p_value = mcnemar_exact_p_value(reference_only_right, variant_only_right)
    samples = (variant.astype(np.float64), reference.astype(np.float64))
    low, high = _percentile_interval(samples, _accuracy_delta_points, resamples, seed, 1.0 - alpha)
    return {
        "accuracy_delta": float(_accuracy_delta_points(*samples)),
        "accuracy_delta_ci_low": float(low[0]),
        "accuracy_delta_ci_high": float(high[0]),
        "mcnemar_b": reference_only_right,
        "mcnemar_c": variant_only_right,
        "mcnemar_p_value": p_value,
        "significant": bool(p_value < alpha),
    }


# -- ratios of sums (token-level figures of a causal LM) --------------------------------------


def ratio_intervals(columns: dict[str, tuple[np.ndarray, np.ndarray]], resamples: int, seed: int,
                    confidence: float = 0.95) -> dict[str, float]:
    """Bootstrap intervals of sum(numerator) / sum(denominator) over rows, for each named column.

    A causal LM's token accuracy and loss are ratios of per-example sums (correct tokens / target
    tokens, NLL / target tokens): the example is what is resampled, as for a classifier's rows,
    so long targets weigh as they do in the point value. A per-example mean (a sentence score)
    is the same with a denominator of ones. Returns {"<name>_ci_low", "<name>_ci_high"}.
    """
    _check_resamples(resamples)
    names = list(columns)
    arrays = tuple(np.asarray(a, dtype=np.float64) for name in names for a in columns[name])
    _check_rows(len(arrays[0]))

    def statistic(*resampled, axis=-1):
        return np.stack([np.sum(resampled[2 * i], axis=axis) / np.sum(resampled[2 * i + 1], axis=axis)
                         for i in range(len(names))])

    low, high = _percentile_interval(arrays, statistic, resamples, seed, confidence)
    out: dict[str, float] = {}
    for name, lo, hi in zip(names, low, high):
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(lo), float(hi)
    return out
