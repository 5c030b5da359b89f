"""The offline commands of the ``inference`` package: ``train``, ``evaluate`` and ``analyze``."""

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from config.settings import Settings


def register(app: typer.Typer, get_settings: Callable[[], Settings]) -> None:
    """Add the inference commands to the ``lungvision`` CLI."""

    def classifier():
        from inference.classifier import WeightsMismatch, load_classifier

        try:
            return load_classifier(get_settings().model.weights_dir)
        except (FileNotFoundError, WeightsMismatch) as error:
            typer.echo(f"error: cannot load the model: {error}", err=True)
            raise typer.Exit(2) from None

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
    def evaluate(
        data: Path = typer.Option(..., "--data", help="folder with NORMAL/ and PNEUMONIA/ (JPEG, PNG or DICOM)"),
        out: Path = typer.Option(..., "--out", help="where metrics.json, plots and report.md go"),
    ) -> None:
        """Evaluate the model on a labelled folder at the model card's threshold."""
        from inference.evaluate import evaluate as run_evaluation
        from inference.evaluate import summary_table

        require_dir(data, "data folder")
        try:
            metrics = run_evaluation(data, out, classifier(), batch_size=get_settings().model.batch_size)
        except (FileNotFoundError, ValueError) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        typer.echo(summary_table(metrics))
        typer.echo(f"written to {out}")

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
        errors = run_analysis(paths, classifier(), out, sys.stdout)
        if errors:
            typer.echo(f"{errors} file(s) could not be analysed", err=True)
            raise typer.Exit(1)
