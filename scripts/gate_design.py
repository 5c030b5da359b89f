"""Design study for the image check: which features of the one forward pass separate the training
population from adults best, at a threshold that refuses 1 % of the pediatric validation split.

Run: ``.venv/bin/python scripts/gate_design.py [--data ../shared/data] [--run runs/refit1]``.

Protocol, fixed before any figure was seen: the adult training images are split by patient group
(``design_half``) into a *design* half, used here to compare the candidates, and a *report* half
that only ``scripts/gate_report.py`` reads. Each candidate is fitted on the pediatric training
side of the run's split and thresholded at the 99 % quantile of the pediatric validation side;
the candidate refusing the largest share of the adult design half wins (ties: fewer dimensions).
"""

import argparse
import csv
import hashlib
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo's packages, not scripts/

import numpy as np
import torch
import torch.nn.functional as F

from inference.classifier import Classifier
from inference.dataset import load_squares
from inference.image_check import fit_image_check, threshold_for
from inference.model_card import WEIGHTS_DIR
from inference.preprocess import normalise

LAYERS = ("layer1", "layer2", "layer3", "layer4")


def design_half(patient_group: str) -> bool:
    """True for the adult patient groups of the design half (the other half is for reporting)."""
    return int(hashlib.sha256(patient_group.encode()).hexdigest()[0], 16) % 2 == 0


def adult_files(data: Path, design: bool) -> list[str]:
    with (data / "adult_cxr" / "MANIFEST.tsv").open() as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [str(data / "adult_cxr" / row["file"]) for row in rows if design_half(row["patient_group"]) == design]


def pooled_features(network: torch.nn.Module, squares: np.ndarray, input_size: int) -> dict[str, np.ndarray]:
    """Per image: spatial means and standard deviations of every layer, and layer4 on a 2×2 grid."""
    maps: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(network, name).register_forward_hook(lambda _m, _i, output, name=name: maps.__setitem__(name, output))
        for name in LAYERS
    ]
    parts: dict[str, list] = {}
    with torch.inference_mode():
        for start in range(0, len(squares), 64):
            network(normalise(torch.from_numpy(squares[start : start + 64])[:, None], input_size))
            for name in LAYERS:
                parts.setdefault(f"{name}.mean", []).append(maps[name].mean(dim=(2, 3)))
                parts.setdefault(f"{name}.std", []).append(maps[name].std(dim=(2, 3)))
            parts.setdefault("layer4.grid", []).append(F.adaptive_avg_pool2d(maps["layer4"], 2).flatten(1))
    for hook in hooks:
        hook.remove()
    return {key: torch.cat(values).numpy() for key, values in parts.items()}


