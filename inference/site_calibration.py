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
* **Populations**: a model with several populations (children, adults) gets one point per
  population, fitted on that population's cases only, for each population with at least
  ``MIN_CASES_PER_CLASS`` pneumonia and as many normal cases; the others keep the shipped point and
  the profile says why. A set whose cases all belong to one population (e.g. a children's hospital)
  fits that population's point on whatever it holds, as a one-population model always did; the
  other populations keep the shipped point.
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import torch

from inference.calibration import calibrated_probabilities, fit_temperature, threshold_with_confidence
from inference.classifier import Classifier
from inference.metrics import metrics_with_ci
from inference.site_profile import OperatingPoint, PointSource, PopulationFit, SiteProfile

FOLDS = 5
MIN_CASES_PER_CLASS = 20  # pneumonia and normal cases a population needs for its own point (several populations)


def _log_loss(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(
        torch.nn.functional.binary_cross_entropy_with_logits(
            torch.as_tensor(logits / temperature, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.float64)
        )
    )


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
        "shipped": shipped,
        "fitted": fitted,
        "used": "fitted" if helps else "shipped",
        "cv_log_loss_fitted": float(np.mean(site_losses)) if site_losses else None,
        "cv_log_loss_shipped": float(np.mean(shipped_losses)) if shipped_losses else None,
    }


def fit_population(
    labels: np.ndarray, logits: np.ndarray, shipped: OperatingPoint, *, target_sensitivity: float, confidence: float
) -> PopulationFit:
    """Fit one population's point on its ``labels`` (1 = pneumonia) and raw ``logits``."""
    positives, negatives = int(labels.sum()), int(len(labels) - labels.sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"calibration needs pneumonia and normal cases; got {positives} and {negatives}")
    temperature, temperature_fit = choose_temperature(logits, labels, shipped.temperature)
    probabilities = calibrated_probabilities(logits, temperature)
    threshold, bound, met = threshold_with_confidence(probabilities, labels, target_sensitivity, confidence)
    figures = metrics_with_ci(labels, probabilities, threshold)
    expected = {
        "sensitivity": {
            "sample": figures["recall"],
            "ci95": figures["ci95"].get("recall"),
            "lower_bound": bound,
            "confidence": confidence,
        },
        "specificity": {"sample": figures["specificity"], "ci95": figures["ci95"].get("specificity")},
        "accuracy": {"sample": figures["accuracy"], "ci95": figures["ci95"].get("accuracy")},
        "roc_auc": {"sample": figures["roc_auc"], "ci95": figures["ci95"].get("roc_auc")},
        "confusion": figures["confusion"],
    }
    return PopulationFit(
        shipped.population,
        PointSource.SITE,
        threshold,
        temperature,
        {"positive": positives, "negative": negatives},
        met,
        expected,
        temperature_fit,
    )


def calibrate_site(
    labels: np.ndarray,
    logits: np.ndarray,
    classifier: Classifier,
    *,
    target_sensitivity: float,
    confidence: float,
    profile_id: str,
    data: str,
    refused: int = 0,
    populations: Sequence[str] | None = None,
) -> SiteProfile:
    """Fit a site profile on ``labels`` (1 = pneumonia) and raw ``logits`` of the current weights;
    ``populations`` names each case's population (None: all the model's first population)."""
    labels = np.asarray(labels, dtype=int)
    logits = np.asarray(logits, dtype=float)
    names = classifier.population_names
    of_case = np.array([names[0]] * len(labels) if populations is None else list(populations), dtype=str)
    unknown = sorted(set(of_case.tolist()) - set(names))
    if unknown:
        raise ValueError(f"cases of populations {unknown} the model does not have ({', '.join(names)})")
    present = [name for name in names if (of_case == name).any()]
    fits = []
    for name in names:
        members = of_case == name
        shipped = classifier.shipped_points[name]
        positives, negatives = int(labels[members].sum()), int(members.sum() - labels[members].sum())
        if name not in present or (len(present) > 1 and min(positives, negatives) < MIN_CASES_PER_CLASS):
            fits.append(
                PopulationFit(
                    name,
                    PointSource.SHIPPED,
                    shipped.threshold,
                    shipped.temperature,
                    {"positive": positives, "negative": negatives},
                    note="no case of this population in the set"
                    if name not in present
                    else f"{positives} pneumonia / {negatives} normal cases; a point of its own needs at least "
                    f"{MIN_CASES_PER_CLASS} of each",
                )
            )
            continue
        fits.append(
            fit_population(
                labels[members], logits[members], shipped, target_sensitivity=target_sensitivity, confidence=confidence
            )
        )
    fitted = [fit for fit in fits if fit.source is PointSource.SITE]
    if not fitted:
        raise ValueError(
            "no population has enough cases for a point of its own: "
            + "; ".join(f"{fit.population}: {fit.note}" for fit in fits)
        )
    first = fits[0]
    return SiteProfile(
        id=profile_id,
        threshold=first.threshold,
        temperature=first.temperature,
        target_sensitivity=target_sensitivity,
        confidence=confidence,
        target_met=all(fit.target_met for fit in fitted),
        weights_sha256=classifier.card.weights_sha256,
        model_version=classifier.version,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        data=data,
        n={"positive": int(labels.sum()), "negative": int(len(labels) - labels.sum()), "refused": refused},
        expected=first.expected,
        temperature_fit=first.temperature_fit,
        populations=fits,
    )


def positives_needed(target_sensitivity: float, confidence: float) -> int:
    """How many positives, all caught, show ``target_sensitivity`` with ``confidence``."""
    return int(np.ceil(np.log(1.0 - confidence) / np.log(target_sensitivity)))


def describe(profile: SiteProfile) -> str:
    """What the site should expect at the profile's operating points, for people."""
    fits = profile.populations or [
        PopulationFit(
            "every population",
            PointSource.SITE,
            profile.threshold,
            profile.temperature,
            profile.n,
            profile.target_met,
            profile.expected,
            profile.temperature_fit,
        )
    ]
    lines = [
        f"site profile {profile.id}: fitted on {profile.n['positive']} pneumonia / {profile.n['negative']} "
        f"normal cases ({profile.n.get('refused', 0)} refused by the intended-use gate)"
    ]
    for fit in fits:
        lines += _describe_fit(fit, profile.target_sensitivity, profile.confidence)
    return "\n".join(lines)


def _describe_fit(fit: PopulationFit, target_sensitivity: float, confidence: float) -> list[str]:
    if fit.source is PointSource.SHIPPED:
        return [
            f"{fit.population}: the shipped point is kept (threshold {fit.threshold:.4f}, temperature "
            f"{fit.temperature:.4f}): {fit.note}"
        ]
    sensitivity, specificity = fit.expected["sensitivity"], fit.expected["specificity"]

    def ci(figure: dict) -> str:
        low_high = figure.get("ci95")
        return f" (95 % CI {low_high[0]:.3f}–{low_high[1]:.3f})" if low_high else ""

    lines = [
        f"{fit.population}: threshold {fit.threshold:.4f}, temperature {fit.temperature:.4f} "
        f"({fit.temperature_fit['used']}), fitted on {fit.n['positive']} pneumonia / {fit.n['negative']} normal cases",
        f"  expected sensitivity ≥ {sensitivity['lower_bound']:.3f} with {confidence:.0%} confidence "
        f"(on the sample {sensitivity['sample']:.3f}{ci(sensitivity)})",
        f"  expected specificity {specificity['sample']:.3f}{ci(specificity)}",
    ]
    if not fit.target_met:
        lines.append(
            f"  WARNING: {fit.n['positive']} positives cannot show sensitivity ≥ {target_sensitivity} with "
            f"{confidence:.0%} confidence (that needs ≥ {positives_needed(target_sensitivity, confidence)} "
            f"positives, all caught); the threshold keeps every positive of the sample instead. Add cases or "
            f"lower --target-sensitivity / --confidence."
        )
    return lines
