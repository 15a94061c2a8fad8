import inspect
import json

import numpy as np
import pytest

from lowbit.calibration import (
    METHODS,
    Calibrator,
    expected_calibration_error,
    fit_calibrator,
    per_class_report,
    reliability_bins,
    reliability_diagram,
)
from lowbit.errors import LowbitError
from lowbit.metrics import load_metric, quality_metrics


def overconfident_toy(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated 3-class logits × 5 (over-confident) and 10% of labels redrawn at random (so it is wrong sometimes)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    logits = np.eye(3)[labels] + rng.normal(0.0, 0.6, (rows, 3))
    noisy = rng.random(rows) < 0.1
    labels = np.where(noisy, rng.integers(0, 3, rows), labels)
    return 5.0 * logits, labels


@pytest.fixture(scope="module")
def toy():
    val_logits, val_labels = overconfident_toy(600, seed=0)
    test_logits, test_labels = overconfident_toy(3000, seed=1)  # a separate draw: never shown to the fit
    return val_logits, val_labels, test_logits, test_labels


def scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """lowbit's own metrics on probabilities (quality_metrics takes logits; log p is one, floored for isotonic zeros)."""
    return quality_metrics(np.log(np.clip(probabilities, 1e-300, 1.0)), labels)


def test_temperature_scaling_lowers_ece_and_nll_and_keeps_every_prediction(toy):
    val_logits, val_labels, test_logits, test_labels = toy
    before = quality_metrics(test_logits, test_labels)
    calibrator = fit_calibrator("temperature", val_logits, val_labels)
    probabilities = calibrator.apply(test_logits)
    after = scores(probabilities, test_labels)
    assert calibrator.params["temperature"] > 1  # an over-confident model is softened
    assert after["ece"] < before["ece"]
    assert after["loss"] < before["loss"]
    assert np.array_equal(probabilities.argmax(axis=1), test_logits.argmax(axis=1))
    assert after["accuracy"] == before["accuracy"]


@pytest.mark.parametrize("method", ["platt", "isotonic"])
def test_platt_and_isotonic_lower_ece_on_the_toy(toy, method):
    val_logits, val_labels, test_logits, test_labels = toy
    probabilities = fit_calibrator(method, val_logits, val_labels).apply(test_logits)
    assert np.allclose(probabilities.sum(axis=1), 1.0) and probabilities.min() >= 0
    assert scores(probabilities, test_labels)["ece"] < quality_metrics(test_logits, test_labels)["ece"]


def test_none_is_plain_softmax(toy):
    _, _, test_logits, test_labels = toy
    probabilities = fit_calibrator("none", *toy[:2]).apply(test_logits)
    assert scores(probabilities, test_labels)["ece"] == pytest.approx(quality_metrics(test_logits, test_labels)["ece"])


@pytest.mark.parametrize("method", METHODS)
def test_json_round_trip_gives_identical_probabilities(toy, method):
    val_logits, val_labels, test_logits, _ = toy
    calibrator = fit_calibrator(method, val_logits, val_labels)
    restored = Calibrator.from_json(json.loads(json.dumps(calibrator.to_json())))  # through real JSON text
    assert restored.method == method
    assert np.array_equal(restored.apply(test_logits), calibrator.apply(test_logits))


@pytest.mark.parametrize("method", METHODS)
def test_fit_sees_only_validation_rows(toy, method):
    assert list(inspect.signature(fit_calibrator).parameters) == ["method", "val_logits", "val_labels"]
    val_logits, val_labels, test_logits, _ = toy
    calibrator = fit_calibrator(method, val_logits, val_labels)
    fitted = json.dumps(calibrator.to_json())
    test_copy = test_logits.copy()
    calibrator.apply(test_logits)
    assert json.dumps(calibrator.to_json()) == fitted  # applying to test rows changes nothing that was fitted
    assert np.array_equal(test_logits, test_copy)
    assert json.dumps(fit_calibrator(method, val_logits, val_labels).to_json()) == fitted  # deterministic fit


def test_reliability_bins_on_a_hand_computed_case():
    # confidences 0.95 (right), 0.85 (wrong), 0.55 (right), 0.58 (wrong), 0.52 (wrong); 15 bins of width 1/15,
    # bin i = (i/15, (i+1)/15]: 0.95 -> 14 (0.933, 1], 0.85 -> 12 (0.8, 0.867], 0.55 and 0.58 -> 8 (0.533, 0.6],
    # 0.52 -> 7 (0.467, 0.533].
    # ECE = 1/5·|1 − 0.95| + 1/5·|0 − 0.85| + 2/5·|0.5 − 0.565| + 1/5·|0 − 0.52|
    #     = 0.01 + 0.17 + 0.026 + 0.104 = 0.31
    probabilities = np.array([[0.95, 0.05], [0.15, 0.85], [0.55, 0.45], [0.42, 0.58], [0.48, 0.52]])
    labels = np.array([0, 0, 0, 0, 0])
    bins = reliability_bins(probabilities, labels)
    assert len(bins) == 15
    filled = {i: b for i, b in enumerate(bins) if b["count"]}
    assert sorted(filled) == [7, 8, 12, 14]
    assert filled[14] == {"lower": 14 / 15, "upper": 1.0, "count": 1, "mean_confidence": 0.95, "accuracy": 1.0}
    assert filled[12] == {"lower": 12 / 15, "upper": 13 / 15, "count": 1, "mean_confidence": 0.85, "accuracy": 0.0}
    assert filled[7] == {"lower": 7 / 15, "upper": 8 / 15, "count": 1, "mean_confidence": 0.52, "accuracy": 0.0}
    assert filled[8]["count"] == 2
    assert filled[8]["mean_confidence"] == pytest.approx(0.565)
    assert filled[8]["accuracy"] == 0.5
    assert all(b["mean_confidence"] is None and b["accuracy"] is None for i, b in enumerate(bins) if i not in filled)
    assert expected_calibration_error(bins) == pytest.approx(0.31)
    ece = load_metric("ece").compute(probabilities=probabilities, references=labels)["ece"]
    assert expected_calibration_error(bins) == pytest.approx(ece, abs=1e-15)
    json.dumps(bins)  # JSON-able as is


def test_expected_calibration_error_agrees_with_the_metric_on_the_toy(toy):
    _, _, test_logits, test_labels = toy
    probabilities = fit_calibrator("none", *toy[:2]).apply(test_logits)
    ece = expected_calibration_error(reliability_bins(probabilities, test_labels))
    assert ece == pytest.approx(quality_metrics(test_logits, test_labels)["ece"], abs=1e-12)


@pytest.mark.parametrize("method", ["temperature", "platt", "isotonic"])
def test_a_one_class_validation_split_is_refused(method):
    logits = np.random.default_rng(0).normal(size=(50, 3))
    with pytest.raises(LowbitError, match=r"evaluate\.calibration: .*at least 2 classes.*class id 1"):
        fit_calibrator(method, logits, np.ones(50, dtype=int))


def test_isotonic_with_too_few_rows_of_a_class_is_refused():
    labels = np.array([0] * 30 + [1] * 7 + [2] * 25)
    logits = np.random.default_rng(0).normal(size=(len(labels), 3))
    with pytest.raises(LowbitError, match=r"evaluate\.calibration: isotonic needs at least 20 .* has 7 of class id 1"):
        fit_calibrator("isotonic", logits, labels)
    fit_calibrator("temperature", logits, labels)  # the suggested alternative works on the same split


def test_unknown_method_lists_the_methods():
    with pytest.raises(LowbitError, match=r"evaluate\.calibration: unknown method 'histogram'.*none, temperature, platt, isotonic"):
        fit_calibrator("histogram", np.zeros((4, 2)), np.array([0, 1, 0, 1]))


def test_per_class_report_when_one_class_collapses():
    # true: 3 × neg, 3 × neu, 2 × pos; the model never predicts "neu" (2 of them go to neg, 1 to pos)
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    predicted = np.array([0, 0, 2, 0, 0, 2, 2, 2])
    probabilities = np.full((8, 3), 0.2)
    probabilities[np.arange(8), predicted] = 0.6
    report = per_class_report(probabilities, labels, ["neg", "neu", "pos"])
    assert report["confusion_matrix"] == [[2, 0, 1], [2, 0, 1], [0, 0, 2]]  # rows = true class
    assert report["labels"] == ["neg", "neu", "pos"]
    neg, neu, pos = (report["per_class"][name] for name in ("neg", "neu", "pos"))
    assert neu == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}
    # neg: TP 2 of 4 predicted, 2 of 3 true -> P 1/2, R 2/3, F1 = 2·(1/2)(2/3)/(1/2 + 2/3) = 4/7
    assert (neg["precision"], neg["recall"], neg["f1"], neg["support"]) == pytest.approx((1 / 2, 2 / 3, 4 / 7, 3))
    # pos: TP 2 of 4 predicted, 2 of 2 true -> P 1/2, R 1, F1 = 2/3
    assert (pos["precision"], pos["recall"], pos["f1"], pos["support"]) == pytest.approx((1 / 2, 1.0, 2 / 3, 2))
    json.dumps(report)


def test_reliability_diagram_writes_a_png(toy, tmp_path):
    val_logits, val_labels, test_logits, test_labels = toy
    before = reliability_bins(fit_calibrator("none", val_logits, val_labels).apply(test_logits), test_labels)
    after = reliability_bins(fit_calibrator("temperature", val_logits, val_labels).apply(test_logits), test_labels)
    path = tmp_path / "reports" / "reliability.png"
    reliability_diagram({"fp32": {"before": before, "after temperature": after}, "ptq_nf4": before}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]  # no temporary file left
