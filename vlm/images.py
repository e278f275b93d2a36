"""Safe image loading: any real-world image in, a plain RGB `PIL.Image` out, or a clear `ImageError`.

Why a function of its own: users drop arbitrary files on the app and the data loaders meet every kind
of JPEG/PNG in the wild. The vision encoder wants 3-channel pixels, but files come as RGBA, grayscale,
palette, CMYK, 16-bit, EXIF-rotated, 16x16 or 100 megapixels, and some are truncated or hostile.
One bad file must give an error naming it, never take the process down.

Order of work, chosen to bound memory and time:
1. read only the header and refuse a decompression bomb (pixel count above `bomb_pixels`);
2. let the JPEG decoder scale down while decoding (`draft`: DCT scaling, 1/2..1/8, nearly free);
3. decode, then downscale to `max_pixels` before any mode conversion (so a 100 MP palette PNG is
   never expanded to 400 MB of RGBA);
4. apply the EXIF orientation, composite transparency on white, convert everything else to RGB.
"""
from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

ImageSource = Union[str, os.PathLike, bytes, bytearray, Image.Image]

# Above this many pixels (read from the header) a file is refused undecoded. Kept below Pillow's own
# hard limit (2 * Image.MAX_IMAGE_PIXELS ~ 179 MP) so that our message, not Pillow's, decides.
DEFAULT_BOMB_PIXELS = 150_000_000
# Decoded images are downscaled (aspect kept) to at most this many pixels: the encoder sees 224 px or
# less, and the app never needs more than a screen's worth.
DEFAULT_MAX_PIXELS = 2048 * 2048

_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


def _describe(src: ImageSource, name: str | None) -> str:
    if name:
        return name
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, (bytes, bytearray)):
        return f"<{len(src)} bytes>"
    return f"<PIL image {getattr(src, 'filename', '') or 'in memory'}>"


def _target_size(size: tuple[int, int], max_pixels: int) -> tuple[int, int]:
    """Largest size with the same aspect ratio and at most `max_pixels` pixels (never upscales)."""
    w, h = size
    if w * h <= max_pixels:
        return w, h
    scale = math.sqrt(max_pixels / (w * h))
    return max(1, int(w * scale)), max(1, int(h * scale))


def _downscale(im: Image.Image, target: tuple[int, int]) -> Image.Image:
    if im.size == target:
        return im
    if im.mode in ("1", "P", "PA"):
        # Palette/bilevel images only resample with NEAREST: shrink to ~2x the target that way,
        # convert, and let the high-quality filter do the last step in `_to_rgb`'s mode.
        w, h = im.size
        if w > 2 * target[0]:
            im = im.resize((2 * target[0], 2 * target[1]), Image.Resampling.NEAREST)
        im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB" if im.mode == "P" else "L")
    elif im.mode.startswith("I;16") or im.mode in ("I", "F"):
        im = _high_bit_depth_to_l(im)
    # reducing_gap: integer box-reduce first, then an exact filter over the last factor <= 2 (fast
    # and still antialiased).
    return im.resize(target, Image.Resampling.BICUBIC, reducing_gap=2.0)


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float grayscale -> 8-bit L, scaled (Pillow's convert would clip at 255)."""
    arr = np.asarray(im).astype(np.float32)
    if im.mode == "F":
        arr = arr * 255.0 if arr.size and float(arr.max()) <= 1.0 else arr
    elif arr.size and float(arr.max()) > 255.0:
        arr = arr / 257.0  # 16-bit range (0..65535) -> 0..255
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparent pixels become white (what a viewer shows on a white page)."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        im = _high_bit_depth_to_l(im)
    if im.mode in ("P", "L", "RGB") and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in _TRANSPARENT_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _open(src: ImageSource) -> Image.Image:
    if isinstance(src, (bytes, bytearray)):
        return Image.open(io.BytesIO(bytes(src)))
    return Image.open(Path(src))


# EXIF orientation tag value -> the transpose that shows the picture upright (as ImageOps.exif_transpose).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _decode(im: Image.Image, label: str, own_file: bool, max_pixels: int, bomb_pixels: int) -> Image.Image:
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageError(f"{label}: image has an empty size {w}x{h}")
    if w * h > bomb_pixels:
        raise ImageError(
            f"{label}: refused as a possible decompression bomb: {w}x{h} = {w * h / 1e6:.0f} MP "
            f"is above the limit of {bomb_pixels / 1e6:.0f} MP (nothing was decoded)"
        )
    # Read the orientation now: resizing and converting may drop the EXIF block.
    orientation = im.getexif().get(0x0112, 1)
    target = _target_size((w, h), max_pixels)
    if own_file and im.format == "JPEG" and target != (w, h):
        im.draft(im.mode, target)  # decode at 1/2, 1/4 or 1/8 scale, never below the target
    im.load()
    out = _to_rgb(_downscale(im, _target_size(im.size, max_pixels)))
    if orientation in _ORIENTATION:
        out = out.transpose(_ORIENTATION[orientation])
    return out


def load_image(
    src: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    bomb_pixels: int = DEFAULT_BOMB_PIXELS,
    name: str | None = None,
) -> Image.Image:
    """Load `src` (a path, the file's bytes, or a PIL image) as an RGB image of at most `max_pixels`.

    Raises `ImageError` (naming `name` or the path) for a missing, unreadable, truncated or corrupt
    file, and for a decompression bomb (more than `bomb_pixels` pixels, decided from the header
    before anything is decoded).
    """
    label = _describe(src, name)
    try:
        with warnings.catch_warnings():
            # Pillow warns above ~89 MP; our own `bomb_pixels` check below is the decision.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            own_file = not isinstance(src, Image.Image)
            opened = _open(src) if own_file else src
            try:
                return _decode(opened, label, own_file, max_pixels, bomb_pixels)
            finally:
                if own_file:
                    opened.close()
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"{label}: no such file") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{label}: not a recognised image format") from e
    except Image.DecompressionBombError as e:
        raise ImageError(f"{label}: refused as a possible decompression bomb ({e})") from e
    except MemoryError as e:
        raise ImageError(f"{label}: not enough memory to decode this image") from e
    except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError, struct.error...
        raise ImageError(f"{label}: cannot decode image ({type(e).__name__}: {e})") from e
