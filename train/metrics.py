"""Segmentation metrics: confusion matrix, mIoU, per-class IoU, pixel accuracy, and DeepLab's
boundary "trimap" accuracy as a function of band width (DeepLab v1, figure 5).

Both accumulators are sums of integer counts, so results from several processes combine exactly
(:meth:`ConfusionMatrix.all_reduce` with :func:`train.process.all_reduce_sum`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .data import VOID


def _as_long(x):
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).long()


class ConfusionMatrix:
    """Accumulates ``mat[t, p]`` = number of pixels of true class ``t`` predicted as ``p``,
    over every pixel whose truth is not ``ignore_index``.

    Example:
        >>> cm = ConfusionMatrix(3)
        >>> cm.update(torch.tensor([[0, 1], [2, 2]]), torch.tensor([[0, 1], [1, 255]]))
        >>> cm.mat.tolist()
        [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    """

    def __init__(self, num_classes: int, ignore_index: int = VOID):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.mat = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)

    def update(self, pred, target):
        """Add ``pred`` and ``target`` (integer ``Tensor[...]`` of equal shape, e.g. ``[N, H, W]``)."""
        pred, target = _as_long(pred).cpu(), _as_long(target).cpu()
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        k = target != self.ignore_index
        t, p = target[k], pred[k]
        n = self.num_classes
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n):
            raise ValueError(f"target values must be in 0..{n - 1} or {self.ignore_index}, "
                             f"got range {int(t.min())}..{int(t.max())}")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= n):
            raise ValueError(f"pred values must be in 0..{n - 1}, got range {int(p.min())}..{int(p.max())}")
        self.mat += torch.bincount(t * n + p, minlength=n * n).reshape(n, n)

    def all_reduce(self, reduce_sum):
        """Sum the counts over the processes with ``reduce_sum`` (:func:`train.process.all_reduce_sum`)."""
        self.mat = reduce_sum(self.mat)

    def iou(self) -> torch.Tensor:
        """Per-class IoU ``Tensor[C]`` float64: TP / (TP + FP + FN); NaN where the class is
        neither present nor predicted."""
        m = self.mat.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    def miou(self) -> float:
        """Mean IoU over classes with a non-empty union (VOC's protocol on the full val set)."""
        iou = self.iou()
        valid = ~torch.isnan(iou)
        return float(iou[valid].mean()) if bool(valid.any()) else math.nan

    def pixel_accuracy(self) -> float:
        """Correctly labelled pixels / all non-void pixels."""
        total = int(self.mat.sum())
        return float(self.mat.diag().sum()) / total if total else math.nan

    def mean_class_accuracy(self) -> float:
        """Mean over present classes of per-class recall."""
        m = self.mat.double()
        rows = m.sum(1)
        valid = rows > 0
        return float((m.diag()[valid] / rows[valid]).mean()) if bool(valid.any()) else math.nan

    def summary(self, class_names=None) -> dict:
        """JSON-ready dict: ``miou``, ``pixel_accuracy``, ``mean_class_accuracy``, ``per_class_iou``
        (name -> IoU or None), ``confusion`` (list of lists)."""
        names = class_names or [str(i) for i in range(self.num_classes)]
        iou = self.iou().tolist()
        return {
            "miou": self.miou(),
            "pixel_accuracy": self.pixel_accuracy(),
            "mean_class_accuracy": self.mean_class_accuracy(),
            "per_class_iou": {n: (None if math.isnan(v) else v) for n, v in zip(names, iou)},
            "confusion": self.mat.tolist(),
        }


def boundary_distance(label: np.ndarray) -> np.ndarray:
    """Euclidean distance (pixels, ``float[H, W]``) from each pixel to the nearest label boundary.

    A pixel is on a boundary when a 4-neighbour has a different label (void counts as a label, so
    VOC's void outlines are boundaries); both pixels of such a pair get distance 0. A label map
    with no boundary gives ``inf`` everywhere.
    """
    from scipy import ndimage

    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be [H, W], got shape {label.shape}")
    edge = np.zeros(label.shape, bool)
    dv = label[:-1] != label[1:]
    dh = label[:, :-1] != label[:, 1:]
    edge[:-1] |= dv
    edge[1:] |= dv
    edge[:, :-1] |= dh
    edge[:, 1:] |= dh
    if not edge.any():
        return np.full(label.shape, np.inf)
    return ndimage.distance_transform_edt(~edge)


class BandAccuracy:
    """Pixel accuracy inside the band of width ``b`` around label boundaries, for each ``b``.

    For a band width ``b`` the band holds the non-void pixels whose :func:`boundary_distance` is
    ``<= b`` (DeepLab's trimap; the accuracy is that of those pixels). ``bands`` are the widths
    reported.
    """

    def __init__(self, bands, ignore_index: int = VOID):
        bands = sorted(float(b) for b in bands)
        if not bands or bands[0] < 0:
            raise ValueError(f"bands must be a non-empty list of widths >= 0, got {bands}")
        self.bands = bands
        self.ignore_index = ignore_index
        self.correct = torch.zeros(len(bands), dtype=torch.int64)
        self.total = torch.zeros(len(bands), dtype=torch.int64)

    def update(self, pred, target):
        """Add predictions and truths, ``[H, W]`` or ``[N, H, W]`` integer arrays/tensors."""
        pred = np.asarray(pred.cpu() if torch.is_tensor(pred) else pred)
        target = np.asarray(target.cpu() if torch.is_tensor(target) else target)
        if pred.shape != target.shape:
            raise ValueError(f"pred {pred.shape} and target {target.shape} differ in shape")
        if target.ndim == 2:
            pred, target = pred[None], target[None]
        edges = np.asarray(self.bands)
        for p, t in zip(pred, target):
            dist = boundary_distance(t)
            valid = t != self.ignore_index
            d = dist[valid]
            ok = (p == t)[valid]
            # band k counts the pixels with d <= bands[k]: a histogram over the sorted widths, cumulated.
            slot = np.searchsorted(edges, d, side="left")  # first k with bands[k] >= d
            tot = np.bincount(slot, minlength=len(edges) + 1)[:len(edges)].cumsum()
            cor = np.bincount(slot[ok], minlength=len(edges) + 1)[:len(edges)].cumsum()
            self.total += torch.from_numpy(tot.astype(np.int64))
            self.correct += torch.from_numpy(cor.astype(np.int64))

    def all_reduce(self, reduce_sum):
        """Sum the counts over the processes with ``reduce_sum`` (:func:`train.process.all_reduce_sum`)."""
        self.correct, self.total = reduce_sum(self.correct), reduce_sum(self.total)

    def accuracy(self) -> list:
        """Accuracy per band width (NaN for an empty band)."""
        return [c / t if t else math.nan for c, t in zip(self.correct.tolist(), self.total.tolist())]

    def summary(self) -> dict:
        """``{"bands": [...], "accuracy": [...], "pixels": [...]}`` (JSON-ready)."""
        return {"bands": self.bands, "accuracy": [None if math.isnan(a) else a for a in self.accuracy()],
                "pixels": self.total.tolist()}

