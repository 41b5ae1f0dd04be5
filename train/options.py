"""The scripts' command-line options: declared here, parsed by argparse, finished and checked by
:func:`finalize`. Every option has one default, shown by ``--help``: in its declaration or, where
it depends on ``--dataset`` (and for a few on the script), in :data:`PRESETS`, whose rows ``--help``
shows for both datasets ("synthetic: 0.125; voc: 1.0"). Nothing here builds data, a net or a CRF.
"""
from __future__ import annotations

import argparse
import copy
import math
import os

import crfrnn
import models

#: The defaults that depend on the dataset: ``PRESETS[dataset][option]``, or, for an option whose
#: default depends on the script too, ``PRESETS[dataset][option][script]``. ``None``: the
#: option's help says what happens then.
PRESETS = {
    "synthetic": dict(
        num_classes={"dcnn": 4, "crf": 4, "joint": 4, "evaluate": None}, train_samples=1024, val_samples=100,
        crop_size=0, min_scale=1.0, max_scale=1.0, workers=0, width=0.125, dropout=0.0, crf_preset="synthetic",
        # The CRF's C x C matrices are O(1-10): joint training's Adam moves them by ~lr a step.
        crf_lr_mult={"crf": 1.0, "joint": 10.0},
        iters={"dcnn": 1500, "crf": 60, "joint": 300}, batch_size=8, lr={"dcnn": 1e-3, "crf": 1e-2, "joint": 1e-4},
        optimizer="adam", classifier_lr_mult=1.0, lr_policy="poly", lr_step=1000, dcnn_loss="full",
        pretrain_iters=1500, ckpt_every=100, eval_every=0, eval_batch_size=20, bands=[1, 2, 3, 4, 6, 8, 12],
        threads=1, search_w1=[3, 5, 10], search_sxy=[10, 20, 40], search_srgb=[6, 12, 24], search_samples=24),
    "voc": dict(
        num_classes={"dcnn": 21, "crf": 21, "joint": 21, "evaluate": None}, train_samples=None, val_samples=None,
        crop_size=321, min_scale=0.5, max_scale=1.5, workers=min(4, os.cpu_count() or 1), width=1.0, dropout=0.5,
        crf_preset="deeplab", crf_lr_mult=1.0,
        iters={"dcnn": 6000, "crf": 2000, "joint": 6000}, batch_size={"dcnn": 20, "crf": 10, "joint": 20},
        lr=1e-3, optimizer="sgd", classifier_lr_mult=10.0, lr_policy="step", lr_step=2000, dcnn_loss="coarse",
        pretrain_iters=0, ckpt_every=500, eval_every=1000, eval_batch_size=1,
        bands=[1, 2, 3, 4, 6, 8, 12, 16, 20, 30, 40], threads=0,
        # DeepLab's search ranges (paper, section 4.1); w2 = sigma_gamma = 3.
        search_w1=[5, 6, 7, 8, 9, 10], search_sxy=[50, 60, 70, 80, 90, 100],
        search_srgb=[3, 4, 5, 6, 7, 8, 9, 10], search_samples=100),
}
DATASETS = tuple(PRESETS)

#: Initial CRF parameters: bilateral (sigma_xy px, sigma_rgb, weight), spatial (sigma_xy px, weight).
CRF_PRESETS = {
    "deeplab": crfrnn.DEEPLAB_LARGEFOV_PARAMS,   # DeepLab-LargeFOV's cross-validated values (VOC)
    "crfasrnn": crfrnn.CRFRNN_PARAMS,             # CRF-RNN's defaults
    # Small images with flat, strongly coloured objects (the synthetic set): the best point of a
    # grid (w1 3/5/10, sigma_alpha 10/20/40, sigma_beta 6/12/24) on stride-8-blurred ground truth.
    "synthetic": dict(bilateral=(40.0, 24.0, 10.0), spatial=(3.0, 3.0)),
}

#: Options a resumed run may change freely: where the files go and how the run is watched and
#: checkpointed. None of them changes a number of the run.
RESUME_FREE = ("out_dir", "overwrite", "no_progress", "log", "log_every", "ckpt_every", "eval_every",
               "stop_at", "resume", "resume_anyway", "workers", "examples")
