"""Reading an image file as the 8-bit RGB array every model here takes, whatever its pixel format.

``PIL.Image.convert("RGB")`` clips other than 8-bit data to 0..255: a 16-bit PNG
(0..65535) came out as two grey levels. :func:`read_rgb` scales by the real range instead:

- 8-bit modes (RGB, RGBA, LA, L, 1, P palette, CMYK, YCbCr, ...): ``convert("RGB")``; an alpha
  channel is dropped, a palette looked up, CMYK converted.
- 16-bit greyscale (``I;16``, ``I;16B``, ...): 0..65535 scaled to 0..255. Pillow reads 16-bit
  RGB PNGs as 8-bit RGB itself (the high byte of each value), which is that same scaling.
- 32-bit integer (``I``; Pillow's mode for some 16-bit files, e.g. TIFF): taken as 16-bit,
  0..65535; values outside that range are refused (nothing says what their range means).
- 32-bit float (``F``, e.g. a float TIFF): refused unless every value is finite and in 0..1
  (scaled by 255) or, when some value exceeds 1, in 0..255 (taken as is); a float image with
  any other range has no obvious meaning as colours.

Anything that cannot be read (not an image, truncated, corrupt) and images over Pillow's
decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, about 89 megapixels) are a
``ValueError`` naming the file.
"""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

__all__ = ["read_rgb", "to_rgb"]

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def read_rgb(path) -> np.ndarray:
    """The image file ``path`` as ``np.uint8[H, W, 3]`` RGB (see the module docstring for the
    rules); ``ValueError`` naming the file when it cannot be read or has no clear colour range."""
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
    if im.mode in _SIXTEEN_BIT:
        return _grey(np.asarray(im).astype(np.float64) * (255.0 / 65535.0))
    if im.mode == "I":
        values = np.asarray(im)
        lo, hi = int(values.min(initial=0)), int(values.max(initial=0))
        if lo < 0 or hi > 65535:
            raise ValueError(f"{name}: 32-bit integer image with values {lo}..{hi}; only 0..65535 (16-bit) "
                             "has a known colour range: save it as an 8- or 16-bit image")
        return _grey(values.astype(np.float64) * (255.0 / 65535.0))
    if im.mode == "F":
        return _grey(_float_scale(np.asarray(im, dtype=np.float64), name))
    try:
        return np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as e:
        raise ValueError(f"{name}: cannot convert a {im.mode!r} image to RGB ({e})") from e


def _float_scale(values: np.ndarray, name) -> np.ndarray:
    """A float image's values on 0..255: 0..1 is scaled by 255, 0..255 taken as is, others refused."""
    if values.size == 0:
        return values
    if not np.isfinite(values).all():
        raise ValueError(f"{name}: float image with NaN or infinite values")
    lo, hi = float(values.min()), float(values.max())
    if lo < 0 or hi > 255:
        raise ValueError(f"{name}: float image with values {lo:g}..{hi:g}; only 0..1 or 0..255 have a "
                         "known colour range: rescale it to one of them, or save it as an 8-bit image")
    return values * 255.0 if hi <= 1.0 else values


def _grey(values: np.ndarray) -> np.ndarray:
    """``float[H, W]`` on 0..255 to ``uint8[H, W, 3]`` grey."""
    grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)
