"""Operating points — the shipped threshold and temperature per population, or a site's own from
``lungvision calibrate``.

A site profile is a small JSON file: per population of the model, the threshold and temperature
fitted on the site's labelled cases of that population — or the shipped point kept, with the reason,
when the site had too few of them — the sensitivity target and the confidence with which it holds,
what the site should expect there (with confidence intervals), the sample it was fitted on, the
date, and the sha256 of the weights it belongs to. A profile made for other weights is refused: its
thresholds mean nothing for them. A profile made before populations (no ``populations``) holds one
point, which applies to every population.
"""

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path

SHIPPED = "shipped"


class SiteProfileError(ValueError):
    """The site profile cannot be used (unreadable, incomplete, or made for other weights)."""


@dataclass(frozen=True)
class OperatingPoint:
    """How calibrated probabilities are made (temperature) and called positive (threshold) for one
    population, and where the point comes from (``source``: "shipped" or "site profile <id>")."""

    threshold: float
    temperature: float
    source: str
    population: str

    @property
    def name(self) -> str:
        """Where the point comes from and its population, e.g. "shipped / adults" (ASCII: it goes into
        SR text and HL7 as it is)."""
        return f"{self.source} / {self.population}"


class PointSource(str, Enum):
    """Where a site profile's point for one population comes from."""

    SITE = "site"  # fitted on the site's cases of the population
    SHIPPED = "shipped"  # too few of the site's cases of the population: the model card's point is kept


@dataclass
class PopulationFit:
    """A site profile's point for one population and the evidence behind it."""

    population: str
    source: PointSource
    threshold: float
    temperature: float
    n: dict = field(default_factory=dict)  # {"positive": …, "negative": …} of the population's cases
    target_met: bool = False  # False: not fitted, or too few positives to show the target with the confidence
    expected: dict = field(default_factory=dict)  # sensitivity / specificity: value, ci95, lower bound
    temperature_fit: dict = field(default_factory=dict)  # how the temperature was chosen and what it bought
    note: str = ""  # why the shipped point was kept

    def __post_init__(self) -> None:
        self.source = PointSource(self.source)


@dataclass
class SiteProfile:
    """A site's operating points and the evidence behind them.

    ``populations`` holds one entry per population of the model. The top-level ``threshold``,
    ``temperature``, ``expected`` and ``temperature_fit`` are the first population's (what a profile
    made before populations held: its one point, for every population); ``n`` counts every case and
    ``target_met`` is true when every fitted population met the target.
    """

    id: str
    threshold: float
    temperature: float
    target_sensitivity: float
    confidence: float
    target_met: bool  # False: too few positives to show the target with that confidence
    weights_sha256: str
    model_version: str
    created: str  # ISO date and time
    data: str  # where the labelled cases came from
    n: dict = field(default_factory=dict)  # {"positive": …, "negative": …, "refused": …}
    expected: dict = field(default_factory=dict)  # sensitivity / specificity: value, ci95, lower bound
    temperature_fit: dict = field(default_factory=dict)  # how the temperature was chosen and what it bought
    populations: list[PopulationFit] = field(default_factory=list)

    @property
    def source(self) -> str:
        return f"site profile {self.id}"

    def operating_points(self, shipped: dict[str, OperatingPoint]) -> dict[str, OperatingPoint]:
        """The point per population name, given the ``shipped`` ones: the profile's where it fitted one,
        the shipped one where it kept it; an old single-point profile's point for every population."""
        if not self.populations:
            return {name: OperatingPoint(self.threshold, self.temperature, self.source, name) for name in shipped}
        points = dict(shipped)
        for fit in self.populations:
            if fit.population not in shipped:
                raise SiteProfileError(
                    f"site profile {self.id} has a point for population {fit.population!r}, "
                    f"which the model does not have ({', '.join(shipped)})"
                )
            if fit.source is PointSource.SITE:
                points[fit.population] = OperatingPoint(fit.threshold, fit.temperature, self.source, fit.population)
        return points

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path, weights_sha256: str) -> "SiteProfile":
        """Read a profile and check that it belongs to the weights with ``weights_sha256``."""
        try:
            fields = json.loads(Path(path).read_text())
            if not isinstance(fields, dict):
                raise TypeError("not a JSON object")
            fields["populations"] = [PopulationFit(**fit) for fit in fields.get("populations", [])]
            profile = cls(**fields)
        except FileNotFoundError:
            raise SiteProfileError(f"site profile {path} does not exist") from None
        except (json.JSONDecodeError, TypeError, ValueError) as error:
            raise SiteProfileError(f"site profile {path} is not a Lung Vision site profile: {error}") from None
        if profile.weights_sha256 != weights_sha256:
            raise SiteProfileError(
                f"site profile {path} ({profile.id}) was made for weights sha256 {profile.weights_sha256[:16]}…, "
                f"but the loaded weights are {weights_sha256[:16]}…; run 'lungvision calibrate' again for them"
            )
        points = [(profile.threshold, profile.temperature)] + [
            (fit.threshold, fit.temperature) for fit in profile.populations
        ]
        if not all(0.0 < threshold < 1.0 and temperature > 0 for threshold, temperature in points):
            raise SiteProfileError(f"site profile {path}: thresholds must lie in (0, 1) and temperatures be > 0")
        return profile
