"""Overlay — a gray image and its heatmap become an RGB picture with a burned-in legend.

Used for ``lungvision analyze`` PNGs and for the worker's Secondary Capture, so radiologists see
the same picture everywhere.
"""

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

HEAT_COLORMAP = "jet"
MAX_BLEND = 0.5  # at full heat the colour covers half of the pixel; the anatomy stays visible
HEAT_FLOOR = 0.15  # heat below this is not coloured at all


def _display_uint8(gray: np.ndarray) -> np.ndarray:
    low, high = np.percentile(gray, [0.5, 99.5])
    scaled = (gray.astype(np.float32) - low) / max(float(high - low), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def resize_long_side(image: Image.Image, max_long_side: int) -> Image.Image:
    """Shrink ``image`` so that its longer side is at most ``max_long_side`` pixels."""
    scale = max_long_side / max(image.size)
    if scale >= 1:
        return image
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)


def render_overlay(gray: np.ndarray, heatmap: np.ndarray, legend: list[str], max_long_side: int = 1024) -> np.ndarray:
    """Shrink to ``max_long_side``, blend the heatmap over the gray image and burn ``legend`` in.

    Returns an H×W×3 uint8 RGB array. Heat is shown only where it exceeds ``HEAT_FLOOR``, fading in
    from there, so a low-probability map (see ``inference.gradcam``) barely tints the image.
    """
    base = resize_long_side(Image.fromarray(_display_uint8(gray), "L"), max_long_side)
    heat = np.asarray(Image.fromarray(heatmap.astype(np.float32), "F").resize(base.size, Image.BILINEAR))
    heat = np.clip(heat, 0, 1)[..., None]
    colours = colormaps[HEAT_COLORMAP](heat[..., 0])[..., :3] * 255.0
    alpha = np.clip((heat - HEAT_FLOOR) / (1 - HEAT_FLOOR), 0, 1) * MAX_BLEND  # fades in above the floor
    gray_rgb = np.asarray(base, dtype=np.float32)[..., None]
    picture = Image.fromarray((gray_rgb * (1 - alpha) + colours * alpha).astype(np.uint8), "RGB")
    _draw_legend(picture, legend)
    return np.asarray(picture)


def _draw_legend(picture: Image.Image, lines: list[str]) -> None:
    size = max(12, picture.height // 40)
    font = ImageFont.load_default(size=size)
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
    ramp = (colormaps[HEAT_COLORMAP](np.linspace(0, 1, bar_width))[:, :3] * 255).astype(np.uint8)
    picture.paste(Image.fromarray(np.repeat(ramp[None], bar_height, axis=0), "RGB"), (bar_left, bar_top))
    draw.text((bar_left, bar_top + bar_height + 2), "0", fill=(255, 255, 255), font=font)
    draw.text((bar_left + bar_width - size, bar_top + bar_height + 2), "1", fill=(255, 255, 255), font=font)


def legend_lines(probability: float, positive: bool, threshold: float, model_version: str) -> list[str]:
    """The legend every Lung Vision picture carries."""
    return [
        f"Pneumonia probability {probability:.2f}  ({'POSITIVE' if positive else 'NEGATIVE'} at threshold {threshold:.2f})",
        f"Lung Vision {model_version}",
        "NOT FOR DIAGNOSTIC USE",
    ]
