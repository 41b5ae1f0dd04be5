"""PASCAL VOC 2012 and the SBD augmented set, read through torchvision's dataset classes.

``--data-root`` may name the folder that holds ``VOCdevkit``, ``VOCdevkit`` itself, or
``VOCdevkit/VOC2012``; the layout below it is the official one::

    VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    VOCdevkit/VOC2012/SegmentationClass/<id>.png      (palette PNG of class indices, 255 = void)
    VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt

``--sbd-root`` names SBD's ``benchmark_RELEASE/dataset`` folder (or ``benchmark_RELEASE``)::

    dataset/img/<id>.jpg   dataset/cls/<id>.mat   dataset/{train,val}.txt

DeepLab's ``train_aug`` split = VOC train ∪ SBD train ∪ SBD val, minus every VOC val image
(10,582 images for the full sets); where VOC and SBD both label an image, VOC's label is used.

Every dataset here returns ``(image np.uint8[H, W, 3], label np.int64[H, W])`` and raises a
``FileNotFoundError``/``ValueError`` that names the offending folder or file. torchvision lists the
files; the images are read by :func:`train.data.images.read_rgb` (16-bit and float images scaled
by their real range, corrupt files named).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from .images import read_rgb

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")


def resolve_voc_root(path) -> Path:
    """Return the ``VOCdevkit/VOC2012`` folder under ``path`` (which may be it, its parent
    ``VOCdevkit``, or the folder holding ``VOCdevkit``); raise ``FileNotFoundError`` naming what
    is missing."""
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
    raise FileNotFoundError(
        f"no VOCdevkit/VOC2012 folder found at {p}: pass the folder that holds VOCdevkit, "
        "VOCdevkit itself, or VOCdevkit/VOC2012")


def read_split(path: Path) -> list:
    """Image ids, one a line, from a split file; ``FileNotFoundError``/``ValueError`` when absent or empty."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} not found")
    ids = [line.strip().split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split file {path} lists no images")
    return ids


def load_label_png(path) -> np.ndarray:
    """Read a VOC-style label PNG (mode ``P`` palette or ``L`` grey, pixel value = class index)
    as ``np.int64[H, W]``; ``ValueError`` naming the file for any other mode (e.g. an RGB colour
    rendering) or an unreadable file."""
    try:
        with Image.open(path) as im:
            return label_from_pil(im, path)
    except (OSError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable label image ({' '.join(str(e).split())})") from e


def load_sbd_label(path) -> np.ndarray:
    """Read an SBD class segmentation (``cls/<id>.mat``, ``GTcls.Segmentation``) as
    ``np.int64[H, W]``; ``ValueError`` naming the file when it is not one."""
    from scipy.io import loadmat

    try:
        return np.asarray(loadmat(path)["GTcls"][0]["Segmentation"][0]).astype(np.int64)
    except (KeyError, IndexError, ValueError, TypeError, OSError) as e:
        raise ValueError(f"{path}: not an SBD class-segmentation .mat (expected GTcls.Segmentation): {e}") from e


def label_from_pil(im: Image.Image, name="label") -> np.ndarray:
    """``np.int64[H, W]`` class indices from a PIL label image in mode ``P`` or ``L``."""
    if im.mode not in ("P", "L"):
        raise ValueError(
            f"{name}: label image has mode {im.mode!r}; expected a palette ('P') or greyscale ('L') "
            "PNG whose pixel values are class indices (255 = void), as VOC's SegmentationClass")
    return np.asarray(im, dtype=np.uint8).astype(np.int64)


def _check_pair(image: np.ndarray, label: np.ndarray, name: str):
    if image.shape[:2] != label.shape:
        raise ValueError(f"{name}: image is {image.shape[1]}x{image.shape[0]} but its label is "
                         f"{label.shape[1]}x{label.shape[0]} (W x H); they must be the same size")


def _check_files(paths, what: str, root):
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {what} listed in the split are missing under {root}, "
                                f"e.g. {missing[0]}")


class VOCSegmentation:
    """PASCAL VOC 2012 segmentation split (``train``, ``val``, ``trainval``, or any
    ``ImageSets/Segmentation/<split>.txt``) via ``torchvision.datasets.VOCSegmentation``.

    ``dataset[i]`` -> ``(np.uint8[H, W, 3], np.int64[H, W])``; ``dataset.ids[i]`` is the image id.
    """

    num_classes = len(VOC_CLASSES)
    class_names = VOC_CLASSES

    def __init__(self, root, split: str):
        from torchvision.datasets import VOCSegmentation as TVVOC

        voc = resolve_voc_root(root)
        split_file = voc / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not split_file.is_file():
            have = sorted(p.stem for p in (voc / "ImageSets" / "Segmentation").glob("*.txt"))
            raise FileNotFoundError(f"VOC split {split!r} not found: {split_file} (have: {have})")
        self.root = voc
        self.split = split
        self._tv = TVVOC(str(voc.parent.parent), year="2012", image_set=split, download=False)
        self.ids = [Path(p).stem for p in self._tv.images]
        if not self.ids:
            raise ValueError(f"VOC split file {split_file} lists no images")
        _check_files(self._tv.images, "images", voc / "JPEGImages")
        _check_files(self._tv.masks, "label PNGs", voc / "SegmentationClass")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        image = read_rgb(self._tv.images[i])
        label = load_label_png(self._tv.masks[i])
        _check_pair(image, label, self._tv.masks[i])
        return image, label


def resolve_sbd_root(path) -> Path:
    """Return SBD's ``dataset`` folder (holding ``img``, ``cls``) under ``path``."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"SBD root {p} does not exist or is not a folder")
    for cand in (p, p / "dataset", p / "benchmark_RELEASE" / "dataset"):
        if (cand / "img").is_dir() and (cand / "cls").is_dir():
            return cand
    raise FileNotFoundError(f"no SBD dataset folder (with img/ and cls/) found at {p}: pass "
                            "benchmark_RELEASE/dataset or benchmark_RELEASE")


class SBDSegmentation:
    """SBD class segmentations (``cls/<id>.mat``) via ``torchvision.datasets.SBDataset``.

    ``split`` is ``"train"`` or ``"val"`` (SBD's own lists); ``ids`` restricts to a subset.
    ``dataset[i]`` -> ``(np.uint8[H, W, 3], np.int64[H, W])``.
    """

    num_classes = len(VOC_CLASSES)
    class_names = VOC_CLASSES

    def __init__(self, root, split: str, ids=None):
        from torchvision.datasets import SBDataset

        root = resolve_sbd_root(root)
        split_file = root / f"{split}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"SBD split file {split_file} not found")
        self.root = root
        self._tv = SBDataset(str(root), image_set=split, mode="segmentation", download=False)
        all_ids = [Path(p).stem for p in self._tv.images]
        pos = {k: i for i, k in enumerate(all_ids)}
        self._index = list(range(len(all_ids))) if ids is None else [pos[k] for k in ids if k in pos]
        self.ids = [all_ids[i] for i in self._index]
        _check_files([self._tv.images[i] for i in self._index], "images", root / "img")
        _check_files([self._tv.masks[i] for i in self._index], "label .mat files", root / "cls")

    def __len__(self):
        return len(self._index)

    def __getitem__(self, i):
        j = self._index[i]
        image = read_rgb(self._tv.images[j])
        label = load_sbd_label(self._tv.masks[j])
        _check_pair(image, label, self._tv.masks[j])
        return image, label


class VOCAugmented:
    """DeepLab's ``train_aug``: VOC ``train`` ∪ SBD ``train``+``val`` minus VOC ``val``
    (VOC's label wins where both exist). ``dataset[i]`` -> ``(np.uint8[H, W, 3], np.int64[H, W])``."""

    num_classes = len(VOC_CLASSES)
    class_names = VOC_CLASSES

    def __init__(self, voc_root, sbd_root):
        self.voc = VOCSegmentation(voc_root, "train")
        voc_dir = self.voc.root
        val_file = voc_dir / "ImageSets" / "Segmentation" / "val.txt"
        exclude = set(read_split(val_file)) if val_file.is_file() else set()
        exclude |= set(self.voc.ids)
        sbd_dir = resolve_sbd_root(sbd_root)
        self.sbd = []
        for split in ("train", "val"):
            if (sbd_dir / f"{split}.txt").is_file():
                keep = [k for k in read_split(sbd_dir / f"{split}.txt") if k not in exclude]
                exclude |= set(keep)
                self.sbd.append(SBDSegmentation(sbd_dir, split, ids=keep))
        if not self.sbd:
            raise FileNotFoundError(f"SBD folder {sbd_dir} has neither train.txt nor val.txt")
        self._items = [(self.voc, i) for i in range(len(self.voc))]
        for ds in self.sbd:
            self._items += [(ds, i) for i in range(len(ds))]
        self.ids = [src.ids[i] for src, i in self._items]

    def __len__(self):
        return len(self._items)

    def __getitem__(self, i):
        src, j = self._items[i]
        return src[j]
