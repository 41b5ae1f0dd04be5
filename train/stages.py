"""The parts the training scripts (dcnn.py, crf.py, joint.py) are made of: the opening of a run,
and training stages that checkpoint, evaluate now and then, and resume exactly."""
from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import torch

import models

from . import distributed as dist_utils
from . import engine
from .checkpoint import data_description, load_training_state, open_resume
from .data import SegmentationSet
from .distributed import log
from .options import make_sets
from .outputs import OutputDir
from .process import open_output_dir, setup


class TrainingRun(NamedTuple):
    """What every training script opens with (see :func:`start_training`)."""
    info: dist_utils.DistInfo
    out: OutputDir         # the output folder: every file is written through out.claim(name)
    started: float         # time.perf_counter() at the start
    train_set: SegmentationSet
    val_set: SegmentationSet
    class_names: list
    val_loader: object     # engine.make_eval_loader's loader
    logger: engine.MetricLogger
    resumed: dict | None   # --resume's training state (train.checkpoint.resume_info), or None
    data: dict             # what the run trains on, stored in its checkpoints (data_description)

    @property
    def checkpoint(self) -> Path:
        """The resumable checkpoint every stage of the run writes (``--resume`` reads it)."""
        return self.out.path("checkpoint.pt")

    def seconds(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self.started


def start_training(args, outputs) -> TrainingRun:
    """:func:`train.process.setup`, ``--out-dir`` opened for the files ``outputs(args)`` names (with
    the options finished; refused before any work when one is there from an earlier run:
    :func:`train.process.open_output_dir`), what ``--resume`` continues
    (:func:`train.checkpoint.open_resume`), the seeds (``--seed`` + rank), the train and val
    sets, the val loader and the metric log."""
    info = setup(args)
    out = open_output_dir(args, ["checkpoint.pt", "metrics.csv", *outputs(args)])
    resumed = open_resume(args)
    engine.seed_everything(args.seed, info.rank)
    started = time.perf_counter()
    train_set, val_set, names = make_sets(args)
    val_loader = engine.make_eval_loader(val_set, info, args.eval_batch_size, args.workers)
    logger = engine.MetricLogger(out.claim("metrics.csv"), tensorboard=args.log == "tensorboard",
                                 enabled=info.is_main, resume=resumed is not None)
    return TrainingRun(info, out, started, train_set, val_set, names, val_loader, logger, resumed,
                       data_description(args, names))


def loop_config(args, stage: str, iters: int, ckpt_path, lr=None, stop_at=None) -> engine.LoopConfig:
    """The :class:`train.engine.LoopConfig` of the options for one stage (``lr``: the stage's
    base rate, ``--lr`` when None)."""
    return engine.LoopConfig(
        max_iter=iters, batch_size=args.batch_size, lr=args.lr if lr is None else lr,
        lr_policy=args.lr_policy, lr_step=args.lr_step, lr_gamma=args.lr_gamma,
        poly_power=args.poly_power, seed=args.seed, amp=args.amp, workers=args.workers,
        ckpt_path=str(ckpt_path) if ckpt_path else None, ckpt_every=args.ckpt_every,
        eval_every=args.eval_every, log_every=args.log_every, stage=stage,
        progress=not args.no_progress, stop_at=stop_at)


def periodic_eval(args, model, val_loader, info, prefix=""):
    """An ``eval_fn`` for :func:`engine.train_loop`: mIoU of the DCNN (and with the CRF)."""
    def fn(_it):
        res, _ = engine.evaluate(model, val_loader, args.num_classes, info.device, amp=args.amp,
                                 bands=args.bands)
        return {f"{prefix}val_miou_{k}": v["miou"] for k, v in res.items()}
    return fn


def train_stage(args, run: TrainingRun, model, optimizer, loss_fn, stage: str, iters: int, *,
                resume: bool = False, lr=None, stop_at=None, ckpt_extra: dict | None = None) -> dict:
    """Train ``model`` (a DeepLab or DeepLabCRF on the run's device; ``optimizer`` over its
    parameters) up to iteration ``iters``, writing ``run.checkpoint`` as stage ``stage``.

    ``resume``: first load ``--resume``'s checkpoint of this stage (weights, optimiser, AMP scaler,
    RNG) and continue from its iteration. ``lr``, ``stop_at``: see :func:`loop_config`;
    ``ckpt_extra``: plain values stored in every checkpoint, besides the run's ``data``. Returns
    :func:`engine.train_loop`'s summary.
    """
    scaler = torch.amp.GradScaler(run.info.device.type,
                                  enabled=bool(args.amp and run.info.device.type == "cuda"))
    start = 0
    if resume:
        start = int(load_training_state(args.resume, model, optimizer, scaler)["iteration"])
        run.logger.truncate(stage, start)
    cfg = loop_config(args, stage, iters, run.out.claim("checkpoint.pt"), lr=lr, stop_at=stop_at)
    return engine.train_loop(dist_utils.wrap_ddp(model, run.info), run.train_set, loss_fn, optimizer, cfg,
                             run.info, start_iter=start, scaler=scaler, logger=run.logger, args=args,
                             eval_fn=periodic_eval(args, model, run.val_loader, run.info),
                             ckpt_extra={"data": run.data, **(ckpt_extra or {})})


def train_dcnn(args, run: TrainingRun, net, iters: int, *, resume: bool = False, lr=None,
               stop_at=None) -> dict:
    """Train a DeepLab alone (stage "dcnn"): DeepLab's loss on the stride-8 scores, or on the
    upsampled ones with ``--dcnn-loss full``. See :func:`train_stage`."""
    full = args.dcnn_loss == "full"
    opt = engine.build_optimizer(net, name=args.optimizer, lr=args.lr if lr is None else lr,
                                 momentum=args.momentum, weight_decay=args.weight_decay,
                                 classifier_lr_mult=args.classifier_lr_mult)
    return train_stage(args, run, net, opt, lambda m, x, y: engine.dcnn_loss(m, x, y, full_resolution=full),
                       "dcnn", iters, resume=resume, lr=lr, stop_at=stop_at)


def pretrain_dcnn(args, run: TrainingRun, net, resumed: dict | None) -> dict | None:
    """Stage 1 of crf.py and joint.py when they are given no trained DCNN: ``--pretrain-iters``
    iterations of ``net`` alone at ``--pretrain-lr`` (continued when ``resumed``, the
    ``--resume`` checkpoint's state, is of this stage), then ``net`` is written to OUT/dcnn.pt.
    Nothing runs when ``resumed`` is of a later stage. Returns what is left to resume: None once
    this stage ran, else ``resumed``."""
    if resumed is not None and resumed["stage"] != "dcnn":
        return resumed
    log(f"stage 1: DCNN alone, {args.pretrain_iters} iterations")
    train_dcnn(args, run, net, args.pretrain_iters, resume=resumed is not None, lr=args.pretrain_lr)
    if run.info.is_main:
        models.save_checkpoint(run.out.claim("dcnn.pt"), net, data=run.data)
    dist_utils.barrier()
    return None
