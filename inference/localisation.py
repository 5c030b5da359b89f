"""Localisation — does the heatmap point at the finding? Heatmaps and radiologist boxes become the
pointing game and the share of heatmap energy inside the boxes, with two baselines.

* **Pointing game**: is the heatmap's peak inside one of the image's boxes? Baseline: the image
  centre (a "heatmap" that always peaks in the middle).
* **Energy in boxes**: the share of the heatmap's total (after ReLU, resized to the image the same
  way as the shown heatmap) that falls inside the boxes. Baseline: a uniform map, whose share is
  the boxes' area.

Boxes are ``(x, y, width, height)`` as fractions of the image; only images with at least one box
count. Figures come with 95 % percentile-bootstrap CIs over images.
"""

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from inference.gradcam import Heatmap, relative_map

GRID = 224  # heatmaps are compared with boxes on this grid (the model's square)
BOOTSTRAP_ROUNDS = 2000


def box_grid(boxes, size: int = GRID) -> np.ndarray:
    """size×size bool: inside any of ``boxes``."""
    inside = np.zeros((size, size), dtype=bool)
    for x, y, w, h in boxes:
        inside[round(y * size) : round((y + h) * size), round(x * size) : round((x + w) * size)] = True
    return inside


def upsampled(cam: torch.Tensor, size: int = GRID, kind: Heatmap = Heatmap.GRADCAM) -> np.ndarray:
    """An h×w class map (or a shown heatmap) → the relative map ``kind`` shows, size×size, resized
    like the shown heatmap (bilinear)."""
    return (
        F.interpolate(
            relative_map(cam.float(), kind)[None, None], size=(size, size), mode="bilinear", align_corners=False
        )[0, 0]
        .clamp_min(0)
        .numpy()
    )


def image_figures(cam: torch.Tensor, boxes, kind: Heatmap = Heatmap.GRADCAM) -> dict[str, float]:
    """Pointing hit, energy share and both baselines for one image's map and boxes. A blank map
    points nowhere (no hit) and spreads nothing (energy share 0)."""
    inside = box_grid(boxes)
    heat = upsampled(cam, kind=kind)
    peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
    total = float(heat.sum())  # 0: a blank map
    return {
        "pointing": float(inside[peak]) if total > 0 else 0.0,
        "pointing_centre": float(inside[GRID // 2, GRID // 2]),
        "energy": float(heat[inside].sum() / total) if total > 0 else 0.0,
        "energy_uniform": float(inside.mean()),
    }


def localisation_figures(cams, boxes_per_image, kind: Heatmap = Heatmap.GRADCAM, seed: int = 0) -> dict:
    """Mean figures (with 95 % bootstrap CIs) over the images that have boxes."""
    rows = [image_figures(cam, boxes, kind) for cam, boxes in zip(cams, boxes_per_image) if boxes]
    if not rows:
        return {"n": 0}
    names = list(rows[0])
    values = np.array([[row[name] for name in names] for row in rows])
    rng = np.random.default_rng(seed)
    resampled = np.stack(
        [values[rng.integers(0, len(values), len(values))].mean(axis=0) for _ in range(BOOTSTRAP_ROUNDS)]
    )
    result: dict = {"n": len(rows)}
    for column, name in enumerate(names):
        result[name] = float(values[:, column].mean())
        result.setdefault("ci95", {})[name] = [
            float(np.quantile(resampled[:, column], 0.025)),
            float(np.quantile(resampled[:, column], 0.975)),
        ]
    return result


def describe(figures: dict) -> str:
    """One line for people."""
    if not figures.get("n"):
        return "no image with boxes"

    def value(name: str) -> str:
        low, high = figures["ci95"][name]
        return f"{figures[name]:.3f} ({low:.3f}–{high:.3f})"

    return (
        f"n = {figures['n']} boxed images: heatmap peak in a box {value('pointing')} vs image centre "
        f"{value('pointing_centre')}; heatmap energy in boxes {value('energy')} vs uniform map "
        f"{value('energy_uniform')}"
    )


def read_boxes_csv(path) -> dict[str, tuple[str, float | None, float | None]]:
    """A boxes CSV (comma- or tab-separated, like the adult set's MANIFEST.tsv) → ``{file: (boxes text,
    width, height)}``. Columns: ``file``; ``rsna_boxes`` or ``boxes`` ("x y w h;x y w h", pixels);
    optionally ``orig_width`` / ``orig_height`` (or ``width`` / ``height``): the pixel space of the
    boxes — without them, the boxes are in the image's own pixels."""
    text = Path(path).read_text()
    rows = csv.DictReader(text.splitlines(), delimiter="\t" if "\t" in text.splitlines()[0] else ",")
    columns = set(rows.fieldnames or [])
    box_column = "rsna_boxes" if "rsna_boxes" in columns else "boxes"
    if "file" not in columns or box_column not in columns:
        raise ValueError(f"{path} needs a 'file' and a 'boxes' (or 'rsna_boxes') column; it has {sorted(columns)}")
    width_column = next((c for c in ("orig_width", "width") if c in columns), None)
    height_column = next((c for c in ("orig_height", "height") if c in columns), None)
    boxes = {}
    for row in rows:
        if (row[box_column] or "").strip():
            boxes[row["file"]] = (
                row[box_column],
                float(row[width_column]) if width_column else None,
                float(row[height_column]) if height_column else None,
            )
    return boxes
