"""Refusal rates of the intended-use gate on in-distribution and out-of-distribution images, and the
population the image check chooses for images without an age.

Run: ``.venv/bin/python scripts/gate_report.py [--data ../shared/data] [--weights-dir DIR] [--run RUN]``.
Prints one table (set, images, refused, share, by rule, population of the accepted). The sets: the
Kaggle ``val/`` folder of the pediatric data (in distribution, never used for any choice); with
``--run``, the adult validation split of that training run (in distribution for a two-population
model; JPEGs without a header, so the image check alone decides and chooses the population);
otherwise the *report half* of the adult images by patient group; the three vendor DICOM samples;
and images made here: the pediatric ``val/`` images inverted, turned 90°, and synthetic
non-radiographs (noise, gradients, shapes, text). Nothing is tuned on these figures.
"""

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo's packages, not scripts/

import numpy as np
from PIL import Image, ImageDraw

from inference.classifier import Classifier
from inference.gated import score_files
from inference.model_card import WEIGHTS_DIR
from inference.split import read_split_csv
from scripts.gate_design import adult_files


def synthetic_images(folder: Path, count: int = 40) -> list[Path]:
    """Non-radiographs: noise, gradients, shapes and text, as 8-bit PNGs."""
    rng = np.random.default_rng(7)
    paths = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            pixels = rng.integers(0, 256, (400, 400), dtype=np.uint8)
        elif kind == 1:
            ramp = np.linspace(0, 255, 400)
            pixels = (np.add.outer(ramp * rng.uniform(0, 1), ramp * rng.uniform(0, 1)) / 2).astype(np.uint8)
        else:
            image = Image.new("L", (400, 400), int(rng.integers(0, 255)))
            draw = ImageDraw.Draw(image)
            for _ in range(12):
                box = sorted(rng.integers(0, 400, 2)), sorted(rng.integers(0, 400, 2))
                if kind == 2:
                    draw.ellipse([box[0][0], box[1][0], box[0][1], box[1][1]], fill=int(rng.integers(0, 255)))
                else:
                    draw.text((int(box[0][0]), int(box[1][0])), "LUNG VISION 1234", fill=int(rng.integers(0, 255)))
            pixels = np.asarray(image)
        path = folder / f"synthetic-{index:02d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def transformed(sources: list[Path], folder: Path, name: str, change) -> list[Path]:
    paths = []
    for source in sources:
        path = folder / f"{name}-{source.stem}.png"
        Image.fromarray(change(np.asarray(Image.open(source).convert("L")))).save(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--run", type=Path, help="training run whose adult validation split to use (split.csv)")
    arguments = parser.parse_args()
    classifier = Classifier(arguments.weights_dir)
    gate = classifier.intended_use()
    pediatric_val = sorted((arguments.data / "chest_xray" / "val").rglob("*.jpeg"))
    if arguments.run:
        adult = [
            Path(row.path)
            for row in read_split_csv(arguments.run / "split.csv")
            if row.population == "adults" and row.side == "val"
        ]
        adult_set = "validation split"
    else:
        adult = [Path(path) for path in adult_files(arguments.data, design=False)]
        adult_set = "report half"
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        sets = {
            "pediatric val/ folder (in distribution)": pediatric_val,
            **{
                f"adult {label} ({adult_set})": [path for path in adult if path.parent.name == label]
                for label in ("NORMAL", "PNEUMONIA", "OTHER")
            },
            "vendor DICOM samples (adults)": sorted((arguments.data / "dicom_samples").glob("*.dcm")),
            "pediatric val/, inverted": transformed(pediatric_val, folder, "inverted", lambda p: 255 - p),
            "pediatric val/, turned 90°": transformed(pediatric_val, folder, "turned", np.rot90),
            "synthetic non-radiographs": synthetic_images(folder),
        }
        print(f"image check threshold {gate.image_check_threshold:.2f}; model {classifier.version}")
        print("| set | images | refused | share | by rule | population of the accepted |\n|---|---:|---:|---:|---|---|")
        for name, paths in sets.items():
            if not paths:
                print(f"| {name} | 0 | | | (absent) | |")
                continue
            scores = score_files([(str(path), None) for path in paths], classifier, gate)
            readable = len(scores.accepted) + len(scores.refused)
            rules = Counter(score.verdict.reason.value for score in scores.refused)
            print(
                f"| {name} | {readable} | {len(scores.refused)} | {len(scores.refused) / readable:.1%} | "
                f"{dict(rules)} | {dict(Counter(scores.populations.tolist()))} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
