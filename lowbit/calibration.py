"""Probability calibration fitted on the validation split, reliability bins and diagrams, per-class report.

    calibrator = fit_calibrator("temperature", val_logits, val_labels)   # validation rows only
    test_probabilities = calibrator.apply(test_logits)                   # [n, classes]
    Path("calibrator.json").write_text(json.dumps(calibrator.to_json()))  # JSON, never pickle
    bins = reliability_bins(test_probabilities, test_labels)             # 15 equal-width bins, as `ece`
    expected_calibration_error(bins)                                     # == lowbit.metrics ece

Methods (`METHODS`):
- none: softmax(logits).
- temperature: softmax(logits / T), one T > 0 minimising validation NLL. Dividing by
  T > 0 keeps each row's order, so predictions and accuracy do not change.
- platt: multinomial logistic regression with the logits as features (binary: one
  sigmoid), close to unregularised. Can change predictions.
- isotonic: per class, a monotone map from the softmax probability to the validation
  frequency of that class (one-vs-rest), then rows renormalised to sum to 1. Can change predictions.

The fitting function takes only validation data: test rows cannot reach the fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import optimize, special
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from lowbit.errors import LowbitError
from lowbit.statistics import ECE_BINS, confidence_bin
from lowbit.tables import plt, save_png

METHODS = ("none", "temperature", "platt", "isotonic")
ISOTONIC_MIN_ROWS_PER_CLASS = 20  # below this a per-class step function mostly memorises noise
# log T is searched in [-5, 5], i.e. T in [0.0067, 148]: far beyond any useful sharpening or
# softening, while keeping the bounded search finite when the validation split is separable.
_LOG_TEMPERATURE_BOUNDS = (-5.0, 5.0)
_PLATT_C = 1e4  # inverse L2 strength: large = close to unregularised (plain Platt/multinomial scaling)
_PLATT_MAX_ITER = 1000


# -- the calibrator ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibrator:
    """A fitted calibration map from logits [n, classes] to probabilities [n, classes].

    `params` holds only JSON types (floats, ints, lists): temperature {"temperature": T};
    platt {"coef": [[...]] (rows × classes), "intercept": [...], "classes": [...]};
    isotonic {"x_thresholds": [[...] per class], "y_thresholds": [[...] per class]}; none {}.
    """

    method: str
    params: dict = field(default_factory=dict)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities [n, classes] (rows sum to 1) for logits [n, classes]."""
        logits = _as_logits(logits)
        return _APPLY[self.method](self.params, logits)

    def to_json(self) -> dict:
        """{"method": ..., **params}: everything needed to apply it, JSON-serialisable."""
        return {"method": self.method, **self.params}

    @classmethod
    def from_json(cls, data: dict) -> Calibrator:
        """The inverse of to_json."""
        data = dict(data)
        method = data.pop("method", None)
        if method not in METHODS:
            raise LowbitError(f"saved calibrator has method {method!r}; lowbit knows {', '.join(METHODS)}: "
                              "rerun evaluate to refit it")
        return cls(method=method, params=data)


def _as_logits(logits: np.ndarray) -> np.ndarray:
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 2:
        raise ValueError(f"logits must be [n, classes] with at least 2 classes, got shape {array.shape}")
    return array


# -- applying each method ---------------------------------------------------------------------


def _apply_none(params: dict, logits: np.ndarray) -> np.ndarray:
    return special.softmax(logits, axis=1)


def _apply_temperature(params: dict, logits: np.ndarray) -> np.ndarray:
    return special.softmax(logits / params["temperature"], axis=1)


def _apply_platt(params: dict, logits: np.ndarray) -> np.ndarray:
    """softmax(logits · coefᵀ + intercept) [n, K]; with one coef row (binary), [1 − σ(z), σ(z)] as sklearn."""
    coef, intercept = np.asarray(params["coef"]), np.asarray(params["intercept"])
    scores = logits @ coef.T + intercept  # [n, K] or [n, 1]
    if scores.shape[1] == 1:
        positive = special.expit(scores[:, 0])
        return np.stack([1.0 - positive, positive], axis=1)
    return special.softmax(scores, axis=1)


def _apply_isotonic(params: dict, logits: np.ndarray) -> np.ndarray:
    """Each class's softmax probability through its isotonic step map, then rows renormalised.

    np.interp holds the end values outside the fitted range, as IsotonicRegression(out_of_bounds="clip").
    A row every map sends to 0 has no information left: it gets the uniform distribution.
    """
    softmax = special.softmax(logits, axis=1)
    mapped = np.stack([np.interp(softmax[:, k], x, y)
                       for k, (x, y) in enumerate(zip(params["x_thresholds"], params["y_thresholds"]))], axis=1)
    totals = mapped.sum(axis=1, keepdims=True)
    uniform = np.full_like(mapped, 1.0 / mapped.shape[1])
    return np.where(totals > 0, mapped / np.where(totals > 0, totals, 1.0), uniform)


