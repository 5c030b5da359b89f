"""Equivalence — the reduced-precision forward pass compared with float32 on a labelled folder.

Both classifiers (the same weights and operating points, ``Precision.FP32`` and ``Precision.BF16``)
score every file through the same gate as ``lungvision evaluate`` (``gated.score_files``). Per
readable image the two paths are compared on everything the worker decides from the forward pass:
the calibrated probability, the label at the image's operating point, the image check's verdict,
the gate's decision (analysed or refused) and the population whose operating point it gets. The
headline figures (AUC, sensitivity, specificity at the operating points, over the images each path
accepts) are given for both, and the speed of the two forward passes on the folder's own images.
"""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from inference.classifier import Classifier
from inference.dataset import list_labelled
from inference.evaluate import headline_scores
from inference.gated import GatedScore, GatedScores, score_files
from inference.images import read_image
from inference.intended_use import IntendedUse
from inference.metrics import point_metrics
from inference.preprocess import to_square_uint8

TIMING_ROUNDS = 5  # alternating rounds per path: each path's best round counts


@dataclass(frozen=True)
class PathFigures:
    """One path's headline figures over the images its gate accepted, at their operating points."""

    precision: str
    accepted: int
    roc_auc: float
    sensitivity: float
    specificity: float
    images_per_second: float  # forward pass only, batches of the folder's images


@dataclass(frozen=True)
class Equivalence:
    """How far the fast path is from float32 on one folder (per readable image, unless named)."""

    data: str
    n: int  # images both paths read
    max_abs_difference: float  # of the calibrated probability
    p99_abs_difference: float
    label_flips: list[str]  # paths whose label at their operating point differs
    image_check_flips: list[str]  # paths whose image-check verdict (inside / unlike the training images) differs
    gate_flips: list[str]  # paths one path analyses and the other refuses
    population_flips: list[str]  # paths judged at another population's operating point
    reference: PathFigures
    fast: PathFigures
    batch_size: int

    @property
    def speed_ratio(self) -> float:
        return self.fast.images_per_second / self.reference.images_per_second

    def as_dict(self) -> dict:
        return {**asdict(self), "speed_ratio": self.speed_ratio}


