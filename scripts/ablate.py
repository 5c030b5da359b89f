"""Ablations, one change at a time, within the CPU budget: branch a training run at a checkpoint.

Protocol (fixed before any branch was run): every branch starts from the same checkpoint of the
shipped run (model, EMA and optimiser after epoch ``--from-epoch``), trains ``--samples`` more images
with the learning rate falling on a cosine from the run's rate at that point to zero, and is scored
on the run's validation split (EMA weights): AUC per population and per adult label source, and the
pointing game / energy in boxes on the boxed adult validation positives, with 95 % bootstrap CIs.
The ``baseline`` branch keeps the shipped recipe; each other branch changes exactly one choice.
A branch therefore measures what a choice buys over the last part of training, not from scratch
(a from-scratch run per choice does not fit on two CPU cores); the model card says so.

    .venv/bin/python scripts/ablate.py --run runs/main-v2 --checkpoint runs/main-v2/checkpoint-epoch5.pt \\
        --out runs/main-v2/ablations.json [--card inference/weights]
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
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.dataset import load_squares  # noqa: E402
from inference.finalise import SplitImages, forward_batches  # noqa: E402
from inference.gradcam import Heatmap  # noqa: E402
from inference.localisation import localisation_figures  # noqa: E402
from inference.metrics import metrics_with_ci  # noqa: E402
from inference.network import build_resnet18  # noqa: E402
from inference.publish import add_ablations  # noqa: E402
from inference.split import read_split_csv  # noqa: E402
from inference.train import LossStep, TrainOptions, _learning_rate, training_loader  # noqa: E402

BRANCHES = {
    "baseline (shipped recipe)": {},
    "no box loss (localisation_weight 0)": {"localisation_weight": 0.0},
    "no augmentation": {"augment": False},
    "NIH text-mined positives at full weight (1.0 instead of 0.5)": {"nih_positive_weight": 1.0},
    "populations as in the data (no 50/50 balance)": {"adult_share": None},
    "without the adult OTHER images": {"use_other": False},
    "input 224 instead of 160": {"input_size": 224},
}


def score(network: torch.nn.Module, images: SplitImages, input_size: int) -> dict:
    """AUCs with CIs per population / adult source, and localisation, on the validation split."""
    val = forward_batches(network, torch.from_numpy(images.val_squares)[:, None], input_size)
    logits = val.logits.numpy()
    probabilities = 1 / (1 + np.exp(-logits))
    populations, sources = images.val_column("population"), images.val_column("source")
    figures: dict = {"ci95": {}}
    for name, members in (("AUC children", populations == "children"), ("AUC adults", populations == "adults"),
                          ("AUC adults RSNA", sources == "rsna"), ("AUC adults NIH", sources == "nih")):
        result = metrics_with_ci(images.val_labels[members], probabilities[members], 0.5, rounds=300)
        figures[name] = result["roc_auc"]
        figures["ci95"][name] = result["ci95"]["roc_auc"]
    boxes = [row.boxes for row in images.val_rows]
    for kind in Heatmap:
        located = localisation_figures(val.cams, boxes, kind)
        for key, name in (("pointing", f"peak in box ({kind.value})"), ("energy", f"energy in boxes ({kind.value})")):
            figures[name] = located[key]
            figures["ci95"][name] = located["ci95"][key]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the run folder (split.csv)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint every branch starts from")
    parser.add_argument("--samples", type=int, default=3000, help="images each branch trains on")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", nargs="*", help="run only these branches (by position, 0 = baseline)")
    parser.add_argument("--card", type=Path, help="also put the table into this folder's model card (e.g. the run)")
    arguments = parser.parse_args()

    rows = read_split_csv(arguments.run / "split.csv")
    train_rows = [row for row in rows if row.side == "train"]
    val_rows = [row for row in rows if row.side == "val"]
    cache = arguments.run.parent / ".cache"
    images = SplitImages.of(train_rows, val_rows, load_squares([r.path for r in train_rows], cache),
                            load_squares([r.path for r in val_rows], cache))
    state = torch.load(arguments.checkpoint, weights_only=True)
    base = TrainOptions()
    steps_per_epoch = base.samples_per_epoch // base.batch_size
    start_rate = _learning_rate(state["epoch"] * steps_per_epoch, base.epochs * steps_per_epoch, steps_per_epoch,
                                base.learning_rate)
    results = json.loads(arguments.out.read_text()) if arguments.out.exists() else []
    done = {row["change"] for row in results}
    for index, (change, overrides) in enumerate(BRANCHES.items()):
        if change in done or (arguments.only and str(index) not in arguments.only):
            continue
        options = replace(base, samples_per_epoch=arguments.samples, **overrides)
        torch.manual_seed(base.seed)
        model = build_resnet18().to(memory_format=torch.channels_last)
        model.load_state_dict(state["model"])
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(options.ema_decay), use_buffers=True)
        ema.load_state_dict(state["ema"])
        optimiser = torch.optim.AdamW(model.parameters(), lr=start_rate, weight_decay=options.weight_decay)
        optimiser.load_state_dict(state["optimiser"])
        keep = np.array([options.use_other or row.folder != "OTHER" for row in train_rows])
        loader = training_loader(images, options, keep)
        step = LossStep(model, options)
        started = time.monotonic()
        model.train()
        for number, batch in enumerate(loader):
            step(batch, optimiser, start_rate * 0.5 * (1 + math.cos(math.pi * number / len(loader))))
            ema.update_parameters(model)
        seconds = time.monotonic() - started
        figures = score(ema.module, images, options.input_size)
        results.append({"change": change, "overrides": {k: v for k, v in overrides.items()},
                        "protocol": f"Each row: the shipped run's checkpoint after epoch {state['epoch']} of "
                        f"{base.epochs}, trained on {arguments.samples} more images (learning rate on a cosine from "
                        f"{start_rate:.2e} to 0) with that one change, scored on the validation split (EMA "
                        "weights; AUC before calibration; localisation on the boxed adult validation positives); "
                        "95 % bootstrap CIs in brackets. A branch measures what a choice buys over the last part of "
                        "training, not from scratch.",
                        "seconds": round(seconds), "figures": figures})
        arguments.out.write_text(json.dumps(results, indent=2))
        print(change, {k: round(v, 4) for k, v in figures.items() if k != "ci95"}, f"{seconds:.0f} s", flush=True)
    if arguments.card:
        print(f"ablation table written into {add_ablations(arguments.card, results)}")


if __name__ == "__main__":
    main()
