"""Gated scoring — image files become model scores behind the intended-use gate, for the offline
commands (``evaluate``, ``calibrate``), the same way the worker decides: header rules (DICOM only:
JPEG and PNG carry no header), then the image check from the same forward pass; each image's
population (whose operating point it gets) from the header's age, else from the image check."""

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from inference.classifier import Classifier
from inference.images import read_image
from inference.intended_use import GateVerdict, HeaderReading, IntendedUse
from inference.preprocess import to_square_uint8


@dataclass(frozen=True)
class GatedScore:
    """One readable image: its scores, and the gate's verdict (None = inside the intended use)."""

    path: str
    label: int | None
    logit: float
    probability: float  # at the temperature of its population
    image_check_score: float | None
    verdict: GateVerdict | None
    population: str  # whose operating point: by the header's age, else the image check
    image_shape: tuple[int, int] = (0, 0)  # rows, columns of the image as read
    heatmap: np.ndarray | None = None  # the shown heatmap on the model's square (``score_files(with_heatmaps=True)``)


@dataclass
class GatedScores:
    """Every image of a run: accepted (scored), refused (outside the intended use) and unreadable."""

    accepted: list[GatedScore] = field(default_factory=list)
    refused: list[GatedScore] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)  # {"path": …, "error": …}

    @property
    def labels(self) -> np.ndarray:
        return np.array([score.label for score in self.accepted], dtype=int)

    @property
    def logits(self) -> np.ndarray:
        return np.array([score.logit for score in self.accepted], dtype=float)

    @property
    def probabilities(self) -> np.ndarray:
        """Each accepted image's probability, at the temperature of its population."""
        return np.array([score.probability for score in self.accepted], dtype=float)

    @property
    def populations(self) -> np.ndarray:
        """Each accepted image's population name (e.g. ``scores.populations == "adults"`` selects them)."""
        return np.array([score.population for score in self.accepted], dtype=str)

    def refused_summary(self) -> dict:
        """``{"n": …, "reasons": {rule: count}}`` of the refused images."""
        return _by_rule(self.refused)

    def flagged_summary(self) -> dict:
        """The same for accepted images outside the intended use (the ``flag`` policy)."""
        return _by_rule([score for score in self.accepted if score.verdict is not None])

    @property
    def coverage(self) -> float:
        """The share of readable images the gate accepted."""
        readable = len(self.accepted) + len(self.refused)
        return len(self.accepted) / readable if readable else 0.0


def _by_rule(scores: list[GatedScore]) -> dict:
    return {
        "n": len(scores),
        "reasons": dict(Counter(score.verdict.reason.value for score in scores if score.verdict is not None)),
    }


def score_files(
    files: Sequence[tuple[str, int | None]],
    classifier: Classifier,
    gate: IntendedUse,
    batch_size: int = 32,
    with_heatmaps: bool = False,
) -> GatedScores:
    """Score ``(path, label)`` pairs (label None when unknown) through the gate; ``with_heatmaps`` keeps
    each image's heatmap, on its square (the model sees the whole image squashed into it)."""
    result = GatedScores()
    pending: list[tuple[str, int | None, np.ndarray, HeaderReading, tuple[int, int]]] = []

    def flush() -> None:
        if not pending:
            return
        squares = np.stack([square for _, _, square, _, _ in pending])
        predictions = classifier.predict_squares(
            squares,
            [square.shape for square in squares] if with_heatmaps else None,
            [header.population for _, _, _, header, _ in pending],
        )
        for (path, label, _, header, shape), prediction in zip(pending, predictions):
            verdict = gate.verdict(header.verdict, prediction.image_check_score)
            score = GatedScore(
                path,
                label,
                prediction.logit,
                prediction.probability,
                prediction.image_check_score,
                verdict,
                prediction.population,
                shape,
                prediction.heatmap,
            )
            (result.refused if gate.refuses(verdict) else result.accepted).append(score)
        pending.clear()

    for path, label in tqdm(files, desc="scoring", mininterval=5, disable=len(files) < 50):
        try:
            gray, dataset = read_image(Path(path))
        except (OSError, ValueError) as error:  # unreadable file or UnsupportedImage: listed, not fatal
            result.unreadable.append({"path": path, "error": str(error)})
            continue
        pending.append((path, label, to_square_uint8(gray), gate.read_header(dataset), gray.shape))
        if len(pending) >= batch_size:
            flush()
    flush()
    return result
