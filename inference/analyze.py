"""Offline analysis — image files (DICOM, PNG, JPEG) become one JSON line each and overlay PNGs.

Every line says whether the image is inside the model's intended use (``"intended_use"``) and, when
not, why (``"reason"``); under the ``refuse`` policy such a line carries no probability. An analysed
image's line names its population (by the header's age, else the image check) and the operating
point it was judged at.
"""

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from PIL import Image

from inference.classifier import Classifier
from inference.images import IMAGE_SUFFIXES, read_image
from inference.intended_use import IntendedUse
from inference.overlay import legend_lines, render_overlay


def expand_paths(paths: list[Path]) -> Iterator[Path]:
    """Files as given, and every image file (or suffix-less file, as DICOM often is) under folders."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and (child.suffix.lower() in IMAGE_SUFFIXES or child.suffix == ""):
                    yield child
        else:
            yield path


def analyze(paths: list[Path], classifier: Classifier, gate: IntendedUse, out_dir: Path | None, output: TextIO) -> int:
    """Analyse each file through the gate, print a JSON line for it and write its overlay; returns
    the error count."""
    errors = 0
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    for index, path in enumerate(expand_paths(paths)):
        started = time.perf_counter()
        try:
            gray, dataset = read_image(path)
            header = gate.read_header(dataset)
            prediction = classifier.predict([gray], with_heatmap=out_dir is not None, populations=[header.population])[
                0
            ]
        except (OSError, ValueError) as error:  # unreadable file or UnsupportedImage: report, go on
            errors += 1
            output.write(json.dumps({"path": str(path), "error": str(error)}) + "\n")
            continue
        milliseconds = (time.perf_counter() - started) * 1000
        verdict = gate.verdict(header.verdict, prediction.image_check_score)
        record = {"path": str(path), "intended_use": verdict is None, "reason": verdict.text if verdict else None}
        if gate.refuses(verdict):
            record.update(model_version=prediction.model_version, milliseconds=round(milliseconds, 1))
            output.write(json.dumps(record) + "\n")
            output.flush()
            continue
        record.update(
            probability=round(prediction.probability, 4),
            label=prediction.label,
            threshold=prediction.threshold,
            population=prediction.population,
            operating_point=prediction.operating_point,
            model_version=prediction.model_version,
            milliseconds=round(milliseconds, 1),
        )
        if out_dir is not None:
            legend = legend_lines(
                prediction.probability, prediction.positive, prediction.threshold, prediction.model_version
            )
            overlay_path = out_dir / f"{index:04d}-{path.stem}-heatmap.png"
            assert prediction.heatmap is not None  # asked for (with_heatmap) since there is an out_dir
            Image.fromarray(render_overlay(gray, prediction.heatmap, legend)).save(overlay_path)
            record["overlay"] = str(overlay_path)
        output.write(json.dumps(record) + "\n")
        output.flush()
    return errors
