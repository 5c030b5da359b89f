"""The offline commands of the ``inference`` package: ``train``, ``refit``, ``evaluate``, ``equivalence``,
``analyze`` and ``calibrate``."""

import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from config.settings import Settings
from inference.model_card import WEIGHTS_DIR

# (labels, raw logits, populations — None where the round recorded none —, skipped reasons → counts) of
# the studies radiologists marked in the worklist, for the given weights sha256; supplied by the wiring
# (the store belongs to the worker package).
WorklistLabels = Callable[[Settings, str], tuple[list[int], list[float], list[str | None], dict[str, int]]]


@dataclass(frozen=True)
class _Wiring:
    """What the ``lungvision`` app hands its commands."""

    settings: Callable[[], Settings]  # the settings the global options chose; errors end the command
    worklist_labels: WorklistLabels


_wiring: _Wiring  # set by register


def register(app: typer.Typer, get_settings: Callable[[], Settings], worklist_labels: WorklistLabels) -> None:
    """Add the inference commands to the ``lungvision`` CLI."""
    global _wiring
    _wiring = _Wiring(get_settings, worklist_labels)
    for command in (train, refit, evaluate, equivalence, calibrate, analyze):
        app.command()(command)


# options that several commands share
_LABELLED_FOLDER = typer.Option("--data", help="folder with NORMAL/ and PNEUMONIA/ (JPEG, PNG or DICOM)")
LabelledFolder = Annotated[Path, _LABELLED_FOLDER]
OptionalLabelledFolder = Annotated[Path | None, _LABELLED_FOLDER]
FromWorklist = Annotated[
    bool,
    typer.Option("--from-worklist", help="use the studies radiologists marked agree/disagree in the worklist"),
]
MaxTrainImages = Annotated[int | None, typer.Option(hidden=True, help="smoke tests only")]


def _model():
    """(classifier, intended-use gate) as the settings configure them; errors end the command."""
    from inference.classifier import WeightsMismatch, load_model
    from inference.site_profile import SiteProfileError

    try:
        return load_model(_wiring.settings().model)
    except (FileNotFoundError, WeightsMismatch, SiteProfileError) as error:
        typer.echo(f"error: cannot load the model: {error}", err=True)
        raise typer.Exit(2) from None


