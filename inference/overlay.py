"""Overlay — a gray image and its heatmap become an RGB picture with a burned-in legend.

Used for ``lungvision analyze`` PNGs and for the worker's Secondary Capture, so radiologists see
the same picture everywhere.

The picture is made at its final size first (``display_size``): the gray image is shrunk with an
area-averaging (box) filter, its display window is taken from the shrunk picture, and heat, colour
and blending work on that picture's pixels only — a 2500×2000 radiograph costs one pass over its
full-size pixels. The heatmap is best given at the picture's size already (``display_size``);
another size is stretched to it.
"""

import functools
import math

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

HEAT_COLORMAP = "jet"
MAX_BLEND = 0.5  # at full heat the colour covers half of the pixel; the anatomy stays visible
HEAT_FLOOR = 0.15  # heat below this is not coloured at all
WINDOW_PERCENTILES = (0.5, 99.5)  # the display window: gray values between these percentiles of the picture
WINDOW_SAMPLES = 50_000  # ...taken from about this many of its pixels, on a regular grid (≈ 250 in each tail)
LEVELS = 256  # heat is drawn in 256 steps: one per palette entry


def display_size(shape: tuple[int, int], max_long_side: int) -> tuple[int, int]:
    """(rows, columns) of the picture of an image of ``shape``: shrunk so that its longer side is at
    most ``max_long_side`` pixels, aspect ratio kept; never enlarged."""
    rows, columns = shape
    scale = max_long_side / max(rows, columns)
    if scale >= 1:
        return rows, columns
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def render_overlay(gray: np.ndarray, heatmap: np.ndarray, legend: list[str], max_long_side: int = 1024) -> np.ndarray:
    """Shrink to ``max_long_side``, blend the heatmap over the gray image and burn ``legend`` in.

    Returns an H×W×3 uint8 RGB array of ``display_size(gray.shape, max_long_side)``. Heat is shown
    only where it exceeds ``HEAT_FLOOR``, fading in from there, so a low-probability map (see
    ``inference.gradcam``) barely tints the image. The two steps, ``display_picture`` then
    ``blend_overlay``, can be taken apart: the first needs no heatmap.
    """
    return blend_overlay(display_picture(gray, max_long_side), heatmap, legend)


def display_picture(gray: np.ndarray, max_long_side: int = 1024) -> Image.Image:
    """The gray image as the overlay shows it: shrunk to ``display_size(gray.shape, max_long_side)`` and
    windowed to 8 bits — the one pass over the full-size pixels, and most of ``render_overlay``'s time."""
    return _display_gray(gray, display_size(gray.shape, max_long_side))


def blend_overlay(picture: Image.Image, heatmap: np.ndarray, legend: list[str]) -> np.ndarray:
    """``heatmap`` blended over ``picture`` (``display_picture``'s, left unchanged) with ``legend`` burned in:
    ``render_overlay``'s result."""
    size = (picture.height, picture.width)
    coloured = picture.convert("RGB")
    heat = _heat_levels(heatmap, size)
    colours = heat.copy()
    colours.putpalette(_heat_palette())  # heat level → jet colour, in C
    coloured.paste(colours.convert("RGB"), mask=heat.point(_blend_table()))  # blended as the mask says
    _draw_legend(coloured, legend)
    return np.asarray(coloured)


def _resized(pixels: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """A float 2-D array resized to ``size`` (rows, columns); the same array when it has that size."""
    if pixels.shape == size:
        return pixels
    image = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), "F")
    return np.asarray(image.resize((size[1], size[0]), resample))


def _display_gray(gray: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The gray image at ``size``, windowed to 8 bits between the percentiles of ``WINDOW_PERCENTILES``.

    Shrinking averages areas (box filter: no ringing, no aliasing), then the window is taken from the
    shrunk picture — from ``WINDOW_SAMPLES`` of its pixels, ample for two percentiles.
    """
    shrunk = _resized(gray, size, Image.Resampling.BOX)
    step = max(1, math.isqrt(shrunk.size // WINDOW_SAMPLES))
    low, high = np.percentile(shrunk[::step, ::step], WINDOW_PERCENTILES)
    scale = 255.0 / max(float(high - low), 1e-6)
    windowed = shrunk - low  # then in place: each new picture-sized array is fresh memory to fault in
    windowed *= scale
    return Image.fromarray(np.clip(windowed, 0, 255, out=windowed).astype(np.uint8), "L")


def _heat_levels(heatmap: np.ndarray, size: tuple[int, int]) -> Image.Image:
    """The 0..1 heatmap at ``size`` as 8-bit levels (0..255), stretched bilinearly if it has another size."""
    levels = np.clip(_resized(heatmap, size, Image.Resampling.BILINEAR), 0, 1)  # a new array: scaled in place
    levels *= LEVELS - 1
    levels += 0.5
    return Image.fromarray(levels.astype(np.uint8), "L")


@functools.cache
def _heat_palette() -> bytes:
    """The colormap as a 256-entry RGB palette: level i has the colour of heat i/255."""
    return (colormaps[HEAT_COLORMAP](np.linspace(0, 1, LEVELS))[:, :3] * 255).astype(np.uint8).tobytes()


@functools.cache
def _blend_table() -> list[int]:
    """Heat level → how much of the colour covers the pixel (0..255): nothing up to ``HEAT_FLOOR``,
    fading in to ``MAX_BLEND`` at full heat."""
    heat = np.linspace(0, 1, LEVELS)
    alpha = np.clip((heat - HEAT_FLOOR) / (1 - HEAT_FLOOR), 0, 1) * MAX_BLEND
    return np.round(alpha * 255).astype(int).tolist()


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _heat_ramp(width: int) -> np.ndarray:
    """The palette's colours from heat 0 to 1 across ``width`` pixels (width × 3 uint8)."""
    palette = np.frombuffer(_heat_palette(), dtype=np.uint8).reshape(LEVELS, 3)
    return palette[np.linspace(0, LEVELS - 1, width).round().astype(np.intp)]


def _draw_legend(picture: Image.Image, lines: list[str]) -> None:
    size = max(12, picture.height // 40)
    font = _font(size)
    draw = ImageDraw.Draw(picture)
    margin = size // 2
    line_height = int(size * 1.3)
    width = max(draw.textlength(line, font=font) for line in lines) + 2 * margin
    box_height = line_height * len(lines) + 2 * margin
    draw.rectangle([0, 0, width, box_height], fill=(0, 0, 0))
    for row, line in enumerate(lines):
        draw.text((margin, margin + row * line_height), line, fill=(255, 255, 255), font=font)
    # Colour bar: the heat scale from 0 to 1, under the text.
    bar_top, bar_left = box_height + margin, margin
    bar_width, bar_height = max(64, int(width) - 2 * margin), max(6, size // 2)
    ramp = np.repeat(_heat_ramp(bar_width)[None], bar_height, axis=0)
    picture.paste(Image.fromarray(ramp, "RGB"), (bar_left, bar_top))
    draw.text((bar_left, bar_top + bar_height + 2), "0", fill=(255, 255, 255), font=font)
    draw.text((bar_left + bar_width - size, bar_top + bar_height + 2), "1", fill=(255, 255, 255), font=font)


def legend_lines(probability: float, positive: bool, threshold: float, model_version: str) -> list[str]:
    """The legend every Lung Vision picture carries."""
    return [
        f"Pneumonia probability {probability:.2f}  "
        f"({'POSITIVE' if positive else 'NEGATIVE'} at threshold {threshold:.2f})",
        f"Lung Vision {model_version}",
        "NOT FOR DIAGNOSTIC USE",
    ]
