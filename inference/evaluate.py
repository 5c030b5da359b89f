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

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from inference.classifier import Classifier  # noqa: E402
from inference.dataset import list_labelled  # noqa: E402
from inference.gated import score_files  # noqa: E402
from inference.intended_use import IntendedUse  # noqa: E402
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
        _plot(out_dir / "roc.png", fpr, tpr, "1 − specificity", "sensitivity", f"ROC (AUC {metrics['roc_auc']:.3f})", True)
        precision, recall, _ = precision_recall_curve(labels, probabilities)
        _plot(out_dir / "pr.png", recall, precision, "recall", "precision", f"PR (AP {metrics['pr_auc']:.3f})", False)
    bins = np.clip((probabilities * 10).astype(int), 0, 9)
    occupied = [b for b in range(10) if (bins == b).any()]
    confidence = np.array([probabilities[bins == b].mean() for b in occupied])
    observed = np.array([labels[bins == b].mean() for b in occupied])
    _plot(out_dir / "reliability.png", confidence, observed, "predicted probability", "observed pneumonia rate",
          f"Reliability (ECE {metrics['ece']:.3f})", True)


def summary_table(metrics: dict) -> str:
    """A Markdown table of the headline figures with their 95 % CIs."""
    rows = ["| metric | value | 95 % CI |", "|---|---:|---|"]
    for name in SUMMARY_FIGURES:
        value = metrics[name]
        low_high = metrics["ci95"].get(name)
        ci = f"{low_high[0]:.3f} – {low_high[1]:.3f}" if low_high else ""
        rows.append(f"| {name} | {value if isinstance(value, int) else f'{value:.4f}'} | {ci} |")
    confusion = metrics["confusion"]
    rows.append(f"| threshold | {metrics['threshold']:.4f} | |")
    if "coverage" in metrics:
        rows.append(f"| coverage (inside intended use) | {metrics['coverage']:.4f} | refused {metrics['refused']['n']} |")
    rows.append(f"| confusion | TP {confusion['tp']} · FP {confusion['fp']} · TN {confusion['tn']} · FN {confusion['fn']} | |")
    return "\n".join(rows)


def folder_cases(data_dir: Path, classifier: Classifier, gate: IntendedUse,
                 batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, dict]:
    """(labels, raw logits, facts for the report) of the images under ``data_dir`` the gate accepted;
    the facts are the unreadable files (``skipped``), ``refused`` and ``flagged`` by rule, ``coverage``."""
    scores = score_files(list_labelled(data_dir), classifier, gate, batch_size)
    if not scores.accepted:
        raise ValueError(f"no image under {data_dir} was readable and inside the intended use "
                         f"({len(scores.refused)} refused, {len(scores.unreadable)} unreadable)")
    return scores.labels, scores.logits, {"skipped": scores.unreadable, "refused": scores.refused_summary(),
                                          "coverage": scores.coverage, "flagged": scores.flagged_summary()}


def write_evaluation(out_dir: Path, source: str, labels: np.ndarray, probabilities: np.ndarray,
                     classifier: Classifier, **extra) -> dict:
    """metrics.json (figures with 95 % CIs plus ``extra``), scores.csv, plots and report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = metrics_with_ci(labels, probabilities, classifier.threshold)
    metrics.update(model_version=classifier.version, weights_sha256=classifier.card.weights_sha256,
                   operating_point=classifier.operating_point.name, data_dir=source, **extra)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out_dir / "scores.csv").open("w") as handle:
        handle.write("label,probability\n")
        handle.writelines(f"{label},{probability:.6f}\n" for label, probability in zip(labels, probabilities))
    write_plots(out_dir, labels, probabilities, metrics)
    refused = metrics.get("refused")
    report = [f"# Lung Vision evaluation — {source}", "", f"Model: {classifier.version} "
              f"(sha256 `{classifier.card.weights_sha256[:16]}…`), operating point: {metrics['operating_point']}",
              "", summary_table(metrics), ""]
    if refused is not None:
        report += [f"Outside the intended use (refused): {refused['n']} {refused['reasons']} — coverage "
                   f"{metrics['coverage']:.3f}", ""]
    report += [f"Skipped files: {len(metrics.get('skipped', []))}", "",
               "![ROC](roc.png) ![PR](pr.png) ![Reliability](reliability.png)", ""]
    (out_dir / "report.md").write_text("\n".join(report))
    return metrics
