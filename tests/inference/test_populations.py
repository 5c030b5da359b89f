"""Per-population operating points: the model card's populations (or the one population of an old card),
the population each image gets (header age, else the image check), per-population thresholds and
temperatures in predictions, site profiles and site calibration per population."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import expit, logit

from inference.classifier import Classifier
from inference.evaluate import folder_cases
from inference.gated import score_files
from inference.images import read_gray
from inference.intended_use import GateReason, Population
from inference.model_card import ModelCard
from inference.sample_dicom import wrap_image, write_dataset
from inference.site_calibration import MIN_CASES_PER_CLASS, calibrate_site, describe
from inference.site_profile import PointSource, PopulationFit, SiteProfile, SiteProfileError
from tests.kit.data import TWO_POPULATIONS
from tests.kit.records import site_profile


@pytest.fixture(scope="module")
def two(two_population_weights) -> Classifier:
    return Classifier(two_population_weights)


def images(count: int) -> np.ndarray:
    """``count`` different 224×224 uint8 squares (noise of varied brightness and texture)."""
    rng = np.random.default_rng(7)
    rows = np.linspace(0, 1, 224)[:, None] * np.linspace(0, 1, 224)[None]
    return np.stack(
        [
            np.clip(rng.normal(40 + 20 * i, 10 + 8 * i, (224, 224)) + 120 * rows * (i % 3), 0, 255).astype(np.uint8)
            for i in range(count)
        ]
    )


def test_a_card_without_populations_is_one_population_named_children(tmp_path) -> None:
    """A card from before populations (model 1.x): the shipped weights' card without ``populations``
    and without its two-population image check."""
    import shutil

    from inference.model_card import WEIGHTS_DIR

    card_json = json.loads((WEIGHTS_DIR / "model_card.json").read_text())
    card_json.update(populations=[], image_check={}, population={"min_age_years": 1.0, "max_age_years": 6.0})
    shutil.copy(WEIGHTS_DIR / card_json["weights_file"], tmp_path)
    (tmp_path / "model_card.json").write_text(json.dumps(card_json))
    classifier = Classifier(tmp_path)
    card = ModelCard.load(tmp_path)
    assert card.populations == []
    assert classifier.populations == (
        Population(card.population["min_age_years"], card.population["max_age_years"], "children"),
    )
    point = classifier.operating_point
    assert (point.threshold, point.temperature, point.name) == (card.threshold, card.temperature, "shipped / children")
    assert classifier.threshold == card.threshold
    prediction = classifier.predict_squares(images(1), None)[0]
    assert prediction.population == "children" and prediction.operating_point == "shipped / children"


def test_each_image_is_judged_at_its_populations_point(two) -> None:
    squares = images(6)
    given = ["children", "adults", None, None, None, None]
    predictions = two.predict_squares(squares, None, given)
    features = two.forward(squares).features
    nearest = two.image_check.distances(features).argmin(dim=1)  # the group each unknown-age image is nearest to
    expected = ["children", "adults"] + [("children", "adults")[int(group) % 2] for group in nearest[2:]]
    assert [prediction.population for prediction in predictions] == expected
    points = {population["name"]: population for population in TWO_POPULATIONS}
    for prediction in predictions:
        point = points[prediction.population]
        assert prediction.threshold == point["threshold"]
        assert prediction.probability == pytest.approx(expit(prediction.logit / point["temperature"]), abs=1e-6)
        assert prediction.positive == (prediction.probability >= point["threshold"])
        assert prediction.operating_point == f"shipped / {prediction.population}"
    # the same logit gives each population its own probability
    logits = np.array([predictions[0].logit] * 2)
    children, adults = two.calibrated(logits, ["children", "adults"])
    assert children == pytest.approx(expit(logits[0])) and adults == pytest.approx(expit(logits[0] / 2.0))
    assert two.operating_point.population == "children" and two.threshold == 0.2  # single-population callers


def test_the_image_check_chooses_for_images_without_an_age(two) -> None:
    features = two.forward(images(6)).features
    distances = two.image_check.distances(features)
    # pull every image onto one group's mean: its population follows
    for group, population in ((0, "children"), (1, "adults")):
        assert two.nearest_populations(two.image_check.means[group].repeat(3, 1)) == [population] * 3
    assert two.choose_populations(features, ["adults"] + [None] * 5)[0] == "adults"
    assert len(two.choose_populations(features, None)) == len(distances)


def _site_profile(classifier: Classifier, **changes) -> SiteProfile:
    return site_profile(classifier.card.weights_sha256, id="ward-7", **changes)


def test_an_old_single_point_profile_applies_to_every_population(two, two_population_weights, tmp_path) -> None:
    path = _site_profile(two).save(tmp_path / "old.json")
    site = Classifier(two_population_weights, path)
    assert {
        name: (point.threshold, point.temperature, point.name) for name, point in site.operating_points.items()
    } == {
        "children": (0.5, 1.5, "site profile ward-7 / children"),
        "adults": (0.5, 1.5, "site profile ward-7 / adults"),
    }


def test_a_profile_keeps_the_shipped_point_where_it_fitted_none(two, two_population_weights, tmp_path) -> None:
    fits = [
        PopulationFit("children", PointSource.SITE, 0.3, 1.2, {"positive": 40, "negative": 40}, True),
        PopulationFit("adults", PointSource.SHIPPED, 0.7, 2.0, {"positive": 3, "negative": 9}, note="too few"),
    ]
    path = _site_profile(two, threshold=0.3, temperature=1.2, populations=fits).save(tmp_path / "site.json")
    assert json.loads(path.read_text())["populations"][1]["source"] == "shipped"
    site = Classifier(two_population_weights, path)
    assert site.operating_points["children"].name == "site profile ward-7 / children"
    assert site.operating_points["children"].threshold == 0.3
    assert site.operating_points["adults"] == two.shipped_points["adults"]
    prediction = site.predict_squares(images(1), None, ["adults"])[0]
    assert prediction.threshold == 0.7 and prediction.operating_point == "shipped / adults"

    unknown = [PopulationFit("elderly", PointSource.SITE, 0.3, 1.2)]
    path = _site_profile(two, populations=unknown).save(tmp_path / "unknown.json")
    with pytest.raises(SiteProfileError, match="population 'elderly'"):
        Classifier(two_population_weights, path)


Cases = tuple[np.ndarray, np.ndarray, str]  # labels, logits and the population they are of


def _cases(rng, population: str, positives: int, negatives: int, shift: float) -> Cases:
    logits = np.concatenate([rng.normal(3 + shift, 1, positives), rng.normal(-2 + shift, 1, negatives)])
    return np.array([1] * positives + [0] * negatives), logits, population


def _calibrate(classifier: Classifier, profile_id: str, *groups: Cases) -> SiteProfile:
    """Site calibration of the ``groups``' cases for a sensitivity of 0.95 shown with 95 % confidence."""
    return calibrate_site(
        np.concatenate([labels for labels, _, _ in groups]),
        np.concatenate([logits for _, logits, _ in groups]),
        classifier,
        target_sensitivity=0.95,
        confidence=0.95,
        profile_id=profile_id,
        data="synthetic",
        populations=[population for labels, _, population in groups for _ in labels],
    )


