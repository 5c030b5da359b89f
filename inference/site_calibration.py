"""Site calibration — a site's labelled cases (raw logits and labels) become a site profile: the
threshold at which a target sensitivity holds *with confidence*, and a temperature when it helps.

* **Threshold**: the highest one whose one-sided Clopper–Pearson lower bound of sensitivity is
  still ≥ the target (``calibration.threshold_with_confidence``). A sensitivity measured on 100
  positives is noisy; the bound makes the promise hold for the site's population, not the sample.
  The threshold depends on the positives only, so the specificity measured on the site's
  negatives is an unbiased estimate of what the site will see.
* **Temperature**: refitted on the site's cases and kept only when it predicts held-out cases
  better than the shipped one (5-fold cross-validated log-loss); it changes the probabilities
  shown, never which side of the threshold a case falls on.
"""

from datetime import datetime, timezone

import numpy as np
import torch

from inference.calibration import calibrated_probabilities, fit_temperature, threshold_with_confidence
from inference.classifier import Classifier
from inference.metrics import metrics_with_ci
from inference.site_profile import SiteProfile

FOLDS = 5


def _log_loss(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(torch.nn.functional.binary_cross_entropy_with_logits(
        torch.as_tensor(logits / temperature, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.float64)))


def choose_temperature(logits: np.ndarray, labels: np.ndarray, shipped: float, seed: int = 0) -> tuple[float, dict]:
    """The site's temperature if it beats ``shipped`` on held-out folds, else ``shipped``."""
    order = np.random.default_rng(seed).permutation(len(labels))
    site_losses, shipped_losses = [], []
    for fold in np.array_split(order, FOLDS):
        rest = np.setdiff1d(order, fold)
        if len(set(labels[rest].tolist())) < 2 or len(fold) == 0:
            continue
        fitted = fit_temperature(logits[rest], labels[rest])
        site_losses.append(_log_loss(logits[fold], labels[fold], fitted))
        shipped_losses.append(_log_loss(logits[fold], labels[fold], shipped))
    fitted = fit_temperature(logits, labels)
    helps = bool(site_losses) and float(np.mean(site_losses)) < float(np.mean(shipped_losses))
    return (fitted if helps else shipped), {
        "shipped": shipped, "fitted": fitted, "used": "fitted" if helps else "shipped",
        "cv_log_loss_fitted": float(np.mean(site_losses)) if site_losses else None,
        "cv_log_loss_shipped": float(np.mean(shipped_losses)) if shipped_losses else None,
    }


def calibrate_site(labels: np.ndarray, logits: np.ndarray, classifier: Classifier, *, target_sensitivity: float,
                   confidence: float, profile_id: str, data: str, refused: int = 0) -> SiteProfile:
    """Fit a site profile on ``labels`` (1 = pneumonia) and raw ``logits`` of the current weights."""
    labels = np.asarray(labels, dtype=int)
    logits = np.asarray(logits, dtype=float)
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"calibration needs pneumonia and normal cases; got {positives} and {negatives}")
    temperature, temperature_fit = choose_temperature(logits, labels, classifier.card.temperature)
    probabilities = calibrated_probabilities(logits, temperature)
    threshold, bound, met = threshold_with_confidence(probabilities, labels, target_sensitivity, confidence)
    figures = metrics_with_ci(labels, probabilities, threshold)
    expected = {
        "sensitivity": {"sample": figures["recall"], "ci95": figures["ci95"].get("recall"),
                        "lower_bound": bound, "confidence": confidence},
        "specificity": {"sample": figures["specificity"], "ci95": figures["ci95"].get("specificity")},
        "accuracy": {"sample": figures["accuracy"], "ci95": figures["ci95"].get("accuracy")},
        "roc_auc": {"sample": figures["roc_auc"], "ci95": figures["ci95"].get("roc_auc")},
        "confusion": figures["confusion"],
    }
    return SiteProfile(
        id=profile_id, threshold=threshold, temperature=temperature, target_sensitivity=target_sensitivity,
        confidence=confidence, target_met=met, weights_sha256=classifier.card.weights_sha256,
        model_version=classifier.version, created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        data=data, n={"positive": positives, "negative": negatives, "refused": refused}, expected=expected,
        temperature_fit=temperature_fit)


def positives_needed(target_sensitivity: float, confidence: float) -> int:
    """How many positives, all caught, show ``target_sensitivity`` with ``confidence``."""
    return int(np.ceil(np.log(1.0 - confidence) / np.log(target_sensitivity)))


def describe(profile: SiteProfile) -> str:
    """What the site should expect at the profile's operating point, for people."""
    sensitivity, specificity = profile.expected["sensitivity"], profile.expected["specificity"]

    def ci(figure: dict) -> str:
        low_high = figure.get("ci95")
        return f" (95 % CI {low_high[0]:.3f}–{low_high[1]:.3f})" if low_high else ""

    lines = [
        f"site profile {profile.id}: threshold {profile.threshold:.4f}, temperature {profile.temperature:.4f} "
        f"({profile.temperature_fit['used']}), fitted on {profile.n['positive']} pneumonia / "
        f"{profile.n['negative']} normal cases ({profile.n['refused']} refused by the intended-use gate)",
        f"expected sensitivity ≥ {sensitivity['lower_bound']:.3f} with {profile.confidence:.0%} confidence "
        f"(on the sample {sensitivity['sample']:.3f}{ci(sensitivity)})",
        f"expected specificity {specificity['sample']:.3f}{ci(specificity)}",
    ]
    if not profile.target_met:
        lines.append(
            f"WARNING: {profile.n['positive']} positives cannot show sensitivity ≥ {profile.target_sensitivity} with "
            f"{profile.confidence:.0%} confidence (that needs ≥ {positives_needed(profile.target_sensitivity, profile.confidence)} "
            f"positives, all caught); the threshold keeps every positive of the sample instead. Add cases or "
            f"lower --target-sensitivity / --confidence.")
    return "\n".join(lines)
