"""Datasets and paired transforms.

- :class:`SyntheticShapes`: procedural sharp-edged shapes, deterministic from a seed (the default).
- :class:`VOCSegmentation`, :class:`SBDSegmentation`, :class:`VOCAugmented`: PASCAL VOC 2012 and
  SBD through torchvision's dataset classes.
- :func:`build_dataset`: one of the above, by name and split, as a raw ``(image, label)`` dataset.
- ``transforms``: paired random scale / crop (255 fill) / flip / ImageNet normalisation.
- ``loader``: resumable stream sampler for iteration-based training, shard sampler, padding collate.
"""
from .labels import VOID
from .loader import SegmentationSet, ShardSampler, StreamBatchSampler, pad_collate
from .synthetic import SyntheticShapes
from .transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, eval_transform, train_transform
from .voc import VOC_CLASSES, SBDSegmentation, VOCAugmented, VOCSegmentation, load_label_png


def build_dataset(name: str, split: str, *, data_root, sbd_root, seed: int, num_samples, image_size: int,
                  num_classes: int):
    """A raw dataset (``ds[i] -> (np.uint8[H, W, 3], np.int64[H, W])``) with ``num_classes``
    and ``class_names`` attributes.

    Args:
        name: ``"synthetic"`` or ``"voc"``.
        split: ``"train"`` or ``"val"`` (VOC: any ``ImageSets/Segmentation`` list; with
            ``sbd_root``, ``"train"`` means DeepLab's train_aug).
        data_root: the VOC folder (``--data-root``), for ``"voc"``.
        sbd_root: SBD's ``benchmark_RELEASE/dataset`` (``--sbd-root``) or None.
        num_samples: the first N samples (VOC: None for all of them).
        seed, image_size, num_classes: the synthetic set's.
    """
    if name == "synthetic":
        return SyntheticShapes(num_samples, size=image_size, num_classes=num_classes, split=split, seed=seed)
    if name == "voc":
        if split == "train" and sbd_root is not None:
            ds = VOCAugmented(data_root, sbd_root)
        else:
            ds = VOCSegmentation(data_root, split)
        if num_samples is not None and num_samples < len(ds):
            return _Head(ds, num_samples)
        return ds
    raise ValueError(f"unknown dataset {name!r}; expected synthetic or voc")


class _Head:
    """The first ``n`` samples of a dataset (keeps ``ids``, ``num_classes``, ``class_names``)."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, int(n)
        self.num_classes, self.class_names = ds.num_classes, ds.class_names
        self.ids = list(ds.ids[:self.n])

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.ds[i]


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "VOID", "SBDSegmentation", "SegmentationSet", "ShardSampler",
    "StreamBatchSampler", "SyntheticShapes", "VOCAugmented", "VOCSegmentation", "VOC_CLASSES",
    "build_dataset", "denormalize", "eval_transform", "load_label_png", "pad_collate", "train_transform",
]
