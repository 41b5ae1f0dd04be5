"""What a run leaves to read: result tables, metrics JSON and pictures drawn with PIL (VOC palette
label PNGs, overlays, the example grid with its colour legend, the band-accuracy chart), all
written atomically (:func:`models.files.atomic_write`)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.files import atomic_write

from .data import VOID


# ----------------------------------------------------------------------------- tables and JSON
def format_table(rows) -> str:
    """A text table of ``rows`` = [(name, result dict of engine.evaluate)]: mIoU %, pixel accuracy %
    and the accuracy within the middle band width of a boundary %."""
    if not rows:
        return ""
    bands = rows[0][1]["band_accuracy"]["bands"]
    k = len(bands) // 2
    head = ["model", "mIoU %", "pixel acc %", f"acc ≤{bands[k]:g}px of edge %"]
    body = []
    for name, res in rows:
        acc = res["band_accuracy"]["accuracy"][k]
        body.append([name, f"{100 * res['miou']:.2f}", f"{100 * res['pixel_accuracy']:.2f}",
                     "n/a" if acc is None else f"{100 * acc:.2f}"])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]

    def line(r):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    sep = "-" * len(line(head))
    return "\n".join([sep, line(head), sep] + [line(r) for r in body] + [sep])


def per_class_table(rows) -> str:
    """Per-class IoU % of each row of :func:`format_table` (a class absent from the set: '-')."""
    names = list(rows[0][1]["per_class_iou"].keys())
    w = max(len(n) for n in names)
    lines = ["class".ljust(w) + "".join(f"  {r[0]:>12}" for r in rows)]
    for n in names:
        vals = [r[1]["per_class_iou"][n] for r in rows]
        lines.append(n.ljust(w) + "".join(f"  {'-' if v is None else f'{100 * v:.2f}':>12}" for v in vals))
    return "\n".join(lines)


def write_json(path, obj):
    """Atomic JSON write; NaN and infinities become null."""
    def finite(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: finite(v) for k, v in o.items()}
        return [finite(v) for v in o] if isinstance(o, (list, tuple)) else o

    atomic_write(Path(path), json.dumps(finite(obj), indent=2).encode())


# ----------------------------------------------------------------------------- label pictures
def _voc_palette() -> np.ndarray:
    """PASCAL VOC's colour map, ``np.uint8[256, 3]`` (0 black, 1 maroon, ..., 255 cream): bit
    3j + c of the class index is bit 7 - j of colour channel c."""
    index = np.arange(256)
    palette = np.zeros((256, 3), np.uint8)
    for j in range(8):
        for c in range(3):
            palette[:, c] |= (((index >> (3 * j + c)) & 1) << (7 - j)).astype(np.uint8)
    return palette


PALETTE = _voc_palette()


def save_image_atomic(img: Image.Image, path):
    """Save a PIL image to ``path`` as a PNG, atomically."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    atomic_write(Path(path), buffer.getvalue())


def label_image(label: np.ndarray) -> Image.Image:
    """A palette ('P') PIL image of a label map ``int[H, W]`` (values 0..255), VOC colours."""
    im = Image.fromarray(np.asarray(label).astype(np.uint8), mode="P")
    im.putpalette(PALETTE.reshape(-1).tolist())
    return im


