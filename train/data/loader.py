"""Resumable, shardable sampling and batching for iteration-based training.

Training reads one endless stream: the concatenation of per-epoch permutations of the dataset,
each drawn from ``(seed, epoch)``. Global iteration ``it`` takes stream positions
``it*B .. it*B + B - 1`` (``B`` = batch per process × processes) and process ``r`` takes its
``b`` consecutive ones. Each sample is handed out with its stream position, from which
:class:`SegmentationSet` seeds its augmentation. So the batches and their augmentation depend
only on ``(seed, iteration, rank, world size)``: ``--resume`` at iteration ``k`` sees exactly
what an uninterrupted run sees from ``k`` on, in any number of DataLoader workers.
"""
from __future__ import annotations

import numpy as np
import torch

from .labels import VOID
from .transforms import to_tensors


class SegmentationSet(torch.utils.data.Dataset):
    """A raw dataset (``base[i] -> (image, label)``) with a paired transform:
    ``self[(index, seed, position)]`` applies ``transform(image, label, rng)`` with
    ``rng = np.random.default_rng([seed, position])`` (``self[index]``: position = index) and
    returns ``(image Tensor[3, H, W] float32, label Tensor[H, W] int64, index)``. Label values
    outside ``0..num_classes-1`` and 255 are a ``ValueError``."""

    def __init__(self, base, transform, num_classes: int, seed: int):
        self.base, self.transform = base, transform
        self.num_classes, self.seed = int(num_classes), int(seed)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        index, seed, pos = key if isinstance(key, tuple) else (int(key), self.seed, int(key))
        image, label = to_tensors(*self.base[index])
        bad = ((label >= self.num_classes) & (label != VOID)) | (label < 0)
        if bool(bad.any()):
            name = self.base.ids[index] if hasattr(self.base, "ids") else f"sample {index}"
            raise ValueError(f"{name}: label values {label[bad].unique().tolist()[:5]} outside "
                             f"0..{self.num_classes - 1} and 255 (void)")
        if self.transform is not None:
            image, label = self.transform(image, label, np.random.default_rng([seed, pos]))
        return image, label, index


class StreamBatchSampler(torch.utils.data.Sampler):
    """This process's batches of iterations ``start_iter .. max_iter - 1``, each a list of
    ``batch_size`` ``(index, seed, position)`` keys for :class:`SegmentationSet`."""

    def __init__(self, num_samples: int, batch_size: int, max_iter: int, *, seed: int, start_iter: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.n, self.b, self.max_iter = int(num_samples), int(batch_size), int(max_iter)
        self.seed, self.start_iter = int(seed), int(start_iter)
        self.rank, self.world = int(rank), int(world_size)
        self._perm_epoch, self._perm = -1, None

    def _index(self, pos: int) -> int:
        epoch, off = divmod(pos, self.n)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, 7919, epoch]).permutation(self.n)
            self._perm_epoch = epoch
        return int(self._perm[off])

    def __iter__(self):
        for it in range(self.start_iter, self.max_iter):
            start = (it * self.world + self.rank) * self.b
            yield [(self._index(p), self.seed, p) for p in range(start, start + self.b)]

    def __len__(self):
        return max(0, self.max_iter - self.start_iter)


class ShardSampler(torch.utils.data.Sampler):
    """Evaluation: indices ``rank, rank + world, ...`` of ``range(num_samples)``, without padding,
    so that a metric summed over the processes counts every image exactly once."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, int(num_samples), world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def pad_collate(batch):
    """Stack ``[(image [3, h, w], label [h, w], index), ...]`` into
    ``(images Tensor[N, 3, H, W], labels Tensor[N, H, W], sizes Tensor[N, 2], indices Tensor[N])``,
    padding each sample at the bottom/right to the batch's largest size (image 0, the mean after
    normalisation; label 255); ``sizes`` holds each sample's ``(h, w)``."""
    images, labels, indices = zip(*batch)
    sizes = torch.tensor([lab.shape for lab in labels], dtype=torch.long)
    h, w = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    out_i = images[0].new_zeros((len(images), 3, h, w))
    out_l = torch.full((len(labels), h, w), VOID, dtype=torch.long)
    for k, (im, lab) in enumerate(zip(images, labels)):
        out_i[k, :, :im.shape[1], :im.shape[2]] = im
        out_l[k, :lab.shape[0], :lab.shape[1]] = lab
    return out_i, out_l, sizes, torch.tensor(indices, dtype=torch.long)