def knn_scores(train: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Distance to the k-th nearest training image, each layer's block L2-normalised (Sun et al. 2022)."""
    train_t, query_t = torch.from_numpy(train), torch.from_numpy(query)
    distances = torch.cdist(query_t, train_t)
    return distances.kthvalue(k, dim=1).values.numpy()


def normalised(features: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    blocks = [features[key] / np.linalg.norm(features[key], axis=1, keepdims=True).clip(1e-12) for key in keys]
    return np.concatenate(blocks, axis=1).astype(np.float32)


KNN_CANDIDATES = {
    "G kNN k=1, layer4 mean": (["layer4.mean"], 1),
    "H kNN k=10, layer4 mean": (["layer4.mean"], 10),
    "I kNN k=10, layer1-4 means": (["layer1.mean", "layer2.mean", "layer3.mean", "layer4.mean"], 10),
    "J kNN k=50, layer1-4 means": (["layer1.mean", "layer2.mean", "layer3.mean", "layer4.mean"], 50),
}

CANDIDATES = {
    "A layer3+4 means (shipped first)": ["layer3.mean", "layer4.mean"],
    "B layer1-4 means": ["layer1.mean", "layer2.mean", "layer3.mean", "layer4.mean"],
    "C layer2+3+4 means": ["layer2.mean", "layer3.mean", "layer4.mean"],
    "D layer3+4 means and stds": ["layer3.mean", "layer3.std", "layer4.mean", "layer4.std"],
    "E layer3 mean + layer4 2x2 grid": ["layer3.mean", "layer4.grid"],
    "F layer1-4 means and stds": [f"{n}.{s}" for n in LAYERS for s in ("mean", "std")],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--run", type=Path, required=True, help="a run folder with split.csv")
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    arguments = parser.parse_args()
    classifier = Classifier(arguments.weights_dir)
    network, size = classifier.network, classifier.card.input_size
    with (arguments.run / "split.csv").open() as handle:
        split = list(csv.DictReader(handle))
    cache = arguments.run.parent / ".cache"
    sides = {side: [row for row in split if row["side"] == side] for side in ("train", "val")}
    cached = arguments.run / "gate-design-features.npz"
    if cached.exists():
        stored = np.load(cached)
        train, val, adults = (
            {key.split("/", 1)[1]: stored[key] for key in stored.files if key.startswith(f"{side}/")}
            for side in ("train", "val", "adults")
        )
    else:
        train = pooled_features(network, load_squares([r["path"] for r in sides["train"]], cache), size)
        val = pooled_features(network, load_squares([r["path"] for r in sides["val"]], cache), size)
        adults = pooled_features(network, load_squares(adult_files(arguments.data, design=True), cache), size)
        np.savez(
            cached,
            **{
                f"{side}/{key}": value
                for side, features in (("train", train), ("val", val), ("adults", adults))
                for key, value in features.items()
            },
        )
    labels = np.array([int(r["label"]) for r in sides["train"]])
    print("| candidate | dims | adult design half refused | pediatric val refused |\n|---|---:|---:|---:|")
    for name, keys in CANDIDATES.items():

        def stack(features):
            return np.concatenate([features[key] for key in keys], axis=1)  # noqa: B023 (called within this iteration)

        check = fit_image_check(stack(train), labels)
        val_scores = check.scores(torch.from_numpy(stack(val))).numpy()
        threshold = threshold_for(val_scores)
        adult_scores = check.scores(torch.from_numpy(stack(adults))).numpy()
        print(
            f"| {name} | {stack(val).shape[1]} | {(adult_scores > threshold).mean():.1%} | "
            f"{(val_scores > threshold).mean():.1%} |",
            flush=True,
        )
    layer_scores = {}
    for layer in LAYERS:  # one Gaussian per layer, for the combined candidates
        check = fit_image_check(train[f"{layer}.mean"], labels)
        layer_scores[layer] = [check.scores(torch.from_numpy(f[f"{layer}.mean"])).numpy() for f in (val, adults)]
    for name, combine in (
        ("K per-layer Mahalanobis, max of score / val 99 %", "max"),
        ("L per-layer Mahalanobis, sum of score / val median", "sum"),
    ):
        scale = {layer: np.quantile(v, 0.99 if combine == "max" else 0.5) for layer, (v, _) in layer_scores.items()}
        val_scores, adult_scores = (
            getattr(np, combine)(np.stack([layer_scores[layer][side] / scale[layer] for layer in LAYERS]), axis=0)
            for side in (0, 1)
        )
        threshold = threshold_for(val_scores)
        print(
            f"| {name} | 960 | {(adult_scores > threshold).mean():.1%} | {(val_scores > threshold).mean():.1%} |",
            flush=True,
        )
    for name, (keys, k) in KNN_CANDIDATES.items():
        reference = normalised(train, keys)
        val_scores = knn_scores(reference, normalised(val, keys), k)
        threshold = threshold_for(val_scores)
        adult_scores = knn_scores(reference, normalised(adults, keys), k)
        print(
            f"| {name} | {reference.shape[1]} | {(adult_scores > threshold).mean():.1%} | "
            f"{(val_scores > threshold).mean():.1%} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
