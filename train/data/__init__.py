"""Datasets (the synthetic shapes; PASCAL VOC 2012, SBD and DeepLab's train_aug), paired
transforms, the resumable samplers and reading any image file."""
from .labels import VOID
from .loader import SegmentationSet, ShardSampler, StreamBatchSampler, pad_collate
from .synthetic import SyntheticShapes
from .transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize, eval_transform, train_transform
from .voc import VOC_CLASSES, SBDSegmentation, VOCAugmented, VOCSegmentation, load_label_png

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "VOID", "VOC_CLASSES", "SBDSegmentation", "SegmentationSet",
           "ShardSampler", "StreamBatchSampler", "SyntheticShapes", "VOCAugmented", "VOCSegmentation",
           "build_dataset", "denormalize", "eval_transform", "load_label_png", "pad_collate", "train_transform"]


def build_dataset(name: str, split: str, *, data_root, sbd_root, seed: int, num_samples, image_size: int,
                  num_classes: int):
    """A raw dataset (``ds[i] -> (np.uint8[H, W, 3], np.int64[H, W])``, with ``class_names``):
    "synthetic" (``num_samples`` images of the split) or "voc" (the ``ImageSets/Segmentation``
    list ``split``, its first ``num_samples``, None: all; with ``sbd_root``, "train" is train_aug)."""
    if name == "synthetic":
        return SyntheticShapes(num_samples, size=image_size, num_classes=num_classes, split=split, seed=seed)
    if split == "train" and sbd_root is not None:
        return VOCAugmented(data_root, sbd_root).head(num_samples)
    return VOCSegmentation(data_root, split).head(num_samples)