_APPLY = {"none": _apply_none, "temperature": _apply_temperature, "platt": _apply_platt, "isotonic": _apply_isotonic}


# -- fitting ----------------------------------------------------------------------------------


def _check_fit_inputs(method: str, val_logits: np.ndarray, val_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every refusal happens here, before any fitting."""
    if method not in METHODS:
        raise LowbitError(f"params.yaml: evaluate.calibration: unknown method {method!r}; "
                          f"choose one of {', '.join(METHODS)}")
    logits = _as_logits(val_logits)
    labels = np.asarray(val_labels).astype(np.int64)
    classes = logits.shape[1]
    if labels.shape != (len(logits),):
        raise ValueError(f"val_labels must be [n] for val_logits [n, classes]; got {labels.shape} and {logits.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"val_labels must be class ids 0..{classes - 1}; got {labels.min()}..{labels.max()}")
    if method == "none":
        return logits, labels
    counts = np.bincount(labels, minlength=classes)
    if np.count_nonzero(counts) < 2:
        present = ", ".join(str(c) for c in np.flatnonzero(counts)) or "none"
        raise LowbitError(f"params.yaml: evaluate.calibration: {method} needs validation rows of at least 2 classes; "
                          f"the val split has {len(labels)} rows, all of class id {present}; use none, "
                          "raise prepare.val_fraction, or check the labels")
    if method == "platt" and counts.min() == 0:
        missing = int(np.argmin(counts))
        raise LowbitError(f"params.yaml: evaluate.calibration: platt needs validation rows of every class; the val split "
                          f"has none of class id {missing}, so the calibrated model could never predict it; "
                          "use temperature or raise prepare.val_fraction")
    if method == "isotonic" and counts.min() < ISOTONIC_MIN_ROWS_PER_CLASS:
        short = int(np.argmin(counts))
        raise LowbitError(f"params.yaml: evaluate.calibration: isotonic needs at least {ISOTONIC_MIN_ROWS_PER_CLASS} "
                          f"validation rows per class; the val split has {int(counts[short])} of class id {short}; "
                          "use temperature or raise prepare.val_fraction")
    return logits, labels


def _mean_nll(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean of −log softmax(logits)[i, label_i]: [n, K], [n] -> scalar (log_softmax: no overflow, no log 0)."""
    return float(-special.log_softmax(logits, axis=1)[np.arange(len(labels)), labels].mean())


def _fit_temperature(logits: np.ndarray, labels: np.ndarray) -> dict:
    """T = argmin_T NLL(softmax(logits / T)), searched over log T so that T > 0 by construction."""
    result = optimize.minimize_scalar(lambda log_t: _mean_nll(logits / math.exp(log_t), labels),
                                      bounds=_LOG_TEMPERATURE_BOUNDS, method="bounded", options={"xatol": 1e-6})
    return {"temperature": float(math.exp(result.x))}


def _fit_platt(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Logistic regression of the label on the logits (lbfgs, multinomial for > 2 classes); coefficients as lists."""
    model = LogisticRegression(C=_PLATT_C, solver="lbfgs", max_iter=_PLATT_MAX_ITER)
    model.fit(logits, labels)
    return {"coef": model.coef_.tolist(), "intercept": model.intercept_.tolist(),
            "classes": [int(c) for c in model.classes_]}


def _fit_isotonic(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Per class k, an increasing step map from softmax probability p_k to P(label = k), clipped to [0, 1]."""
    softmax = special.softmax(logits, axis=1)
    x_thresholds, y_thresholds = [], []
    for k in range(logits.shape[1]):
        regressor = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
        regressor.fit(softmax[:, k], (labels == k).astype(np.float64))
        x_thresholds.append(regressor.X_thresholds_.tolist())
        y_thresholds.append(regressor.y_thresholds_.tolist())
    return {"x_thresholds": x_thresholds, "y_thresholds": y_thresholds}


_FIT = {"none": lambda logits, labels: {}, "temperature": _fit_temperature, "platt": _fit_platt,
        "isotonic": _fit_isotonic}


def check_calibration_data(method: str, val_labels: np.ndarray, classes: int) -> None:
    """fit_calibrator's refusals from the labels alone, so a run can fail before any training
    (the flow calls it right after prepare) rather than in the evaluate stage."""
    _check_fit_inputs(method, np.zeros((len(val_labels), classes)), val_labels)


def fit_calibrator(method: str, val_logits: np.ndarray, val_labels: np.ndarray) -> Calibrator:
    """Fit `method` (one of METHODS) on validation logits [n, classes] and labels [n] only."""
    logits, labels = _check_fit_inputs(method, val_logits, val_labels)
    return Calibrator(method=method, params=_FIT[method](logits, labels))


# -- reliability --------------------------------------------------------------------------------


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Equal-width bins on confidence (top probability): (i/B, (i+1)/B], the first also holding 0.

    probabilities [n, classes], labels [n] -> B dicts {"lower", "upper", "count",
    "mean_confidence", "accuracy"}; an empty bin has count 0 and None for the two means.
    Binning is that of lowbit/metrics/ece.py, so expected_calibration_error(bins) equals `ece`.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if probs.ndim != 2 or labels.shape != (len(probs),):
        raise ValueError(f"need probabilities [n, classes] and labels [n]; got {probs.shape} and {labels.shape}")
    return confidence_bins(probs.max(axis=1), probs.argmax(axis=1) == labels, bins)


def confidence_bins(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """reliability_bins from each prediction's confidence and whether it was right (a causal LM's
    next-token predictions, where a probability row over the whole vocabulary is not kept)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    index = confidence_bin(confidence, bins)
    out = []
    for b in range(bins):
        in_bin = index == b
        count = int(in_bin.sum())
        out.append({
            "lower": b / bins, "upper": (b + 1) / bins, "count": count,
            "mean_confidence": float(confidence[in_bin].mean()) if count else None,
            "accuracy": float(correct[in_bin].mean()) if count else None,
        })
    return out


def expected_calibration_error(bins_list: list[dict]) -> float:
    """ECE = Σ_b (count_b / n) · |accuracy_b − mean confidence_b| over non-empty bins; 0 if there are no rows."""
    total = sum(b["count"] for b in bins_list)
    if total == 0:
        return 0.0
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["mean_confidence"]) for b in bins_list if b["count"]))


def reliability_diagram(curves: dict[str, dict[str, list[dict]] | list[dict]], path: Path) -> None:
    """One PNG of small multiples: a panel per variant, accuracy vs confidence per bin, and the diagonal.

    curves maps variant -> {series name -> reliability_bins(...)}, e.g.
    {"fp32": {"before": bins, "after temperature": bins}, "ptq_nf4": {"before": ..., "after temperature": ...}};
    a bare list of bins is one unnamed series. Each series is drawn as translucent bars
    (empty bins left out) and labelled with its ECE, computed from the bins. Bars under the
    diagonal are over-confident bins, bars above it under-confident ones.
    """
    if not curves:
        raise ValueError("reliability_diagram needs at least one variant's bins")
    columns = min(4, len(curves))
    rows = math.ceil(len(curves) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False,
                             sharex=True, sharey=True)
    for ax, (variant, series) in zip(axes.flat, curves.items()):
        series = {"": series} if isinstance(series, list) else series
        for name, bins_list in series.items():
            filled = [b for b in bins_list if b["count"]]
            label = f"{name} (ECE {expected_calibration_error(bins_list):.3f})".strip()
            ax.bar([(b["lower"] + b["upper"]) / 2 for b in filled], [b["accuracy"] for b in filled],
                   width=[b["upper"] - b["lower"] for b in filled], alpha=0.5, edgecolor="black", linewidth=0.5,
                   label=label)
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
        ax.set(title=variant, xlim=(0, 1), ylim=(0, 1))
        ax.legend(fontsize=7, loc="upper left")
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("confidence")
    for ax in axes[:, 0]:
        ax.set_ylabel("accuracy")
    fig.suptitle("Reliability (test split)")
    fig.tight_layout()
    save_png(fig, path)


# -- per-class report ---------------------------------------------------------------------------


def per_class_report(probabilities: np.ndarray, labels: np.ndarray, label_names: list[str]) -> dict:
    """Per-class precision, recall, F1, support of the argmax predictions, and the confusion matrix.

    probabilities [n, K], labels [n], label_names [K] (name of class id k at k) ->
    {"per_class": {name: {"precision", "recall", "f1", "support"}},
     "confusion_matrix": K × K nested lists of ints (row = true class, column = predicted),
     "labels": label_names (the row/column order)}. A class never predicted scores 0, not NaN.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(label_names):
        raise ValueError(f"probabilities must be [n, {len(label_names)}] for {len(label_names)} label names, "
                         f"got shape {probs.shape}")
    predictions = probs.argmax(axis=1)
    class_ids = list(range(len(label_names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=class_ids, zero_division=0)
    matrix = confusion_matrix(labels, predictions, labels=class_ids)
    per_class = {name: {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                        "support": int(support[k])} for k, name in enumerate(label_names)}
    return {"per_class": per_class, "confusion_matrix": matrix.tolist(), "labels": list(label_names)}
