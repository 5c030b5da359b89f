"""Benchmark — the receiver's CPU per association: the node against dcmtk's storescp (and, with ``--baseline
DIR``, the node of another checkout), same files, same run.

Run: ``.venv/bin/python bench/association.py [--associations 30] [--rounds 2] [--baseline DIR]`` (needs dcmtk).
A single-image study usually comes in one association of its own, so what the receiver spends on setting one
up — decoding the request's presentation contexts (dcmtk's ``storescu`` proposes 128), negotiating, answering
— is paid once per study. Each association here carries one 64×64 16-bit CR (8 KB), so the figure is almost
all set-up and release. ``storescu`` sends them one after another; the receiver's CPU time (user + system, its
whole process tree, from ``/proc``) before and after, divided by the associations, is the figure. Receivers,
each started fresh on a loopback port, as bench/node.py starts them: the node (``python -m dicom_node``: temp
file, fsync, arrival record, audit line per instance) and ``storescp --fork`` (default mode, no fsync; its
children's CPU counts once it has reaped them). Runs
alternate each round. Prints ms of CPU per association and the ratios. Nothing is asserted.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# bench/ holds a worker.py that would hide the worker package: look for packages in the repo, not in bench/.
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.deployment import cpu_seconds
from bench.node import REPO, START_TIMEOUT_S, dcmtk, start_node, start_storescp, write_images
from common.ports import free_port, wait_until_listening

SIDE = 64  # pixels: an 8 KB instance, so the association's own cost dominates
SETTLE_S = 0.5  # after start-up and after the last association, before reading the CPU times


def cpu_ms_per_association(start: Callable[[int, Path], subprocess.Popen], files: list[Path], output: Path) -> float:
    """Start a receiver, send each file in an association of its own, and return its CPU ms per association."""
    output.mkdir()
    port = free_port()
    receiver = start(port, output)
    try:
        wait_until_listening(port, receiver, START_TIMEOUT_S)
        time.sleep(SETTLE_S)
        before = cpu_seconds(receiver.pid)
        storescu = dcmtk("storescu")
        for path in files:
            subprocess.run(
                [storescu, "-aec", "LUNGVISION", "127.0.0.1", str(port), str(path)], check=True, capture_output=True
            )
        time.sleep(SETTLE_S)
        return (cpu_seconds(receiver.pid) - before) * 1000 / len(files)
    finally:
        receiver.terminate()
        receiver.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, default=30, help="associations per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="measure every receiver this many times, alternating")
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout's node to measure too")
    arguments = parser.parse_args()
    receivers: dict[str, Callable[[int, Path], subprocess.Popen]] = {
        "node": lambda port, output: start_node(port, output, REPO),
        "storescp": lambda port, output: start_storescp(port, output, bit_preserving=False, env=dict(os.environ)),
    }
    if arguments.baseline is not None:
        baseline = arguments.baseline.resolve()
        receivers["baseline node"] = lambda port, output: start_node(port, output, baseline)
    with tempfile.TemporaryDirectory(prefix="lv-association-") as temporary:
        root = Path(temporary)
        (root / "in").mkdir()
        files = write_images(root / "in", arguments.associations, SIDE, SIDE)
        figures: dict[str, list[float]] = {name: [] for name in receivers}
        for round_number in range(arguments.rounds):
            order = list(receivers) if round_number % 2 == 0 else list(receivers)[::-1]
            for name in order:
                output = root / f"{name.replace(' ', '-')}-{round_number}"
                figures[name].append(cpu_ms_per_association(receivers[name], files, output))
    print(f"{arguments.associations} associations of one {SIDE}x{SIDE} CR each, storescu one after another")
    print(f"{'receiver':<14} | {'CPU ms per association, round by round':<40} | {'median':>6}")
    for name, values in figures.items():
        rounds = ", ".join(f"{value:.1f}" for value in values)
        print(f"{name:<14} | {rounds:<40} | {statistics.median(values):>6.1f}")
    node = statistics.median(figures["node"])
    print(f"node / storescp: {node / statistics.median(figures['storescp']):.2f}x")
    if "baseline node" in figures:
        print(f"node / baseline node: {node / statistics.median(figures['baseline node']):.2f}x")


if __name__ == "__main__":
    main()
