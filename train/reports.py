"""What a run leaves to read: the result table, metrics JSON, the example grid and the
band-accuracy plot. Files are written atomically, by rank 0 only."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from models.files import atomic_write

from . import distributed as dist_utils
from .data import VOID
from .visualize import image_grid, legend_entries, line_plot, save_image_atomic


def format_table(rows, band=None) -> str:
    """A text table: ``rows`` = [(name, result dict from engine.evaluate)].

    Columns: mIoU %, pixel accuracy %, and the accuracy within ``band`` px of a boundary %
    (default: the middle of the evaluated bands)."""
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
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    sep = "-" * len(line(head))
    return "\n".join([sep, line(head), sep] + [line(r) for r in body] + [sep])


def write_json(path, obj):
    """Atomic JSON write (rank 0 only); NaN and infinities become null."""
    if not dist_utils.is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(_finite(obj), indent=2).encode())


def _finite(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def band_plot(path, curves: dict, title="Accuracy near object boundaries (trimap)"):
    """Write the band-accuracy plot: ``curves`` maps a name to a result dict (rank 0 only)."""
    if not dist_utils.is_main_process() or not curves:
        return
    series = {}
    for name, res in curves.items():
        b = res["band_accuracy"]
        series[name] = (b["bands"], [None if a is None else 100 * a for a in b["accuracy"]])
    bands = sorted({b for xs, _ in series.values() for b in xs})
    save_image_atomic(line_plot(series, xlabel="trimap band width (px)", ylabel="pixel accuracy %",
                                title=title, xticks=bands), path)


def examples_png(path, columns: dict, class_names=None, max_rows: int = 6, scale=None):
    """Write a grid: one row per example, columns image, truth, then each named prediction, and
    below a legend of the colours of the classes shown (``class_names``; none: their numbers).

    ``columns`` maps a column title to ``(examples, key)``: a list of example dicts from
    :func:`engine.evaluate` (``"image"``, ``"label"``, and the predictions under ``"dcnn"`` and
    ``"crf"``) and the key of the prediction to show (rank 0 only)."""
    if not dist_utils.is_main_process() or not columns:
        return
    first = next(iter(columns.values()))[0]
    rows = []
    for i in range(min(max_rows, len(first))):
        row = [first[i]["image"], first[i]["label"]]
        for exs, key in columns.values():
            row.append(exs[i][key])
        rows.append(row)
    if not rows:
        return
    titles = ["image", "truth"] + list(columns.keys())
    if scale is None:  # pictures are for looking at: enlarge small images
        scale = max(1, min(4, 160 // max(rows[0][0].shape[0], 1)))
    labels = [tile for row in rows for tile in row[1:]]
    names = class_names or [str(c) for c in range(1 + max(int(np.max(t[t != VOID], initial=0)) for t in labels))]
    save_image_atomic(image_grid(rows, col_titles=titles, scale=scale, legend=legend_entries(names, labels)), path)
