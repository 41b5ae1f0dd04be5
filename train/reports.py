"""What a run leaves to read: the result tables, metrics JSON, and pictures drawn with PIL alone
(VOC palette label PNGs, overlays, the example grid with its colour legend, the band-accuracy
plot). Files are written atomically (:func:`models.files.atomic_write`); the scripts write them
from rank 0 only."""
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
def format_table(rows, band=None) -> str:
    """A text table: ``rows`` = [(name, result dict of engine.evaluate)]. Columns: mIoU %, pixel
    accuracy %, and the accuracy within ``band`` px of a boundary % (default: the middle band)."""
    if not rows:
        return ""
    bands = rows[0][1]["band_accuracy"]["bands"]
    if band is None:
        band = bands[min(len(bands) - 1, len(bands) // 2)]
    k = bands.index(band) if band in bands else len(bands) // 2
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


def band_plot(path, curves: dict, title="Accuracy near object boundaries (trimap)"):
    """The band-accuracy plot: ``curves`` maps a name to a result dict of engine.evaluate."""
    series = {name: (res["band_accuracy"]["bands"], [None if a is None else 100 * a
                                                     for a in res["band_accuracy"]["accuracy"]])
              for name, res in curves.items()}
    bands = sorted({b for xs, _ in series.values() for b in xs})
    save_image_atomic(line_plot(series, xlabel="trimap band width (px)", ylabel="pixel accuracy %",
                                title=title, xticks=bands), path)


def examples_png(path, columns: dict, class_names):
    """A grid: one row per example, columns image, truth, then each named prediction, and below a
    legend of the colours of the classes shown (``class_names``). ``columns`` maps a column title
    to ``(examples, key)``: example dicts of engine.evaluate (``"image"``, ``"label"``, and the
    predictions under ``"dcnn"`` and ``"crf"``; numpy arrays or tensors) and the key of the
    prediction to show."""
    first = next(iter(columns.values()))[0]
    rows = [[ex["image"], ex["label"]] + [exs[i][key] for exs, key in columns.values()] for i, ex in enumerate(first)]
    if not rows:
        return
    scale = max(1, min(4, 160 // max(rows[0][0].shape[0], 1)))     # pictures are for looking at: enlarge
    labels = [tile for row in rows for tile in row[1:]]
    save_image_atomic(image_grid(rows, col_titles=["image", "truth"] + list(columns), scale=scale,
                                 legend=legend_entries(class_names, labels)), path)


# ----------------------------------------------------------------------------- pictures
def voc_palette(n: int = 256) -> np.ndarray:
    """PASCAL VOC's colour map: ``np.uint8[n, 3]`` (class 0 black, 1 maroon, ..., 255 cream)."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


PALETTE = voc_palette()


def save_image_atomic(img: Image.Image, path, **kw):
    """Save a PIL image to ``path`` atomically (:func:`models.files.atomic_write`); the format
    follows the suffix (PNG when unknown)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = kw.pop("format", None) or Image.registered_extensions().get(path.suffix.lower(), "PNG")
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kw)
    atomic_write(path, buffer.getvalue())


def label_image(label: np.ndarray) -> Image.Image:
    """A palette ('P') PIL image of a label map ``int[H, W]`` (values 0..255), VOC colours."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be [H, W], got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"label values must be in 0..255, got {label.min()}..{label.max()}")
    im = Image.fromarray(label.astype(np.uint8), mode="P")
    im.putpalette(PALETTE.reshape(-1).tolist())
    return im


def colorize(label: np.ndarray) -> np.ndarray:
    """``np.uint8[H, W, 3]`` VOC colours of a label map ``int[H, W]``."""
    return PALETTE[np.asarray(label).astype(np.int64) & 255]


def overlay(image: np.ndarray, label: np.ndarray, alpha: float) -> np.ndarray:
    """Blend the VOC colours of ``label`` (``int[H, W]``) over ``image`` (``uint8[H, W, 3]``) with
    opacity ``alpha``; background (0) and void (255) pixels are left as the image."""
    image = np.asarray(image)
    label = np.asarray(label)
    if image.shape[:2] != label.shape:
        raise ValueError(f"image {image.shape[:2]} and label {label.shape} differ in size")
    col = colorize(label).astype(np.float32)
    out = image.astype(np.float32)
    m = ((label != 0) & (label != VOID))[..., None]
    out = np.where(m, (1 - alpha) * out + alpha * col, out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _font(size=12):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def legend_entries(class_names, label_maps=None) -> list:
    """``[(name, (r, g, b))]``, the VOC colour of each class: of every class in ``class_names``
    (index = class), or, given ``label_maps`` (``int[H, W]`` arrays), of the classes that occur in
    them, void (255) included, in class order."""
    names = list(class_names)
    if label_maps is None:
        present = range(len(names))
    else:
        present = sorted(set().union(*(np.unique(np.asarray(m)).tolist() for m in label_maps)))
    entries = []
    for c in present:
        c = int(c)
        name = "void" if c == VOID else (names[c] if 0 <= c < len(names) else f"class {c}")
        entries.append((name, tuple(int(v) for v in PALETTE[c & 255])))
    return entries


def draw_legend(entries, width: int, swatch: int = 12, pad: int = 4) -> Image.Image:
    """A white strip ``width`` px wide with one colour swatch and name per entry of
    :func:`legend_entries`, wrapped over as many lines as it takes."""
    font = _font(12)
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


def image_grid(rows, col_titles=None, scale: int = 1, pad: int = 4, legend=None) -> Image.Image:
    """Tile ``rows`` (a list of lists of ``uint8[H, W, 3]`` or ``[H, W]`` label arrays, all the
    same size) into one RGB image, with optional column titles and, below, a colour ``legend``
    (:func:`legend_entries`). ``scale`` enlarges each tile by pixel repetition."""
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one row with one tile")
    tiles = [[t if np.asarray(t).ndim == 3 else colorize(t) for t in r] for r in rows]
    h, w = tiles[0][0].shape[:2]
    h, w = h * scale, w * scale
    font = _font(12)
    top = 18 if col_titles else 0
    ncol = max(len(r) for r in tiles)
    width = ncol * (w + pad) + pad
    key = draw_legend(legend, width) if legend else None
    grid_h = top + len(tiles) * (h + pad) + pad
    canvas = Image.new("RGB", (width, grid_h + (key.height if key else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, title in enumerate(col_titles or []):
        draw.text((pad + j * (w + pad), 3), str(title), fill="black", font=font)
    for i, r in enumerate(tiles):
        for j, t in enumerate(r):
            im = Image.fromarray(np.asarray(t, np.uint8))
            if scale != 1:
                im = im.resize((w, h), Image.NEAREST)
            canvas.paste(im, (pad + j * (w + pad), top + pad + i * (h + pad)))
    if key:
        canvas.paste(key, (0, grid_h))
    return canvas


_SERIES_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189),
                   (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def _nice_ticks(lo, hi, n=5):
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    ticks = [round(start, 10)]
    while ticks[-1] < hi - 1e-9 * step:  # the last tick reaches or passes hi
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def line_plot(series: dict, xlabel: str = "", ylabel: str = "", title: str = "",
              size=(640, 420), xticks=None) -> Image.Image:
    """A line chart: ``series`` maps a legend name to ``(xs, ys)`` (None/NaN points skipped).
    ``xticks``: the x values to mark (default: round numbers); a tick label that would overlap
    the one before it is left out, its grid line kept."""
    W, H = size
    ml, mr, mt, mb = 62, 16, 30, 46
    font = _font(12)
    pts = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys)
           if y is not None and not (isinstance(y, float) and math.isnan(y))]
    if not pts:
        raise ValueError("line_plot: no finite points to draw")
    if xticks:
        xt = sorted(float(t) for t in xticks)
        x0, x1 = min(xt[0], min(p[0] for p in pts)), max(xt[-1], max(p[0] for p in pts))
        x1 = x1 if x1 > x0 else x0 + 1
    else:
        xt = _nice_ticks(min(p[0] for p in pts), max(p[0] for p in pts))
        x0, x1 = xt[0], xt[-1]
    yt = _nice_ticks(min(p[1] for p in pts), max(p[1] for p in pts))
    y0, y1 = yt[0], yt[-1]
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)

    def px(x, y):
        return (ml + (x - x0) / (x1 - x0) * (W - ml - mr), H - mb - (y - y0) / (y1 - y0) * (H - mt - mb))

    for t in yt:
        _, yy = px(x0, t)
        d.line([(ml, yy), (W - mr, yy)], fill=(225, 225, 225))
        d.text((4, yy - 7), f"{t:g}", fill="black", font=font)
    label_end = -math.inf
    for t in xt:
        xx, _ = px(t, y0)
        d.line([(xx, mt), (xx, H - mb)], fill=(235, 235, 235))
        text = f"{t:g}"
        tw = d.textlength(text, font=font)
        if xx - tw / 2 > label_end + 3:          # room for the label: centred under its tick
            d.text((xx - tw / 2, H - mb + 4), text, fill="black", font=font)
            label_end = xx + tw / 2
    d.rectangle([ml, mt, W - mr, H - mb], outline="black")
    cx = ml + (W - ml - mr) // 2
    d.text((cx - d.textlength(xlabel, font=font) / 2, H - 20), xlabel, fill="black", font=font)
    d.text((4, 8), ylabel, fill="black", font=font)
    d.text((cx - d.textlength(title, font=font) / 2, 8), title, fill="black", font=font)
    for k, (name, (xs, ys)) in enumerate(series.items()):
        col = _SERIES_COLOURS[k % len(_SERIES_COLOURS)]
        seg = [px(x, y) for x, y in zip(xs, ys) if y is not None and not (isinstance(y, float) and math.isnan(y))]
        if len(seg) > 1:
            d.line(seg, fill=col, width=2)
        for (cx, cy) in seg:
            d.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=col)
    # Legend at the lower right, on a white box drawn over the curves.
    text_w = max(d.textlength(str(n), font=font) for n in series)
    lx = W - mr - 36 - text_w
    ly0 = H - mb - 8 - 16 * len(series)
    d.rectangle([lx - 6, ly0 - 4, W - mr - 4, H - mb - 6], fill="white", outline=(180, 180, 180))
    for k, name in enumerate(series):
        col = _SERIES_COLOURS[k % len(_SERIES_COLOURS)]
        ly = ly0 + 16 * k
        d.line([(lx, ly + 6), (lx + 22, ly + 6)], fill=col, width=3)
        d.text((lx + 28, ly), str(name), fill="black", font=font)
    return img