def colorize(label: np.ndarray) -> np.ndarray:
    """``np.uint8[H, W, 3]`` VOC colours of a label map ``int[H, W]``."""
    return PALETTE[np.asarray(label).astype(np.int64) & 255]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float) -> np.ndarray:
    """The VOC colours of ``label`` (``int[H, W]``) blended over ``image`` (``uint8[H, W, 3]``) with
    opacity ``alpha``; background (0) and void (255) pixels are left as the image."""
    label = np.asarray(label)
    out = np.asarray(image).astype(np.float32)
    coloured = ((label != 0) & (label != VOID))[..., None]
    out = np.where(coloured, (1 - alpha) * out + alpha * colorize(label).astype(np.float32), out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _font(size=12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def legend_entries(class_names, label_maps=None) -> list:
    """``[(name, (r, g, b))]``: the VOC colour of each class of ``class_names`` (index = class), or,
    given ``label_maps`` (``int[H, W]`` arrays), of the classes in them, void included, in order."""
    present = range(len(class_names)) if label_maps is None else \
        sorted(set().union(*(np.unique(np.asarray(m)).tolist() for m in label_maps)))
    names = {**dict(enumerate(class_names)), VOID: "void"}
    return [(names.get(c, f"class {c}"), tuple(int(v) for v in PALETTE[c & 255])) for c in map(int, present)]


def draw_legend(entries, width: int, swatch: int = 12, pad: int = 4) -> Image.Image:
    """A white strip ``width`` px wide with a colour swatch and the name of each of ``entries``
    (:func:`legend_entries`), wrapped over as many lines as it takes."""
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(swatch, 14) + pad
    placed, x, y = [], pad, pad
    for name, colour in entries:
        w = swatch + 4 + int(measure.textlength(name, font=font)) + 3 * pad
        if x > pad and x + w > width:
            x, y = pad, y + line_h
        placed.append((x, y, name, colour))
        x += w
    img = Image.new("RGB", (width, y + line_h + pad if entries else 0), "white")
    d = ImageDraw.Draw(img)
    for x, y, name, colour in placed:
        d.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=colour, outline=(128, 128, 128))
        d.text((x + swatch + 4, y - 1), name, fill="black", font=font)
    return img


def examples_png(path, columns: dict, class_names, pad: int = 4):
    """A grid of examples: a row per example, columns image, truth, then each named prediction
    (label maps in VOC colours, enlarged up to 4x), and below a legend of the classes shown.
    ``columns`` maps a column title to ``(examples, key)``: example dicts of engine.evaluate
    (``"image"``, ``"label"``, ``"dcnn"``, ``"crf"``: arrays or tensors) and the key to show."""
    first = next(iter(columns.values()))[0]
    rows = [[ex["image"], ex["label"]] + [exs[i][key] for exs, key in columns.values()] for i, ex in enumerate(first)]
    if not rows:
        return
    scale = max(1, min(4, 160 // max(np.asarray(rows[0][0]).shape[0], 1)))
    h, w = (scale * n for n in np.asarray(rows[0][0]).shape[:2])
    titles = ["image", "truth", *columns]
    width, top = len(titles) * (w + pad) + pad, 18           # top: the column titles
    legend = draw_legend(legend_entries(class_names, [tile for row in rows for tile in row[1:]]), width)
    grid_h = top + len(rows) * (h + pad) + pad
    canvas = Image.new("RGB", (width, grid_h + legend.height), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(titles):
        draw.text((pad + j * (w + pad), 3), title, fill="black", font=_font())
    for i, row in enumerate(rows):
        for j, tile in enumerate(map(np.asarray, row)):
            rgb = Image.fromarray((tile if tile.ndim == 3 else colorize(tile)).astype(np.uint8))
            canvas.paste(rgb.resize((w, h), Image.NEAREST), (pad + j * (w + pad), top + pad + i * (h + pad)))
    canvas.paste(legend, (0, grid_h))
    save_image_atomic(canvas, path)


# ----------------------------------------------------------------------------- charts
_SERIES_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
                   (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    """About ``n`` round values (steps of 1, 2, 2.5 or 5 × 10^k) from ``lo`` or below to ``hi`` or above."""
    hi = hi if hi > lo else lo + 1
    magnitude = 10 ** math.floor(math.log10((hi - lo) / n))
    step = next(s * magnitude for s in (1, 2, 2.5, 5, 10) if s * magnitude >= (hi - lo) / n)
    ticks = [round(math.floor(lo / step) * step, 10)]
    while ticks[-1] < hi - 1e-9 * step:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def line_plot(series: dict, xlabel: str = "", ylabel: str = "", title: str = "", size=(640, 420)) -> Image.Image:
    """A line chart of ``series``, a legend name to ``(xs, ys)`` (None/NaN points skipped): a grid
    line at every x given (labelled where the label has room) and at round y values."""
    W, H = size
    left, right, top, bottom = 62, 16, 30, 46              # margins
    font = _font()
    xt = sorted({float(x) for xs, _ in series.values() for x in xs})
    points = {name: [(x, y) for x, y in zip(xs, ys) if y is not None and not math.isnan(y)]
              for name, (xs, ys) in series.items()}
    ys = [y for pts in points.values() for _, y in pts]
    if not ys:
        raise ValueError("line_plot: no finite points to draw")
    x0, x1 = xt[0], (xt[-1] if xt[-1] > xt[0] else xt[0] + 1)
    yt = _nice_ticks(min(ys), max(ys))

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right),
                H - bottom - (y - yt[0]) / (yt[-1] - yt[0]) * (H - top - bottom))

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    for t in yt:
        y = px(x0, t)[1]
        d.line([(left, y), (W - right, y)], fill=(225, 225, 225))
        d.text((4, y - 7), f"{t:g}", fill="black", font=font)
    label_end = -math.inf
    for t in xt:
        x, text = px(t, yt[0])[0], f"{t:g}"
        half = d.textlength(text, font=font) / 2
        d.line([(x, top), (x, H - bottom)], fill=(235, 235, 235))
        if x - half > label_end + 3:                       # room for the label, centred under its line
            d.text((x - half, H - bottom + 4), text, fill="black", font=font)
            label_end = x + half
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    centre = left + (W - left - right) // 2
    d.text((centre - d.textlength(xlabel, font=font) / 2, H - 20), xlabel, fill="black", font=font)
    d.text((4, 8), ylabel, fill="black", font=font)
    d.text((centre - d.textlength(title, font=font) / 2, 8), title, fill="black", font=font)
    colours = [_SERIES_COLOURS[k % len(_SERIES_COLOURS)] for k in range(len(points))]
    for colour, pts in zip(colours, points.values()):
        line = [px(x, y) for x, y in pts]
        if len(line) > 1:
            d.line(line, fill=colour, width=2)
        for x, y in line:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    # The legend at the lower right, on a white box over the curves.
    lx = W - right - 36 - max(d.textlength(str(name), font=font) for name in points)
    ly = H - bottom - 8 - 16 * len(points)
    d.rectangle([lx - 6, ly - 4, W - right - 4, H - bottom - 6], fill="white", outline=(180, 180, 180))
    for k, (colour, name) in enumerate(zip(colours, points)):
        d.line([(lx, ly + 16 * k + 6), (lx + 22, ly + 16 * k + 6)], fill=colour, width=3)
        d.text((lx + 28, ly + 16 * k), str(name), fill="black", font=font)
    return img


def band_plot(path, curves: dict):
    """The band-accuracy chart (DeepLab's trimap figure): ``curves`` maps a name to a result dict
    of engine.evaluate."""
    series = {name: (res["band_accuracy"]["bands"], [None if a is None else 100 * a
                                                     for a in res["band_accuracy"]["accuracy"]])
              for name, res in curves.items()}
    save_image_atomic(line_plot(series, "trimap band width (px)", "pixel accuracy %",
                                "Accuracy near object boundaries (trimap)"), path)