def test_site_calibration_fits_one_point_per_population_with_enough_cases(two) -> None:
    rng = np.random.default_rng(2)
    child_cases = _cases(rng, "children", 200, 100, 0.0)
    adult_cases = _cases(rng, "adults", 200, 100, 3.0)  # adults score higher: a higher threshold fits them
    profile = _calibrate(two, "both", child_cases, adult_cases)
    children, adults = profile.populations
    assert (children.population, adults.population) == ("children", "adults")
    assert children.source is adults.source is PointSource.SITE
    assert children.n == {"positive": 200, "negative": 100} and adults.n == {"positive": 200, "negative": 100}

    def logit_threshold(fit: PopulationFit) -> float:  # thresholds compared before each population's temperature
        return fit.temperature * float(logit(fit.threshold))

    assert logit_threshold(adults) > logit_threshold(children) + 2
    alone = _calibrate(two, "c", child_cases)
    assert alone.populations[0].threshold == children.threshold  # fitted on the population's own cases only
    assert profile.n == {"positive": 400, "negative": 200, "refused": 0}
    assert (profile.threshold, profile.temperature) == (children.threshold, children.temperature)
    text = describe(profile)
    assert "children: threshold" in text and "adults: threshold" in text and "expected sensitivity ≥" in text


def test_a_population_with_too_few_cases_keeps_the_shipped_point(two, two_population_weights, tmp_path) -> None:
    rng = np.random.default_rng(3)
    child_cases = _cases(rng, "children", 200, 100, 0.0)
    adult_cases = _cases(rng, "adults", MIN_CASES_PER_CLASS - 1, 50, 3.0)
    profile = _calibrate(two, "kids", child_cases, adult_cases)
    children, adults = profile.populations
    assert children.source is PointSource.SITE and adults.source is PointSource.SHIPPED
    assert (adults.threshold, adults.temperature) == (0.7, 2.0)
    assert adults.n == {"positive": MIN_CASES_PER_CLASS - 1, "negative": 50}
    assert f"at least {MIN_CASES_PER_CLASS} of each" in adults.note
    assert "adults: the shipped point is kept" in describe(profile)
    site = Classifier(two_population_weights, profile.save(tmp_path / "kids.json"))
    assert site.operating_points["adults"].name == "shipped / adults"
    assert site.operating_points["children"].name == "site profile kids / children"

    # a set of one population fits it on whatever it holds (as a one-population model always did)
    only_adults = _calibrate(two, "ward", adult_cases)
    assert [fit.source.value for fit in only_adults.populations] == ["shipped", "site"]
    # both populations present and both short: nothing to fit
    labels, logits, _ = child_cases
    few_children = (np.concatenate([labels[:5], labels[-5:]]), np.concatenate([logits[:5], logits[-5:]]), "children")
    with pytest.raises(ValueError, match="no population has enough cases"):
        _calibrate(two, "none", few_children, adult_cases)
    with pytest.raises(ValueError, match="populations \\['elderly'\\]"):
        _calibrate(two, "x", (labels, logits, "elderly"))


