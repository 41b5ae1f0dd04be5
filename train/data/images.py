"""Reading an image file as the 8-bit RGB array every model here takes, whatever its pixel format.

``PIL.Image.convert("RGB")`` clips other than 8-bit data to 0..255 (a 16-bit PNG came out as two
grey levels), so :func:`to_rgb` scales by the real range instead:

- 8-bit modes (RGB, RGBA, L, P, CMYK, ...): ``convert("RGB")`` (alpha dropped, palette looked up).
- 16-bit greyscale (``I;16*``) and 32-bit integer (``I``, Pillow's mode for some 16-bit TIFFs):
  0..65535 scaled to 0..255; ``I`` values outside that range are refused. (Pillow reads 16-bit
  RGB PNGs as 8-bit RGB itself, the high byte of each value: the same scaling.)
- 32-bit float (``F``): finite values in 0..1 are scaled by 255, in 0..255 taken as is; any other
  range is refused.
"""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def read_rgb(path) -> np.ndarray:
    """The image file ``path`` as ``np.uint8[H, W, 3]`` RGB; ``ValueError`` naming the file when it
    cannot be read (not an image, truncated, over Pillow's decompression-bomb limit of about 89
    megapixels) or has no clear colour range."""
    try:
        with warnings.catch_warnings():
            # Over MAX_IMAGE_PIXELS Pillow only warns; a DCNN would then need tens of GB.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return to_rgb(im, path)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: image too large to segment ({' '.join(str(e).split())})") from e
    except (OSError, SyntaxError, EOFError) as e:  # Pillow's errors for unreadable files
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable image ({' '.join(str(e).split()) or type(e).__name__})") from e


def to_rgb(im: Image.Image, name="image") -> np.ndarray:
    """A PIL image as ``np.uint8[H, W, 3]`` RGB, scaled by its real range (module docstring)."""
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        values = np.asarray(im).astype(np.float64)
        lo, hi = values.min(initial=0), values.max(initial=0)
        if lo < 0 or hi > 65535:
            raise ValueError(f"{name}: 32-bit integer image with values {lo:.0f}..{hi:.0f}; only 0..65535 "
                             "(16-bit) has a known colour range: save it as an 8- or 16-bit image")
        return _grey(values * (255.0 / 65535.0))
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError(f"{name}: float image with NaN or infinite values")
        lo, hi = (values.min(), values.max()) if values.size else (0.0, 0.0)
        if lo < 0 or hi > 255:
            raise ValueError(f"{name}: float image with values {lo:g}..{hi:g}; only 0..1 or 0..255 have a "
                             "known colour range: rescale it to one of them, or save it as an 8-bit image")
        return _grey(values * 255.0 if hi <= 1.0 else values)
    try:
        return np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as e:
        raise ValueError(f"{name}: cannot convert a {im.mode!r} image to RGB ({e})") from e


def _grey(values: np.ndarray) -> np.ndarray:
    """``float[H, W]`` on 0..255 to ``uint8[H, W, 3]`` grey."""
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)
