"""Training — a Kaggle-layout pediatric folder (and, optionally, the adult set) becomes calibrated
ResNet-18 weights and a model card.

Steps: patient-grouped validation split carved from ``train/`` (and the adult manifest) → decode once
into a cache → from-scratch training with population- and class-balanced sampling, per-label-source
loss weights, a box loss on the RSNA-boxed positives, augmentation, AdamW with warm-up + cosine decay
and an exponential moving average (EMA) of the weights → each population's temperature and threshold
on validation →
``RUN_DIR/lungvision-resnet18.safetensors`` + ``model_card.json``. A checkpoint is written every
epoch; ``resume=True`` continues from it.
"""

import csv
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import torch
from safetensors.torch import save_file
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from inference.augment import training_transform
from inference.dataset import adult_rows, list_labelled, load_squares
from inference.finalise import SplitImages, finalise, population_validation
from inference.localisation import box_grid
from inference.network import build_resnet18
from inference.precision import Precision, autocast
from inference.preprocess import normalise
from inference.split import SplitRow, assign_sides, kermany_rows, write_split_csv

WEIGHTS_NAME = "lungvision-resnet18.safetensors"


@dataclass
class TrainOptions:
    """Hyper-parameters of one training run (their reasons are in the model card)."""

    epochs: int = 9
    input_size: int = 160
    batch_size: int = 32
    learning_rate: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.05
    ema_decay: float = 0.998
    val_fraction: float = 0.15  # children: share of each class's patients held out for validation
    adult_val_fraction: float = 0.2  # adults: share of each (folder, source) stratum's patient groups
    seed: int = 42
    augment: bool = True
    use_other: bool = True  # the adult set's OTHER folder (abnormal, not pneumonia) as negatives
    nih_positive_weight: float = 0.5  # loss weight of NIH's text-mined pneumonia labels (about half confirmed)
    adult_share: float | None = 0.5  # share of each batch drawn from adults; None: as many as the data holds
    localisation_weight: float = 0.5  # auxiliary loss: the class map of RSNA-boxed positives against the boxes
    ablation_epoch: int | None = 5  # keep checkpoint-epoch<N>.pt, where scripts/ablate.py branches off
    samples_per_epoch: int | None = 12000  # images drawn per epoch (None: as many as the training side holds)
    mixed_precision: bool = True  # forward pass in bfloat16 autocast (weights, optimiser and losses stay fp32)
    max_train_images: int | None = None  # for smoke tests only


class SquaresDataset(torch.utils.data.Dataset):
    """Cached squares with labels, loss weights and box masks; ``transform`` (a ``TrainingTransform``,
    or None) turns a 1×224×224 uint8 square into model input and moves its box mask with it."""

    def __init__(
        self,
        squares: np.ndarray,
        labels: np.ndarray,
        transform=None,
        weights: np.ndarray | None = None,
        boxes: list | None = None,
        input_size: int = 224,
    ) -> None:
        self.squares, self.labels, self.transform = squares, labels, transform
        self.weights = np.ones(len(labels), dtype=np.float32) if weights is None else weights
        self.boxes = boxes or [()] * len(labels)
        self.input_size = input_size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float, float, torch.Tensor, bool]:
        image = torch.from_numpy(self.squares[index])[None]
        boxes = self.boxes[index]
        mask = box_mask(boxes, image.shape[-1])
        if self.transform is not None:
            image, mask = self.transform.with_mask(image, mask)
        else:
            image = image.float() / 255.0
        if mask.shape[-1] != self.input_size:
            mask = torch.nn.functional.interpolate(mask[None].float(), size=(self.input_size,) * 2)[0]
        return image, float(self.labels[index]), float(self.weights[index]), mask.float(), bool(boxes)


def box_mask(boxes, size: int) -> torch.Tensor:
    """1×size×size uint8 mask: 1 inside any of ``boxes`` (fractions x, y, w, h), 0 elsewhere."""
    return torch.from_numpy(box_grid(boxes, size)).to(torch.uint8)[None]


