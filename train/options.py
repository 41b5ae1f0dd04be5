"""Command-line options shared by the scripts, and their dataset-dependent defaults.

Options left unset (``None``) take the defaults of the chosen dataset in :func:`finalize`:
PASCAL VOC gets the papers' recipe (full-width VGG-16, batch 20, 6000 iterations, lr 1e-3 ×10 on
the classifier, ×0.1 every 2000, 321 crops); the synthetic set gets a small, fast setting that
finishes on two CPU cores in minutes.
"""
from __future__ import annotations

import argparse
import os

from .data import DATASETS, IMAGENET_MEAN, IMAGENET_STD, build_dataset

# Per-dataset defaults for options that default to None.
DEFAULTS = {
    "voc": dict(width=1.0, image_size=None, num_classes=21, batch_size=20, iters=6000, lr=1e-3,
                optimizer="sgd", lr_policy="step", lr_step=2000, crop_size=321, min_scale=0.5,
                max_scale=1.5, workers=min(4, os.cpu_count() or 1), ckpt_every=500, eval_every=1000, eval_batch_size=1,
                train_samples=None, val_samples=None, crf_preset="deeplab",
                bands=[1, 2, 3, 4, 6, 8, 12, 16, 20, 30, 40], dropout=0.5, dcnn_loss="coarse",
                classifier_lr_mult=10.0),
    "synthetic": dict(width=0.125, image_size=64, num_classes=4, batch_size=8, iters=1500, lr=1e-3,
                      optimizer="adam", lr_policy="poly", lr_step=1000, crop_size=0, min_scale=1.0,
                      max_scale=1.0, workers=0, ckpt_every=100, eval_every=0, eval_batch_size=20,
                      train_samples=1024, val_samples=100, crf_preset="synthetic",
                      bands=[1, 2, 3, 4, 6, 8, 12], dropout=0.0, dcnn_loss="full",
                      classifier_lr_mult=1.0),
}

# CRF parameters: (bilateral sigma_xy, sigma_rgb, weight), (spatial sigma_xy, weight).
CRF_PRESETS = {
    # DeepLab-LargeFOV's cross-validated values (VOC, ~500x375 images).
    "deeplab": dict(bilateral=(121.0, 5.0, 4.0), spatial=(3.0, 3.0)),
    # CRF-RNN's defaults.
    "crfasrnn": dict(bilateral=(160.0, 3.0, 5.0), spatial=(3.0, 3.0)),
    # Small images with flat, strongly coloured objects (the synthetic set): the best point of a
    # grid (w1 3/5/10, sigma_alpha 10/20/40, sigma_beta 6/12/24) on stride-8-blurred ground truth.
    "synthetic": dict(bilateral=(40.0, 24.0, 10.0), spatial=(3.0, 3.0)),
}


