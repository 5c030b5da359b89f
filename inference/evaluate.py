"""Evaluation — a labelled folder becomes metrics.json, ROC/PR/reliability plots and a Markdown report.

The folder holds ``NORMAL/`` and ``PNEUMONIA/`` subfolders of JPEG, PNG or DICOM files, read through
the same pixel pipeline, intended-use gate and classifier as the worker. Files that cannot be read
are listed in ``metrics.json`` under ``skipped``; images the gate refuses are counted under
``refused`` (by rule) and ``coverage`` is the share of readable images it accepted; the figures
are computed on the accepted images, at the classifier's operating point (shipped or site profile).
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; must run before pyplot is imported, hence the E402 noqa below
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from inference.classifier import Classifier  # noqa: E402
from inference.dataset import list_labelled, parse_boxes  # noqa: E402
from inference.gated import score_files  # noqa: E402
from inference.intended_use import IntendedUse  # noqa: E402
from inference.localisation import describe, localisation_figures, read_boxes_csv  # noqa: E402
from inference.metrics import metrics_with_ci  # noqa: E402

SUMMARY_FIGURES = ("n", "accuracy", "recall", "specificity", "precision", "f1", "roc_auc", "pr_auc", "ece")


def _plot(path: Path, x: np.ndarray, y: np.ndarray, xlabel: str, ylabel: str, title: str, diagonal: bool) -> None:
    figure, axes = plt.subplots(figsize=(5, 5))
    axes.plot(x, y, marker="o" if len(x) < 20 else None)
    if diagonal:
        axes.plot([0, 1], [0, 1], linestyle="--", color="grey")
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.02))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_plots(out_dir: Path, labels: np.ndarray, probabilities: np.ndarray, metrics: dict) -> None:
    """ROC, precision–recall and reliability-diagram PNGs."""
    if 0 < labels.sum() < len(labels):
        fpr, tpr, _ = roc_curve(labels, probabilities)
        _plot(
            out_dir / "roc.png", fpr, tpr, "1 − specificity", "sensitivity", f"ROC (AUC {metrics['roc_auc']:.3f})", True
        )
        precision, recall, _ = precision_recall_curve(labels, probabilities)
        _plot(out_dir / "pr.png", recall, precision, "recall", "precision", f"PR (AP {metrics['pr_auc']:.3f})", False)
    bins = np.clip((probabilities * 10).astype(int), 0, 9)
    occupied = [b for b in range(10) if (bins == b).any()]
    confidence = np.array([probabilities[bins == b].mean() for b in occupied])
    observed = np.array([labels[bins == b].mean() for b in occupied])
    _plot(
        out_dir / "reliability.png",
        confidence,
        observed,
        "predicted probability",
        "observed pneumonia rate",
        f"Reliability (ECE {metrics['ece']:.3f})",
        True,
    )


def summary_table(metrics: dict) -> str:
    """A Markdown table of the headline figures with their 95 % CIs."""
    rows = ["| metric | value | 95 % CI |", "|---|---:|---|"]
    for name in SUMMARY_FIGURES:
        value = metrics[name]
        low_high = metrics["ci95"].get(name)
        ci = f"{low_high[0]:.3f} – {low_high[1]:.3f}" if low_high else ""
        rows.append(f"| {name} | {value if isinstance(value, int) else f'{value:.4f}'} | {ci} |")
    confusion = metrics["confusion"]
    threshold = metrics["threshold"]
    rows.append(f"| threshold | {threshold if isinstance(threshold, str) else f'{threshold:.4f}'} | |")
    if "coverage" in metrics:
        rows.append(
            f"| coverage (inside intended use) | {metrics['coverage']:.4f} | refused {metrics['refused']['n']} |"
        )
    rows.append(
        f"| confusion | TP {confusion['tp']} · FP {confusion['fp']} · TN {confusion['tn']} · FN {confusion['fn']} | |"
    )
    return "\n".join(rows)


def folder_cases(
    data_dir: Path, classifier: Classifier, gate: IntendedUse, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(labels, raw logits, facts for the report) of the images under ``data_dir`` the gate accepted;
    the facts are the unreadable files (``skipped``), ``refused`` and ``flagged`` by rule, ``coverage``
    and each accepted image's population (``populations``, in the order of the labels)."""
    scores = score_files(list_labelled(data_dir), classifier, gate, batch_size)
    if not scores.accepted:
        raise ValueError(
            f"no image under {data_dir} was readable and inside the intended use "
            f"({len(scores.refused)} refused, {len(scores.unreadable)} unreadable)"
        )
    return (
        scores.labels,
        scores.logits,
        {
            "skipped": scores.unreadable,
            "refused": scores.refused_summary(),
            "coverage": scores.coverage,
            "flagged": scores.flagged_summary(),
            "populations": scores.populations.tolist(),
        },
    )


def _boxes_key(path: Path, data_dir: Path, boxes: dict) -> str | None:
    """The boxes CSV's row for an image: by path relative to the data folder, by file name, or by stem
    (a CSV written for JPEG copies then also fits the DICOM originals)."""
    relative = str(path.relative_to(data_dir)) if path.is_relative_to(data_dir) else None
    for key in (relative, path.name):
        if key in boxes:
            return key
    stems = {Path(name).stem: name for name in boxes}
    return stems.get(path.stem) or stems.get(path.stem.split("_", 1)[-1])


