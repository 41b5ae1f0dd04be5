"""The pictures a run leaves: examples.png carries a legend of the class colours it shows, and
bands.png marks the band widths that were measured on its x axis."""
import numpy as np
from PIL import Image

from train import reports
from train.reports import PALETTE, draw_legend, legend_entries, line_plot

NAMES = ["background", "ellipse", "rectangle", "triangle"]


def _colours(img: Image.Image) -> set:
    return {tuple(c) for c in np.asarray(img.convert("RGB")).reshape(-1, 3).tolist()}


def test_legend_entries_name_each_class_shown_with_its_colour():
    assert legend_entries(NAMES) == [(n, tuple(PALETTE[c].tolist())) for c, n in enumerate(NAMES)]
    maps = [np.array([[0, 2], [2, 255]]), np.array([[3, 3], [0, 0]])]
    assert legend_entries(NAMES, maps) == [("background", (0, 0, 0)), ("rectangle", (0, 128, 0)),
                                           ("triangle", (128, 128, 0)), ("void", (224, 224, 192))]


def test_legend_draws_a_swatch_per_class_and_wraps():
    entries = legend_entries([f"class number {i}" for i in range(21)])
    wide, narrow = draw_legend(entries, 2000), draw_legend(entries, 300)
    assert narrow.width == 300 and narrow.height > 3 * wide.height       # wrapped over several lines
    for img in (wide, narrow):
        assert {colour for _, colour in entries} <= _colours(img)


def _example(label, pred):
    return {"image": np.full(label.shape + (3,), 90, np.uint8), "label": label, "dcnn": pred, "crf": pred}


def test_examples_png_has_a_legend_of_the_classes_it_shows(tmp_path):
    label = np.zeros((16, 16), np.int64)
    label[4:10, 4:10] = 1
    pred = np.where(label == 1, 3, 0)
    reports.examples_png(tmp_path / "ex.png", {"DCNN": ([_example(label, pred)], "dcnn")}, NAMES)
    with Image.open(tmp_path / "ex.png") as img:
        grid_rows = 18 + 4 + 16 * 4 + 4                     # titles, pad, one 4x tile, pad
        legend = img.crop((0, grid_rows, img.width, img.height))
        assert legend.height > 10
        assert {(128, 0, 0), (128, 128, 0), (0, 0, 0)} <= _colours(legend)   # ellipse, triangle, background
        assert (0, 128, 0) not in _colours(img)                              # rectangle: not shown


def test_band_plot_ticks_at_the_band_widths(tmp_path):
    bands = [1, 2, 3, 4, 6, 8, 12]
    res = {"band_accuracy": {"bands": bands, "accuracy": [0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9]}}
    reports.band_plot(tmp_path / "bands.png", {"DCNN": res})
    grid = (235, 235, 235)
    with Image.open(tmp_path / "bands.png") as img:
        row = np.asarray(img.convert("RGB"))[60]                     # a row inside the plot area
    columns = [x for x in range(img.width) if tuple(row[x]) == grid]
    left, right = 62, img.width - 16                                  # the plot area's margins
    expected = [round(left + (b - 1) / (12 - 1) * (right - left)) for b in bands]
    assert len(columns) == len(bands) - 2                             # the frame covers the ends
    for x in expected[1:-1]:
        assert any(abs(x - c) <= 1 for c in columns), (x, columns)
    assert not any(abs(left + (5 - 1) / 11 * (right - left) - c) <= 1 for c in columns)   # no tick at 5


def test_line_plot_has_the_size_asked_for():
    img = line_plot({"a": ([0, 10], [1, 2])}, size=(300, 200))
    assert img.size == (300, 200)
