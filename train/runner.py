"""What the scripts share: setup (and the opening of a training run), data loaders, the DCNN stage, evaluation reports, the result
table, and the files a run leaves (metrics JSON, example grid, band-accuracy plot)."""
from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

import models

from . import distributed as dist_utils
from . import engine
from .checkpoint import load_training_state
from .data import SegmentationSet, eval_transform, train_transform
from .options import build_crf, datasets, finalize
from .visualize import image_grid, line_plot, save_image_atomic


def log(msg: str):
    """Print on rank 0 only."""
    if dist_utils.is_main_process():
        print(msg, flush=True)


def keep_large_blocks_in_the_heap() -> bool:
    """Stop glibc's malloc from returning large freed blocks to the system (Linux only).

    glibc serves every block over 32 MB with mmap and unmaps it on free, so on the CPU each
    [N, H*W, C] tensor of a CRF iteration (63 MB at N = 4, 500x375, C = 21) page-faults afresh
    at every step: batch-4 forward+backward ran about 1.8x slower per image than batch 1 (see
    README, `MALLOC_MMAP_MAX_=0 python bench/crf.py`). Returns whether the setting took.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, ...): leave malloc alone
        return False


def setup(args, overrides=None):
    """Finish the options (``overrides``: the script's per-dataset defaults), join the process
    group, seed (``seed + rank``), on the CPU keep large freed blocks in the heap
    (:func:`keep_large_blocks_in_the_heap`), create the output folder. Returns the
    :class:`train.distributed.DistInfo`."""
    finalize(args, overrides)
    info = dist_utils.init_distributed(args.device)
    engine.seed_everything(args.seed, info.rank)
    threads = getattr(args, "threads", None)
    if threads is None and info.device.type == "cpu":
        if args.dataset == "synthetic":
            threads = 1
        elif info.world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
            threads = max(1, (os.cpu_count() or 1) // info.world_size)
    if threads:
        torch.set_num_threads(threads)
    if info.device.type == "cpu":
        keep_large_blocks_in_the_heap()
    if info.is_main:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    return info


class TrainingRun(NamedTuple):
    """What every training script opens with (see :func:`start_training`)."""
    info: dist_utils.DistInfo
    out: Path              # the output folder
    timer: "Timer"
    train_set: SegmentationSet | None  # None when the data has no training split
    val_set: SegmentationSet
    class_names: list
    val_loader: object     # engine.make_eval_loader's loader
    logger: engine.MetricLogger


def start_training(args, overrides=None) -> TrainingRun:
    """:func:`setup`, then a timer, the train and val sets, the val loader and the metric log
    in ``args.out_dir``: the opening of train/dcnn.py, crf.py and joint.py."""
    info = setup(args, overrides)
    out = Path(args.out_dir)
    timer = Timer()
    train_set, val_set, names = make_sets(args)
    val_loader = engine.make_eval_loader(val_set, info, args.eval_batch_size, args.workers)
    logger = engine.MetricLogger(out, tensorboard=args.log == "tensorboard", enabled=info.is_main)
    return TrainingRun(info, out, timer, train_set, val_set, names, val_loader, logger)


def make_sets(args, train: bool = True):
    """``(train_set or None, val_set, class_names)`` as :class:`SegmentationSet` s."""
    tr_raw, va_raw = datasets(args, train=train)
    names = list(va_raw.class_names)
    tr = None
    if tr_raw is not None:
        tr = SegmentationSet(tr_raw, train_transform(args.crop_size, args.min_scale, args.max_scale,
                                                     not args.no_flip), args.num_classes, args.seed)
    va = SegmentationSet(va_raw, eval_transform(), args.num_classes)
    return tr, va, names


def loop_config(args, stage: str, iters: int, ckpt_path, lr=None, batch_size=None,
                stop_at=None) -> engine.LoopConfig:
    return engine.LoopConfig(
        max_iter=iters, batch_size=batch_size or args.batch_size, lr=args.lr if lr is None else lr,
        lr_policy=args.lr_policy, lr_step=args.lr_step, lr_gamma=args.lr_gamma,
        poly_power=args.poly_power, seed=args.seed, amp=args.amp, workers=args.workers,
        ckpt_path=str(ckpt_path) if ckpt_path else None, ckpt_every=args.ckpt_every,
        eval_every=args.eval_every, log_every=args.log_every, stage=stage,
        progress=not args.no_progress, stop_at=stop_at)


def make_scaler(args, info):
    return torch.amp.GradScaler(info.device.type, enabled=bool(args.amp and info.device.type == "cuda"))


def periodic_eval(args, model, val_loader, info, prefix=""):
    """An ``eval_fn`` for :func:`engine.train_loop`: mIoU of the DCNN (and with the CRF)."""
    def fn(_it):
        res, _ = engine.evaluate(model, val_loader, args.num_classes, info.device, amp=args.amp,
                                 bands=args.bands)
        return {f"{prefix}val_miou_{k}": v["miou"] for k, v in res.items()}
    return fn


def train_dcnn(args, info, net, train_set, val_loader, logger, iters: int, ckpt_path,
               resume_state: dict | None = None, lr=None, loss_fn=None, stop_at=None):
    """Stage 1: train a DeepLab alone (DeepLab's loss on the stride-8 scores).

    ``resume_state``: the dict :func:`train.checkpoint.load_training_state` returned for a
    checkpoint of this stage (its weights are already in ``net``), or None for a fresh start.
    Returns the loop summary.
    """
    if loss_fn is None:
        full = getattr(args, "dcnn_loss", "coarse") == "full"
        loss_fn = lambda m, x, y: engine.dcnn_loss(m, x, y, full_resolution=full)  # noqa: E731
    model = dist_utils.wrap_ddp(net, info)
    opt = engine.build_optimizer(net, name=args.optimizer, lr=args.lr if lr is None else lr,
                                 momentum=args.momentum, weight_decay=args.weight_decay,
                                 classifier_lr_mult=args.classifier_lr_mult)
    scaler = make_scaler(args, info)
    start = 0
    if resume_state is not None:
        start = _restore_optim(resume_state, opt, scaler)
        if logger is not None:
            logger.truncate("dcnn", start)
    cfg = loop_config(args, "dcnn", iters, ckpt_path, lr=lr, stop_at=stop_at)
    return engine.train_loop(model, train_set, loss_fn, opt, cfg, info, start_iter=start,
                             scaler=scaler, logger=logger, args=args,
                             eval_fn=periodic_eval(args, net, val_loader, info))


def _restore_optim(state, opt, scaler):
    if state.get("optimizer") is not None:
        opt.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    return int(state["iteration"])


def resume_info(path) -> dict:
    """The ``train`` dict of a checkpoint (stage, iteration, args) without touching any model."""
    _, extra = models.load_checkpoint(path)
    if "train" not in extra:
        raise ValueError(f"{path} holds no training state (not written by train/*.py); "
                         "use it with --init instead of --resume")
    return extra["train"]


def load_resume(path, model) -> dict:
    """Weights into ``model``, this rank's RNG restored; returns the train state dict
    (optimiser state applied later by the stage that owns the optimiser)."""
    return load_training_state(path, model, optimizer=None, scaler=None)


def open_resume(args) -> dict | None:
    """The ``train`` dict of ``--resume``'s checkpoint (see :func:`resume_info`), with the resumed
    stage logged and changed options warned about; None without ``--resume``."""
    if not args.resume:
        return None
    resumed = resume_info(args.resume)
    check_resume_args(resumed.get("args", {}), args)
    log(f"resuming {args.resume}: stage {resumed['stage']}, iteration {resumed['iteration']}")
    return resumed


def check_resume_args(saved: dict, args, keys=("dataset", "num_classes", "width", "variant", "batch_size",
                                                "seed", "image_size")):
    """Warn when a resumed run's options differ from the checkpoint's in ways that matter."""
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(args, k)}" for k in keys
             if k in saved and hasattr(args, k) and str(saved.get(k)) != str(getattr(args, k))]
    if diffs:
        log("warning: resuming with options that differ from the checkpoint's: " + "; ".join(diffs))


def load_model(path, args=None):
    """``(net, crf or None)`` from a models checkpoint: a DeepLab or a DeepLabCRF."""
    model, _ = models.load_checkpoint(path)
    if isinstance(model, models.DeepLabCRF):
        return model.net, model.crf
    return model, None


def crf_from_args(args):
    """The CRF layer for the options (checkpointable: it carries its constructor arguments)."""
    return build_crf(args)


# ----------------------------------------------------------------------------- reports
def short_metrics(res: dict) -> dict:
    """mIoU, pixel accuracy and the band accuracies of one evaluation result."""
    b = res["band_accuracy"]
    return {"miou": res["miou"], "pixel_accuracy": res["pixel_accuracy"],
            "band_accuracy": dict(zip([f"{x:g}" for x in b["bands"]], b["accuracy"]))}


def format_table(rows, band=None) -> str:
    """A text table: ``rows`` = [(name, result dict from engine.evaluate)].

    Columns: mIoU %, pixel accuracy %, and the accuracy within ``band`` px of a boundary %
    (default: the middle of the evaluated bands)."""
    if not rows:
        return ""
    bands = rows[0][1]["band_accuracy"]["bands"]
    if band is None:
        band = bands[min(len(bands) - 1, len(bands) // 2)]
    k = bands.index(band) if band in bands else len(bands) // 2
    head = ["model", "mIoU %", "pixel acc %", f"acc ≤{bands[k]:g}px of edge %"]
    body = []
    for name, res in rows:
        acc = res["band_accuracy"]["accuracy"][k]
        body.append([name, f"{100 * res['miou']:.2f}", f"{100 * res['pixel_accuracy']:.2f}",
                     "n/a" if acc is None else f"{100 * acc:.2f}"])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    sep = "-" * len(line(head))
    return "\n".join([sep, line(head), sep] + [line(r) for r in body] + [sep])


def write_json(path, obj):
    """Atomic JSON write (rank 0 only)."""
    if not dist_utils.is_main_process():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(_finite(obj), indent=2))
    os.replace(tmp, path)


def _finite(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def band_plot(path, curves: dict, title="Accuracy near object boundaries (trimap)"):
    """Write the band-accuracy plot: ``curves`` maps a name to a result dict (rank 0 only)."""
    if not dist_utils.is_main_process() or not curves:
        return
    series = {}
    for name, res in curves.items():
        b = res["band_accuracy"]
        series[name] = (b["bands"], [None if a is None else 100 * a for a in b["accuracy"]])
    save_image_atomic(line_plot(series, xlabel="trimap band width (px)", ylabel="pixel accuracy %",
                                title=title), path)


def examples_png(path, columns: dict, max_rows: int = 6, scale=None):
    """Write a grid: one row per example, columns image, truth, then each named prediction.

    ``columns`` maps a column title to a list of example dicts from :func:`engine.evaluate`
    (``"image"``, ``"label"``, and the prediction under key ``"dcnn"`` or ``"crf"``), given as
    ``(examples, key)`` pairs."""
    if not dist_utils.is_main_process() or not columns:
        return
    first = next(iter(columns.values()))[0]
    rows = []
    for i in range(min(max_rows, len(first))):
        row = [first[i]["image"], first[i]["label"]]
        for exs, key in columns.values():
            row.append(exs[i][key])
        rows.append(row)
    titles = ["image", "truth"] + list(columns.keys())
    if scale is None:  # pictures are for looking at: enlarge small images
        scale = max(1, min(4, 160 // max(rows[0][0].shape[0], 1)))
    save_image_atomic(image_grid(rows, col_titles=titles, scale=scale), path)


def first_examples(examples, key):
    """``(examples, key)`` for :func:`examples_png`."""
    return (examples, key)


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def run_main(main, parser):
    """Parse, run ``main(args)``; a NaN/Inf loss or bad input (missing or malformed dataset,
    bad option) ends with a one-line message and exit status 2 (other errors: traceback, 1)."""
    args = parser.parse_args()
    try:
        main(args)
    except (engine.NonFiniteLossError, FileNotFoundError, ValueError) as e:
        if os.environ.get("CRFRNN_TRACEBACK"):
            raise
        print(f"error: {e}  (set CRFRNN_TRACEBACK=1 for the traceback)", file=sys.stderr)
        sys.exit(2)
    finally:
        dist_utils.cleanup()
