"""train.data.images.read_rgb: every pixel format to 8-bit RGB by its real range (16-bit and float
images were crushed to two grey levels by ``convert("RGB")``), or a one-line error naming the
file; the VOC loader and segment.py read through it; corrupt and decompression-bomb images."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from script_helpers import assert_one_line_error, run_script, save_tiny_checkpoint
from test_train_data import make_voc
from train.data import VOCSegmentation
from train.data.images import read_rgb

RAMP = np.arange(48 * 64).reshape(48, 64) % 256                      # every 8-bit value, a few times


def write_png(path, array: np.ndarray, bit_depth: int, colour_type: int, size=None):
    """A PNG written by hand (Pillow cannot write 16-bit RGB): ``array`` uint16/uint8 [H, W(, 3)]
    big-endian rows; ``size`` = (W, H) overrides the header's size (for a bomb)."""
    h, w = array.shape[:2]
    width, height = size or (w, h)
    raw = b"".join(b"\x00" + row.astype(">u2" if bit_depth == 16 else "u1").tobytes() for row in array)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def grey(values):
    return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=2)


def test_sixteen_bit_greyscale_png_keeps_its_levels(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray((RAMP * 257).astype(np.uint16)).save(path)        # 0..65535, mode I;16
    with Image.open(path) as im:
        assert im.mode == "I;16"
    np.testing.assert_array_equal(read_rgb(path), grey(RAMP))


def test_sixteen_bit_rgb_png_keeps_its_levels(tmp_path):
    rgb = np.stack([RAMP, 255 - RAMP, RAMP[::-1]], axis=2)
    path = write_png(tmp_path / "rgb16.png", (rgb * 257).astype(np.uint16), 16, 2)
    np.testing.assert_array_equal(read_rgb(path), rgb.astype(np.uint8))


def test_thirty_two_bit_integer_tiff_is_read_as_sixteen_bit_or_refused(tmp_path):
    Image.fromarray((RAMP * 257).astype(np.int32)).save(tmp_path / "i.tif")
    with Image.open(tmp_path / "i.tif") as im:
        assert im.mode == "I"
    np.testing.assert_array_equal(read_rgb(tmp_path / "i.tif"), grey(RAMP))
    Image.fromarray((RAMP - 100).astype(np.int32)).save(tmp_path / "neg.tif")
    with pytest.raises(ValueError, match=r"neg\.tif: 32-bit integer image with values -100\.\.155"):
        read_rgb(tmp_path / "neg.tif")


def test_float_tiff_in_zero_one_or_zero_255_and_nothing_else(tmp_path):
    Image.fromarray((RAMP / 255.0).astype(np.float32)).save(tmp_path / "unit.tif")
    Image.fromarray(RAMP.astype(np.float32)).save(tmp_path / "bytes.tif")
    with Image.open(tmp_path / "unit.tif") as im:
        assert im.mode == "F"
    np.testing.assert_array_equal(read_rgb(tmp_path / "unit.tif"), grey(RAMP))
    np.testing.assert_array_equal(read_rgb(tmp_path / "bytes.tif"), grey(RAMP))
    for name, values, what in (("big.tif", RAMP * 1000.0, "values 0..255000"),
                               ("negative.tif", RAMP - 0.5, "values -0.5..254.5"),
                               ("nan.tif", np.where(RAMP > 3, RAMP, np.nan), "NaN")):
        Image.fromarray(values.astype(np.float32)).save(tmp_path / name)
        with pytest.raises(ValueError, match=f"{name}: float image with {what}"):
            read_rgb(tmp_path / name)


def test_eight_bit_modes_convert_as_pillow_does(tmp_path):
    rgb = np.stack([RAMP, 255 - RAMP, RAMP[::-1]], axis=2).astype(np.uint8)
    rgb_image = Image.fromarray(rgb)
    cases = {
        "palette.png": rgb_image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "rgba.png": Image.fromarray(np.dstack([rgb, RAMP.astype(np.uint8)])),
        "grey.jpg": Image.fromarray(RAMP.astype(np.uint8)),
        "cmyk.jpg": rgb_image.convert("CMYK"),
        "bilevel.png": Image.fromarray(RAMP > 128),
    }
    for name, im in cases.items():
        im.save(tmp_path / name, quality=95) if name.endswith(".jpg") else im.save(tmp_path / name)
        out = read_rgb(tmp_path / name)
        assert out.shape == (48, 64, 3) and out.dtype == np.uint8, name
        with Image.open(tmp_path / name) as again:
            np.testing.assert_array_equal(out, np.asarray(again.convert("RGB")), err_msg=name)
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba.png"), rgb)      # alpha dropped
    assert np.abs(read_rgb(tmp_path / "cmyk.jpg").astype(int) - rgb).mean() < 4    # colours kept


def test_unreadable_and_oversized_images_are_named(tmp_path):
    (tmp_path / "text.jpg").write_text("not an image")
    good = tmp_path / "good.jpg"
    Image.fromarray(grey(RAMP)).save(good)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:300])
    for name in ("text.jpg", "cut.jpg"):
        with pytest.raises(ValueError, match=f"{name}: not a readable image"):
            read_rgb(tmp_path / name)
    write_png(tmp_path / "bomb.png", np.zeros((1, 1), np.uint8), 8, 0, size=(20000, 20000))
    write_png(tmp_path / "large.png", np.zeros((1, 1), np.uint8), 8, 0, size=(10000, 9000))
    for name in ("bomb.png", "large.png"):
        with pytest.raises(ValueError, match=f"{name}: image too large") as info:
            read_rgb(tmp_path / name)
        assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_rgb(tmp_path / "missing.png")