#: Options a resumed run may change with a warning: where the data or weights are read from (the
#: same files may have moved), or the evaluation and its report. Every other option (data,
#: model, CRF, optimiser, schedule, seed, --amp, --threads, ...) changes the arithmetic.
RESUME_WARN = ("data_root", "sbd_root", "vgg_weights", "device", "val_split", "val_samples",
               "eval_batch_size", "bands", "crf_eval_iters")


class PerDataset(dict):
    """A default that depends on ``--dataset``, shown by ``--help`` as ``synthetic: 0.125; voc: 1.0``."""

    def __str__(self):
        return "; ".join(f"{name}: {'none' if value is None else value}" for name, value in self.items())


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except a ``None`` one (the help says what happens then) and
    an off switch."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def parser(description: str, add_help: bool = True) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, add_help=add_help)


def set_presets(p: argparse.ArgumentParser, script: str, table: dict = PRESETS) -> argparse.ArgumentParser:
    """Give ``p``'s options their :data:`PRESETS` defaults for ``script`` (``"dcnn"``, ``"crf"``,
    ``"joint"``, ``"evaluate"``): a :class:`PerDataset` where the datasets' values differ. A row
    without a value for some dataset or for ``script`` is a ``KeyError``. The parsed options then
    name the script (``args.script``: a checkpoint records which script it continues). Returns ``p``."""
    declared = {a.dest: a.default for a in p._actions}
    for name in sorted(set(declared) & set().union(*table.values())):
        if declared[name] is not None:
            raise ValueError(f"--{name.replace('_', '-')} has a default in its declaration and in PRESETS")
        missing = [ds for ds in table if name not in table[ds]]
        if missing:
            raise KeyError(f"the preset of --{name.replace('_', '-')} has no value for {missing}")
        values = PerDataset()
        for ds, value in ((ds, table[ds][name]) for ds in table):
            if isinstance(value, dict):                          # a default per script
                if script not in value:
                    raise KeyError(f"the preset of --{name.replace('_', '-')} has no value for {script} ({ds})")
                value = value[script]
            values[ds] = copy.deepcopy(value)   # the parsed options may change in place, the table not
        same = all(v == values[DATASETS[0]] for v in values.values())
        p.set_defaults(**{name: values[DATASETS[0]] if same else values})
    p.set_defaults(script=script)
    return p


def add_data_args(p, training: bool = True):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=DATASETS,
                   help="'synthetic': generated shapes, no files needed; 'voc': PASCAL VOC 2012 from --data-root"
                        + (" (with SBD from --sbd-root for DeepLab's train_aug)" if training else ""))
    g.add_argument("--data-root", default=None, help="the VOC folder: VOCdevkit/VOC2012, or VOCdevkit, or the "
                                                     "folder that holds VOCdevkit (needed with --dataset voc)")
    if training:
        g.add_argument("--sbd-root", default=None, help="SBD's benchmark_RELEASE/dataset: adds SBD train+val "
                                                        "(minus VOC val) to training (none: VOC's list alone)")
        g.add_argument("--train-split", default="train", help="VOC ImageSets/Segmentation list to train on")
    g.add_argument("--val-split", default="val", help="VOC ImageSets/Segmentation list to evaluate on")
    g.add_argument("--num-classes", type=int,
                   help="classes incl. background" + ("" if training else " (none: the checkpoint's)"))
    g.add_argument("--image-size", type=int, default=64, help="side of the synthetic images in pixels")
    if training:
        g.add_argument("--train-samples", type=int,
                       help="training set size (VOC: the first N of the list; none: all of it)")
    g.add_argument("--val-samples", type=int,
                   help="evaluation set size (VOC: the first N of the list; none: all of it)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic dataset")
    if training:
        g.add_argument("--crop-size", type=int, help="side of the random training crop (0: no crop)")
        g.add_argument("--min-scale", type=float, help="random scale lower bound")
        g.add_argument("--max-scale", type=float, help="random scale upper bound")
        g.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    g.add_argument("--workers", type=int, help="DataLoader worker processes (0: load in the main process)")


