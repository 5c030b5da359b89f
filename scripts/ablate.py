"""Ablations, one change at a time, within the CPU budget: branch a training run at a checkpoint.

Protocol (fixed before any branch was run): every branch starts from the same checkpoint of the
shipped run (model and optimiser after epoch 5 of its 9), trains ``--samples`` more images (default:
one epoch of the run) with the learning rate falling on a cosine from the run's rate at that point
to zero, and is scored on the run's validation split with the branch's own weights (not the EMA,
which would still be mostly the shared checkpoint): ``finalise.population_validation`` — AUC per
population and per adult label source, RSNA specificity at sensitivity 0.90, pointing game and
energy in boxes on the boxed adult validation positives — with 95 % bootstrap CIs.
The ``baseline`` branch keeps the shipped recipe; each other branch changes exactly one choice.
A branch therefore measures what a choice buys over the last part of training, not from scratch
(a from-scratch run per choice does not fit on two CPU cores); the model card says so.

    .venv/bin/python scripts/ablate.py --run runs/main-v3 --checkpoint runs/main-v3/checkpoint-epoch5.pt \\
        --out runs/main-v3/ablations.json [--card inference/weights]
"""

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.dataset import load_squares
from inference.finalise import SplitImages, population_validation
from inference.model_card import ModelCard
from inference.network import build_resnet18
from inference.publish import add_ablations
from inference.split import read_split_csv
from inference.train import LossStep, TrainOptions, _learning_rate, training_loader

BRANCHES = {
    "baseline (shipped recipe)": {},
    "no box loss (localisation_weight 0)": {"localisation_weight": 0.0},
    "no augmentation": {"augment": False},
    "NIH text-mined positives at full weight (1.0 instead of 0.5)": {"nih_positive_weight": 1.0},
    "populations as in the data (no 50/50 balance)": {"adult_share": None},
    "without the adult OTHER images": {"use_other": False},
    "input 224 instead of 160": {"input_size": 224},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the run folder (split.csv)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint every branch starts from")
    parser.add_argument("--samples", type=int, help="images each branch trains on (default: one epoch of the run)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", help="run only these branches (by position, 0 = baseline)")
    parser.add_argument("--card", type=Path, help="also put the table into this folder's model card (e.g. the run)")
    arguments = parser.parse_args()

    rows = read_split_csv(arguments.run / "split.csv")
    train_rows = [row for row in rows if row.side == "train"]
    val_rows = [row for row in rows if row.side == "val"]
    cache = arguments.run.parent / ".cache"
    images = SplitImages.of(
        train_rows,
        val_rows,
        load_squares([r.path for r in train_rows], cache),
        load_squares([r.path for r in val_rows], cache),
    )
    state = torch.load(arguments.checkpoint, weights_only=True)
    training = ModelCard.load(arguments.run).training  # the run's own recipe
    base = TrainOptions(epochs=training["epochs"], samples_per_epoch=training["images_per_epoch"])
    samples = arguments.samples or base.samples_per_epoch
    steps_per_epoch = base.samples_per_epoch // base.batch_size
    start_rate = _learning_rate(
        state["epoch"] * steps_per_epoch, base.epochs * steps_per_epoch, steps_per_epoch, base.learning_rate
    )
    results = json.loads(arguments.out.read_text()) if arguments.out.exists() else []
    done = {row["change"] for row in results}
    for index, (change, overrides) in enumerate(BRANCHES.items()):
        if change in done or (arguments.only and str(index) not in arguments.only):
            continue
        options = replace(base, samples_per_epoch=samples, **overrides)
        torch.manual_seed(base.seed)
        model = build_resnet18().to(memory_format=torch.channels_last)
        model.load_state_dict(state["model"])
        optimiser = torch.optim.AdamW(model.parameters(), lr=start_rate, weight_decay=options.weight_decay)
        optimiser.load_state_dict(state["optimiser"])
        keep = np.array([options.use_other or row.folder != "OTHER" for row in train_rows])
        loader = training_loader(images, options, keep)
        step = LossStep(model, options)
        started = time.monotonic()
        model.train()
        for number, batch in enumerate(loader):
            step(batch, optimiser, start_rate * 0.5 * (1 + math.cos(math.pi * number / len(loader))))
        seconds = time.monotonic() - started
        figures = population_validation(model, images, options.input_size, ci_rounds=1000)
        results.append(
            {
                "change": change,
                "overrides": {k: v for k, v in overrides.items()},
                "protocol": f"Each row: the shipped run's checkpoint after epoch {state['epoch']} of "
                f"{base.epochs}, trained on {samples} more images (learning rate on a cosine from "
                f"{start_rate:.2e} to 0) with that one change, scored on the validation split with the "
                "branch's own weights (AUC before calibration; RSNA specificity at sensitivity 0.90; "
                "localisation on the boxed adult validation positives); "
                "95 % bootstrap CIs in brackets. A branch measures what a choice buys over the last part of "
                "training, not from scratch.",
                "seconds": round(seconds),
                "figures": figures,
            }
        )
        arguments.out.write_text(json.dumps(results, indent=2))
        print(change, {k: round(v, 4) for k, v in figures.items() if k != "ci95"}, f"{seconds:.0f} s", flush=True)
    if arguments.card:
        print(f"ablation table written into {add_ablations(arguments.card, results)}")


if __name__ == "__main__":
    main()
