"""Benchmark — images/s for plain inference, inference + closed-form Grad-CAM, the same + the
intended-use gate's image check (what the worker runs), and pytorch-grad-cam.

Run: ``.venv/bin/python bench/inference.py [--seconds 10]``. Prints one table; nothing is asserted.
All paths start from 224 px squares and use the shipped model at its input size, batch 1 and 16
(grad-cam gets the already-normalised tensor, so it is timed without preprocessing).
"""

import argparse
import sys
import time
from pathlib import Path

# This script shares its name with the package it measures: look for packages in the repo, not in bench/.
sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pytorch_grad_cam import GradCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

from inference.classifier import load_classifier  # noqa: E402
from inference.gradcam import class_activation_map, heatmap_in_image  # noqa: E402
from inference.preprocess import SQUARE_SIZE, normalise  # noqa: E402


def images_per_second(step, batch_size: int, seconds: float) -> float:
    """Run ``step`` repeatedly (after one warm-up call) for about ``seconds``; return images/s."""
    step()
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        runs += 1
    return runs * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per measurement")
    seconds = parser.parse_args().seconds
    classifier = load_classifier()
    network, size = classifier.network, classifier.card.input_size
    print(f"model {classifier.version}, input {size}x{size}, torch threads {torch.get_num_threads()}")
    gate = classifier.intended_use()
    print(f"{'batch':>5} | {'plain img/s':>11} | {'+heatmap img/s':>14} | {'overhead':>8} | "
          f"{'+gate img/s':>11} | {'gate cost':>9} | {'grad-cam img/s':>14} | {'ours / grad-cam':>15}")
    for batch_size in (1, 16):
        squares = np.random.default_rng(0).integers(0, 256, (batch_size, SQUARE_SIZE, SQUARE_SIZE), dtype=np.uint8)
        inputs = normalise(torch.from_numpy(squares)[:, None], size)

        def plain() -> None:
            with torch.inference_mode():
                network(normalise(torch.from_numpy(squares)[:, None], size))

        def with_heatmap() -> None:  # the path before the gate: one hook on layer4, the CAM, the heatmaps
            maps = {}
            hook = network.layer4.register_forward_hook(lambda _m, _i, output: maps.__setitem__("layer4", output))
            with torch.inference_mode():
                logits = network(normalise(torch.from_numpy(squares)[:, None], size)).flatten()
                cams = class_activation_map(maps["layer4"], network.fc.weight[0])
            hook.remove()
            for cam, probability in zip(cams, classifier.calibrated(logits).tolist()):
                heatmap_in_image(cam, probability, (size, size))

        def with_gate() -> None:  # what the worker runs: + pooled features, image check score and verdict
            for prediction in classifier.predict_squares(squares, [(size, size)] * batch_size):
                gate.image_verdict(prediction.image_check_score)

        reference = GradCAM(model=network, target_layers=[network.layer4])
        targets = [ClassifierOutputTarget(0)] * batch_size

        def autograd() -> None:
            reference(input_tensor=inputs, targets=targets)

        plain_rate = images_per_second(plain, batch_size, seconds)
        heatmap_rate = images_per_second(with_heatmap, batch_size, seconds)
        gate_rate = images_per_second(with_gate, batch_size, seconds)
        autograd_rate = images_per_second(autograd, batch_size, seconds)
        reference.__exit__(None, None, None)
        print(f"{batch_size:>5} | {plain_rate:>11.1f} | {heatmap_rate:>14.1f} | "
              f"{plain_rate / heatmap_rate - 1:>8.1%} | {gate_rate:>11.1f} | {heatmap_rate / gate_rate - 1:>9.1%} | "
              f"{autograd_rate:>14.1f} | {heatmap_rate / autograd_rate:>14.1f}x")


if __name__ == "__main__":
    main()