def add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--variant", default="largefov", choices=tuple(models.VARIANTS),
                   help="DeepLab fc6 variant (the paper's field-of-view study)")
    g.add_argument("--width", type=float, help="channel multiplier of the VGG-16")
    g.add_argument("--msc", action="store_true", help="add the multi-scale (MSc) heads")
    g.add_argument("--dropout", type=float, help="dropout after fc6/fc7")
    g.add_argument("--vgg-weights", default=None, help="torchvision VGG-16 state dict (.pth) to initialise the "
                                                       "backbone (ImageNet; none: random initialisation)")


def add_crf_args(p, training: bool = True, preset_none: str = ""):
    g = p.add_argument_group("CRF")
    show = lambda values: " ".join(f"{x:g}" for x in values)  # noqa: E731
    presets = ", ".join(f"{name} ({show(v['bilateral'])}; {show(v['spatial'])})" for name, v in CRF_PRESETS.items())
    g.add_argument("--crf-preset", choices=tuple(CRF_PRESETS),
                   help="initial CRF parameters, bilateral (σα px, σβ, w1) and spatial (σγ px, w2): " + presets
                        + ("" if training else "; for a checkpoint without a CRF") + preset_none)
    g.add_argument("--bilateral", type=float, nargs=3, metavar=("SXY", "SRGB", "W"), default=None,
                   help="bilateral kernel: sigma_alpha (px), sigma_beta (0..255 colour), weight w1 "
                        "(none: the --crf-preset's)")
    g.add_argument("--spatial", type=float, nargs=2, metavar=("SXY", "W"), default=None,
                   help="spatial kernel: sigma_gamma (px), weight w2 (none: the --crf-preset's)")
    if training:
        g.add_argument("--crf-iters", type=int, default=5, help="mean-field iterations in training (CRF-RNN: 5)")
    g.add_argument("--crf-eval-iters", type=int, default=10, help="mean-field iterations at evaluation")
    if not training:
        return
    g.add_argument("--crf-lr-mult", type=float, help="lr multiplier of the CRF's kernel weights and compatibility")
    g.add_argument("--crf-weight-decay", type=float, default=0.0,
                   help="weight decay of the CRF parameters (0: decay would shrink the Potts start)")
    g.add_argument("--crf-loss", choices=("ce", "lovasz"), default="ce",
                   help="loss of the CRF's output: ce (cross-entropy, CRF-RNN's) or lovasz (the Lovász-softmax "
                        "surrogate of the IoU, which learns the bandwidths towards a better mIoU)")
    g.add_argument("--learn-bandwidths", action="store_true",
                   help="learn the CRF's bandwidths (σα, σβ, σγ) by gradient too, as log-parameters")
    g.add_argument("--compatibility", choices=crfrnn.COMPATIBILITY_SHARING, default="full",
                   help="sharing of the CRF's compatibility matrix: potts (fixed 1 - I), symmetric or full (CRF-RNN's)")
    g.add_argument("--kernel-weights", choices=crfrnn.KERNEL_WEIGHT_SHARING, default="full",
                   help="sharing of each kernel's weight matrix: scalar, diagonal or full (CRF-RNN's)")
    g.add_argument("--bandwidth-grad", choices=crfrnn.FEATURE_GRADIENTS, default="gaussian",
                   help="bandwidth gradient with --learn-bandwidths: gaussian (the Gaussian's derivative evaluated "
                        "with the lattice) or lattice (the lattice's own; cheaper, sign errors on colour bandwidths)")


