"""Metrics — binary classification figures with 95 % bootstrap confidence intervals.

ROC AUC and average precision are computed here with numpy rather than by scikit-learn's functions: a
bootstrap calls them a thousand times per figure, and scikit-learn's checks of its arguments took 25 of
every 30 seconds of finalising a model. Both give scikit-learn's numbers (tests/inference/test_metrics.py).
"""

from typing import Any

import numpy as np
from scipy.stats import rankdata


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a positive scores above a negative, ties counting half
    (the Mann-Whitney U over positives × negatives). NaN without both classes."""
    positive = labels == 1
    positives, negatives = int(positive.sum()), int((~positive).sum())
    if not positives or not negatives:
        return float("nan")
    ranks = rankdata(scores)  # equal scores share their mean rank
    return float((ranks[positive].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: the precision at each distinct score (highest first) weighted by the recall it
    adds. NaN without positives."""
    order = np.argsort(-scores, kind="stable")
    ordered, hits = scores[order], (labels[order] == 1)
    last_of_each_score = np.append(np.flatnonzero(np.diff(ordered)), len(ordered) - 1)
    true_positives = np.cumsum(hits)[last_of_each_score]
    if not len(true_positives) or not true_positives[-1]:
        return float("nan")
    precision = true_positives / (last_of_each_score + 1)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """ECE over ``bins`` equal-width probability bins (weighted mean |accuracy − confidence|)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(probabilities, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(labels[members].mean() - probabilities[members].mean())
    return float(error)


def point_metrics(labels: np.ndarray, probabilities: np.ndarray, threshold: float) -> dict[str, Any]:
    """Accuracy, recall, specificity, precision, F1, ROC/PR AUC and ECE at ``threshold`` (floats), and the
    confusion counts (``confusion``)."""
    predicted = probabilities >= threshold
    positive = labels == 1
    tp = int((predicted & positive).sum())
    fp = int((predicted & ~positive).sum())
    tn = int((~predicted & ~positive).sum())
    fn = int((~predicted & positive).sum())
    recall = tp / (tp + fn) if tp + fn else float("nan")
    precision = tp / (tp + fp) if tp + fp else float("nan")
    both_classes = 0 < positive.sum() < len(labels)
    return {
        "accuracy": (tp + tn) / len(labels),
        "recall": recall,
        "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        "precision": precision,
        "f1": 2 * precision * recall / (precision + recall) if tp else 0.0,
        "roc_auc": roc_auc(labels, probabilities) if both_classes else float("nan"),
        "pr_auc": average_precision(labels, probabilities) if both_classes else float("nan"),
        "ece": expected_calibration_error(labels, probabilities),
        "confusion": {"tp": tp, "fp": fp, "tn": tn, "fn": fn},
    }


def metrics_with_ci(
    labels: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    rounds: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> dict:
    """``point_metrics`` plus ``n``, ``threshold`` and a 95 % percentile-bootstrap CI per figure.

    ``groups`` (one id per row) makes the bootstrap draw whole groups, e.g. all perturbed copies
    of one image, so that copies do not narrow the intervals.
    """
    labels = np.asarray(labels).astype(int)
    probabilities = np.asarray(probabilities, dtype=float)
    result: dict[str, Any] = {
        "n": int(len(labels)),
        "threshold": float(threshold),
        **point_metrics(labels, probabilities, threshold),
    }
    rng = np.random.default_rng(seed)
    members = None
    if groups is not None:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        members = [np.flatnonzero(inverse == g) for g in range(inverse.max() + 1)]
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        if members is None:
            index = rng.integers(0, len(labels), len(labels))
        else:
            index = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        for name, value in point_metrics(labels[index], probabilities[index], threshold).items():
            if name != "confusion" and not np.isnan(value):
                samples.setdefault(name, []).append(value)
    result["ci95"] = {
        name: [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
        for name, values in samples.items()
    }
    return result


def specificity_at_sensitivity(labels: np.ndarray, scores: np.ndarray, sensitivity: float) -> float:
    """Specificity at the highest threshold that still calls at least ``sensitivity`` of the positives."""
    positives = np.sort(scores[labels == 1])
    negatives = scores[labels == 0]
    if not len(positives) or not len(negatives):
        return float("nan")
    threshold = positives[int(np.floor((1 - sensitivity) * len(positives)))]
    return float((negatives < threshold).mean())


def bootstrap_ci(statistic, labels: np.ndarray, scores: np.ndarray, rounds: int = 1000, seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap CI of ``statistic(labels, scores)`` over resampled cases."""
    rng = np.random.default_rng(seed)
    values = [
        statistic(labels[index], scores[index])
        for index in (rng.integers(0, len(labels), len(labels)) for _ in range(rounds))
    ]
    values = [value for value in values if not np.isnan(value)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else [float("nan")] * 2