def test_voc_loader_reads_sixteen_bit_images_by_their_range(tmp_path):
    voc, labels = make_voc(tmp_path, ids_train=("a1",), ids_val=("b1",), size=(48, 64))
    write_png(voc / "JPEGImages" / "a1.jpg", (RAMP * 257).astype(np.uint16), 16, 0)   # any content, any name
    image, label = VOCSegmentation(tmp_path, "train")[0]
    np.testing.assert_array_equal(image, grey(RAMP))
    np.testing.assert_array_equal(label, labels["a1"])


@pytest.fixture(scope="module")
def voc_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "voc.pt", num_classes=21, data="voc")


@pytest.mark.parametrize("damage", ["corrupt", "bomb"])
def test_evaluate_names_a_bad_image_in_one_line(tmp_path, voc_checkpoint, damage):
    """Through DataLoader workers (--workers 2), whose errors arrive wrapped in a traceback."""
    voc, _ = make_voc(tmp_path, ids_train=("a1",), ids_val=("b1", "b2", "b3"), size=(20, 30))
    bad = voc / "JPEGImages" / "b2.jpg"
    if damage == "corrupt":
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        write_png(bad, np.zeros((1, 1), np.uint8), 8, 0, size=(20000, 20000))
    r = run_script("evaluate", "--checkpoint", voc_checkpoint, "--dataset", "voc", "--data-root", tmp_path,
                   "--workers", "2", "--crf-eval-iters", "1", "--out-dir", tmp_path / "eval")
    assert_one_line_error(r, "b2.jpg", "not a readable image" if damage == "corrupt" else "image too large")
    assert not (tmp_path / "eval" / "metrics.json").exists()


def test_segment_reads_a_sixteen_bit_png_as_its_eight_bit_twin(tmp_path):
    from train import segment as segment_script

    checkpoint = save_tiny_checkpoint(tmp_path / "m.pt")
    rng = np.random.default_rng(0)
    rgb = (rng.integers(0, 256, (40, 48, 3)) // 64 * 64).astype(np.uint8)      # flat blocks of colour
    (tmp_path / "in8").mkdir()
    (tmp_path / "in16").mkdir()
    Image.fromarray(rgb).save(tmp_path / "in8" / "x.png")
    write_png(tmp_path / "in16" / "x.png", rgb.astype(np.uint16) * 257, 16, 2)
    for folder in ("in8", "in16"):
        segment_script.main(segment_script.get_args_parser().parse_args(
            [str(tmp_path / folder), "--checkpoint", str(checkpoint), "--out-dir", str(tmp_path / f"out_{folder}"),
             "--crf-eval-iters", "1", "--no-progress"]))
    for kind in ("labels", "overlays"):
        a = np.asarray(Image.open(tmp_path / "out_in8" / kind / "x.png"))
        b = np.asarray(Image.open(tmp_path / "out_in16" / kind / "x.png"))
        np.testing.assert_array_equal(a, b)
