"""Classifier — gray images become calibrated pneumonia probabilities with Grad-CAM heatmaps.

The shipped weights are loaded once per process (``load_classifier``) and verified against the
sha256 in the model card before use, with the image check shipped beside them (an
out-of-distribution score from the same forward pass) and one operating point per population (e.g.
children and adults): the model card's, or a site profile's from ``lungvision calibrate``.

Which population's point an image gets: the one its header's patient age falls in, given by the
caller (``IntendedUse.read_header``); for an image without a known age, the population whose
training images are nearest in feature space (the image check's ``nearest_population``).

The forward pass runs at ``model.precision`` (``inference/precision.py``): bfloat16 where the CPU
computes it natively, else float32; its outputs are float32 either way.
"""

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.torch import load_file

from inference.calibration import calibrated_probabilities
from inference.gradcam import Heatmap, class_map, heatmap_in_image
from inference.image_check import FEATURE_LAYERS, ImageCheck
from inference.intended_use import DEFAULT_POPULATION, IntendedUse, Policy, Population
from inference.model_card import WEIGHTS_DIR, ModelCard, sha256_of
from inference.network import build_resnet18
from inference.precision import Precision, autocast, network_for, prepared_input, resolve
from inference.preprocess import normalise, to_square_uint8
from inference.site_profile import SHIPPED, OperatingPoint, SiteProfile


class WeightsMismatch(RuntimeError):
    """The weights file (or the image check beside it) does not match the sha256 in its model card."""


def _verified(path: Path, expected_sha256: str) -> Path:
    actual = sha256_of(path)
    if actual != expected_sha256:
        raise WeightsMismatch(f"{path} has sha256 {actual}, the model card expects {expected_sha256}")
    return path


def shipped_network(weights_dir: Path, card: ModelCard) -> torch.nn.Module:
    """The float32 network as shipped, in evaluation mode: built, with the weights of ``card``'s file in
    ``weights_dir`` (raises WeightsMismatch unless their sha256 is the card's)."""
    network = build_resnet18()
    network.load_state_dict(load_file(_verified(weights_dir / card.weights_file, card.weights_sha256)))
    return network.eval()