def add_data_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=DATASETS,
                   help="'synthetic': generated shapes, no files needed (default); 'voc': PASCAL VOC 2012 "
                        "from --data-root (with SBD from --sbd-root for DeepLab's train_aug)")
    g.add_argument("--data-root", default=None,
                   help="VOC folder: the one holding VOCdevkit, VOCdevkit, or VOCdevkit/VOC2012")
    g.add_argument("--sbd-root", default=None,
                   help="SBD's benchmark_RELEASE/dataset: adds SBD train+val (minus VOC val) to training")
    g.add_argument("--train-split", default="train", help="VOC ImageSets/Segmentation list to train on")
    g.add_argument("--val-split", default="val", help="VOC list to evaluate on")
    g.add_argument("--num-classes", type=int, default=None,
                   help="classes incl. background (VOC: 21; synthetic default 4)")
    g.add_argument("--image-size", type=int, default=None, help="synthetic image side in pixels (default 64)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="training set size (synthetic default 1024; VOC: first N of the split)")
    g.add_argument("--val-samples", type=int, default=None,
                   help="evaluation set size (synthetic default 100; VOC: first N of the split, default all)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic dataset")
    g.add_argument("--crop-size", type=int, default=None, help="training crop (VOC: 321; 0 = no crop)")
    g.add_argument("--min-scale", type=float, default=None, help="random scale lower bound (VOC 0.5)")
    g.add_argument("--max-scale", type=float, default=None, help="random scale upper bound (VOC 1.5)")
    g.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    g.add_argument("--workers", type=int, default=None, help="DataLoader worker processes")
    return g


def add_model_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("--variant", default="largefov", choices=("largefov", "7x7", "4x4", "4x4-d8"),
                   help="DeepLab fc6 variant (the paper's field-of-view study)")
    g.add_argument("--width", type=float, default=None,
                   help="channel multiplier of the VGG-16 (VOC 1.0; synthetic 0.125)")
    g.add_argument("--msc", action="store_true", help="add the multi-scale (MSc) heads")
    g.add_argument("--dropout", type=float, default=None, help="dropout after fc6/fc7 (VOC 0.5, synthetic 0)")
    g.add_argument("--vgg-weights", default=None,
                   help="torchvision VGG-16 state dict (.pth) to initialise the backbone (ImageNet)")
    return g


def add_crf_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("CRF")
    g.add_argument("--crf-preset", default=None, choices=sorted(CRF_PRESETS),
                   help="initial CRF parameters: deeplab (w1 4, sα 121, sβ 5, w2 3, sγ 3; VOC default), "
                        "crfasrnn (5, 160, 3, 3, 3) or synthetic (10, 40, 24, 3, 3)")
    g.add_argument("--bilateral", type=float, nargs=3, metavar=("SXY", "SRGB", "W"), default=None,
                   help="bilateral kernel: sigma_alpha (px), sigma_beta (0..255 colour), weight w1")
    g.add_argument("--spatial", type=float, nargs=2, metavar=("SXY", "W"), default=None,
                   help="spatial kernel: sigma_gamma (px), weight w2")
    g.add_argument("--crf-iters", type=int, default=5, help="mean-field iterations in training (CRF-RNN: 5)")
    g.add_argument("--crf-eval-iters", type=int, default=10, help="mean-field iterations at evaluation (10)")
    g.add_argument("--crf-lr-mult", type=float, default=None,
                   help="lr multiplier of the CRF's kernel weights and compatibility matrix "
                        "(joint.py: synthetic 10, VOC 1; crf.py: 1)")
    g.add_argument("--crf-weight-decay", type=float, default=0.0,
                   help="weight decay of the CRF parameters (0: decay would shrink the Potts start)")
    return g


def add_optim_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=None, help="training iterations (VOC 6000)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global mini-batch, split over processes (VOC 20)")
    g.add_argument("--lr", type=float, default=None, help="base learning rate (VOC 1e-3)")
    g.add_argument("--optimizer", default=None, choices=("sgd", "adam"),
                   help="sgd (momentum; the paper, VOC default) or adam (synthetic default: trains the "
                        "from-scratch tiny net fast)")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--classifier-lr-mult", type=float, default=None,
                   help="lr multiplier of fc8 (VOC 10 as in the paper; synthetic 1: Adam needs none)")
    g.add_argument("--lr-policy", default=None, choices=("step", "poly"),
                   help="step: ×--lr-gamma every --lr-step iterations (VOC); poly: (1-it/max)^--poly-power")
    g.add_argument("--lr-step", type=int, default=None, help="step policy period (VOC 2000)")
    g.add_argument("--lr-gamma", type=float, default=0.1)
    g.add_argument("--poly-power", type=float, default=0.9)
    g.add_argument("--dcnn-loss", default=None, choices=("coarse", "full"),
                   help="DCNN-stage loss: coarse = on the stride-8 scores vs labels subsampled by 8 (the "
                        "paper, VOC default); full = on the upsampled scores (synthetic default: its "
                        "64-px images give only 8x8 score maps)")
    g.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    return g


