"""Calibration — temperature scaling and the operating-threshold rule, both fitted on validation."""

import numpy as np
import torch
from scipy.special import expit


def calibrated_probabilities(logits: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """``sigmoid(logit / temperature)``, computed without overflow for very negative logits (``temperature``:
    one, or one per logit)."""
    return expit(np.asarray(logits, dtype=np.float64) / temperature)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T minimising the validation log-loss of ``sigmoid(logit / T)``."""
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    labels_t = torch.as_tensor(labels, dtype=torch.float64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimiser.step(closure)
    return float(log_t.detach().exp())


def choose_threshold(probabilities: np.ndarray, labels: np.ndarray, min_sensitivity: float = 0.98) -> float:
    """The highest threshold whose validation sensitivity is still ≥ ``min_sensitivity``.

    Highest = best specificity among thresholds meeting the sensitivity target. It depends only on
    the pneumonia scores, so it does not move when the share of pneumonia cases changes.
    A case is called positive when its probability is ≥ the threshold.
    """
    positives = np.sort(np.asarray(probabilities)[np.asarray(labels) == 1])
    if len(positives) == 0:
        raise ValueError("validation split has no pneumonia case to set a threshold on")
    allowed_misses = int(np.floor((1.0 - min_sensitivity) * len(positives) + 1e-9))
    return float(positives[allowed_misses])


def sensitivity_lower_bound(caught: int, positives: int, confidence: float = 0.95) -> float:
    """One-sided Clopper–Pearson lower bound of a sensitivity of ``caught`` / ``positives``."""
    if positives == 0:
        return 0.0
    if caught == 0:
        return 0.0
    from scipy.stats import beta  # here, not at the top: the worker, which never calls this, is spared scipy.stats

    return float(beta.ppf(1.0 - confidence, caught, positives - caught + 1))


def threshold_with_confidence(
    probabilities: np.ndarray, labels: np.ndarray, target_sensitivity: float, confidence: float = 0.95
) -> tuple[float, float, bool]:
    """The highest threshold whose sensitivity is ≥ ``target_sensitivity`` with ``confidence``.

    Returns (threshold, lower bound of the sensitivity there, whether the target was met). With
    too few positives no threshold can show the target (e.g. 100 of 100 caught only shows 0.970
    at 95 %); the threshold then keeps every positive of the sample, the best that can be shown.
    """
    positives = np.sort(np.asarray(probabilities, dtype=float)[np.asarray(labels) == 1])
    if len(positives) == 0:
        raise ValueError("the labelled set has no pneumonia case to set a threshold on")
    n = len(positives)
    for misses in range(n - 1, -1, -1):  # from the highest threshold down
        bound = sensitivity_lower_bound(n - misses, n, confidence)
        if bound >= target_sensitivity:
            return float(positives[misses]), bound, True
    return float(positives[0]), sensitivity_lower_bound(n, n, confidence), False


def balanced_threshold(
    probabilities: np.ndarray, labels: np.ndarray, min_sensitivity: float, max_threshold: float = 1.0
) -> float:
    """The threshold with the highest Youden index (sensitivity + specificity − 1) among those
    whose sensitivity is ≥ ``min_sensitivity`` and that are ≤ ``max_threshold``: the middle of the
    interval of thresholds that all give that best index (a case is positive when its probability
    is ≥ the threshold)."""
    probabilities = np.asarray(probabilities, dtype=float)
    labels = np.asarray(labels)
    candidates = np.unique(np.append(probabilities[probabilities <= max_threshold], min(max_threshold, 1.0)))
    positives, negatives = probabilities[labels == 1], probabilities[labels == 0]
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("a balanced threshold needs pneumonia and normal cases")
    sensitivity = np.array([(positives >= t).mean() for t in candidates])
    specificity = np.array([(negatives < t).mean() for t in candidates])
    allowed = (sensitivity >= min_sensitivity) & (candidates <= max_threshold)
    if not allowed.any():
        raise ValueError(f"no threshold ≤ {max_threshold} keeps sensitivity ≥ {min_sensitivity}")
    youden = np.where(allowed, sensitivity + specificity - 1.0, -np.inf)
    best = np.flatnonzero(youden == youden.max())
    last = best[0]
    while last + 1 < len(candidates) and youden[last + 1] == youden[best[0]]:  # the first run of equal bests
        last += 1
    low = candidates[best[0] - 1] if best[0] > 0 else 0.0  # every threshold in (low, candidates[last]] is as good
    return float((low + candidates[last]) / 2)
