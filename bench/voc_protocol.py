"""The coarse-unary protocol: judge a dense CRF on real VOC images without a trained DCNN.

A stride-8 network finds the object but misplaces and blurs its outline. We imitate its score
maps from the ground truth (the protocol is defined here):

1. one-hot labels, void -> background;
2. displaced by a smooth random field (std 12 px, drawn on a 48-px grid, bicubic), nearest
   resampling;
3. averaged over 8x8 cells (the stride-8 score map);
4. logits = log(0.9 p + 0.1/21) plus Gaussian noise of std 0.3 per cell;
5. bilinearly upsampled to the image and softmaxed.

The random draws are seeded by the image's 0-based index in ``val.txt`` and made in a fixed
order (field, then noise), so every run, test and benchmark sees the same unaries, and the
published densecrf figures (77.7 -> 79.9 mIoU on the 46 shared images) can be reproduced.

The images and labels are read by train/'s VOC reader (train.data), and scored by train/'s metrics
(train.metrics: ConfusionMatrix, boundary_distance). Importable from tests and benchmarks
(``sys.path`` must hold ``bench/`` and the repository root: ``import common`` puts the latter).
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import common  # noqa: F401  (the repository root on sys.path, for train)
from train.data import VOC_CLASSES, VOID
from train.data.images import read_rgb
from train.data.voc import load_label_png, read_split

NUM_CLASSES = len(VOC_CLASSES)

__all__ = ["NUM_CLASSES", "VOID", "voc_root", "image_ids", "load_pair", "coarse_logits",
           "coarse_probs", "downscale_pair"]


def voc_root(shared_data) -> Path:
    """VOCdevkit/VOC2012 under the shared data folder."""
    return Path(shared_data) / "VOCdevkit" / "VOC2012"


def image_ids(root) -> list:
    """Ids listed in ImageSets/Segmentation/val.txt, in file order (the order seeds the noise)."""
    return read_split(Path(root) / "ImageSets" / "Segmentation" / "val.txt")


def load_pair(root, image_id):
    """(image uint8 [H, W, 3] RGB, label int64 [H, W], void = 255) of one VOC image."""
    root = Path(root)
    image = read_rgb(root / "JPEGImages" / f"{image_id}.jpg")
    label = load_label_png(root / "SegmentationClass" / f"{image_id}.png")
    if label.shape != image.shape[:2]:
        raise ValueError(f"{image_id}: label {label.shape} and image {image.shape} sizes differ")
    return image, label


def downscale_pair(image, label, factor):
    """Shrink an (image [H, W, 3] uint8, label [H, W]) pair by an integer `factor` (box filter
    for the image, nearest for the label), for quick tests."""
    if factor == 1:
        return image, label
    h, w = label.shape[0] // factor, label.shape[1] // factor
    img = np.asarray(Image.fromarray(image).resize((w, h), Image.BOX))
    lab = np.asarray(Image.fromarray(label.astype(np.uint8)).resize((w, h), Image.NEAREST)).astype(np.int64)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


def _warp_labels(onehot, rng, warp, cell):
    """Resample Tensor[1, C, H, W] at positions displaced by a smooth random field."""
    _, _, h, w = onehot.shape
    grid_h, grid_w = max(2, h // cell + 2), max(2, w // cell + 2)
    field = rng.standard_normal((1, 2, grid_h, grid_w)).astype(np.float32)
    field = F.interpolate(torch.from_numpy(field) * warp, size=(h, w), mode="bicubic",
                          align_corners=True)[0]
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    # grid_sample wants (x, y) in [-1, 1], with align_corners=True: -1 and 1 are pixel centres.
    # (Keep this arithmetic order: nearest resampling flips pixels on float rounding.)
    x = (cols + field[0]) / (w - 1) * 2 - 1
    y = (rows + field[1]) / (h - 1) * 2 - 1
    grid = torch.stack([x, y], dim=-1)[None]
    return F.grid_sample(onehot, grid, mode="nearest", padding_mode="border", align_corners=True)


def coarse_logits(label, seed, stride=8, warp=12.0, noise=0.3, cell=48, num_classes=NUM_CLASSES):
    """DCNN-like unary logits made from a ground-truth label map.

    Args:
        label (ndarray[H, W] int): class ids, void (255) counted as background.
        seed (int): the image's index in val.txt.
        stride, warp, noise, cell: the protocol's constants (stride-8 cells, 12-px field std on a
            48-px grid, logit noise std 0.3).
    Returns:
        Tensor[C, H, W] float32: upsampled logits (their softmax is `coarse_probs`).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be [H, W], got shape {label.shape}")
    rng = np.random.default_rng(seed)
    h, w = label.shape
    classes = np.where(label == VOID, 0, label).astype(np.int64)
    onehot = torch.from_numpy(np.eye(num_classes, dtype=np.float32)[classes]).permute(2, 0, 1)[None]
    warped = _warp_labels(onehot.contiguous(), rng, warp, cell)
    cells = F.adaptive_avg_pool2d(warped, (-(-h // stride), -(-w // stride)))
    logits = torch.log(0.9 * cells + 0.1 / num_classes)
    logits = logits + noise * torch.from_numpy(rng.standard_normal(tuple(logits.shape)).astype(np.float32))
    return F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)[0]


def coarse_probs(label, seed, **kwargs):
    """softmax(coarse_logits(label, seed)): ndarray[C, H, W] float32 probabilities."""
    return torch.softmax(coarse_logits(label, seed, **kwargs), 0).numpy()
