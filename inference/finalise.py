"""Finalising a run — trained weights and the run's split become each population's calibration and
operating point, the intended-use gate's image check and the heatmap's localisation figures (all from
the training data alone).

* **Per population** (``POPULATIONS``: children, adults), on that population's validation images
  (the adults': the radiologist-labelled ones only):
* **Temperature**: fitted on the clean validation split (log-loss).
* **Threshold** — the rule: *the highest Youden index (sensitivity + specificity − 1) on the
  stressed validation split, among thresholds keeping sensitivity ≥ the population's floor (children
  0.95, adults 0.92) on the stressed and on the clean validation split*. The stressed split is every
  validation image under ``STRESS_DRAWS`` seeded draws of the training augmentation (crop, rotation, gamma, blur,
  resolution loss, noise, markers): a new site differs from the training site in acquisition, so
  the point is chosen where both classes already spread as they would there, not on the
  near-separable clean split, whose 0.98-sensitivity point sits in the far tail of the positives'
  scores. The floor of 0.95 keeps the triage purpose (few missed pneumonias) first. (The first
  version of the rule put the floor on the stressed split only; on the shipped weights that gave
  a clean-validation sensitivity of 0.90 — augmentation *raises* pneumonia scores — so the floor
  now holds on both; see the model card.) What a new site should expect is reported from both
  splits, with CIs (the stressed split's resample whole images).
* **Image check**: fitted on the training side, one group per (population, class), thresholded on
  the validation side (``inference.image_check``).
* **Heatmap**: both one-pass variants measured against the RSNA boxes of the validation split;
  ``HEATMAP_RULE`` chooses the shipped one.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from inference.augment import training_transform
from inference.calibration import balanced_threshold, calibrated_probabilities, choose_threshold, fit_temperature
from inference.classifier import ForwardPass, forward_pass
from inference.gradcam import Heatmap
from inference.image_check import (
    FEATURE_LAYERS,
    IMAGE_CHECK_FILE,
    REFUSED_VALIDATION_SHARE,
    fit_image_check,
    threshold_for,
)
from inference.localisation import localisation_figures
from inference.metrics import bootstrap_ci, metrics_with_ci, roc_auc, specificity_at_sensitivity
from inference.model_card import sha256_of
from inference.split import SplitRow

STRESS_DRAWS = 4


@dataclass(frozen=True)
class PopulationRule:
    """A population of the training data: its ages, the sensitivity floor of its operating point and
    which validation images the point is fitted on."""

    name: str
    min_age_years: float
    max_age_years: float
    min_sensitivity: float
    fitted_on: str  # "all" or "radiologist" (only images whose labels a radiologist gave)
    description: str

    def threshold_rule(self) -> str:
        subset = "" if self.fitted_on == "all" else " radiologist-labelled"
        return (
            f"highest Youden index (sensitivity + specificity − 1) on the stressed{subset} {self.name} validation "
            f"split (each validation image under {STRESS_DRAWS} seeded draws of the training augmentation), among "
            f"thresholds keeping sensitivity ≥ {self.min_sensitivity} on the stressed and on the clean{subset} "
            f"{self.name} validation split; temperature fitted on the clean{subset} {self.name} validation split"
        )


# The rules were fixed before any adult figure was seen. Adults: the withheld adult test data is
# radiologist-labelled (RSNA) while about half of NIH's text-mined pneumonia labels are wrong, so
# the adults' point is fitted on the radiologist-labelled validation images only; its floor (0.92)
# sits above the goal (0.90) because that subset holds only about 45 positives.
POPULATIONS = (
    PopulationRule(
        "children",
        1.0,
        6.0,
        0.95,
        "all",
        "children aged one to five years (Kermany et al.: Guangzhou Women and Children's Medical Center)",
    ),
    PopulationRule(
        "adults",
        18.0,
        88.0,
        0.92,
        "radiologist",
        "adults aged 18 to 87 years (NIH Clinical Center ChestX-ray14 images; labels text-mined by NIH or "
        "given by RSNA/STR radiologists)",
    ),
)
THRESHOLD_RULE = "per population: " + "; ".join(f"{rule.name}: {rule.threshold_rule()}" for rule in POPULATIONS)
IMAGE_CHECK_RULE = (
    f"Mahalanobis distance of the spatial means of {', '.join(FEATURE_LAYERS)} to the nearest (population, class) "
    "group of the training side (shared Ledoit–Wolf covariance); threshold = the "
    f"{1 - REFUSED_VALIDATION_SHARE:.0%} quantile of the validation side's distances; the nearest group's population "
    "chooses the operating point when the header gives no age"
)


NEW_SITE_NOTE = (
    "What a new site should expect: sensitivity near the clean split's (acquisition changes of the kind the stressed "
    "split simulates raise pneumonia scores, so misses do not grow with them), and a specificity below both splits' — "
    "both come from the training hospitals, and other devices, positioning, processing and disease mix tend to move "
    "normal images' scores up. How far cannot be measured from the training data: treat the figures above as upper "
    "bounds for specificity, run in shadow mode and fit the site's own operating points on 100–300 local cases "
    "per population (`lungvision calibrate`) before relying on the flag."
)


def _figure(figures: dict, name: str) -> str:
    low, high = figures["ci95"][name]
    return f"{figures[name]:.3f} (95 % CI {low:.3f}–{high:.3f})"


@dataclass
class SplitImages:
    """The run's decoded squares (N×224×224 uint8), labels and rows (population, source, boxes),
    train and validation side."""

    train_squares: np.ndarray
    train_labels: np.ndarray
    val_squares: np.ndarray
    val_labels: np.ndarray
    train_rows: list[SplitRow] = field(default_factory=list)
    val_rows: list[SplitRow] = field(default_factory=list)

    @classmethod
    def of(
        cls, train_rows: list[SplitRow], val_rows: list[SplitRow], train_squares: np.ndarray, val_squares: np.ndarray
    ) -> "SplitImages":
        return cls(
            train_squares,
            np.array([row.label for row in train_rows]),
            val_squares,
            np.array([row.label for row in val_rows]),
            train_rows,
            val_rows,
        )

    def val_column(self, name: str) -> np.ndarray:
        """One attribute (population, source, label_source…) of every validation row."""
        return np.array([getattr(row, name) for row in self.val_rows])


def forward_batches(
    network: torch.nn.Module, images: torch.Tensor, input_size: int, batch_size: int = 64
) -> ForwardPass:
    """``forward_pass`` over a large N×1×H×W stack, batch by batch (the network is put in eval mode)."""
    network.eval()
    parts = [
        forward_pass(network, images[start : start + batch_size], input_size)
        for start in range(0, len(images), batch_size)
    ]
    return ForwardPass(
        torch.cat([p.logits for p in parts]), torch.cat([p.cams for p in parts]), torch.cat([p.features for p in parts])
    )


def stressed_logits(
    network: torch.nn.Module, squares: np.ndarray, input_size: int, draws: int = STRESS_DRAWS, seed: int = 1234
) -> tuple[np.ndarray, np.ndarray]:
    """Logits of every square under ``draws`` seeded augmentations → (logits, image index per logit)."""
    transform = training_transform(input_size)
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)
    try:
        logits, index = [], []
        for _draw in range(draws):
            images = torch.stack([transform(torch.from_numpy(square)[None]) for square in squares])
            logits.append(forward_batches(network, images, input_size).logits.numpy())
            index.append(np.arange(len(squares)))
    finally:
        torch.set_rng_state(generator_state)
    return np.concatenate(logits), np.concatenate(index)


def _specificity_at_90(labels: np.ndarray, scores: np.ndarray) -> float:
    return specificity_at_sensitivity(labels, scores, 0.90)


def population_validation(network: torch.nn.Module, images: SplitImages, input_size: int, ci_rounds: int = 0) -> dict:
    """Validation figures of one network (per epoch, and per ablation branch): AUC per population and
    per adult label source, the specificity at sensitivity 0.90 on the radiologist-labelled adults
    (the adult goal's point), and where the heatmap points on the boxed adult positives (peak in a
    box, energy in the boxes, per heatmap kind). With ``ci_rounds`` > 0, ``ci95`` holds 95 %
    bootstrap CIs of each figure."""
    val = forward_batches(network, torch.from_numpy(images.val_squares)[:, None], input_size)
    logits = val.logits.numpy()
    labels = images.val_labels
    populations, sources = images.val_column("population"), images.val_column("source")
    figures: dict = {}
    intervals: dict = {}

    def add(name: str, statistic, members: np.ndarray) -> None:
        figures[name] = statistic(labels[members], logits[members])
        if ci_rounds:
            intervals[name] = bootstrap_ci(statistic, labels[members], logits[members], ci_rounds)

    for population in dict.fromkeys(populations):
        add(f"auc_{population}", roc_auc, populations == population)
    if "auc_adults" in figures:
        for source in ("rsna", "nih"):
            add(f"auc_adults_{source}", roc_auc, sources == source)
        add("specificity_at_sensitivity_0.90_rsna", _specificity_at_90, sources == "rsna")
        boxes = [row.boxes for row in images.val_rows]
        for kind in Heatmap:
            located = localisation_figures(val.cams, boxes, kind)
            for key in ("pointing", "energy"):
                if key in located:
                    figures[f"{key}_{kind.value}"] = located[key]
                    intervals[f"{key}_{kind.value}"] = located["ci95"][key]
    return {**figures, "ci95": intervals} if ci_rounds else figures


HEATMAP_RULE = (
    "the heatmap variant with the higher pointing game on the boxed adult validation positives; Grad-CAM on a tie"
)


def choose_heatmap(cams: torch.Tensor, boxes: list) -> dict:
    """Localisation figures of both heatmap variants on the boxed validation images, and the one the
    rule chooses (``HEATMAP_RULE``); no boxes: Grad-CAM, unmeasured."""
    variants = {kind.value: localisation_figures(cams, boxes, kind) for kind in Heatmap}
    if not variants[Heatmap.GRADCAM.value].get("n"):
        return {"heatmap": Heatmap.GRADCAM.value, "n": 0}
    chosen = max(Heatmap, key=lambda kind: (variants[kind.value]["pointing"], kind is Heatmap.GRADCAM))
    return {
        "data": "boxed adult validation positives (RSNA radiologists' opacity boxes)",
        "heatmap": chosen.value,
        "rule": HEATMAP_RULE,
        **variants[chosen.value],
        "variants": variants,
    }


def _operating_point(
    rule: PopulationRule, images: SplitImages, val_logits: np.ndarray, stressed: np.ndarray, image_of: np.ndarray
) -> dict:
    """Temperature, threshold and validation figures of one population."""
    populations, label_sources = images.val_column("population"), images.val_column("label_source")
    members = populations == rule.name
    fitted = members & ((label_sources == "radiologist") if rule.fitted_on == "radiologist" else True)
    labels = images.val_labels
    temperature = fit_temperature(val_logits[fitted], labels[fitted])
    probabilities = calibrated_probabilities(val_logits, temperature)
    stressed_probabilities = calibrated_probabilities(stressed, temperature)
    stressed_fitted = fitted[image_of]
    clean_floor = choose_threshold(probabilities[fitted], labels[fitted], rule.min_sensitivity)
    threshold = balanced_threshold(
        stressed_probabilities[stressed_fitted],
        labels[image_of][stressed_fitted],
        rule.min_sensitivity,
        max_threshold=clean_floor,
    )
    validation = metrics_with_ci(labels[members], probabilities[members], threshold)
    expected = metrics_with_ci(
        labels[image_of][stressed_fitted],
        stressed_probabilities[stressed_fitted],
        threshold,
        groups=image_of[stressed_fitted],
    )
    expectation = [
        f"Clean {rule.name} validation split (n = {validation['n']}): sensitivity "
        f"{_figure(validation, 'recall')}, specificity {_figure(validation, 'specificity')}, "
        f"AUC {_figure(validation, 'roc_auc')}."
    ]
    by_source = {}
    if rule.fitted_on == "radiologist":
        sources = images.val_column("source")
        for source in sorted(set(sources[members])):
            subset = members & (sources == source)
            by_source[source] = metrics_with_ci(labels[subset], probabilities[subset], threshold)
            expectation.append(
                f"Of which {source} (n = {by_source[source]['n']}): sensitivity "
                f"{_figure(by_source[source], 'recall')}, specificity "
                f"{_figure(by_source[source], 'specificity')}, AUC "
                f"{_figure(by_source[source], 'roc_auc')}."
            )
    expectation += [
        f"Stressed{'' if rule.fitted_on == 'all' else ' radiologist-labelled'} {rule.name} validation "
        f"split (n = {expected['n']}): sensitivity {_figure(expected, 'recall')}, specificity "
        f"{_figure(expected, 'specificity')}.",
        NEW_SITE_NOTE,
    ]
    return {
        "name": rule.name,
        "min_age_years": rule.min_age_years,
        "max_age_years": rule.max_age_years,
        "description": rule.description,
        "temperature": temperature,
        "threshold": threshold,
        "threshold_rule": rule.threshold_rule(),
        "validation": validation,
        "validation_by_source": by_source,
        "operating_point": {
            "rule": rule.threshold_rule(),
            "expectation": expectation,
            "stressed_validation": {
                key: expected[key] for key in ("n", "recall", "specificity", "accuracy", "roc_auc", "ci95", "confusion")
            },
        },
    }


def finalise(network: torch.nn.Module, images: SplitImages, input_size: int, run_dir: Path) -> dict:
    """Calibrate, choose each population's operating point, fit the image check and measure the
    heatmap against the validation boxes; writes the image-check file into ``run_dir`` and returns
    what the model card records about them."""
    train = forward_batches(network, torch.from_numpy(images.train_squares)[:, None], input_size)
    val = forward_batches(network, torch.from_numpy(images.val_squares)[:, None], input_size)
    val_logits = val.logits.numpy()
    stressed, image_of = stressed_logits(network, images.val_squares, input_size)
    val_populations = images.val_column("population")
    rules = [rule for rule in POPULATIONS if (val_populations == rule.name).any()]
    points = [_operating_point(rule, images, val_logits, stressed, image_of) for rule in rules]

    names = [rule.name for rule in rules]
    train_population = np.array([names.index(row.population) for row in images.train_rows])
    val_population = np.array([names.index(population) for population in val_populations])
    check = fit_image_check(train.features.numpy(), images.train_labels, train_population)
    val_scores = check.scores(val.features).numpy()
    train_scores = check.scores(train.features).numpy()
    check_threshold = threshold_for(val_scores)
    check_path = check.save(run_dir / IMAGE_CHECK_FILE)
    nearest = check.nearest_population(val.features).numpy()
    located = choose_heatmap(val.cams, [row.boxes for row in images.val_rows])
    np.savez(
        run_dir / "finalise-scores.npz",
        val_logits=val_logits,
        val_labels=images.val_labels,
        val_population=val_population,
        stressed_logits=stressed,
        stressed_image=image_of,
        val_image_check=val_scores,
        train_image_check=train_scores,
        val_cams=val.cams.numpy(),
    )
    first = points[0]
    return {
        "temperature": first["temperature"],
        "threshold": first["threshold"],
        "validation": first["validation"],
        "operating_point": first["operating_point"],
        "populations": points,
        "localisation": located,
        "image_check": {
            "file": IMAGE_CHECK_FILE,
            "sha256": sha256_of(check_path),
            "threshold": check_threshold,
            "rule": IMAGE_CHECK_RULE,
            "populations": names,
            "population_agreement_validation": {
                name: float((nearest[val_population == index] == index).mean()) for index, name in enumerate(names)
            },
            "refused_share": {
                "validation": float((val_scores > check_threshold).mean()),
                "train": float((train_scores > check_threshold).mean()),
            },
            "score_quantiles_validation": {str(q): float(np.quantile(val_scores, q)) for q in (0.5, 0.9, 0.99)},
        },
    }
