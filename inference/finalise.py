"""Finalising a run — trained weights and the run's split become the calibration, the shipped
operating point and the intended-use gate's image check (all from the training data alone).

* **Temperature**: fitted on the clean validation split (log-loss).
* **Threshold** — the rule: *the highest Youden index (sensitivity + specificity − 1) on the
  stressed validation split, among thresholds keeping sensitivity ≥ 0.95 on the stressed and on
  the clean validation split*. The stressed split is every validation image under
  ``STRESS_DRAWS`` seeded draws of the training augmentation (crop, rotation, gamma, blur,
  resolution loss, noise, markers): a new site differs from the training site in acquisition, so
  the point is chosen where both classes already spread as they would there, not on the
  near-separable clean split, whose 0.98-sensitivity point sits in the far tail of the positives'
  scores. The floor of 0.95 keeps the triage purpose (few missed pneumonias) first. (The first
  version of the rule put the floor on the stressed split only; on the shipped weights that gave
  a clean-validation sensitivity of 0.90 — augmentation *raises* pneumonia scores — so the floor
  now holds on both; see the model card.) What a new site should expect is reported from both
  splits, with CIs (the stressed split's resample whole images).
* **Image check**: fitted on the training side, thresholded on the validation side
  (``inference.image_check``).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.augment import training_transform
from inference.calibration import balanced_threshold, calibrated_probabilities, choose_threshold, fit_temperature
from inference.classifier import ForwardPass, forward_pass
from inference.image_check import (FEATURE_LAYERS, IMAGE_CHECK_FILE, REFUSED_VALIDATION_SHARE, fit_image_check,
                                   threshold_for)
from inference.metrics import metrics_with_ci
from inference.model_card import sha256_of

STRESS_DRAWS = 4
MIN_SENSITIVITY = 0.95
THRESHOLD_RULE = (
    f"highest Youden index (sensitivity + specificity − 1) on the stressed validation split (each validation "
    f"image under {STRESS_DRAWS} seeded draws of the training augmentation), among thresholds keeping "
    f"sensitivity ≥ {MIN_SENSITIVITY} on the stressed and on the clean validation split"
)
IMAGE_CHECK_RULE = (
    f"Mahalanobis distance of the spatial means of {', '.join(FEATURE_LAYERS)} to the nearest class of the "
    f"training side (shared Ledoit–Wolf covariance); threshold = the {1 - REFUSED_VALIDATION_SHARE:.0%} quantile "
    "of the validation side's distances"
)


NEW_SITE_NOTE = (
    "What a new site should expect: sensitivity near the clean split's (acquisition changes of the kind the stressed "
    "split simulates raise pneumonia scores, so misses do not grow with them), and a specificity below both splits' — "
    "both come from the training hospital, and other devices, positioning, processing and disease mix tend to move "
    "normal images' scores up. How far cannot be measured from the training data: treat the figures above as upper "
    "bounds for specificity, run in shadow mode and fit the site's own operating point on 100–300 local cases "
    "(`lungvision calibrate`) before relying on the flag."
)


def _figure(figures: dict, name: str) -> str:
    low, high = figures["ci95"][name]
    return f"{figures[name]:.3f} (95 % CI {low:.3f}–{high:.3f})"


@dataclass
class SplitImages:
    """The run's decoded squares (N×224×224 uint8) and labels, train and validation side."""

    train_squares: np.ndarray
    train_labels: np.ndarray
    val_squares: np.ndarray
    val_labels: np.ndarray


def forward_batches(network: torch.nn.Module, images: torch.Tensor, input_size: int,
                    batch_size: int = 64) -> ForwardPass:
    """``forward_pass`` over a large N×1×H×W stack, batch by batch (the network is put in eval mode)."""
    network.eval()
    parts = [forward_pass(network, images[start : start + batch_size], input_size)
             for start in range(0, len(images), batch_size)]
    return ForwardPass(torch.cat([p.logits for p in parts]), torch.cat([p.cams for p in parts]),
                       torch.cat([p.features for p in parts]))


def stressed_logits(network: torch.nn.Module, squares: np.ndarray, input_size: int, draws: int = STRESS_DRAWS,
                    seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """Logits of every square under ``draws`` seeded augmentations → (logits, image index per logit)."""
    transform = training_transform(input_size)
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        logits, index = [], []
        for draw in range(draws):
            images = torch.stack([transform(torch.from_numpy(square)[None]) for square in squares])
            logits.append(forward_batches(network, images, input_size).logits.numpy())
            index.append(np.arange(len(squares)))
    finally:
        torch.set_rng_state(generator_state)
    return np.concatenate(logits), np.concatenate(index)


def finalise(network: torch.nn.Module, images: SplitImages, input_size: int, run_dir: Path) -> dict:
    """Calibrate, choose the operating point and fit the image check; writes the image-check file
    into ``run_dir`` and returns what the model card records about all three."""
    train = forward_batches(network, torch.from_numpy(images.train_squares)[:, None], input_size)
    val = forward_batches(network, torch.from_numpy(images.val_squares)[:, None], input_size)
    val_logits = val.logits.numpy()
    temperature = fit_temperature(val_logits, images.val_labels)

    stressed, image_of = stressed_logits(network, images.val_squares, input_size)
    stressed_labels = images.val_labels[image_of]
    stressed_probabilities = calibrated_probabilities(stressed, temperature)
    val_probabilities = calibrated_probabilities(val_logits, temperature)
    clean_floor = choose_threshold(val_probabilities, images.val_labels, MIN_SENSITIVITY)
    threshold = balanced_threshold(stressed_probabilities, stressed_labels, MIN_SENSITIVITY, max_threshold=clean_floor)
    validation = metrics_with_ci(images.val_labels, val_probabilities, threshold)
    expected = metrics_with_ci(stressed_labels, stressed_probabilities, threshold, groups=image_of)

    check = fit_image_check(train.features.numpy(), images.train_labels)
    val_scores = check.scores(val.features).numpy()
    train_scores = check.scores(train.features).numpy()
    check_threshold = threshold_for(val_scores)
    check_path = check.save(run_dir / IMAGE_CHECK_FILE)
    np.savez(run_dir / "finalise-scores.npz", val_logits=val_logits, val_labels=images.val_labels,
             stressed_logits=stressed, stressed_image=image_of, val_image_check=val_scores,
             train_image_check=train_scores)
    return {
        "temperature": temperature,
        "threshold": threshold,
        "validation": validation,
        "operating_point": {
            "rule": THRESHOLD_RULE,
            "expectation": [
                f"Clean validation split (n = {validation['n']}): sensitivity {_figure(validation, 'recall')}, "
                f"specificity {_figure(validation, 'specificity')}.",
                f"Stressed validation split (n = {expected['n']}): sensitivity {_figure(expected, 'recall')}, "
                f"specificity {_figure(expected, 'specificity')}.",
                NEW_SITE_NOTE,
            ],
            "stressed_validation": {key: expected[key] for key in
                                    ("n", "recall", "specificity", "accuracy", "roc_auc", "ci95", "confusion")},
        },
        "image_check": {
            "file": IMAGE_CHECK_FILE,
            "sha256": sha256_of(check_path),
            "threshold": check_threshold,
            "rule": IMAGE_CHECK_RULE,
            "refused_share": {"validation": float((val_scores > check_threshold).mean()),
                              "train": float((train_scores > check_threshold).mean())},
            "score_quantiles_validation": {str(q): float(np.quantile(val_scores, q)) for q in (0.5, 0.9, 0.99)},
        },
    }
