"""Metrics (inference/metrics.py): ROC AUC and average precision give scikit-learn's numbers, ties included."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from inference.metrics import average_precision, metrics_with_ci, roc_auc


@pytest.mark.parametrize("seed", range(20))
def test_auc_and_average_precision_equal_scikit_learns(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]  # both classes
    # probabilities rounded to few levels: many equal scores, across the classes too
    scores = np.round(rng.random(n), int(rng.integers(1, 4))) if seed % 2 else rng.random(n)
    assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_one_class_gives_nan_as_scikit_learn_warns() -> None:
    labels, scores = np.zeros(5, dtype=int), np.linspace(0, 1, 5)
    assert np.isnan(roc_auc(labels, scores)) and np.isnan(average_precision(labels, scores))
    assert np.isnan(roc_auc(1 - labels, scores)) and average_precision(1 - labels, scores) == 1.0


def test_the_bootstrap_intervals_hold_the_figure() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    probabilities = np.clip(labels * 0.3 + rng.random(300) * 0.7, 0, 1)
    result = metrics_with_ci(labels, probabilities, 0.5, rounds=200)
    for name in ("roc_auc", "pr_auc", "recall", "specificity"):
        low, high = result["ci95"][name]
        assert low <= result[name] <= high, name
    assert result["roc_auc"] == pytest.approx(roc_auc_score(labels, probabilities), abs=1e-12)
