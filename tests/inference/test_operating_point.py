"""Operating points: the shipped threshold rule, the site calibration's confidence bound, site profiles
(loaded by the classifier, refused for other weights)."""

import json

import numpy as np
import pytest

from inference.calibration import balanced_threshold, sensitivity_lower_bound, threshold_with_confidence
from inference.classifier import Classifier, load_classifier
from inference.model_card import WEIGHTS_DIR
from inference.site_calibration import calibrate_site, describe, positives_needed
from inference.site_profile import SiteProfileError
from tests.kit.records import site_profile


def test_clopper_pearson_lower_bounds() -> None:
    assert sensitivity_lower_bound(100, 100, 0.95) == pytest.approx(0.05 ** (1 / 100), abs=1e-6)  # 0.9705
    assert sensitivity_lower_bound(98, 100, 0.95) < 0.98 < 98 / 100 + 1e-9
    assert positives_needed(0.98, 0.95) == 149


def test_a_target_shown_with_confidence_needs_enough_positives() -> None:
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(0.3, 1.0, 400), rng.uniform(0.0, 0.6, 400)])
    labels = np.array([1] * 400 + [0] * 400)
    threshold, bound, met = threshold_with_confidence(scores, labels, 0.98, 0.95)
    assert met and bound >= 0.98
    caught = (scores[labels == 1] >= threshold).sum()
    assert sensitivity_lower_bound(int(caught), 400) >= 0.98
    assert caught < 400  # the bound allows a few misses at 400 positives, so the threshold is above the minimum
    # 100 positives can never show 0.98 at 95 %: keep them all and say so
    threshold, bound, met = threshold_with_confidence(scores[300:500], labels[300:500], 0.98, 0.95)
    assert not met and threshold == scores[300:400].min() and bound == pytest.approx(0.9705, abs=1e-3)


def test_balanced_threshold_respects_the_sensitivity_floor() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.45, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 1])
    # Youden best: miss the 0.45 positive, keep every normal: any threshold in (0.5, 0.55], the middle is taken
    assert balanced_threshold(scores, labels, 0.5) == pytest.approx(0.525)
    # a floor of 0.9 forces catching every positive: (0.3, 0.45]
    assert balanced_threshold(scores, labels, 0.9) == pytest.approx(0.375)
    with pytest.raises(ValueError):
        balanced_threshold(scores, np.ones(10), 0.9)


def test_the_classifier_uses_a_site_profile_and_names_it(tmp_path) -> None:
    shipped = load_classifier()
    path = site_profile(shipped.card.weights_sha256).save(tmp_path / "site.json")
    site = Classifier(WEIGHTS_DIR, path)
    assert site.threshold == 0.5 and site.operating_point.temperature == 1.5
    image = np.random.default_rng(1).integers(0, 255, (256, 256)).astype(np.float32)
    prediction = site.predict([image], with_heatmap=False, populations=["children"])[0]
    assert prediction.threshold == 0.5 and prediction.operating_point == "site profile test-site / children"
    assert prediction.probability == pytest.approx(1 / (1 + np.exp(-prediction.logit / 1.5)), abs=1e-5)
    assert (
        shipped.predict([image], with_heatmap=False, populations=["children"])[0].operating_point
        == "shipped / children"
    )


def test_a_profile_for_other_weights_is_refused(tmp_path) -> None:
    path = site_profile("0" * 64).save(tmp_path / "other.json")
    with pytest.raises(SiteProfileError, match="made for weights sha256 0000"):
        Classifier(WEIGHTS_DIR, path)
    (tmp_path / "junk.json").write_text(json.dumps({"threshold": 0.5}))
    with pytest.raises(SiteProfileError, match="not a Lung Vision site profile"):
        Classifier(WEIGHTS_DIR, tmp_path / "junk.json")
    with pytest.raises(SiteProfileError, match="does not exist"):
        Classifier(WEIGHTS_DIR, tmp_path / "missing.json")


def test_calibrate_site_on_separable_logits() -> None:
    rng = np.random.default_rng(2)
    logits = np.concatenate([rng.normal(3, 1, 250), rng.normal(-2, 1, 150)])
    labels = np.array([1] * 250 + [0] * 150)
    profile = calibrate_site(
        labels, logits, load_classifier(), target_sensitivity=0.95, confidence=0.95, profile_id="p1", data="synthetic"
    )
    caught = (1 / (1 + np.exp(-logits[:250] / profile.temperature)) >= profile.threshold).sum()
    assert profile.target_met and sensitivity_lower_bound(int(caught), 250) >= 0.95
    assert profile.expected["sensitivity"]["lower_bound"] >= 0.95
    assert 0.8 < profile.expected["specificity"]["sample"] <= 1.0
    assert profile.temperature_fit["used"] in ("fitted", "shipped")
    assert "expected sensitivity ≥" in describe(profile)
    few = calibrate_site(
        labels[150:],
        logits[150:],
        load_classifier(),
        target_sensitivity=0.98,
        confidence=0.95,
        profile_id="p2",
        data="synthetic",
    )  # 100 positives: not enough
    assert not few.target_met and "needs ≥ 149 positives" in describe(few)
