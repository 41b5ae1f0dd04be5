"""PASCAL VOC 2012 and the SBD augmented set, read from their official layouts::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png      (palette PNG of class indices, 255 = void)
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt
    benchmark_RELEASE/dataset/{img/<id>.jpg, cls/<id>.mat, train.txt, val.txt}      (SBD)

DeepLab's ``train_aug`` split = VOC train ∪ SBD train ∪ SBD val, minus every VOC val image
(10,582 images for the full sets); where VOC and SBD both label an image, VOC's label is used.
Every dataset here returns ``(image np.uint8[H, W, 3], label np.int64[H, W])`` and raises a
``FileNotFoundError``/``ValueError`` that names the offending folder or file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .images import read_rgb

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")


def load_label_png(path) -> np.ndarray:
    """A VOC-style label PNG (mode ``P`` palette or ``L`` grey, pixel value = class index) as
    ``np.int64[H, W]``; ``ValueError`` naming the file for any other mode (e.g. an RGB colour
    rendering) or an unreadable file."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L"):
                raise ValueError(f"{path}: label image has mode {im.mode!r}; expected a palette ('P') or greyscale "
                                 "('L') PNG whose pixel values are class indices (255 = void), as VOC's "
                                 "SegmentationClass")
            return np.asarray(im, dtype=np.uint8).astype(np.int64)
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable label image ({' '.join(str(e).split())})") from e


def load_sbd_label(path) -> np.ndarray:
    """An SBD class segmentation (``cls/<id>.mat``, ``GTcls.Segmentation``) as ``np.int64[H, W]``."""
    from scipy.io import loadmat

    try:
        return np.asarray(loadmat(path)["GTcls"][0]["Segmentation"][0]).astype(np.int64)
    except (KeyError, IndexError, ValueError, TypeError, OSError) as e:
        raise ValueError(f"{path}: not an SBD class-segmentation .mat (expected GTcls.Segmentation): {e}") from e


def read_split(path: Path) -> list:
    """Image ids, one a line; ``FileNotFoundError``/``ValueError`` when the file is absent or empty."""
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split file {path} lists no images")
    return ids


class LabelledImages:
    """``(image, label)`` pairs of files: ``items`` = ``[(id, image path, label path, label reader)]``."""

    num_classes = len(VOC_CLASSES)
    class_names = VOC_CLASSES

    def __init__(self, items, what: str = "files"):
        missing = [p for _, image, label, _ in items for p in (image, label) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} {what} listed in the split are missing, e.g. {missing[0]}")
        self.items = list(items)

    @property
    def ids(self) -> list:
        return [item[0] for item in self.items]

    def head(self, n: int | None) -> "LabelledImages":
        """The first ``n`` pairs (None: all of them)."""
        self.items = self.items[:n]
        return self

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        _, image_path, label_path, read_label = self.items[i]
        image, label = read_rgb(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise ValueError(f"{label_path}: image is {image.shape[1]}x{image.shape[0]} but its label is "
                             f"{label.shape[1]}x{label.shape[0]} (W x H); they must be the same size")
        return image, label


def resolve_voc_root(path) -> Path:
    """The ``VOCdevkit/VOC2012`` folder under ``path`` (it, its parent ``VOCdevkit``, or the folder
    holding ``VOCdevkit``); ``FileNotFoundError`` naming what is missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"VOC data root {p} does not exist or is not a folder")
    for cand in (p / "VOCdevkit" / "VOC2012", p / "VOC2012", p):
        if cand.name == "VOC2012" and cand.parent.name == "VOCdevkit" and cand.is_dir():
            missing = [d for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation")
                       if not (cand / d).is_dir()]
            if missing:
                raise FileNotFoundError(
                    f"malformed VOC folder {cand}: missing {', '.join(missing)} (expected the "
                    "VOCdevkit/VOC2012 layout with JPEGImages, SegmentationClass, ImageSets/Segmentation)")
            return cand
    raise FileNotFoundError(f"no VOCdevkit/VOC2012 folder found at {p}: pass the folder that holds VOCdevkit, "
                            "VOCdevkit itself, or VOCdevkit/VOC2012")


class VOCSegmentation(LabelledImages):
    """A PASCAL VOC 2012 segmentation split: ``train``, ``val``, ``trainval`` or any
    ``ImageSets/Segmentation/<split>.txt``; ``ids[i]`` is the image id of ``dataset[i]``."""

    def __init__(self, root, split: str):
        voc = self.root = resolve_voc_root(root)
        split_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            have = sorted(p.stem for p in (voc / "ImageSets" / "Segmentation").glob("*.txt"))
            raise FileNotFoundError(f"VOC split {split!r} not found: {split_file} (have: {have})")
        super().__init__([(i, voc / "JPEGImages" / f"{i}.jpg", voc / "SegmentationClass" / f"{i}.png", load_label_png)
                          for i in read_split(split_file)], f"images or label PNGs under {voc}")


def resolve_sbd_root(path) -> Path:
    """SBD's ``dataset`` folder (holding ``img``, ``cls``) under ``path``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"SBD root {p} does not exist or is not a folder")
    for cand in (p, p / "dataset", p / "benchmark_RELEASE" / "dataset"):
        if (cand / "img").is_dir() and (cand / "cls").is_dir():
            return cand
    raise FileNotFoundError(f"no SBD dataset folder (with img/ and cls/) found at {p}: pass "
                            "benchmark_RELEASE/dataset or benchmark_RELEASE")


class SBDSegmentation(LabelledImages):
    """SBD's class segmentations of its ``train`` or ``val`` list (``ids``: of those, only these)."""

    def __init__(self, root, split: str, ids=None):
        sbd = resolve_sbd_root(root)
        listed = read_split(sbd / f"{split}.txt")
        keep = listed if ids is None else list(filter(set(listed).__contains__, ids))
        super().__init__([(i, sbd / "img" / f"{i}.jpg", sbd / "cls" / f"{i}.mat", load_sbd_label) for i in keep],
                         f"images or label .mat files under {sbd}")


class VOCAugmented(LabelledImages):
    """DeepLab's ``train_aug``: VOC ``train`` ∪ SBD ``train``+``val`` minus VOC ``val`` (VOC's label
    wins where both exist)."""

    def __init__(self, voc_root, sbd_root):
        voc = VOCSegmentation(voc_root, "train")
        val_file = voc.root / "ImageSets" / "Segmentation" / "val.txt"
        exclude = set(read_split(val_file) if val_file.is_file() else []) | set(voc.ids)
        sbd_dir, items = resolve_sbd_root(sbd_root), list(voc.items)
        splits = [s for s in ("train", "val") if (sbd_dir / f"{s}.txt").is_file()]
        if not splits:
            raise FileNotFoundError(f"SBD folder {sbd_dir} has neither train.txt nor val.txt")
        for split in splits:
            keep = [k for k in read_split(sbd_dir / f"{split}.txt") if k not in exclude]
            exclude |= set(keep)
            items += SBDSegmentation(sbd_dir, split, ids=keep).items
        super().__init__(items)