def test_gated_scores_name_each_images_population(two, tmp_path) -> None:
    """The offline commands' scoring: an age in the header chooses, an image without one (PNG) or with an
    age in no population is left to the image check; the gap age is outside the intended use."""
    from PIL import Image

    data = tmp_path / "cases"
    pixels = images(3)
    for label, index, age in (("NORMAL", 0, "004Y"), ("PNEUMONIA", 1, "040Y"), ("PNEUMONIA", 2, "010Y")):
        dataset = wrap_image(pixels[index])
        dataset.PatientAge = age
        (data / label).mkdir(parents=True, exist_ok=True)
        write_dataset(dataset, data / label / f"{age}.dcm")
    Image.fromarray(pixels[2]).save(data / "NORMAL" / "no-header.png")
    files = [(str(path), int(path.parent.name == "PNEUMONIA")) for path in sorted(data.rglob("*.*"))]

    scores = score_files(files, two, two.intended_use(policy="flag"))  # every image scored, the gap age flagged
    by_name = {Path(score.path).name: score for score in scores.accepted}
    assert by_name["004Y.dcm"].population == "children" and by_name["040Y.dcm"].population == "adults"
    for name in ("010Y.dcm", "no-header.png"):
        unknown = two.predict(
            [read_gray(data / ("PNEUMONIA" if name == "010Y.dcm" else "NORMAL") / name)], with_heatmap=False
        )[0]
        assert by_name[name].population == unknown.population  # the image check's choice
    assert by_name["010Y.dcm"].verdict.reason is GateReason.AGE
    adult = by_name["040Y.dcm"]
    assert adult.probability == pytest.approx(expit(adult.logit / 2.0), abs=1e-6)
    assert scores.populations.tolist() == [score.population for score in scores.accepted]
    assert np.array_equal(scores.probabilities, [score.probability for score in scores.accepted])

    refused = score_files(files, two, two.intended_use())
    assert [Path(score.path).name for score in refused.refused if score.verdict.reason is GateReason.AGE] == [
        "010Y.dcm"
    ]
    labels, logits, facts = folder_cases(data, two, two.intended_use(policy="flag"))
    assert sorted(facts["populations"]) == sorted(scores.populations.tolist()) and len(labels) == 4
