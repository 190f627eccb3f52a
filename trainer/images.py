"""Open user images safely: size/pixel limits, EXIF orientation, any mode → RGB.

Images come from strangers (uploads, scraped folders), so every check happens
*before* pixels are decoded, and every failure is an :class:`ImageError` with a
reason a person can read. Pillow's own global bomb limit is left alone; we check
the header size ourselves.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from trainer.errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageLimits:
    """Upper bounds for one image; the defaults fit 8K photos, not bombs."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 64 * 1024 * 1024  # 8192 x 8192


DEFAULT_LIMITS = ImageLimits()
# A picture's fingerprint: an 8×8 RGB average (colour and layout) then a 16×16 grey average (shapes), both blind
# to resizing and re-compression. 192 + 256 bytes.
COLOUR_SIDE, SHAPE_SIDE = 8, 16
FINGERPRINT_BYTES = 3 * COLOUR_SIDE ** 2 + SHAPE_SIDE ** 2


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Scale a high-bit-depth or float array into 0..255."""
    array = array.astype(np.float64)
    lo, hi = float(array.min()), float(array.max())
    if array.dtype.kind == "f" and 0.0 <= lo and hi <= 1.0:
        return (array * 255.0).round().astype(np.uint8)
    top = 65535.0 if hi > 255 else 255.0
    return np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = Image.fromarray(_to_uint8(np.asarray(img)), mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image(path: str | os.PathLike, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Open ``path`` as an RGB image with EXIF orientation applied.

    Raises:
        ImageError: the file is empty, too large, not an image, truncated,
            or its pixel count exceeds ``limits.max_pixels``.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageError(f"{path.name}: cannot read file ({err.strerror})") from None
    if size == 0:
        raise ImageError(f"{path.name}: file is empty (0 bytes)")
    if size > limits.max_bytes:
        raise ImageError(
            f"{path.name}: file is {size / 2**20:.0f} MB, over the {limits.max_bytes / 2**20:.0f} MB limit"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > limits.max_pixels:
                    raise ImageError(
                        f"{path.name}: {width}x{height} pixels is over the limit of "
                        f"{limits.max_pixels / 1e6:.0f} megapixels (possible decompression bomb)"
                    )
                if getattr(img, "n_frames", 1) > 1:
                    img.seek(0)  # animated: train on the first frame
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # Pillow refuses very large images inside Image.open, before the size check above: its message has the count
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "the image"
        raise ImageError(f"{path.name}: {size} is over the limit of {limits.max_pixels / 1e6:.0f} megapixels "
                         "(possible decompression bomb); scale it down first") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path.name}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{path.name}: damaged or truncated image ({err})") from None


def fingerprint(img: Image.Image) -> bytes:
    """Box averages of ``img`` (see ``COLOUR_SIDE``): nearly the same for a picture and its resized or re-saved
    copies, which is what ``trainer.dataset_check`` compares."""
    rgb = img.convert("RGB")
    colour = rgb.resize((COLOUR_SIDE, COLOUR_SIDE), Image.Resampling.BOX).tobytes()
    return colour + rgb.convert("L").resize((SHAPE_SIDE, SHAPE_SIDE), Image.Resampling.BOX).tobytes()


def shown_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the image at ``path`` as :func:`open_image` returns it (EXIF rotation applied), read
    from the header without decoding pixels.

    Raises:
        ImageError: not an image Pillow can read.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.format == "PNG":  # its getexif() decodes every pixel to look for an eXIf chunk after them
                exif = Image.Exif()
                if img.info.get("exif"):
                    exif.load(img.info["exif"])
            else:
                exif = img.getexif()
            turned = exif.get(0x0112) in (5, 6, 7, 8)  # orientations that swap the sides
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"{Path(path).name}: not an image Pillow can read ({err})") from None
    return (height, width) if turned else (width, height)