@dataclass(frozen=True)
class ForwardPass:
    """What one forward pass gives for N squares: raw logits, Grad-CAM maps, pooled features."""

    logits: torch.Tensor  # N
    cams: torch.Tensor  # N×h×w class maps (each cell's evidence, before Grad-CAM's ReLU)
    features: torch.Tensor  # N×D spatial means of FEATURE_LAYERS (the image check's input)


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image."""

    probability: float  # calibrated probability of pneumonia
    positive: bool  # probability ≥ threshold
    label: str  # "PNEUMONIA" or "NORMAL"
    threshold: float
    model_version: str
    heatmap: np.ndarray | None  # float32 0..1 over the whole image, of the shape asked for; None if not asked for
    logit: float = 0.0  # raw network output, before temperature (site calibration refits from it)
    image_check_score: float | None = None  # distance from the training images; None: no image check shipped
    operating_point: str = f"{SHIPPED} / {DEFAULT_POPULATION}"  # ``OperatingPoint.name`` of the point used
    population: str = DEFAULT_POPULATION  # whose operating point: by the header's age, else the image check


def forward_pass(
    network: torch.nn.Module, batch: torch.Tensor, input_size: int, precision: Precision = Precision.FP32
) -> ForwardPass:
    """One forward pass of N×1×H×W images (uint8 squares, or float 0..1) → float32 logits, maps, features.

    ``precision``: BF16 needs the network ``network_for`` made for it; FP32 (the default) runs it as is."""
    maps: dict[str, torch.Tensor] = {}
    head = cast(torch.nn.Linear, network.fc)  # the ResNet's one-logit head
    hooks = [
        getattr(network, name).register_forward_hook(
            lambda _module, _inputs, output, name=name: maps.__setitem__(name, output.float())
        )
        for name in FEATURE_LAYERS
    ]
    try:
        with torch.inference_mode():
            with autocast(precision):
                logits = network(prepared_input(normalise(batch, input_size), precision)).flatten()
            cams = class_map(maps["layer4"], head.weight[0])
            features = torch.cat([maps[name].mean(dim=(2, 3)) for name in FEATURE_LAYERS], dim=1)
            if precision is not Precision.FP32:  # the head again, in float32: bf16 would round the logit itself
                logits = head(maps["layer4"].mean(dim=(2, 3))).flatten()
    finally:
        for hook in hooks:
            hook.remove()
    return ForwardPass(logits, cams, features)


def card_populations(card: ModelCard) -> list[dict]:
    """The card's populations (name, age range, temperature, threshold…); a card made before
    populations has one, "children", from its top-level population, temperature and threshold."""
    if card.populations:
        return card.populations
    return [
        {**card.population, "name": DEFAULT_POPULATION, "temperature": card.temperature, "threshold": card.threshold}
    ]


class Classifier:
    """ResNet-18 pneumonia classifier with its model card (populations with their thresholds and
    temperatures, input size), image check and operating points, run at ``precision`` (AUTO: bf16
    where the CPU computes it natively). ``network`` is the float32 network: at FP32 the one that runs, its
    batch norms folded into its convolutions (``network_for`` changes it in place); at BF16 as shipped, and the
    forward pass runs a bfloat16 copy of it."""

    def __init__(
        self,
        weights_dir: Path = WEIGHTS_DIR,
        site_profile: Path | None = None,
        precision: Precision | str = Precision.AUTO,
    ) -> None:
        self.card = ModelCard.load(weights_dir)
        self.network = shipped_network(weights_dir, self.card)
        self.precision = resolve(precision)  # BF16 or FP32
        self._running = network_for(self.network, self.precision)
        self.heatmap = Heatmap(self.card.localisation.get("heatmap", Heatmap.GRADCAM.value))
        self.image_check: ImageCheck | None = None
        if self.card.image_check:
            self.image_check = ImageCheck.load(
                _verified(weights_dir / self.card.image_check["file"], self.card.image_check["sha256"])
            )
        entries = card_populations(self.card)
        self.populations = tuple(
            Population(float(entry["min_age_years"]), float(entry["max_age_years"]), entry["name"]) for entry in entries
        )
        self.shipped_points = {
            entry["name"]: OperatingPoint(entry["threshold"], entry["temperature"], SHIPPED, entry["name"])
            for entry in entries
        }
        # the image check's population indices → names (its own list when it has one, else the card's order)
        self.image_check_populations: list[str] = self.card.image_check.get("populations") or [
            population.name for population in self.populations
        ]
        unknown = set(self.image_check_populations) - set(self.shipped_points)
        if unknown:
            raise ValueError(
                f"model card of {weights_dir}: the image check names populations {sorted(unknown)} "
                f"the card does not have ({', '.join(self.shipped_points)})"
            )
        self.operating_points: dict[str, OperatingPoint] = dict(self.shipped_points)
        self.site_profile: SiteProfile | None = None
        if site_profile is not None:
            self.site_profile = SiteProfile.load(site_profile, self.card.weights_sha256)
            self.operating_points = self.site_profile.operating_points(self.shipped_points)

    @property
    def population_names(self) -> list[str]:
        return [population.name for population in self.populations]

    @property
    def operating_point(self) -> OperatingPoint:
        """The first population's operating point (the children's), for callers that know one population."""
        return self.operating_points[self.populations[0].name]

    @property
    def threshold(self) -> float:
        """The first population's threshold (see ``operating_point``)."""
        return self.operating_point.threshold

    def intended_use(
        self,
        policy: Policy | str = Policy.REFUSE,
        min_age_years: float | None = None,
        max_age_years: float | None = None,
    ) -> IntendedUse:
        """The gate for this model: its card's populations, within the site's outer age bounds if set."""
        return IntendedUse(
            self.populations,
            self.card.image_check.get("threshold") if self.card.image_check else None,
            Policy(policy),
            min_age_years,
            max_age_years,
        )

    def nearest_populations(self, features: torch.Tensor) -> list[str]:
        """Per image, the population whose training images are nearest in feature space (the first
        population for every image when the weights ship no image check)."""
        if self.image_check is None:
            return [self.populations[0].name] * len(features)
        indices = self.image_check.nearest_population(features).tolist()
        return [self.image_check_populations[index] for index in indices]

    def choose_populations(self, features: torch.Tensor, known: Sequence[str | None] | None) -> list[str]:
        """Per image, the population given in ``known`` (from the header's age), else the image check's."""
        nearest = self.nearest_populations(features)
        return nearest if known is None else [given or guess for given, guess in zip(known, nearest, strict=True)]

    @property
    def version(self) -> str:
        """Model name and version, e.g. ``lungvision-resnet18 1.0.0``."""
        return f"{self.card.name} {self.card.version}"

    def forward(self, squares: np.ndarray) -> ForwardPass:
        """N×224×224 uint8 squares → raw logits, Grad-CAM maps and pooled features, in one pass."""
        return forward_pass(
            self._running,
            torch.from_numpy(np.ascontiguousarray(squares))[:, None],
            self.card.input_size,
            self.precision,
        )

    def calibrated(self, logits: torch.Tensor | np.ndarray, populations: Sequence[str] | None = None) -> np.ndarray:
        """Raw logits → calibrated probabilities, each at the temperature of its image's population
        (``populations``: one name per logit; None: the first population's for all)."""
        logits = torch.as_tensor(logits).numpy()
        if populations is None:
            return calibrated_probabilities(logits, self.operating_point.temperature)
        temperatures = np.array([self.operating_points[name].temperature for name in populations], dtype=np.float64)
        return calibrated_probabilities(logits, temperatures)

    def image_check_scores(self, features: torch.Tensor) -> np.ndarray | None:
        """The image check's score per image (None when the weights ship no image check)."""
        return None if self.image_check is None else self.image_check.scores(features).numpy()

    def probabilities(self, squares: np.ndarray) -> np.ndarray:
        """Calibrated pneumonia probabilities for N×224×224 uint8 squares (populations by the image check)."""
        output = self.forward(squares)
        return self.calibrated(output.logits, self.nearest_populations(output.features))

    def predict(
        self, images: Sequence[np.ndarray], with_heatmap: bool = True, populations: Sequence[str | None] | None = None
    ) -> list[Prediction]:
        """One forward pass for a batch of 2-D gray images (any size, bright = dense); ``populations`` as
        in ``predict_squares``."""
        if not images:
            return []
        squares = np.stack([to_square_uint8(image) for image in images])
        return self.predict_squares(squares, [image.shape for image in images] if with_heatmap else None, populations)

    def predict_squares(
        self,
        squares: np.ndarray,
        heatmap_shapes: Sequence[tuple[int, int]] | None,
        populations: Sequence[str | None] | None = None,
    ) -> list[Prediction]:
        """Predictions for preprocessed squares; heatmaps of ``heatmap_shapes`` (None: no heatmaps). A
        heatmap covers its whole image at any size: the image's own, or the picture it is drawn on
        (``overlay.display_size``: cheaper than a full-size map shrunk again).
        Each image is judged at the operating point of its population: the name given in
        ``populations`` (from the header's age), else — None, or no list — the image check's nearest."""
        output = self.forward(squares)
        chosen = self.choose_populations(output.features, populations)
        probabilities = self.calibrated(output.logits, chosen).tolist()
        scores = self.image_check_scores(output.features)
        predictions = []
        for index, (probability, cam, population) in enumerate(zip(probabilities, output.cams, chosen)):
            point = self.operating_points[population]
            positive = probability >= point.threshold
            heatmap = (
                None
                if heatmap_shapes is None
                else heatmap_in_image(cam, probability, heatmap_shapes[index], self.heatmap).numpy()
            )
            predictions.append(
                Prediction(
                    probability,
                    positive,
                    "PNEUMONIA" if positive else "NORMAL",
                    point.threshold,
                    self.version,
                    heatmap,
                    float(output.logits[index]),
                    None if scores is None else float(scores[index]),
                    point.name,
                    population,
                )
            )
        return predictions


@functools.lru_cache(maxsize=4)
def load_classifier(
    weights_dir: Path | None = None, site_profile: Path | None = None, precision: Precision | str = Precision.AUTO
) -> Classifier:
    """The process-wide classifier for ``weights_dir`` (default: the shipped weights) at the
    operating point of ``site_profile`` (default: the model card's) and ``precision``, loaded once."""
    return Classifier(weights_dir or WEIGHTS_DIR, site_profile, precision)


def load_model(model_settings) -> tuple[Classifier, IntendedUse]:
    """The classifier and its intended-use gate as the ``model`` settings section configures them
    (weights_dir, site_profile, precision, intended_use_policy, and min_age_years / max_age_years:
    outer age bounds that narrow the model's populations)."""
    classifier = load_classifier(model_settings.weights_dir, model_settings.site_profile, model_settings.precision)
    gate = classifier.intended_use(
        model_settings.intended_use_policy, model_settings.min_age_years, model_settings.max_age_years
    )
    return classifier, gate
