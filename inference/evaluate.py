"""Evaluation — a labelled folder becomes metrics.json, ROC/PR/reliability plots and a Markdown report.

The folder holds ``NORMAL/`` and ``PNEUMONIA/`` subfolders of JPEG, PNG or DICOM files, read through
the same pixel pipeline and classifier as the worker. Files that cannot be read are listed in
``metrics.json`` under ``skipped`` and left out of the figures.
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402
from tqdm import tqdm  # noqa: E402

from inference.classifier import Classifier  # noqa: E402
from inference.dataset import list_labelled  # noqa: E402
from inference.images import read_gray  # noqa: E402
from inference.metrics import metrics_with_ci  # noqa: E402
from inference.preprocess import to_square_uint8  # noqa: E402

SUMMARY_FIGURES = ("n", "accuracy", "recall", "specificity", "precision", "f1", "roc_auc", "pr_auc", "ece")


def score_folder(data_dir: Path, classifier: Classifier, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(labels, calibrated probabilities, skipped files) for every image under ``data_dir``."""
    labels, squares, skipped = [], [], []
    for path, label in tqdm(list_labelled(data_dir), desc="reading", mininterval=5):
        try:
            squares.append(to_square_uint8(read_gray(Path(path))))
            labels.append(label)
        except (OSError, ValueError) as error:
            skipped.append({"path": path, "error": str(error)})
    if not squares:
        raise ValueError(f"no readable image under {data_dir}")
    stack = np.stack(squares)
    probabilities = np.concatenate(
        [classifier.probabilities(stack[start : start + batch_size]) for start in range(0, len(stack), batch_size)]
    )
    return np.array(labels), probabilities, skipped


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
    rows.append(f"| confusion | TP {confusion['tp']} · FP {confusion['fp']} · TN {confusion['tn']} · FN {confusion['fn']} | |")
    return "\n".join(rows)


def evaluate(data_dir: Path, out_dir: Path, classifier: Classifier, batch_size: int = 32) -> dict:
    """Score ``data_dir`` at the model card's threshold and write metrics, plots and report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels, probabilities, skipped = score_folder(data_dir, classifier, batch_size)
    metrics = metrics_with_ci(labels, probabilities, classifier.card.threshold)
    metrics.update(model_version=classifier.version, weights_sha256=classifier.card.weights_sha256,
                   data_dir=str(data_dir), skipped=skipped)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out_dir / "scores.csv").open("w") as handle:
        handle.write("label,probability\n")
        handle.writelines(f"{label},{probability:.6f}\n" for label, probability in zip(labels, probabilities))
    write_plots(out_dir, labels, probabilities, metrics)
    report = [f"# Lung Vision evaluation — {data_dir}", "", f"Model: {classifier.version} "
              f"(sha256 `{classifier.card.weights_sha256[:16]}…`)", "", summary_table(metrics), "",
              f"Skipped files: {len(skipped)}", "", "![ROC](roc.png) ![PR](pr.png) ![Reliability](reliability.png)", ""]
    (out_dir / "report.md").write_text("\n".join(report))
    return metrics