def folder_localisation(data_dir: Path, boxes_csv: Path, classifier: Classifier, gate: IntendedUse) -> dict:
    """Pointing game and energy in boxes (with baselines and CIs) of the shipped heatmap, over the
    pneumonia images under ``data_dir`` that have boxes in ``boxes_csv`` and that the gate accepts."""
    boxes = read_boxes_csv(boxes_csv)
    files = [
        (path, label)
        for path, label in list_labelled(data_dir)
        if label == 1 and _boxes_key(Path(path), data_dir, boxes)
    ]
    if not files:
        raise ValueError(f"no pneumonia image under {data_dir} has a row with boxes in {boxes_csv}")
    scores = score_files(files, classifier, gate, with_heatmaps=True)
    heatmaps, image_boxes = [], []
    for score in scores.accepted:
        key = _boxes_key(Path(score.path), data_dir, boxes)
        assert key is not None  # only files with a row were scored
        text, width, height = boxes[key]
        rows, columns = score.image_shape
        heatmaps.append(torch.from_numpy(score.heatmap))
        image_boxes.append(parse_boxes(text, width or columns, height or rows))
    figures = localisation_figures(heatmaps, image_boxes)
    return {
        "data": f"{boxes_csv}: boxed pneumonia images the gate accepted",
        "refused": len(scores.refused),
        "unreadable": len(scores.unreadable),
        **figures,
        "summary": describe(figures),
    }


def headline_scores(probabilities: np.ndarray, thresholds: np.ndarray) -> tuple[np.ndarray, float]:
    """The scores and the one threshold the headline figures are taken at (``thresholds``: each image's
    own): the probabilities at their threshold when all images share it, else every score shifted so
    that its own threshold sits at 0.5."""
    if np.all(thresholds == thresholds[0]):
        return probabilities, float(thresholds[0])
    return np.clip(probabilities - thresholds + 0.5, 0.0, 1.0), 0.5


def write_evaluation(
    out_dir: Path,
    source: str,
    labels: np.ndarray,
    probabilities: np.ndarray,
    classifier: Classifier,
    populations: list[str] | None = None,
    localisation: dict | None = None,
    **extra,
) -> dict:
    """metrics.json (figures with 95 % CIs plus ``extra``), scores.csv, plots and report.md.

    Each image is judged at the operating point of its population (``populations``: one name per
    image; None: the first population's). With one population the headline figures are that
    population's; with several, the headline sensitivity / specificity / accuracy are at each image's
    own threshold (AUC and ECE over mixed populations mean little) and every population also gets its
    own figures under ``by_population``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    populations = list(populations or [classifier.population_names[0]] * len(labels))
    names = list(dict.fromkeys(populations))
    thresholds = np.array([classifier.operating_points[name].threshold for name in populations])
    metrics = metrics_with_ci(labels, *headline_scores(probabilities, thresholds))
    if len(names) > 1:
        metrics["threshold"] = "per population"
    by_population = {}
    for name in names:
        members = np.array(populations) == name
        by_population[name] = {
            **metrics_with_ci(labels[members], probabilities[members], classifier.operating_points[name].threshold),
            "operating_point": classifier.operating_points[name].name,
        }
    metrics.update(
        model_version=classifier.version,
        weights_sha256=classifier.card.weights_sha256,
        operating_point=", ".join(classifier.operating_points[name].name for name in names),
        data_dir=source,
        by_population=by_population,
        **extra,
    )
    if localisation is not None:
        metrics["localisation"] = localisation
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out_dir / "scores.csv").open("w") as handle:
        handle.write("label,probability,population,threshold\n")
        handle.writelines(
            f"{label},{probability:.6f},{population},{threshold:.6f}\n"
            for label, probability, population, threshold in zip(labels, probabilities, populations, thresholds)
        )
    write_plots(out_dir, labels, probabilities, metrics)
    refused = metrics.get("refused")
    report = [
        f"# Lung Vision evaluation — {source}",
        "",
        f"Model: {classifier.version} "
        f"(sha256 `{classifier.card.weights_sha256[:16]}…`), operating point: {metrics['operating_point']}",
        "",
        summary_table(metrics),
        "",
    ]
    if len(names) > 1:
        for name, figures in by_population.items():
            report += [f"## {name} ({figures['operating_point']})", "", summary_table(figures), ""]
    if refused is not None:
        report += [
            f"Outside the intended use (refused): {refused['n']} {refused['reasons']} — coverage "
            f"{metrics['coverage']:.3f}",
            "",
        ]
    if localisation is not None:
        report += ["## Heatmap localisation", "", localisation["summary"], ""]
    report += [
        f"Skipped files: {len(metrics.get('skipped', []))}",
        "",
        "![ROC](roc.png) ![PR](pr.png) ![Reliability](reliability.png)",
        "",
    ]
    (out_dir / "report.md").write_text("\n".join(report))
    return metrics
