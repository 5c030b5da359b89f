"""Training — a Kaggle-layout folder becomes calibrated ResNet-18 weights and a model card.

Steps: patient-grouped validation split carved from ``train/`` → decode once into a cache →
from-scratch training with balanced sampling, augmentation, AdamW with warm-up + cosine decay and an
exponential moving average (EMA) of the weights → temperature scaling and threshold on validation →
``RUN_DIR/lungvision-resnet18.safetensors`` + ``model_card.json``. A checkpoint is written every
epoch; ``resume=True`` continues from it.
"""

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from inference.augment import training_transform
from inference.calibration import calibrated_probabilities
from inference.dataset import list_labelled, load_squares
from inference.finalise import SplitImages, finalise
from inference.metrics import point_metrics
from inference.network import build_resnet18
from inference.preprocess import normalise
from inference.split import split_by_patient, write_split_csv

WEIGHTS_NAME = "lungvision-resnet18.safetensors"


@dataclass
class TrainOptions:
    """Hyper-parameters of one training run (their reasons are in the model card)."""

    epochs: int = 20
    input_size: int = 160
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.05
    ema_decay: float = 0.998
    val_fraction: float = 0.15
    seed: int = 42
    min_age_years: float = 1.0  # the training population (Kermany: children aged one to five years)
    max_age_years: float = 6.0
    max_train_images: int | None = None  # for smoke tests only


class SquaresDataset(torch.utils.data.Dataset):
    """Cached squares with labels; applies ``transform`` (if any) to a 1×224×224 uint8 tensor."""

    def __init__(self, squares: np.ndarray, labels: np.ndarray, transform=None) -> None:
        self.squares, self.labels, self.transform = squares, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float]:
        image = torch.from_numpy(self.squares[index])[None]
        if self.transform is not None:
            image = self.transform(image)
        return image, float(self.labels[index])


def predict_logits(model: torch.nn.Module, squares: np.ndarray, input_size: int, batch_size: int = 64) -> np.ndarray:
    """Raw logits for a stack of uint8 squares (no augmentation)."""
    model.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(squares), batch_size):
            batch = torch.from_numpy(squares[start : start + batch_size])[:, None]
            outputs.append(model(normalise(batch, input_size)).flatten())
    return torch.cat(outputs).numpy()


def _learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def split_images(data_dir: Path, run_dir: Path, options: TrainOptions) -> tuple[SplitImages, float]:
    """The patient-grouped split of ``data_dir/train`` (written to ``run_dir/split.csv``), decoded
    into squares through the shared cache; returns the images and the decoding time in seconds."""
    rows = split_by_patient(list_labelled(data_dir / "train"), options.val_fraction, options.seed)
    write_split_csv(rows, run_dir / "split.csv")
    train_rows = [row for row in rows if row.side == "train"]
    val_rows = [row for row in rows if row.side == "val"]
    if options.max_train_images:  # smoke runs: an evenly spaced subset keeps both classes
        train_rows = train_rows[:: max(1, len(train_rows) // options.max_train_images)]
        val_rows = val_rows[:: max(1, len(val_rows) // options.max_train_images)]

    started = time.monotonic()
    cache_dir = run_dir.parent / ".cache"
    train_squares = load_squares([row.path for row in train_rows], cache_dir)
    val_squares = load_squares([row.path for row in val_rows], cache_dir)
    train_labels = np.array([row.label for row in train_rows])
    val_labels = np.array([row.label for row in val_rows])
    decode_seconds = time.monotonic() - started
    print(f"decoded {len(train_rows)} train / {len(val_rows)} val images in {decode_seconds:.0f} s")
    return SplitImages(train_squares, train_labels, val_squares, val_labels), decode_seconds


def train(data_dir: Path, run_dir: Path, options: TrainOptions, resume: bool = False) -> dict:
    """Train, then finalise (calibration, operating point, image check) and write weights into
    ``run_dir``; returns the summary the model card is made from."""
    torch.manual_seed(options.seed)
    np.random.seed(options.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    images, decode_seconds = split_images(data_dir, run_dir, options)
    train_squares, train_labels, val_squares, val_labels = (images.train_squares, images.train_labels,
                                                            images.val_squares, images.val_labels)

    model = build_resnet18().to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(options.ema_decay), use_buffers=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    class_counts = np.bincount(train_labels, minlength=2)
    sampler = torch.utils.data.WeightedRandomSampler(
        weights=torch.as_tensor(1.0 / class_counts[train_labels], dtype=torch.double),
        num_samples=len(train_labels),
        replacement=True,
    )
    loader = torch.utils.data.DataLoader(
        SquaresDataset(train_squares, train_labels, training_transform(options.input_size)),
        batch_size=options.batch_size,
        sampler=sampler,
        drop_last=True,
    )
    total_steps = options.epochs * len(loader)
    checkpoint_path = run_dir / "checkpoint.pt"
    first_epoch, train_seconds, history = 0, 0.0, []
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimiser.load_state_dict(state["optimiser"])
        torch.set_rng_state(state["rng"])
        first_epoch, train_seconds, history = state["epoch"], state["train_seconds"], state["history"]
        print(f"resumed after epoch {first_epoch}")

    smoothing = options.label_smoothing
    for epoch in range(first_epoch, options.epochs):
        epoch_start = time.monotonic()
        model.train()
        progress = tqdm(loader, desc=f"epoch {epoch + 1}/{options.epochs}", mininterval=10)
        running = 0.0
        for step_in_epoch, (images, labels) in enumerate(progress):
            step = epoch * len(loader) + step_in_epoch
            for group in optimiser.param_groups:
                group["lr"] = _learning_rate(step, total_steps, len(loader), options.learning_rate)
            inputs = normalise(images, options.input_size).contiguous(memory_format=torch.channels_last)
            targets = labels.float() * (1 - smoothing) + smoothing / 2
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(inputs).flatten(), targets)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            ema.update_parameters(model)
            running = 0.98 * running + 0.02 * loss.item() if step_in_epoch else loss.item()
            progress.set_postfix(loss=f"{running:.3f}")
        val_logits = predict_logits(ema.module, val_squares, options.input_size)
        val = point_metrics(val_labels, calibrated_probabilities(val_logits, 1.0), 0.5)
        train_seconds += time.monotonic() - epoch_start
        history.append({"epoch": epoch + 1, "train_loss": running, "val_auc": val["roc_auc"],
                        "val_accuracy": val["accuracy"], "seconds": train_seconds})
        print(f"epoch {epoch + 1}: train loss {running:.4f} | val AUC {val['roc_auc']:.4f} "
              f"acc@0.5 {val['accuracy']:.4f} recall {val['recall']:.4f} spec {val['specificity']:.4f} "
              f"| {train_seconds / 60:.1f} min", flush=True)
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimiser": optimiser.state_dict(),
                    "rng": torch.get_rng_state(), "epoch": epoch + 1, "train_seconds": train_seconds,
                    "history": history}, checkpoint_path)

    with (run_dir / "history.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)

    save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, run_dir / WEIGHTS_NAME)
    summary = {**finalise(ema.module, images, options.input_size, run_dir),
               "train_seconds": train_seconds, "decode_seconds": decode_seconds,
               "n_train": len(train_labels), "n_val": len(val_labels), "history": history}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