def add_optim_args(p):
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, help="training iterations")
    g.add_argument("--batch-size", type=int, help="global mini-batch, split over processes")
    g.add_argument("--lr", type=float, help="base learning rate")
    g.add_argument("--optimizer", choices=("sgd", "adam"),
                   help="sgd (momentum; the paper) or adam (trains the from-scratch tiny net fast)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=5e-4,
                   help="weight decay (L2, added to the gradient) of the DCNN's weights")
    g.add_argument("--classifier-lr-mult", type=float, help="lr multiplier of fc8 (10 in the paper; Adam needs none)")
    g.add_argument("--lr-policy", choices=("step", "poly"),
                   help="step: ×--lr-gamma every --lr-step iterations; poly: (1-it/max)^--poly-power")
    g.add_argument("--lr-step", type=int, help="step policy period")
    g.add_argument("--lr-gamma", type=float, default=0.1, help="step policy factor")
    g.add_argument("--poly-power", type=float, default=0.9, help="poly policy exponent")
    g.add_argument("--dcnn-loss", choices=("coarse", "full"),
                   help="DCNN-stage loss: coarse = on the stride-8 scores vs labels subsampled by 8 (the "
                        "paper); full = on the upsampled scores (for tiny images: 64 px give 8x8 scores)")


def add_pretrain_args(g):
    """The DCNN stage of crf.py and joint.py, run when they get no trained DCNN."""
    g.add_argument("--pretrain-iters", type=int,
                   help="DCNN-alone iterations first, when no trained DCNN is given (VOC: train it with train/dcnn.py)")
    g.add_argument("--pretrain-lr", type=float, default=1e-3, help="base lr of that DCNN stage")


def add_output_args(p, out_dir: str, what: str, resumable: bool = False):
    """--out-dir, --overwrite, --device, --no-progress: what every script has."""
    g = p.add_argument_group("run")
    g.add_argument("--out-dir", default=out_dir, help=f"where {what} go")
    g.add_argument("--overwrite", action="store_true",
                   help="replace files this run writes that --out-dir holds from an earlier run (without it the "
                        "run refuses to start" + (", except with --resume of a checkpoint in --out-dir" if resumable
                                                  else "") + "); the run's inputs are never replaced")
    g.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:K")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (they are drawn only on a "
                                                               "terminal; elsewhere, and with this option, a "
                                                               "line now and then reports the progress)")
    return g


def add_checkpoint_args(p, preset_none: str = ""):
    """The options of evaluate.py and segment.py that say what model they run: the file, its CRF."""
    p.add_argument("--checkpoint", default="runs/joint/model.pt",
                   help="a model checkpoint (model.pt, dcnn.pt or checkpoint.pt of any train/ script)")
    p.add_argument("--no-crf", action="store_true", help="the DCNN alone, without the CRF")
    add_crf_args(p, training=False, preset_none=preset_none)


def add_run_args(p, out_dir: str, training: bool = True):
    """The run options of the training scripts and evaluate.py."""
    g = add_output_args(p, out_dir, "checkpoints, logs and pictures" if training else "metrics.json and the PNGs",
                        resumable=training)
    g.add_argument("--threads", type=int,
                   help="CPU threads for PyTorch (0: PyTorch's choice, shared out among the processes of a CPU "
                        "run under torchrun when OMP_NUM_THREADS is unset). 1 for the synthetic set: its tiny "
                        "convolutions gain little from more and lose 5-20x when the cores are shared with other work")
    g.add_argument("--amp", action="store_true", help="mixed precision (float16 on CUDA, bfloat16 on CPU)")
    g.add_argument("--eval-batch-size", type=int, help="images per evaluation batch")
    g.add_argument("--bands", type=float, nargs="+", help="trimap band widths (px) for the boundary accuracy")
    if not training:
        return
    flags = lambda names: ", ".join(f"--{n.replace('_', '-')}" for n in names)  # noqa: E731
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation")
    g.add_argument("--resume", default=None, metavar="CKPT",
                   help="continue a run exactly from its checkpoint (model, optimiser, schedule, RNG), with the "
                        "run's options: a changed option that changes the training is refused (see "
                        "--resume-anyway); only " + flags(n for n in RESUME_FREE if not n.startswith("resume"))
                        + " may change freely, and " + flags(RESUME_WARN) + " with a warning")
    g.add_argument("--resume-anyway", action="store_true",
                   help="with --resume, continue even with options that change the training (with a warning; "
                        "no longer an exact continuation)")
    g.add_argument("--ckpt-every", type=int,
                   help="write the checkpoint every N iterations (a killed run loses at most N)")
    g.add_argument("--eval-every", type=int, help="evaluate every N iterations (0: only at the end)")
    g.add_argument("--log", default="csv", choices=("csv", "tensorboard"),
                   help="metrics log: metrics.csv, or also TensorBoard (needs the tensorboard package)")
    g.add_argument("--log-every", type=int, default=10, help="log the loss every N iterations")
    g.add_argument("--stop-at", type=int, default=None, metavar="ITER",
                   help="end after this iteration of the (last) training stage, checkpointed, as if killed "
                        "there; continue later with --resume OUT/checkpoint.pt")


