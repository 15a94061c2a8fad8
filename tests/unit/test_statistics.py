from math import comb

import numpy as np
import pytest

from lowbit.errors import LowbitError
from lowbit.metrics import quality_metrics, softmax
from lowbit.statistics import INTERVAL_METRICS, _all_metrics, _row_quantities, metric_intervals, paired_comparison, point_metrics

RESAMPLES = 300  # enough for stable percentiles in these checks, fast on a shared CI core


def scored_rows(rows: int, accuracy: float, seed: int, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities [rows, classes] and labels whose argmax is right on exactly round(accuracy · rows) rows."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, rows)
    right = np.zeros(rows, dtype=bool)
    right[rng.permutation(rows)[: round(accuracy * rows)]] = True
    predicted = np.where(right, labels, (labels + rng.integers(1, classes, rows)) % classes)
    top = rng.uniform(0.5, 0.99, rows)  # spread over several ECE bins
    probs = np.full((rows, classes), 0.0)
    probs[:] = ((1 - top) / (classes - 1))[:, None]
    probs[np.arange(rows), predicted] = top
    return probs, labels


def correctness_pairs(both_right: int, reference_only: int, variant_only: int, both_wrong: int):
    variant = [True] * both_right + [False] * reference_only + [True] * variant_only + [False] * both_wrong
    reference = [True] * both_right + [True] * reference_only + [False] * variant_only + [False] * both_wrong
    return np.array(variant), np.array(reference)


def test_mcnemar_exact_test_on_a_hand_built_disagreement_table():
    # b = 10 rows only the reference gets right, c = 2 only the variant: under H0 each
    # disagreement is a fair coin, so p = 2 · P(X <= 2), X ~ Binomial(12, 1/2)
    # = 2 · (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 · 79 / 4096 = 0.03857.
    variant, reference = correctness_pairs(both_right=30, reference_only=10, variant_only=2, both_wrong=8)
    expected_p = 2 * sum(comb(12, k) for k in range(3)) / 2**12
    out = paired_comparison(variant, reference, resamples=RESAMPLES, seed=0, alpha=0.05)
    assert (out["mcnemar_b"], out["mcnemar_c"]) == (10, 2)
    assert out["mcnemar_p_value"] == pytest.approx(expected_p, rel=1e-12)
    assert out["mcnemar_p_value"] == pytest.approx(0.0386, abs=1e-4)
    assert out["significant"] is True
    # variant 32/50 right, reference 40/50: -16 points
    assert out["accuracy_delta"] == pytest.approx(-16.0)
    assert out["accuracy_delta_ci_low"] <= -16.0 <= out["accuracy_delta_ci_high"] < 0


def test_mcnemar_is_not_significant_at_a_stricter_level():
    variant, reference = correctness_pairs(30, 10, 2, 8)
    out = paired_comparison(variant, reference, resamples=RESAMPLES, seed=0, alpha=0.01)
    assert out["significant"] is False


def test_a_variant_identical_to_the_reference_shows_no_difference():
    correct = np.random.default_rng(1).random(400) < 0.85
    out = paired_comparison(correct, correct.copy(), resamples=RESAMPLES, seed=0, alpha=0.05)
    assert out == {"accuracy_delta": 0.0, "accuracy_delta_ci_low": 0.0, "accuracy_delta_ci_high": 0.0,
                   "mcnemar_b": 0, "mcnemar_c": 0, "mcnemar_p_value": 1.0, "significant": False}


def test_intervals_contain_the_point_value_and_shrink_with_more_rows():
    widths = {}
    for rows in (200, 5000):
        probs, labels = scored_rows(rows, accuracy=0.8, seed=rows)
        point = point_metrics(probs, labels)
        assert point["accuracy"] == pytest.approx(0.8)
        ci = metric_intervals(probs, labels, resamples=RESAMPLES, seed=0)
        assert set(ci) == {f"{m}_ci_{side}" for m in INTERVAL_METRICS for side in ("low", "high")}
        # ECE is biased upwards on resamples, so its percentile interval need not hold the point value
        for name in ("accuracy", "f1_macro", "loss"):
            assert ci[f"{name}_ci_low"] <= point[name] <= ci[f"{name}_ci_high"], name
        widths[rows] = {m: ci[f"{m}_ci_high"] - ci[f"{m}_ci_low"] for m in INTERVAL_METRICS}
    for name in INTERVAL_METRICS:
        assert 0 < widths[5000][name] < widths[200][name] / 2, name  # ~ 1/sqrt(n): 5x narrower expected


def probabilities_with_edge_cases(rows: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """4 columns, class 3 never predicted nor labelled (f1_macro must skip it), one label at prob 1e-20 (loss clip)."""
    rng = np.random.default_rng(7)
    probs = rng.dirichlet([0.4, 0.4, 0.4, 0.4], size=rows)
    probs[:, 3] = 1e-9
    probs /= probs.sum(axis=1, keepdims=True)
    labels = rng.integers(0, 3, rows)
    probs[0] = [1.0 - 2e-20, 1e-20, 1e-20, 1e-20]  # confident mistake: the label's probability is under the clip
    labels[0] = 1
    return probs, labels


def test_vectorized_metrics_equal_lowbit_metrics_on_the_full_data():
    probs, labels = probabilities_with_edge_cases()
    logits = np.log(probs)
    reference = quality_metrics(logits, labels)
    ours = point_metrics(softmax(logits), labels)  # the probabilities quality_metrics sees
    assert set(ours) == set(reference)
    for name in INTERVAL_METRICS:
        assert ours[name] == pytest.approx(reference[name], abs=1e-12, rel=0), name


def test_vectorized_metrics_run_along_the_last_axis_with_batch_dimensions():
    probs, labels = probabilities_with_edge_cases(rows=120)
    rows = _row_quantities(probs, labels)
    resampled = np.random.default_rng(0).integers(0, 120, size=(3, 2, 120))  # 6 resamples in a [3, 2] batch
    batched = _all_metrics(probs.shape[1])(*(values[resampled] for values in rows.values()))
    assert batched.shape == (4, 3, 2)
    for i in range(3):
        for j in range(2):
            one = point_metrics(probs[resampled[i, j]], labels[resampled[i, j]])
            assert list(batched[:, i, j]) == pytest.approx([one[m] for m in INTERVAL_METRICS], abs=1e-12)


def test_same_seed_same_intervals_different_seed_different():
    probs, labels = scored_rows(300, accuracy=0.7, seed=3)
    first = metric_intervals(probs, labels, resamples=RESAMPLES, seed=11)
    assert metric_intervals(probs, labels, resamples=RESAMPLES, seed=11) == first
    assert metric_intervals(probs, labels, resamples=RESAMPLES, seed=12) != first
    variant, reference = np.random.default_rng(0).random((2, 300)) < 0.8
    paired = paired_comparison(variant, reference, resamples=RESAMPLES, seed=5, alpha=0.05)
    assert paired_comparison(variant, reference, resamples=RESAMPLES, seed=5, alpha=0.05) == paired


def test_a_degenerate_bootstrap_distribution_gives_a_point_interval_not_nan():
    probs = np.eye(3)[[0, 1, 2, 0, 1, 2]]  # every row right with probability 1: every resample scores the same
    ci = metric_intervals(probs, np.array([0, 1, 2, 0, 1, 2]), resamples=50, seed=0)
    assert (ci["accuracy_ci_low"], ci["accuracy_ci_high"]) == (1.0, 1.0)
    assert (ci["ece_ci_low"], ci["ece_ci_high"]) == (0.0, 0.0)
    assert all(np.isfinite(list(ci.values())))


@pytest.mark.parametrize("resamples", [0, -5, 2.5])
def test_bad_resample_counts_name_the_params_key(resamples):
    probs, labels = scored_rows(50, accuracy=0.8, seed=0)
    with pytest.raises(LowbitError, match="evaluate.bootstrap_resamples"):
        metric_intervals(probs, labels, resamples=resamples, seed=0)
    with pytest.raises(LowbitError, match="evaluate.bootstrap_resamples"):
        paired_comparison(labels == 0, labels == 1, resamples=resamples, seed=0, alpha=0.05)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 1.5, -0.1])
def test_bad_significance_levels_name_the_params_key(alpha):
    correct = np.array([True, False, True, True])
    with pytest.raises(LowbitError, match="evaluate.significance_level"):
        paired_comparison(correct, correct, resamples=10, seed=0, alpha=alpha)


def test_arrays_of_different_lengths_are_refused():
    with pytest.raises(LowbitError, match="same test split"):
        paired_comparison(np.ones(5, bool), np.ones(6, bool), resamples=10, seed=0, alpha=0.05)
    with pytest.raises(LowbitError, match="rerun evaluate"):
        metric_intervals(np.full((5, 2), 0.5), np.zeros(6, int), resamples=10, seed=0)
