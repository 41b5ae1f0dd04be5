"""Datasets and paired transforms.

- :class:`SyntheticShapes`: procedural sharp-edged shapes, deterministic from a seed (the default).
- :class:`VOCSegmentation`, :class:`SBDSegmentation`, :class:`VOCAugmented`: PASCAL VOC 2012 and SBD.
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
    """A raw dataset (``ds[i] -> (np.uint8[H, W, 3], np.int64[H, W])``) with ``num_classes`` and
    ``class_names``: ``name`` "synthetic" (``num_samples`` images of ``image_size`` px, of
    ``num_classes`` classes, from ``seed``) or "voc" (``split`` any ``ImageSets/Segmentation`` list of
    ``data_root``, its first ``num_samples`` (None: all); with ``sbd_root``, "train" is DeepLab's train_aug)."""
    if name == "synthetic":
        return SyntheticShapes(num_samples, size=image_size, num_classes=num_classes, split=split, seed=seed)
    if name == "voc":
        ds = VOCAugmented(data_root, sbd_root) if split == "train" and sbd_root is not None \
            else VOCSegmentation(data_root, split)
        return ds.head(num_samples)
    raise ValueError(f"unknown dataset {name!r}; expected synthetic or voc")


__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "VOID", "SBDSegmentation", "SegmentationSet", "ShardSampler",
    "StreamBatchSampler", "SyntheticShapes", "VOCAugmented", "VOCSegmentation", "VOC_CLASSES",
    "build_dataset", "denormalize", "eval_transform", "load_label_png", "pad_collate", "train_transform",
]
