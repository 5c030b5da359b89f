"""Operating point — the shipped threshold and temperature, or a site's own from ``lungvision calibrate``.

A site profile is a small JSON file: the threshold and temperature fitted on the site's labelled
cases, the sensitivity target and the confidence with which it holds, what the site should expect
there (with confidence intervals), the sample it was fitted on, the date, and the sha256 of the
weights it belongs to. A profile made for other weights is refused: its threshold means nothing
for them.
"""

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

SHIPPED = "shipped"


class SiteProfileError(ValueError):
    """The site profile cannot be used (unreadable, incomplete, or made for other weights)."""


@dataclass(frozen=True)
class OperatingPoint:
    """How calibrated probabilities are made (temperature) and called positive (threshold)."""

    threshold: float
    temperature: float
    name: str = SHIPPED  # "shipped", or "site profile <id>"


@dataclass
class SiteProfile:
    """A site's operating point and the evidence behind it."""

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

    @property
    def operating_point(self) -> OperatingPoint:
        return OperatingPoint(self.threshold, self.temperature, f"site profile {self.id}")

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path, weights_sha256: str) -> "SiteProfile":
        """Read a profile and check that it belongs to the weights with ``weights_sha256``."""
        try:
            profile = cls(**json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise SiteProfileError(f"site profile {path} does not exist") from None
        except (json.JSONDecodeError, TypeError) as error:
            raise SiteProfileError(f"site profile {path} is not a Lung Vision site profile: {error}") from None
        if profile.weights_sha256 != weights_sha256:
            raise SiteProfileError(
                f"site profile {path} ({profile.id}) was made for weights sha256 {profile.weights_sha256[:16]}…, "
                f"but the loaded weights are {weights_sha256[:16]}…; run 'lungvision calibrate' again for them")
        if not 0.0 < profile.threshold < 1.0 or profile.temperature <= 0:
            raise SiteProfileError(f"site profile {path}: threshold must lie in (0, 1) and temperature be > 0")
        return profile
