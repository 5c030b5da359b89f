"""Benchmark — images/s for plain inference, inference + closed-form Grad-CAM, the same + the
intended-use gate's image check (what the worker runs), and pytorch-grad-cam, all in float32; the float32
forward pass as the worker runs it (batch norms folded, channels-last) against the network as built; then
the float32 forward pass against the bf16 one (``model.precision``), alone and as the worker runs it.

Run: ``.venv/bin/python bench/inference.py [--seconds 10]``. Prints three tables; nothing is asserted.
All paths start from 224 px squares and use the shipped model at its input size, batch 1 and 16
(grad-cam gets the already-normalised tensor, so it is timed without preprocessing). The paths of
one row are timed in alternating rounds and each path's best round counts (``best_rates``), so that
a shared machine's load disturbs the ratios less.
"""

import argparse
import sys
import time
from functools import partial
from pathlib import Path

# This script shares its name with the package it measures: look for packages in the repo, not in bench/.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from inference.classifier import Classifier, forward_pass, load_classifier, shipped_network
from inference.equivalence import best_rates
from inference.gradcam import class_activation_map, heatmap_in_image
from inference.model_card import WEIGHTS_DIR
from inference.precision import Precision, resolve
from inference.preprocess import SQUARE_SIZE, normalise


def random_squares(batch_size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (batch_size, SQUARE_SIZE, SQUARE_SIZE), dtype=np.uint8)


def worker_path(classifier: Classifier, squares: np.ndarray):
    """What the worker runs per batch: forward pass, heatmaps, image check score and verdict."""
    gate, size = classifier.intended_use(), classifier.card.input_size

    def step() -> None:
        for prediction in classifier.predict_squares(squares, [(size, size)] * len(squares)):
            gate.image_verdict(prediction.image_check_score)

    return step


def fp32_paths(classifier: Classifier, seconds: float, timed) -> None:
    """The float32 table: plain, + heatmap, + gate, pytorch-grad-cam."""
    network, size = classifier.network, classifier.card.input_size
    print(
        f"{'batch':>5} | {'plain img/s':>11} | {'+heatmap img/s':>14} | {'overhead':>8} | "
        f"{'+gate img/s':>11} | {'gate cost':>9} | {'grad-cam img/s':>14} | {'ours / grad-cam':>15}"
    )
    for batch_size in (1, 16):
        squares = random_squares(batch_size)
        inputs = normalise(torch.from_numpy(squares)[:, None], size)

        def plain() -> None:
            with torch.inference_mode():
                network(normalise(torch.from_numpy(squares)[:, None], size))  # noqa: B023 (called within this iteration)

        def with_heatmap() -> None:  # the path before the gate: one hook on layer4, the CAM, the heatmaps
            maps = {}
            hook = network.layer4.register_forward_hook(lambda _m, _i, output: maps.__setitem__("layer4", output))
            with torch.inference_mode():
                logits = network(normalise(torch.from_numpy(squares)[:, None], size)).flatten()  # noqa: B023 (called within this iteration)
                cams = class_activation_map(maps["layer4"], network.fc.weight[0])
            hook.remove()
            for cam, probability in zip(cams, classifier.calibrated(logits).tolist()):
                heatmap_in_image(cam, probability, (size, size))

        reference = GradCAM(model=network, target_layers=[network.layer4])
        targets = [ClassifierOutputTarget(0)] * batch_size

        def autograd() -> None:
            reference(input_tensor=inputs, targets=targets)  # noqa: B023 (called within this iteration)

        steps = {
            "plain": plain,
            "heatmap": with_heatmap,
            "gate": worker_path(classifier, squares),
            "grad-cam": autograd,
        }
        rates = timed(steps, batch_size, seconds * len(steps))
        plain_rate, heatmap_rate, gate_rate, autograd_rate = (rates[name] for name in steps)
        reference.__exit__(None, None, None)
        print(
            f"{batch_size:>5} | {plain_rate:>11.1f} | {heatmap_rate:>14.1f} | "
            f"{plain_rate / heatmap_rate - 1:>8.1%} | {gate_rate:>11.1f} | {heatmap_rate / gate_rate - 1:>9.1%} | "
            f"{autograd_rate:>14.1f} | {heatmap_rate / autograd_rate:>14.1f}x"
        )


def precision_paths(reference: Classifier, fast: Classifier, seconds: float, timed) -> None:
    """The precision table: the forward pass alone and the worker's path, float32 against the fast one."""
    name = fast.precision.value
    print(
        f"{'batch':>5} | {'fp32 forward img/s':>18} | {name + ' forward img/s':>18} | {name + ' / fp32':>11} | "
        f"{'fp32 worker img/s':>17} | {name + ' worker img/s':>17} | {name + ' / fp32':>11}"
    )
    for batch_size in (1, 16):
        squares = random_squares(batch_size)
        forward = timed(
            {"fp32": lambda: reference.forward(squares), name: lambda: fast.forward(squares)},  # noqa: B023 (called within this iteration)
            batch_size,
            2 * seconds,
        )
        worker = timed(
            {"fp32": worker_path(reference, squares), name: worker_path(fast, squares)}, batch_size, 2 * seconds
        )
        print(
            f"{batch_size:>5} | {forward['fp32']:>18.1f} | {forward[name]:>18.1f} | "
            f"{forward[name] / forward['fp32']:>10.2f}x | {worker['fp32']:>17.1f} | {worker[name]:>17.1f} | "
            f"{worker[name] / worker['fp32']:>10.2f}x"
        )


def fp32_as_run(reference: Classifier, seconds: float, timed) -> None:
    """The fp32 forward pass as the worker runs it (batch norms folded into the convolutions, channels-last
    layout: ``inference.precision.network_for``) against the same weights in the network as built
    (``inference.network.build_resnet18``: contiguous, batch norms of their own)."""
    as_built = shipped_network(WEIGHTS_DIR, reference.card)
    size = reference.card.input_size
    print(f"{'batch':>5} | {'as built img/s':>14} | {'as run img/s':>12} | {'as run / as built':>17}")
    for batch_size in (1, 16):
        squares = random_squares(batch_size)
        batch = torch.from_numpy(squares)[:, None]
        rates = timed(
            {
                "as built": lambda: forward_pass(as_built, batch, size),  # noqa: B023 (called within this iteration)
                "as run": lambda: reference.forward(squares),  # noqa: B023 (called within this iteration)
            },
            batch_size,
            2 * seconds,
        )
        print(
            f"{batch_size:>5} | {rates['as built']:>14.1f} | {rates['as run']:>12.1f} | "
            f"{rates['as run'] / rates['as built']:>16.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per path and measurement")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="images per CPU-second of this process instead of per wall-clock second "
        "(steadier on a machine other jobs load)",
    )
    arguments = parser.parse_args()
    seconds = arguments.seconds
    timed = partial(best_rates, clock=time.process_time) if arguments.cpu_time else best_rates
    reference = load_classifier(precision=Precision.FP32)
    size = reference.card.input_size
    print(
        f"model {reference.version}, input {size}x{size}, torch threads {torch.get_num_threads()}, "
        f"images per {'CPU' if arguments.cpu_time else 'wall-clock'} second"
    )
    fp32_paths(reference, seconds, timed)
    print("\nfp32 as the worker runs it (batch norms folded, channels-last) and as built")
    fp32_as_run(reference, seconds, timed)
    print(f"\nmodel.precision auto runs {resolve(Precision.AUTO).value} on this CPU")
    precision_paths(reference, load_classifier(precision=Precision.BF16), seconds, timed)


if __name__ == "__main__":
    main()