def _labelled_cases(data: Path | None, from_worklist: bool) -> tuple:
    """(classifier, labels, raw logits, source, facts) of the chosen labelled set, the facts with each
    case's population (``populations``); errors end the command."""
    from inference.evaluate import folder_cases

    if (data is None) == (not from_worklist):
        typer.echo("error: give either --data DIR or --from-worklist", err=True)
        raise typer.Exit(2)
    classifier, gate = _model()
    if data is None:  # --from-worklist
        return _worklist_cases(classifier)
    _require_dir(data, "data folder")
    try:
        labels, logits, facts = folder_cases(data, classifier, gate, _wiring.settings().model.batch_size)
    except (FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    return classifier, labels, logits, str(data), facts


def _worklist_cases(classifier) -> tuple:
    """:func:`_labelled_cases` of the studies reviewed in the worklist with the classifier's weights."""
    reviewed, reviewed_logits, populations, skipped = _wiring.worklist_labels(
        _wiring.settings(), classifier.card.weights_sha256
    )
    if not reviewed:
        typer.echo(
            f"error: no study reviewed in the worklist with these weights (skipped: {skipped or 'none'})",
            err=True,
        )
        raise typer.Exit(2)
    # a round recorded before populations were stored was made with weights of one population
    populations = [name or classifier.population_names[0] for name in populations]
    facts = {"skipped_reviews": skipped, "populations": populations}
    return classifier, np.array(reviewed), np.array(reviewed_logits), "worklist reviews", facts


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        typer.echo(f"error: {what} {path} is not a folder", err=True)
        raise typer.Exit(2)


def train(
    data: Annotated[Path, typer.Option("--data", help="Kaggle-layout folder with train/NORMAL and train/PNEUMONIA")],
    out: Annotated[Path, typer.Option("--out", help="run folder: split.csv, checkpoints, weights, model card")],
    adult_data: Annotated[
        Path | None,
        typer.Option("--adult-data", help="the adult set (MANIFEST.tsv, train/NORMAL|PNEUMONIA|OTHER)"),
    ] = None,
    epochs: Annotated[int, typer.Option(help="training epochs")] = 9,
    samples_per_epoch: Annotated[
        int, typer.Option(help="images drawn per epoch (0: the training side's size)")
    ] = 12000,
    input_size: Annotated[int, typer.Option(help="model input size in pixels")] = 160,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="training augmentation")] = True,
    use_other: Annotated[bool, typer.Option("--other/--no-other", help="adult OTHER images as negatives")] = True,
    nih_positive_weight: Annotated[float, typer.Option(help="loss weight of NIH's text-mined pneumonia labels")] = 0.5,
    adult_share: Annotated[
        float, typer.Option(max=1.0, help="share of each batch drawn from adults (negative: as in the data)")
    ] = 0.5,
    localisation_weight: Annotated[
        float, typer.Option(help="weight of the box loss on RSNA-boxed positives (0: off)")
    ] = 0.5,
    mixed_precision: Annotated[
        bool, typer.Option("--bf16/--fp32", help="forward pass in bfloat16 autocast (fp32 weights and losses)")
    ] = True,
    resume: Annotated[bool, typer.Option("--resume", help="continue from RUN_DIR/checkpoint.pt")] = False,
    max_train_images: MaxTrainImages = None,
) -> None:
    """Train the ResNet-18 from scratch, calibrate it and write weights + model card into OUT."""
    from inference.publish import write_model_card
    from inference.train import TrainOptions
    from inference.train import train as run_training

    _require_dir(data / "train", "training folder")
    if adult_data is not None and not (adult_data / "MANIFEST.tsv").is_file():
        typer.echo(f"error: adult data folder {adult_data} has no MANIFEST.tsv", err=True)
        raise typer.Exit(2)
    options = TrainOptions(
        epochs=epochs,
        samples_per_epoch=samples_per_epoch or None,
        input_size=input_size,
        augment=augment,
        use_other=use_other,
        nih_positive_weight=nih_positive_weight,
        adult_share=adult_share if adult_share >= 0 else None,
        localisation_weight=localisation_weight,
        mixed_precision=mixed_precision,
        max_train_images=max_train_images,
    )
    summary = run_training(data, out, options, resume=resume, adult_dir=adult_data)
    card_path = write_model_card(out, summary, options, adult_data is not None)
    typer.echo(f"weights and model card written to {card_path.parent}")


def refit(
    data: Annotated[Path, typer.Option("--data", help="the Kaggle-layout folder the weights were trained on")],
    out: Annotated[Path, typer.Option("--out", help="run folder for the weights, image check and updated card")],
    adult_data: Annotated[
        Path | None,
        typer.Option("--adult-data", help="the adult set the weights were trained on (MANIFEST.tsv)"),
    ] = None,
    max_train_images: MaxTrainImages = None,
) -> None:
    """Finalise trained weights (model.weights_dir) again: temperature, operating points, image check."""
    from inference.publish import refit as run_refit
    from inference.train import TrainOptions

    _require_dir(data / "train", "training folder")
    card_path = run_refit(
        data,
        out,
        _wiring.settings().model.weights_dir or WEIGHTS_DIR,
        TrainOptions(max_train_images=max_train_images),
        adult_data,
    )
    typer.echo(f"weights, image check and model card written to {card_path.parent}")


def evaluate(  # keyword-only, so that the options keep their --help order: --out (required) after --data
    *,
    data: OptionalLabelledFolder = None,
    out: Annotated[Path, typer.Option("--out", help="where metrics.json, plots and report.md go")],
    from_worklist: FromWorklist = False,
    boxes: Annotated[
        Path | None,
        typer.Option(
            "--boxes",
            help="CSV of radiologists' boxes (columns file, boxes or rsna_boxes, optionally "
            "orig_width/orig_height): also measure where the heatmap points",
        ),
    ] = None,
) -> None:
    """Evaluate the model on labelled cases at their populations' operating points (shipped or site profile)."""
    from inference.evaluate import folder_localisation, summary_table, write_evaluation

    if boxes is not None and (data is None or not boxes.is_file()):
        typer.echo(f"error: --boxes needs --data and an existing CSV file ({boxes})", err=True)
        raise typer.Exit(2)
    classifier, labels, logits, source, facts = _labelled_cases(data, from_worklist)
    located = None
    if boxes is not None and data is not None:  # (--boxes without --data ended the command above)
        try:
            located = folder_localisation(data, boxes, classifier, _model()[1])
        except ValueError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
    populations = facts.pop("populations")
    metrics = write_evaluation(
        out, source, labels, classifier.calibrated(logits, populations), classifier, populations, located, **facts
    )
    typer.echo(summary_table(metrics))
    for name, figures in metrics["by_population"].items():
        if len(metrics["by_population"]) > 1:
            typer.echo(f"\n{name} ({figures['operating_point']}):\n{summary_table(figures)}")
    if located is not None:
        typer.echo(f"\nheatmap: {located['summary']}")
    typer.echo(f"written to {out}")