def add_run_args(p: argparse.ArgumentParser, out_dir: str):
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default=out_dir, help=f"where checkpoints, logs and pictures go ({out_dir})")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:K")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue a run exactly from its checkpoint (model, optimiser, schedule, RNG)")
    g.add_argument("--ckpt-every", type=int, default=None,
                   help="write the checkpoint every N iterations (a killed run loses at most N)")
    g.add_argument("--eval-every", type=int, default=None, help="evaluate every N iterations (0 = only at the end)")
    g.add_argument("--eval-batch-size", type=int, default=None, help="images per evaluation batch")
    g.add_argument("--log", default="csv", choices=("csv", "tensorboard"),
                   help="metrics log: metrics.csv, or also TensorBoard (needs the tensorboard package)")
    g.add_argument("--log-every", type=int, default=10, help="log the loss every N iterations")
    g.add_argument("--bands", type=float, nargs="+", default=None,
                   help="trimap band widths (px) for the boundary accuracy")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (0: PyTorch's choice). Default on CPU: 1 for the "
                        "synthetic set, whose tiny convolutions gain little from more and lose 5-20x "
                        "when the cores are shared with other work; PyTorch's choice otherwise")
    g.add_argument("--stop-at", type=int, default=None, metavar="ITER",
                   help="end after this iteration of the (last) training stage, checkpointed, as if "
                        "killed there; continue later with --resume OUT/checkpoint.pt")
    return g


def finalize(args: argparse.Namespace, overrides: dict | None = None) -> argparse.Namespace:
    """Fill options left at None with the dataset's defaults (``overrides[dataset]`` first: a
    script's own defaults, e.g. its iteration count); check the combination."""
    d = dict(DEFAULTS[args.dataset])
    d.update((overrides or {}).get(args.dataset, {}))
    for k, v in d.items():
        if getattr(args, k, "missing") is None:
            setattr(args, k, v)
    if args.dataset == "voc":
        if args.num_classes != 21:
            raise ValueError(f"PASCAL VOC has 21 classes, got --num-classes {args.num_classes}")
        if args.data_root is None:
            raise ValueError("--dataset voc needs --data-root DIR (the folder holding VOCdevkit)")
    if getattr(args, "crf_preset", None) is not None:
        preset = CRF_PRESETS[args.crf_preset]
        if getattr(args, "bilateral", None) is None:
            args.bilateral = list(preset["bilateral"])
        if getattr(args, "spatial", None) is None:
            args.spatial = list(preset["spatial"])
    for k in ("iters", "batch_size", "num_classes"):
        if getattr(args, k, None) is not None and getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    return args


def datasets(args, train: bool = True):
    """``(train_raw or None, val_raw)`` raw datasets for the options."""
    kw = dict(data_root=args.data_root, seed=args.data_seed, image_size=args.image_size,
              num_classes=args.num_classes)
    tr = None
    if train:
        tr = build_dataset(args.dataset, "train" if args.dataset == "synthetic" else args.train_split,
                           sbd_root=args.sbd_root, num_samples=args.train_samples, **kw)
    va = build_dataset(args.dataset, "val" if args.dataset == "synthetic" else args.val_split,
                       num_samples=args.val_samples, **kw)
    return tr, va


def build_crf(args):
    """A ``crfrnn.CRFRNNLayer`` from the options, for ImageNet-normalised inputs."""
    import crfrnn

    sxy, srgb, w1 = args.bilateral
    gxy, w2 = args.spatial
    kw = dict(num_classes=int(args.num_classes), num_iterations=int(args.crf_iters),
              num_eval_iterations=int(args.crf_eval_iters),
              bilateral=[float(sxy), float(srgb), float(w1)], spatial=[float(gxy), float(w2)],
              image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    return crfrnn.CRFRNNLayer(**kw)


def build_net(args):
    """A fresh ``models.DeepLab`` from the options (ImageNet VGG-16 backbone with --vgg-weights)."""
    import models

    net = models.deeplab(args.variant, num_classes=args.num_classes, msc=args.msc, width=args.width,
                         dropout=args.dropout)
    if getattr(args, "vgg_weights", None):
        models.load_vgg16_imagenet(net, args.vgg_weights)
    return net
