"""Segmentation metrics: confusion matrix, mIoU, per-class IoU, pixel accuracy, and DeepLab's
boundary "trimap" accuracy as a function of band width (DeepLab v1, figure 5). Both are sums of
integer counts, so the counts of several processes add up exactly (``all_reduce``)."""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

from .data import VOID


class ConfusionMatrix:
    """Accumulates ``mat[t, p]`` = number of pixels of true class ``t`` predicted as ``p``, over
    every pixel whose truth is not ``ignore_index``."""

    def __init__(self, num_classes: int, ignore_index: int = VOID):
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.mat = torch.zeros((self.num_classes, self.num_classes), dtype=torch.int64)

    def update(self, pred, target):
        """Add ``pred`` and ``target`` (integer arrays or tensors of equal shape, e.g. ``[N, H, W]``)."""
        pred, target = torch.as_tensor(pred).long().cpu(), torch.as_tensor(target).long().cpu()
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
        """Mean IoU over the classes with a non-empty union (VOC's protocol on the full val set)."""
        iou = self.iou()
        valid = ~torch.isnan(iou)
        return float(iou[valid].mean()) if bool(valid.any()) else math.nan

    def pixel_accuracy(self) -> float:
        """Correctly labelled pixels / all non-void pixels."""
        total = int(self.mat.sum())
        return float(self.mat.diag().sum()) / total if total else math.nan

    def mean_class_accuracy(self) -> float:
        """The mean recall of the classes present."""
        m = self.mat.double()
        rows = m.sum(1)
        valid = rows > 0
        return float((m.diag()[valid] / rows[valid]).mean()) if bool(valid.any()) else math.nan

    def summary(self, class_names=None) -> dict:
        """JSON-ready: ``miou``, ``pixel_accuracy``, ``mean_class_accuracy``, ``per_class_iou``
        (name -> IoU or None), ``confusion`` (list of lists)."""
        names = class_names or [str(i) for i in range(self.num_classes)]
        return {"miou": self.miou(), "pixel_accuracy": self.pixel_accuracy(),
                "mean_class_accuracy": self.mean_class_accuracy(),
                "per_class_iou": {n: (None if math.isnan(v) else v) for n, v in zip(names, self.iou().tolist())},
                "confusion": self.mat.tolist()}


def boundary_distance(label: np.ndarray) -> np.ndarray:
    """Euclidean distance (pixels, ``float[H, W]``) from each pixel to the nearest label boundary.

    A pixel is on a boundary when a 4-neighbour has a different label (void counts as a label, so
    VOC's void outlines are boundaries); both pixels of such a pair get distance 0. A label map
    with no boundary gives ``inf`` everywhere.
    """
    label = np.asarray(label)
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
    """Pixel accuracy inside the band of width ``b`` around label boundaries, for each width ``b``
    of ``bands``: of the non-void pixels whose :func:`boundary_distance` is ``<= b`` (DeepLab's
    trimap)."""

    def __init__(self, bands, ignore_index: int = VOID):
        self.bands = sorted(float(b) for b in bands)
        self.ignore_index = ignore_index
        self.correct = torch.zeros(len(self.bands), dtype=torch.int64)
        self.total = torch.zeros(len(self.bands), dtype=torch.int64)

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
            valid = t != self.ignore_index
            d = boundary_distance(t)[valid]
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
        """``{"bands": [...], "accuracy": [...], "pixels": [...]}`` (JSON-ready: None for NaN)."""
        return {"bands": self.bands, "accuracy": [None if math.isnan(a) else a for a in self.accuracy()],
                "pixels": self.total.tolist()}