def equivalence(
    data: LabelledFolder,
    out: Annotated[
        Path | None, typer.Option("--out", help="also write the figures and flipped files here (JSON)")
    ] = None,
    seconds: Annotated[
        float, typer.Option("--seconds", min=0.1, help="time spent timing the two forward passes")
    ] = 5.0,
) -> None:
    """Compare the bf16 forward pass with fp32 on labelled images: probabilities, labels, image check, gate,
    populations, AUC / sensitivity / specificity at the operating points, and speed."""
    import json

    from inference.classifier import load_classifier
    from inference.equivalence import compare, describe
    from inference.precision import Precision

    _require_dir(data, "data folder")
    configured, gate = _model()
    settings = _wiring.settings().model
    reference, fast = (
        load_classifier(settings.weights_dir, settings.site_profile, precision)
        for precision in (Precision.FP32, Precision.BF16)
    )
    try:
        result = compare(data, reference, fast, gate, settings.batch_size, seconds)
    except (FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    typer.echo(describe(result))
    typer.echo(f"\nmodel.precision {settings.precision} runs {configured.precision.value} on this CPU")
    if out is not None:
        out.write_text(json.dumps(result.as_dict(), indent=2) + "\n")
        typer.echo(f"written to {out}")


def calibrate(  # keyword-only, as evaluate
    *,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="this site's labelled cases: NORMAL/ and PNEUMONIA/ (JPEG, PNG or DICOM; 100–300 images)"
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="the site profile to write (JSON); use it as model.site_profile")],
    target_sensitivity: Annotated[float, typer.Option("--target-sensitivity", min=0.5, max=0.999)] = 0.98,
    confidence: Annotated[
        float, typer.Option("--confidence", min=0.5, max=0.999, help="confidence of the sensitivity's lower bound")
    ] = 0.95,
    name: Annotated[
        str | None, typer.Option("--name", help="profile id named in SR and HL7 (default: site-DATE)")
    ] = None,
    from_worklist: FromWorklist = False,
) -> None:
    """Fit this site's operating point per population so that the target sensitivity holds with confidence."""
    from inference.site_calibration import calibrate_site, describe

    classifier, labels, logits, source, facts = _labelled_cases(data, from_worklist)
    try:
        profile = calibrate_site(
            labels,
            logits,
            classifier,
            target_sensitivity=target_sensitivity,
            confidence=confidence,
            profile_id=name or f"site-{datetime.now(UTC):%Y%m%d-%H%M}",
            data=f"{source} (skipped: {facts['skipped_reviews']})" if facts.get("skipped_reviews") else source,
            refused=facts.get("refused", {}).get("n", 0),
            populations=facts["populations"],
        )
    except ValueError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    profile.save(out)
    typer.echo(describe(profile))
    typer.echo(f"written to {out}; use it with model.site_profile (or LUNGVISION_MODEL__SITE_PROFILE={out})")


def analyze(
    paths: Annotated[list[Path], typer.Argument(help="DICOM, PNG or JPEG files or folders")],
    out: Annotated[Path | None, typer.Option("--out", help="folder for heatmap overlay PNGs")] = None,
) -> None:
    """Print one JSON line per image (probability, label, threshold, population, operating point, model
    version, ms)."""
    from inference.analyze import analyze as run_analysis

    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        typer.echo(f"error: no such file or folder: {', '.join(missing)}", err=True)
        raise typer.Exit(2)
    classifier, gate = _model()
    errors = run_analysis(paths, classifier, gate, out, sys.stdout)
    if errors:
        typer.echo(f"{errors} file(s) could not be analysed", err=True)
        raise typer.Exit(1)