# Options whose values must be finite and positive, or finite and >= 0 (checked when present).
_POSITIVE = ("lr", "pretrain_lr", "min_scale", "max_scale", "width", "lr_gamma")
_NON_NEGATIVE = ("crf_lr_mult", "classifier_lr_mult", "weight_decay", "crf_weight_decay", "momentum",
                 "pretrain_iters", "threads", "examples", "workers", "eval_every", "crop_size", "poly_power",
                 "unary_loss_weight", "seed", "data_seed", "dropout", "alpha")
_AT_LEAST_ONE = ("iters", "batch_size", "num_classes", "eval_batch_size", "ckpt_every", "log_every", "stop_at",
                 "train_samples", "val_samples", "lr_step", "search_samples", "demo", "image_size")
# Options whose values must be below a bound: (name, bound, whether the bound itself is allowed).
_BELOW = (("dropout", 1.0, False), ("alpha", 1.0, True), ("seed", 2 ** 63, False), ("data_seed", 2 ** 63, False))
#: Options that name a file the run reads: it must be there before anything is written.
_INPUT_FILES = ("init", "dcnn", "resume", "vgg_weights")


def finalize(args: argparse.Namespace) -> argparse.Namespace:
    """Keep the chosen dataset's value of every :class:`PerDataset` default, fill ``--bilateral``
    and ``--spatial`` from ``--crf-preset``, and check the values, the one place they are checked:
    a ``ValueError`` naming the option for a NaN, a zero or negative count or learning rate, a
    negative multiplier, a scale range upside down, a dropout or opacity out of range; a
    ``FileNotFoundError`` for an input file that is not there. All before anything is written."""
    for name, value in vars(args).items():
        if isinstance(value, PerDataset):
            setattr(args, name, value[args.dataset])
    if getattr(args, "dataset", None) == "voc" and args.data_root is None:
        raise ValueError("--dataset voc needs --data-root DIR (the folder holding VOCdevkit)")
    if getattr(args, "crf_preset", None) is not None:
        preset = CRF_PRESETS[args.crf_preset]
        args.bilateral = list(args.bilateral or preset["bilateral"])
        args.spatial = list(args.spatial or preset["spatial"])
    for k in _AT_LEAST_ONE:
        if getattr(args, k, None) is not None and getattr(args, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    for k in _POSITIVE + _NON_NEGATIVE:
        value = getattr(args, k, None)
        if value is not None and (not math.isfinite(value) or value < 0 or (k in _POSITIVE and value == 0)):
            needs = "a finite number > 0" if k in _POSITIVE else "a finite number >= 0"
            raise ValueError(f"--{k.replace('_', '-')} must be {needs}, got {value}")
    for k, bound, inclusive in _BELOW:
        value = getattr(args, k, None)
        if value is not None and not (value <= bound if inclusive else value < bound):
            raise ValueError(f"--{k.replace('_', '-')} must be {'<=' if inclusive else '<'} {bound:g}, got {value}")
    for k in _INPUT_FILES:
        value = getattr(args, k, None)
        if value and not os.path.isfile(value):
            raise FileNotFoundError(f"--{k.replace('_', '-')} {value}: no such file")
    if getattr(args, "log", None) == "tensorboard":
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("--log tensorboard needs the tensorboard package (pip install tensorboard); "
                             "use --log csv without it") from None
    for width in getattr(args, "bands", None) or ():
        if not math.isfinite(width) or width < 0:
            raise ValueError(f"--bands widths must be finite and >= 0, got {width}")
    if getattr(args, "min_scale", None) is not None and not args.min_scale <= args.max_scale:
        raise ValueError(f"--min-scale {args.min_scale} must be <= --max-scale {args.max_scale}")
    return args