def sample_weights(rows: list[SplitRow], adult_share: float | None) -> np.ndarray:
    """Sampling weight per training image: each population gets its share of the draws (``adult_share``
    for adults; None: its share of the data) and, within a population, both classes equally many."""
    populations = np.array([row.population for row in rows])
    labels = np.array([row.label for row in rows])
    weights = np.zeros(len(rows))
    for population in np.unique(populations):
        members = populations == population
        if adult_share is None or len(np.unique(populations)) == 1:
            share = members.mean()
        else:
            share = adult_share if population == "adults" else 1.0 - adult_share
        for label in (0, 1):
            cell = members & (labels == label)
            if cell.any():
                weights[cell] = share / 2 / cell.sum()
    return weights


def loss_weights(rows: list[SplitRow], nih_positive_weight: float) -> np.ndarray:
    """Loss weight per training image: NIH's text-mined positives count ``nih_positive_weight``."""
    return np.array(
        [nih_positive_weight if row.label == 1 and row.label_source == "nlp-report-mining" else 1.0 for row in rows],
        dtype=np.float32,
    )


def _learning_rate(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def split_images(
    data_dir: Path, run_dir: Path, options: TrainOptions, adult_dir: Path | None = None
) -> tuple[SplitImages, float]:
    """The patient-grouped split of ``data_dir/train`` (children) and, if given, of the adult set in
    ``adult_dir`` (written to ``run_dir/split.csv``), decoded into squares through the shared cache;
    returns the images and the decoding time in seconds."""
    rows = kermany_rows(list_labelled(data_dir / "train"))
    fractions = {"children": options.val_fraction, "adults": options.adult_val_fraction}
    if adult_dir is not None:
        rows += adult_rows(adult_dir, options.use_other)
    rows = assign_sides(rows, fractions, options.seed)
    write_split_csv(rows, run_dir / "split.csv")
    train_rows = [row for row in rows if row.side == "train"]
    val_rows = [row for row in rows if row.side == "val"]
    if options.max_train_images:  # smoke runs: an evenly spaced subset keeps both classes
        train_rows = train_rows[:: max(1, len(train_rows) // options.max_train_images)]
        val_rows = val_rows[:: max(1, len(val_rows) // options.max_train_images)]

    started = time.monotonic()
    cache_dir = run_dir.parent / ".cache"
    images = SplitImages.of(
        train_rows,
        val_rows,
        load_squares([row.path for row in train_rows], cache_dir),
        load_squares([row.path for row in val_rows], cache_dir),
    )
    decode_seconds = time.monotonic() - started
    print(f"decoded {len(train_rows)} train / {len(val_rows)} val images in {decode_seconds:.0f} s")
    return images, decode_seconds


def class_map_logits(features: torch.Tensor, fc: torch.nn.Linear) -> torch.Tensor:
    """The pneumonia logit at every position of the layer4 features (N×C×h×w → N×h×w); their mean is
    the network's output, and their positive part is the Grad-CAM heatmap (``inference.gradcam``)."""
    return torch.einsum("nchw,c->nhw", features, fc.weight[0]) + fc.bias[0]


def training_loader(
    images: SplitImages, options: TrainOptions, keep: np.ndarray | None = None
) -> torch.utils.data.DataLoader:
    """Batches of augmented training images (with labels, loss weights, box masks), drawn with the
    population and class balance of ``options``; ``keep`` (bool per training image) drops the others."""
    rows = images.train_rows
    weights = sample_weights(rows, options.adult_share) * (1.0 if keep is None else keep)
    draws = options.samples_per_epoch or len(rows)
    sampler = torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(weights, dtype=torch.double),  # type: ignore[arg-type]  # a tensor, as torch's docs say
        num_samples=min(draws, len(rows)) if options.max_train_images else draws,
        replacement=True,
    )
    dataset = SquaresDataset(
        images.train_squares,
        images.train_labels,
        training_transform(options.input_size) if options.augment else None,
        loss_weights(rows, options.nih_positive_weight),
        [row.boxes for row in rows],
        options.input_size,
    )
    return torch.utils.data.DataLoader(dataset, batch_size=options.batch_size, sampler=sampler, drop_last=True)


class LossStep:
    """One optimisation step: weighted, label-smoothed BCE of the image logit, plus (for RSNA-boxed
    positives) the box loss — BCE of the class map's logit in every layer4 cell against the share of
    the cell inside the boxes."""

    def __init__(self, model: torch.nn.Module, options: TrainOptions) -> None:
        self.model, self.options = model, options
        self.layer4: list[torch.Tensor] = []
        layer4 = cast(torch.nn.Module, model.layer4)  # a ResNet's
        layer4.register_forward_hook(lambda _module, _inputs, output: self.layer4.append(output))

    def __call__(self, batch, optimiser: torch.optim.Optimizer, learning_rate: float) -> float:
        images, labels, weights, masks, boxed = batch
        options, model = self.options, self.model
        for group in optimiser.param_groups:
            group["lr"] = learning_rate
        inputs = normalise(images, options.input_size).contiguous(memory_format=torch.channels_last)
        targets = labels.float() * (1 - options.label_smoothing) + options.label_smoothing / 2
        self.layer4.clear()
        with autocast(Precision.BF16 if options.mixed_precision else Precision.FP32):
            logits = model(inputs).flatten().float()
        per_image = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        loss = (per_image * weights).sum() / weights.sum()
        if options.localisation_weight and boxed.any():
            cell_logits = class_map_logits(self.layer4[0][boxed].float(), cast(torch.nn.Linear, model.fc))
            # a Size is a tuple of ints, which torch's type for output_size leaves out
            cell_targets = torch.nn.functional.adaptive_avg_pool2d(
                masks[boxed],
                cell_logits.shape[-2:],  # type: ignore[arg-type]
            )[:, 0]
            loss = loss + options.localisation_weight * torch.nn.functional.binary_cross_entropy_with_logits(
                cell_logits, cell_targets
            )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return loss.item()


def train(
    data_dir: Path, run_dir: Path, options: TrainOptions, resume: bool = False, adult_dir: Path | None = None
) -> dict:
    """Train, then finalise (calibration, operating points, image check) and write weights into
    ``run_dir``; returns the summary the model card is made from."""
    torch.manual_seed(options.seed)
    np.random.seed(options.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    images, decode_seconds = split_images(data_dir, run_dir, options, adult_dir)

    model = build_resnet18().to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(options.ema_decay), use_buffers=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay)
    loader = training_loader(images, options)
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

    step = LossStep(model, options)
    for epoch in range(first_epoch, options.epochs):
        epoch_start = time.monotonic()
        model.train()
        progress = tqdm(loader, desc=f"epoch {epoch + 1}/{options.epochs}", mininterval=10)
        running = 0.0
        for step_in_epoch, batch in enumerate(progress):
            learning_rate = _learning_rate(
                epoch * len(loader) + step_in_epoch, total_steps, len(loader), options.learning_rate
            )
            loss = step(batch, optimiser, learning_rate)
            ema.update_parameters(model)
            running = 0.98 * running + 0.02 * loss if step_in_epoch else loss
            progress.set_postfix(loss=f"{running:.3f}")
        train_seconds += time.monotonic() - epoch_start
        figures = population_validation(ema.module, images, options.input_size)
        history.append({"epoch": epoch + 1, "train_loss": running, "seconds": train_seconds, **figures})
        print(
            f"epoch {epoch + 1}: train loss {running:.4f} | "
            + " | ".join(f"{key} {value:.4f}" for key, value in figures.items())
            + f" | {train_seconds / 60:.1f} min",
            flush=True,
        )
        torch.save(
            {
                "model": model.state_dict(),
                "ema": ema.state_dict(),
                "optimiser": optimiser.state_dict(),
                "rng": torch.get_rng_state(),
                "epoch": epoch + 1,
                "train_seconds": train_seconds,
                "history": history,
            },
            checkpoint_path,
        )
        if epoch + 1 == options.ablation_epoch:
            shutil.copyfile(checkpoint_path, run_dir / f"checkpoint-epoch{epoch + 1}.pt")

    with (run_dir / "history.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[-1]))
        writer.writeheader()
        writer.writerows(history)

    save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, run_dir / WEIGHTS_NAME)
    summary = {
        **finalise(ema.module, images, options.input_size, run_dir),
        "train_seconds": train_seconds,
        "decode_seconds": decode_seconds,
        "n_train": len(images.train_labels),
        "n_val": len(images.val_labels),
        "history": history,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
