"""The offline commands of the ``inference`` package: ``train``, ``refit``, ``evaluate``, ``analyze``
and ``calibrate``."""

import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from config.settings import Settings
from inference.model_card import WEIGHTS_DIR


# (labels, raw logits, skipped reasons → counts) of the studies radiologists marked in the worklist,
# for the given weights sha256; supplied by the wiring (the store belongs to the worker package).
WorklistLabels = Callable[[Settings, str], tuple[list[int], list[float], dict[str, int]]]


def register(app: typer.Typer, get_settings: Callable[[], Settings], worklist_labels: WorklistLabels) -> None:
    """Add the inference commands to the ``lungvision`` CLI."""

    def model():
        """(classifier, intended-use gate) as the settings configure them; errors end the command."""
        from inference.classifier import WeightsMismatch, load_model
        from inference.site_profile import SiteProfileError

        try:
            return load_model(get_settings().model)
        except (FileNotFoundError, WeightsMismatch, SiteProfileError) as error:
            typer.echo(f"error: cannot load the model: {error}", err=True)
            raise typer.Exit(2) from None

    def labelled_cases(data: Optional[Path], from_worklist: bool) -> tuple:
        """(classifier, labels, raw logits, source, facts) of the chosen labelled set; errors end the command."""
        from inference.evaluate import folder_cases

        if (data is None) == (not from_worklist):
            typer.echo("error: give either --data DIR or --from-worklist", err=True)
            raise typer.Exit(2)
        classifier, gate = model()
        if from_worklist:
            labels, logits, skipped = worklist_labels(get_settings(), classifier.card.weights_sha256)
            if not labels:
                typer.echo(f"error: no study reviewed in the worklist with these weights (skipped: {skipped or 'none'})",
                           err=True)
                raise typer.Exit(2)
            return classifier, np.array(labels), np.array(logits), "worklist reviews", {"skipped_reviews": skipped}
        require_dir(data, "data folder")
        try:
            labels, logits, facts = folder_cases(data, classifier, gate, get_settings().model.batch_size)
        except (FileNotFoundError, ValueError) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        return classifier, labels, logits, str(data), facts

    def require_dir(path: Path, what: str) -> None:
        if not path.is_dir():
            typer.echo(f"error: {what} {path} is not a folder", err=True)
            raise typer.Exit(2)

    @app.command()
    def train(
        data: Path = typer.Option(..., "--data", help="Kaggle-layout folder with train/NORMAL and train/PNEUMONIA"),
        out: Path = typer.Option(..., "--out", help="run folder: split.csv, checkpoints, weights, model card"),
        epochs: int = typer.Option(20, help="training epochs"),
        input_size: int = typer.Option(160, help="model input size in pixels"),
        resume: bool = typer.Option(False, "--resume", help="continue from RUN_DIR/checkpoint.pt"),
        max_train_images: Optional[int] = typer.Option(None, hidden=True, help="smoke tests only"),
    ) -> None:
        """Train the ResNet-18 from scratch, calibrate it and write weights + model card into OUT."""
        from inference.train import TrainOptions
        from inference.train import train as run_training
        from inference.publish import write_model_card

        require_dir(data / "train", "training folder")
        options = TrainOptions(epochs=epochs, input_size=input_size, max_train_images=max_train_images)
        summary = run_training(data, out, options, resume=resume)
        card_path = write_model_card(out, summary, options)
        typer.echo(f"weights and model card written to {card_path.parent}")

    @app.command()
    def refit(
        data: Path = typer.Option(..., "--data", help="the Kaggle-layout folder the weights were trained on"),
        out: Path = typer.Option(..., "--out", help="run folder for the weights, image check and updated card"),
        max_train_images: Optional[int] = typer.Option(None, hidden=True, help="smoke tests only"),
    ) -> None:
        """Finalise trained weights (model.weights_dir) again: temperature, operating point, image check."""
        from inference.publish import refit as run_refit
        from inference.train import TrainOptions

        require_dir(data / "train", "training folder")
        card_path = run_refit(data, out, get_settings().model.weights_dir or WEIGHTS_DIR,
                              TrainOptions(max_train_images=max_train_images))
        typer.echo(f"weights, image check and model card written to {card_path.parent}")

    @app.command()
    def evaluate(
        data: Optional[Path] = typer.Option(None, "--data", help="folder with NORMAL/ and PNEUMONIA/ (JPEG, PNG or DICOM)"),
        out: Path = typer.Option(..., "--out", help="where metrics.json, plots and report.md go"),
        from_worklist: bool = typer.Option(False, "--from-worklist",
                                           help="use the studies radiologists marked agree/disagree in the worklist"),
    ) -> None:
        """Evaluate the model on labelled cases at its operating point (shipped or site profile)."""
        from inference.evaluate import summary_table, write_evaluation

        classifier, labels, logits, source, facts = labelled_cases(data, from_worklist)
        metrics = write_evaluation(out, source, labels, classifier.calibrated(logits), classifier, **facts)
        typer.echo(summary_table(metrics))
        typer.echo(f"written to {out}")

    @app.command()
    def calibrate(
        data: Optional[Path] = typer.Option(None, "--data", help="this site's labelled cases: NORMAL/ and PNEUMONIA/ "
                                            "(JPEG, PNG or DICOM; 100–300 images)"),
        out: Path = typer.Option(..., "--out", help="the site profile to write (JSON); use it as model.site_profile"),
        target_sensitivity: float = typer.Option(0.98, "--target-sensitivity", min=0.5, max=0.999),
        confidence: float = typer.Option(0.95, "--confidence", min=0.5, max=0.999,
                                         help="confidence of the sensitivity's lower bound"),
        name: Optional[str] = typer.Option(None, "--name", help="profile id named in SR and HL7 (default: site-DATE)"),
        from_worklist: bool = typer.Option(False, "--from-worklist",
                                           help="use the studies radiologists marked agree/disagree in the worklist"),
    ) -> None:
        """Fit this site's operating point so that the target sensitivity holds with confidence."""
        from inference.site_calibration import calibrate_site, describe

        classifier, labels, logits, source, facts = labelled_cases(data, from_worklist)
        try:
            profile = calibrate_site(labels, logits, classifier, target_sensitivity=target_sensitivity,
                                     confidence=confidence,
                                     profile_id=name or f"site-{datetime.now(timezone.utc):%Y%m%d-%H%M}",
                                     data=f"{source} (skipped: {facts['skipped_reviews']})"
                                     if facts.get("skipped_reviews") else source,
                                     refused=facts.get("refused", {}).get("n", 0))
        except ValueError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        profile.save(out)
        typer.echo(describe(profile))
        typer.echo(f"written to {out}; use it with model.site_profile (or LUNGVISION_MODEL__SITE_PROFILE={out})")

    @app.command()
    def analyze(
        paths: list[Path] = typer.Argument(..., help="DICOM, PNG or JPEG files or folders"),
        out: Optional[Path] = typer.Option(None, "--out", help="folder for heatmap overlay PNGs"),
    ) -> None:
        """Print one JSON line per image (probability, label, threshold, model version, ms)."""
        from inference.analyze import analyze as run_analysis

        missing = [str(path) for path in paths if not path.exists()]
        if missing:
            typer.echo(f"error: no such file or folder: {', '.join(missing)}", err=True)
            raise typer.Exit(2)
        classifier, gate = model()
        errors = run_analysis(paths, classifier, gate, out, sys.stdout)
        if errors:
            typer.echo(f"{errors} file(s) could not be analysed", err=True)
            raise typer.Exit(1)
