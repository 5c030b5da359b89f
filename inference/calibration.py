"""Calibration — temperature scaling and the operating-threshold rule, both fitted on validation."""

import numpy as np
import torch


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
