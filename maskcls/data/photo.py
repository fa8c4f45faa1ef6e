"""Opening a photo the one way every part of the project does: training's cache, the decode check,
the face detector, prediction and the README's onnxruntime recipe.

- Upright: a phone photo stores its pixels sideways with an EXIF orientation; it is turned as a
  photo viewer shows it (PIL's `ImageOps.exif_transpose`), so face boxes and crops are in the
  frame a person sees.
- RGB with 8 bits: 16-bit greyscale (PNG `I;16`, or `I`) is scaled down by 256 instead of clipped,
  which would make every such photo white; palette, greyscale and RGBA photos convert as PIL does.
- Not a decompression bomb: a photo of more than PIL's MAX_IMAGE_PIXELS (89 million) is refused
  as undecodable before its pixels are read.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# What "not a decodable image" covers: PIL's own errors and a photo too large to decode.
UNDECODABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the photo as shown, its EXIF orientation applied."""
    orientation = img.getexif().get(_ORIENTATION, 1)
    return (img.height, img.width) if orientation in _TURNED else (img.width, img.height)


def open_rgb(path: str | Path) -> Image.Image:
    """The photo, upright, as 8-bit RGB (see the module docstring); errors are UNDECODABLE."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as file:  # PIL's size check warns here; as an error
                img = ImageOps.exif_transpose(file)
                return _eight_bit_rgb(img)
        except Image.DecompressionBombWarning as err:
            raise Image.DecompressionBombError(str(err)) from None


def _eight_bit_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(img, dtype=np.uint32)
        return Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        return Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def decodes(path: str | Path) -> None:
    """Raises an UNDECODABLE error unless the whole photo decodes (JPEG at 1/4 size: still every byte)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as img:
                img.draft("RGB", (img.width // 4, img.height // 4))
                img.load()
        except Image.DecompressionBombWarning as err:
            raise Image.DecompressionBombError(str(err)) from None
