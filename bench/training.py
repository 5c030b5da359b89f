"""Benchmark — one training step of the shipped recipe in fp32 and in bfloat16 autocast, same run.

Run: ``.venv/bin/python bench/training.py [--seconds 20] [--input-size 160] [--batch-size 32]``.
Measures the training command's own step (``inference.train.LossStep``). Prints images/s of each
and their ratio (the training command uses bfloat16 autocast by default; ``--fp32`` turns it off).
Random inputs: the step's cost does not depend on the pixels. Nothing
is asserted.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

# Look for packages in the repo, not in bench/.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from inference.network import build_resnet18
from inference.train import LossStep, TrainOptions


def images_per_second(mixed_precision: bool, seconds: float, input_size: int, batch_size: int) -> float:
    """The training command's own step (``train.LossStep``: forward, losses, backward, AdamW) for about
    ``seconds`` after two warm-up steps → images/s."""
    torch.manual_seed(0)
    options = TrainOptions(input_size=input_size, batch_size=batch_size, mixed_precision=mixed_precision)
    model = build_resnet18().to(memory_format=torch.channels_last)
    optimiser = torch.optim.AdamW(model.parameters(), lr=options.learning_rate)
    step = LossStep(model, options)
    batch = (
        torch.rand(batch_size, 1, input_size, input_size),
        torch.randint(0, 2, (batch_size,)).float(),
        torch.ones(batch_size),
        torch.zeros(batch_size, 1, input_size, input_size),
        torch.zeros(batch_size, dtype=torch.bool),
    )
    step(batch, optimiser, options.learning_rate), step(batch, optimiser, options.learning_rate)
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step(batch, optimiser, options.learning_rate)
        steps += 1
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="time per precision")
    parser.add_argument("--input-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    arguments = parser.parse_args()
    fp32 = images_per_second(False, arguments.seconds, arguments.input_size, arguments.batch_size)
    bf16 = images_per_second(True, arguments.seconds, arguments.input_size, arguments.batch_size)
    print(f"training step, {arguments.batch_size} × {arguments.input_size} px, {torch.get_num_threads()} threads:")
    print(f"  fp32              {fp32:6.1f} images/s")
    print(f"  bfloat16 autocast {bf16:6.1f} images/s   ratio {bf16 / fp32:.2f}× fp32")


if __name__ == "__main__":
    main()