def best_rates(
    steps: dict[str, Callable[[], object]],
    batch_size: int,
    seconds: float,
    rounds: int = TIMING_ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Images per second of ``clock`` for each step (one call = ``batch_size`` images), timed in
    ``rounds`` alternating rounds of ``seconds / rounds / len(steps)`` after one warm-up call each;
    each step's best round counts, so that a shared machine's load disturbs the comparison less.
    ``clock=time.process_time`` counts this process's CPU seconds instead of wall-clock ones."""
    for step in steps.values():
        step()
    best = dict.fromkeys(steps, 0.0)
    window = seconds / rounds / len(steps)
    for _ in range(rounds):
        for name, step in steps.items():
            calls, started, clock_started = 0, time.perf_counter(), clock()
            while calls == 0 or time.perf_counter() - started < window:
                step()
                calls += 1
            best[name] = max(best[name], calls * batch_size / max(clock() - clock_started, 1e-9))
    return best


def _positive(classifier: Classifier, score: GatedScore) -> bool:
    return score.probability >= classifier.operating_points[score.population].threshold


def _figures(classifier: Classifier, scores: GatedScores, rate: float) -> PathFigures:
    thresholds = np.array([classifier.operating_points[name].threshold for name in scores.populations])
    figures = (
        point_metrics(scores.labels, *headline_scores(scores.probabilities, thresholds))
        if scores.accepted
        else {"roc_auc": float("nan"), "recall": float("nan"), "specificity": float("nan")}
    )
    return PathFigures(
        classifier.precision.value,
        len(scores.accepted),
        figures["roc_auc"],
        figures["recall"],
        figures["specificity"],
        rate,
    )


def _timing_squares(paths: list[str], batch_size: int) -> np.ndarray:
    """The first ``batch_size`` readable images as model squares (repeated when there are fewer)."""
    squares = [to_square_uint8(read_image(Path(path))[0]) for path in paths[:batch_size]]
    return np.stack([squares[index % len(squares)] for index in range(batch_size)])


def compare(
    data_dir: Path,
    reference: Classifier,
    fast: Classifier,
    gate: IntendedUse,
    batch_size: int = 16,
    seconds: float = 5.0,
) -> Equivalence:
    """Score the labelled folder ``data_dir`` (NORMAL/, PNEUMONIA/) with both classifiers through
    ``gate`` and compare them; time both forward passes for about ``seconds`` in all."""
    files = list_labelled(data_dir)
    reference_scores = score_files(files, reference, gate, batch_size)
    fast_scores = score_files(files, fast, gate, batch_size)
    before = {score.path: score for score in reference_scores.accepted + reference_scores.refused}
    after = {score.path: score for score in fast_scores.accepted + fast_scores.refused}
    paths = [path for path, _ in files if path in before and path in after]
    if not paths:
        raise ValueError(f"no image under {data_dir} was readable")
    differences = np.abs([after[path].probability - before[path].probability for path in paths])
    squares = _timing_squares(paths, batch_size)
    rates = best_rates(
        {"reference": lambda: reference.forward(squares), "fast": lambda: fast.forward(squares)}, batch_size, seconds
    )
    return Equivalence(
        data=str(data_dir),
        n=len(paths),
        max_abs_difference=float(differences.max()),
        p99_abs_difference=float(np.quantile(differences, 0.99)),
        label_flips=[path for path in paths if _positive(reference, before[path]) != _positive(fast, after[path])],
        image_check_flips=[
            path
            for path in paths
            if (gate.image_verdict(before[path].image_check_score) is None)
            != (gate.image_verdict(after[path].image_check_score) is None)
        ],
        gate_flips=[path for path in paths if gate.refuses(before[path].verdict) != gate.refuses(after[path].verdict)],
        population_flips=[path for path in paths if before[path].population != after[path].population],
        reference=_figures(reference, reference_scores, rates["reference"]),
        fast=_figures(fast, fast_scores, rates["fast"]),
        batch_size=batch_size,
    )


def describe(result: Equivalence) -> str:
    """A Markdown summary: the differences, then both paths' figures side by side."""
    reference, fast = result.reference, result.fast
    rows = [
        f"{fast.precision} vs {reference.precision} on {result.data}: {result.n} images",
        "",
        "| difference | value |",
        "|---|---:|",
        f"| max \\|Δprobability\\| | {result.max_abs_difference:.2e} |",
        f"| p99 \\|Δprobability\\| | {result.p99_abs_difference:.2e} |",
        f"| label flips at the operating point | {len(result.label_flips)} |",
        f"| image-check verdict flips | {len(result.image_check_flips)} |",
        f"| gate flips (analysed ↔ refused) | {len(result.gate_flips)} |",
        f"| population flips | {len(result.population_flips)} |",
        "",
        f"| figure | {reference.precision} | {fast.precision} | difference |",
        "|---|---:|---:|---:|",
    ]
    rows.append(
        f"| accepted by the gate | {reference.accepted} | {fast.accepted} | {fast.accepted - reference.accepted:+d} |"
    )
    for name in ("roc_auc", "sensitivity", "specificity"):
        before, after = getattr(reference, name), getattr(fast, name)
        rows.append(f"| {name} | {before:.4f} | {after:.4f} | {after - before:+.4f} |")
    rows.append(
        f"| forward pass, images/s (batch {result.batch_size}) | {reference.images_per_second:.1f} | "
        f"{fast.images_per_second:.1f} | ×{result.speed_ratio:.2f} |"
    )
    flipped = result.label_flips + result.image_check_flips + result.gate_flips + result.population_flips
    if flipped:
        rows += ["", "flipped: " + ", ".join(sorted(set(flipped)))]
    return "\n".join(rows)
