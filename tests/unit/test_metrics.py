import math

import numpy as np
import pytest

from lowbit.metrics import quality_metrics, softmax
from lowbit.metrics import load_metric


def test_accuracy_and_macro_f1_against_hand_computed_values():
    preds, refs = [0, 1, 1, 2, 2, 2], [0, 1, 0, 2, 1, 2]
    assert load_metric("accuracy").compute(predictions=preds, references=refs)["accuracy"] == pytest.approx(4 / 6)
    # class 0: P=1, R=1/2 -> F1=2/3; class 1: P=1/2, R=1/2 -> 1/2; class 2: P=2/3, R=1 -> 4/5
    f1 = load_metric("f1_macro").compute(predictions=preds, references=refs)["f1_macro"]
    assert f1 == pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3)


def test_f1_macro_counts_a_never_predicted_class_as_zero():
    f1 = load_metric("f1_macro").compute(predictions=[0, 0, 0, 0], references=[0, 0, 1, 1])["f1_macro"]
    assert f1 == pytest.approx((2 * 2 / 6 + 0) / 2)


def test_ece_worked_example_15_bins():
    # confidences 0.9 (right), 0.8 (right), 0.6 (wrong), 0.95 (wrong): 4 separate bins
    probs = [[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.05, 0.95]]
    refs = [0, 1, 0, 0]
    expected = (0.1 + 0.2 + 0.6 + 0.95) / 4
    assert load_metric("ece").compute(probabilities=probs, references=refs)["ece"] == pytest.approx(expected)


def test_ece_shares_a_bin_between_samples():
    # 0.70 and 0.72 fall in bin (0.667, 0.733]: |acc 0.5 - conf 0.71| weighted 2/2
    probs, refs = [[0.70, 0.30], [0.72, 0.28]], [0, 1]
    assert load_metric("ece").compute(probabilities=probs, references=refs)["ece"] == pytest.approx(0.21)


def test_ece_is_zero_for_a_perfectly_calibrated_confident_model():
    assert load_metric("ece").compute(probabilities=[[1.0, 0.0]] * 3, references=[0, 0, 0])["ece"] == 0.0


def test_loss_is_mean_negative_log_likelihood():
    probs, refs = [[0.5, 0.5], [0.1, 0.9], [0.8, 0.2]], [0, 1, 1]
    expected = -(math.log(0.5) + math.log(0.9) + math.log(0.2)) / 3
    assert load_metric("loss").compute(probabilities=probs, references=refs)["loss"] == pytest.approx(expected)


def test_quality_metrics_from_logits_matches_cross_entropy():
    import torch

    logits = np.array([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-3.0, 4.0, 0.0]])
    labels = np.array([0, 2, 0])
    out = quality_metrics(logits, labels)
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels)).item()
    assert out["loss"] == pytest.approx(expected, rel=1e-9)
    assert out["accuracy"] == pytest.approx(2 / 3)
    assert np.allclose(softmax(logits).sum(axis=1), 1.0)


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        load_metric("bleu")
