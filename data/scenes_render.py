"""Drawing of the synthetic scenes (see `data/scenes.py` for what a scene is and says).

Scenes are drawn at 4x the output size and downsampled, which antialiases edges so the pictures
look like small photos of flat shapes rather than jagged masks. Everything here is deterministic:
same scene, same Pillow -> the same pixels (the font is Pillow's bundled one, no system fonts).
"""
from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

SUPERSAMPLE = 4
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)


def shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon of `shape` centred at (cx, cy) with outer radius r (circles are drawn as ellipses)."""
    if shape == "square":
        h = r * 0.82  # same visual area as the other shapes of radius r, roughly
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)]
    if shape == "star":
        return [(cx + (r if i % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5))
                for i in range(10)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=rgb)
    else:
        draw.polygon(shape_points(shape, cx, cy, r), fill=rgb)


def render(scene, size: int) -> Image.Image:
    """RGB image of `scene` (a `data.scenes.Scene`), `size` x `size` pixels."""
    big = size * SUPERSAMPLE
    im = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for obj in scene.objects:
        _draw_shape(draw, obj.shape, obj.x * big, obj.y * big, obj.r * big, obj.rgb)
    if scene.bars:
        _draw_bars(draw, scene.bars, big)
    if scene.text:
        font = ImageFont.load_default(size=int(scene.text_size * big))
        draw.text((scene.text_xy[0] * big, scene.text_xy[1] * big), scene.text, fill=scene.text_rgb,
                  font=font, anchor="mm")
    return im.resize((size, size), Image.Resampling.LANCZOS)


def _draw_bars(draw: ImageDraw.ImageDraw, bars, big: int) -> None:
    """Vertical bars standing on a baseline; heights are fractions of the plot height."""
    left, right, base, top = 0.12 * big, 0.92 * big, 0.88 * big, 0.1 * big
    slot = (right - left) / len(bars)
    for i, (rgb, height) in enumerate(bars):
        x0 = left + slot * (i + 0.18)
        x1 = left + slot * (i + 0.82)
        draw.rectangle((x0, base - height * (base - top), x1, base), fill=rgb)
    draw.line((left - 0.02 * big, base, right, base), fill=INK, width=max(1, big // 64))
    draw.line((left - 0.02 * big, base, left - 0.02 * big, top), fill=INK, width=max(1, big // 64))
