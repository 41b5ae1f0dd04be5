"""What the scripts are made of: the models and data of the options, losses, a training run and
its stages (:class:`TrainingRun`), and evaluation (:func:`evaluate`)."""
from __future__ import annotations

import csv
import functools
import io
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import crfrnn
import models
from models.files import atomic_write

from .checkpoint import (capture_rng, check_resume_args, check_resume_script, data_description, largest_parameter,
                         load_model, load_training_state, resume_info, save_training_checkpoint)
from .data import (IMAGENET_MEAN, IMAGENET_STD, VOID, SegmentationSet, ShardSampler, StreamBatchSampler,
                   build_dataset, denormalize, eval_transform, pad_collate, train_transform)
from .metrics import BandAccuracy, ConfusionMatrix
from .options import CRF_PRESETS, PRESETS, RESUME_FREE, RESUME_WARN
from .process import (DistInfo, all_gather_object, all_reduce_sum, any_true, barrier, is_main_process, log,
                      open_output_dir, progress_bar, setup, wrap_ddp)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the run stops, keeping the last good checkpoint."""


class NonFiniteOutputError(ValueError):
    """The model computed NaN or infinite scores: its parameters are broken (a checkpoint of a run
    that diverged, a damaged file), and every label it gives would be garbage."""


# ----------------------------------------------------------------------------- building
def make_sets(args, train: bool = True):
    """``(train_set or None, val_set, class_names)``: the :class:`train.data.SegmentationSet` s of the options."""
    if args.dataset == "voc" and args.num_classes != 21:
        raise ValueError(f"PASCAL VOC has 21 classes, got --num-classes {args.num_classes}")
    synthetic = args.dataset == "synthetic"
    kw = dict(data_root=args.data_root, seed=args.data_seed, image_size=args.image_size, num_classes=args.num_classes)
    val_raw = build_dataset(args.dataset, "val" if synthetic else args.val_split, sbd_root=None,
                            num_samples=args.val_samples, **kw)
    val = SegmentationSet(val_raw, eval_transform(), args.num_classes, seed=0)
    tr = None
    if train:
        tr_raw = build_dataset(args.dataset, "train" if synthetic else args.train_split, sbd_root=args.sbd_root,
                               num_samples=args.train_samples, **kw)
        tr = SegmentationSet(tr_raw, train_transform(args.crop_size, args.min_scale, args.max_scale, not args.no_flip),
                             args.num_classes, seed=args.seed)
    return tr, val, list(val_raw.class_names)


def build_net(args):
    """A fresh ``models.DeepLab`` of the options (ImageNet VGG-16 backbone with --vgg-weights)."""
    net = models.deeplab(args.variant, num_classes=args.num_classes, msc=args.msc, width=args.width,
                         dropout=args.dropout)
    if args.vgg_weights:
        models.load_vgg16_imagenet(net, args.vgg_weights)
    return net


def crf_layer(num_classes: int, bilateral, spatial, iterations: int, eval_iterations: int, **layer_options):
    """A ``crfrnn.CRFRNNLayer`` for ImageNet-normalised images (the DCNN's input): ``bilateral`` =
    (sigma_xy, sigma_rgb, w1), ``spatial`` = (sigma_xy, w2)."""
    return crfrnn.CRFRNNLayer(num_classes=int(num_classes), num_iterations=int(iterations),
                              num_eval_iterations=int(eval_iterations), bilateral=[float(x) for x in bilateral],
                              spatial=[float(x) for x in spatial], image_mean=list(IMAGENET_MEAN),
                              image_std=list(IMAGENET_STD), **layer_options)


def build_crf(args, bilateral=None):
    """The CRF layer of a training run's options (``bilateral``: instead of ``--bilateral``); a bad
    value is a ``ValueError`` naming the options, so scripts build it before any work."""
    try:
        return crf_layer(args.num_classes, bilateral or args.bilateral, args.spatial, args.crf_iters,
                         args.crf_eval_iters, learn_bandwidths=args.learn_bandwidths,
                         compatibility=args.compatibility, kernel_weights=args.kernel_weights,
                         bandwidth_grad=args.bandwidth_grad)
    except ValueError as e:
        raise ValueError(f"bad CRF options (--bilateral, --spatial, --crf-iters, --crf-eval-iters): {e}") from None


def load_for_inference(args, num_classes: int | None):
    """``(model, trained_on)``: ``--checkpoint``'s model as a ``models.DeepLabCRF`` whose CRF runs
    ``--crf-eval-iters`` iterations, and the data it was trained on (None: unrecorded). A
    checkpoint without a CRF gets one (unless ``--no-crf``) of ``--bilateral`` / ``--spatial``,
    else of ``--crf-preset``, else of the preset of the data it was trained on."""
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {args.checkpoint} not found (train one first, e.g. "
                                "python train/joint.py, or pass --checkpoint)")
    net, crf, trained_on = load_model(args.checkpoint, num_classes)
    if crf is None and not args.no_crf:
        preset = CRF_PRESETS[args.crf_preset or PRESETS[(trained_on or {}).get("dataset", "synthetic")]["crf_preset"]]
        bilateral, spatial = list(args.bilateral or preset["bilateral"]), list(args.spatial or preset["spatial"])
        crf = crf_layer(net.config["num_classes"], bilateral, spatial, args.crf_eval_iters, args.crf_eval_iters)
        log(f"the checkpoint has no CRF: adding one with bilateral {bilateral}, spatial {spatial}")
    elif crf is not None and (args.bilateral or args.spatial):
        log("note: the checkpoint has its own CRF, which runs as trained: --crf-preset, --bilateral and --spatial "
            "apply to a checkpoint without one")
    if crf is not None:
        crf.num_eval_iterations = args.crf_eval_iters
    return models.DeepLabCRF(net, crf), trained_on


# ----------------------------------------------------------------------------- losses
def downsample_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour subsampling of ``labels`` (Tensor[N, H, W] int64) to ``size`` (h, w),
    as DeepLab compares the stride-8 scores with the ground truth subsampled by 8."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def dcnn_loss(model, images: torch.Tensor, labels: torch.Tensor, *, full_resolution: bool):
    """Cross-entropy (void ignored) of a DeepLab's scores of ``images`` (Tensor[N, 3, H, W]): on
    the stride-8 map against the subsampled ``labels`` (Tensor[N, H, W]; the paper), or, with
    ``full_resolution``, on the upsampled scores."""
    scores = model(images).float()
    if full_resolution:
        scores = F.interpolate(scores, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(scores, downsample_labels(labels, scores.shape[-2:]), ignore_index=VOID)


def lovasz_softmax(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = VOID) -> torch.Tensor:
    """The Lovász-softmax loss (Berman, Triki & Blaschko, CVPR 2018): a convex surrogate of
    1 - IoU of each class present in an image's labels, averaged over those classes, then over
    the images. It follows the mIoU a segmentation is judged by where cross-entropy need not:
    cross-entropy's heavy price on confident mistakes can favour a weaker CRF than the one with
    the best mIoU (bench/crf_learning.py).

    Args:
        logits (Tensor[N, C, H, W]); labels (Tensor[N, H, W] int64, `ignore_index` ignored).
    """
    per_image = []
    for image_logits, image_labels in zip(logits, labels):
        probs = torch.softmax(image_logits.float(), 0).flatten(1).t()  # [P, C]
        keep = image_labels.flatten() != ignore_index
        probs, truth = probs[keep], image_labels.flatten()[keep]
        per_class = []
        for k in truth.unique().tolist():
            foreground = (truth == k).to(probs.dtype)
            errors, order = torch.sort((foreground - probs[:, k]).abs(), descending=True)
            in_order = foreground[order]
            # The gradient of the Lovász extension of the Jaccard loss at the sorted errors.
            total = in_order.sum()
            jaccard = 1.0 - (total - in_order.cumsum(0)) / (total + (1.0 - in_order).cumsum(0))
            per_class.append(torch.dot(errors, torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])))
        if per_class:
            per_image.append(torch.stack(per_class).mean())
    if not per_image:  # every pixel ignored
        return logits.sum() * 0.0
    return torch.stack(per_image).mean()


#: Losses of the CRF's refined logits (Tensor[N, C, H, W]) against labels (Tensor[N, H, W]), by --crf-loss.
CRF_LOSSES = {"ce": lambda logits, labels: F.cross_entropy(logits, labels, ignore_index=VOID),
              "lovasz": lovasz_softmax}


def joint_loss(model, images: torch.Tensor, labels: torch.Tensor, *, unary_weight: float, loss: str):
    """``loss`` (a key of :data:`CRF_LOSSES`) of a DeepLabCRF's refined logits at full resolution,
    plus ``unary_weight`` × the DCNN's own stride-8 cross-entropy (CRF-RNN: 0)."""
    out = model(images)
    total = CRF_LOSSES[loss](out["crf"].float(), labels)
    if unary_weight:
        coarse = out["coarse"].float()
        total = total + unary_weight * F.cross_entropy(coarse, downsample_labels(labels, coarse.shape[-2:]),
                                                       ignore_index=VOID)
    return total


def autocast(device: torch.device, enabled: bool):
    """Mixed precision: float16 on CUDA, bfloat16 on CPU."""
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                          enabled=enabled)


def _broken(model, images: torch.Tensor, amp: bool) -> bool:
    """Whether ``model`` can no longer give a finite loss: a parameter, a CRF pairwise matrix or
    the DCNN's scores of ``images`` hold NaN/Inf (the CRF refuses such input with a ValueError
    before any loss exists)."""
    m = models.unwrap(model)
    net, crf = getattr(m, "net", m), getattr(m, "crf", None)
    with torch.no_grad(), autocast(images.device, amp):
        tensors = [*m.parameters(), net(images)]
        tensors += list(crf.pairwise_matrices()) if hasattr(crf, "pairwise_matrices") else []
        return not all(bool(torch.isfinite(t).all()) for t in tensors)


# ----------------------------------------------------------------------------- optimisation
def lr_factor(it: int, policy: str, max_iter: int, step_size: int, gamma: float, power: float) -> float:
    """Multiplier of the base learning rate at iteration ``it`` (0-based): ``"step"``:
    ``gamma ** (it // step_size)`` (DeepLab: ×0.1 every 2000); ``"poly"``: ``(1 - it/max_iter) ** power``."""
    if policy == "step":
        return gamma ** (it // step_size)
    if policy == "poly":
        return max(0.0, 1.0 - it / max(1, max_iter)) ** power
    raise ValueError(f"unknown lr policy {policy!r}; expected step or poly")


def make_optimizer(model, args, lr: float) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or Adam (``--optimizer``) over the trainable parameters of a
    DeepLab or DeepLabCRF, in named groups whose initial learning rate is ``lr`` × a multiplier:
    ``backbone`` (conv1_1..fc7, ×1), ``classifier`` (fc8 and MSc heads, ×--classifier-lr-mult)
    and ``crf`` (×--crf-lr-mult, with --crf-weight-decay: 0 keeps decay from pulling the Potts
    compatibility to zero). Empty groups are left out."""
    m = models.unwrap(model)
    net, crf = getattr(m, "net", m), getattr(m, "crf", None)
    parts = net.parameter_groups()
    spec = [("backbone", parts["backbone"], 1.0, args.weight_decay),
            ("classifier", parts["classifier"], args.classifier_lr_mult, args.weight_decay)]
    if crf is not None:
        spec.append(("crf", list(crf.parameters()), args.crf_lr_mult, args.crf_weight_decay))
    groups = [{"params": trainable, "name": name, "lr": lr * float(mult), "initial_lr": lr * float(mult),
               "weight_decay": float(decay)}
              for name, params, mult, decay in spec if (trainable := [p for p in params if p.requires_grad])]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=args.momentum)
    return torch.optim.Adam(groups, lr=lr)         # its weight decay is L2 as SGD's (added to the gradient)


def lr_schedule(optimizer, args, iters: int, start: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Each group's ``initial_lr`` × :func:`lr_factor` of the iteration, at iteration ``start`` of
    ``iters``; step it after each iteration."""
    factor = functools.partial(lr_factor, policy=args.lr_policy, max_iter=iters, step_size=args.lr_step,
                               gamma=args.lr_gamma, power=args.poly_power)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=start - 1)


class MetricLogger:
    """Scalars to a CSV file (columns: time, stage, iteration, name, value) and, with
    ``tensorboard``, to TensorBoard event files in a ``tensorboard`` folder beside it; only where
    ``enabled`` (rank 0). A resumed run (``resume``) keeps the file, dropping what follows its
    checkpoint (:meth:`truncate`); a new one starts it afresh."""

    FIELDS = ("time", "stage", "iteration", "name", "value")

    def __init__(self, path, *, tensorboard: bool, enabled: bool, resume: bool):
        self.enabled, self.path, self.tb = enabled, Path(path), None
        if not enabled:
            return
        if not resume or not self.path.is_file():
            self._write_rows([])
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("--log tensorboard needs the tensorboard package "
                                  "(pip install tensorboard); use --log csv without it") from e
            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def _write_rows(self, rows):
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, self.FIELDS)
        w.writeheader()
        w.writerows(rows)
        atomic_write(self.path, text.getvalue().encode())

    def truncate(self, stage: str, iteration: int):
        """Drop the rows of ``stage`` after ``iteration`` (a resumed run logs them again)."""
        if self.enabled and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = list(csv.DictReader(f))
            self._write_rows([r for r in rows if not (r["stage"] == stage and int(r["iteration"]) > iteration)])

    def log(self, stage: str, iteration: int, **scalars):
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            now = f"{time.time():.3f}"
            csv.DictWriter(f, self.FIELDS).writerows({"time": now, "stage": stage, "iteration": iteration,
                                                      "name": k, "value": v} for k, v in scalars.items())
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{stage}/{k}", v, iteration)
            self.tb.flush()        # the scripts never close the log: a run may end or be killed any time

    def close(self):
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- a training run
class TrainingRun:
    """What every training script opens with, once its options are finished: the process, the
    output folder (refused before any work when ``checkpoint.pt``, ``metrics.csv`` or one of
    ``outputs`` is there from an earlier run), what ``--resume`` continues (its options checked
    against the checkpoint's), the seeds (``--seed`` + rank), the data and the metric log."""

    def __init__(self, args, outputs):
        self.args, self.info = args, setup(args)
        if args.batch_size % self.info.world_size:
            raise ValueError(f"--batch-size {args.batch_size} must be divisible by the number of processes "
                             f"({self.info.world_size})")
        self.resumed = None      # --resume's training state (checkpoint.resume_info), checked before any write
        if args.resume:
            self.resumed = resume_info(args.resume)
            check_resume_script(args.resume, self.resumed, args.script)
            warning = check_resume_args(self.resumed.get("args", {}), args, RESUME_FREE, RESUME_WARN)
        self.out = open_output_dir(args, ["checkpoint.pt", "metrics.csv", *outputs])
        if args.resume:
            if warning:
                log(warning)
            log(f"resuming {args.resume}: stage {self.resumed['stage']}, iteration {self.resumed['iteration']}")
        seed = args.seed + self.info.rank         # processes drop out differently
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)
        self.started = time.perf_counter()
        self.train_set, self.val_set, self.class_names = make_sets(args)
        self.val_loader = eval_loader(self.val_set, self.info, args.eval_batch_size, args.workers)
        self.logger = MetricLogger(self.out.claim("metrics.csv"), tensorboard=args.log == "tensorboard",
                                   enabled=self.info.is_main, resume=self.resumed is not None)
        self.data = data_description(args, self.class_names)   # stored in every checkpoint

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def evaluate(self, model, num_examples: int = 0, desc: str = "eval", progress: bool = True):
        """:func:`evaluate` on the run's validation set with its options."""
        a = self.args
        return evaluate(model, self.val_loader, self.info.device, a.num_classes, a.bands, amp=a.amp,
                        progress=progress and not a.no_progress, class_names=self.class_names,
                        num_examples=num_examples, desc=desc)

    def train(self, model, loss_fn, stage: str, iters: int, lr: float, *, resume: bool,
              stop_at: int | None = None, extra: dict | None = None) -> dict:
        """Train ``model`` (a DeepLab or DeepLabCRF on the run's device) up to iteration ``iters`` at
        base learning rate ``lr``, writing the run's checkpoint as stage ``stage``.

        ``loss_fn(model, images, labels)``: the loss of a batch (images Tensor[N, 3, H, W],
        labels Tensor[N, H, W]). ``resume``: first load ``--resume``'s checkpoint of this stage and
        go on from its iteration. ``stop_at``: end after that iteration, checkpointed, as if
        killed there. ``extra``: plain values stored in every checkpoint. Returns
        ``{"iterations" (run now), "loss" (mean of the last log interval), "seconds",
        "images_per_s", "stopped"}``; raises :class:`NonFiniteLossError` on a NaN/Inf loss (no
        checkpoint is written after it).
        """
        args, info = self.args, self.info
        optimizer = make_optimizer(model, args, lr)
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        scaler = torch.amp.GradScaler(info.device.type, enabled=bool(args.amp and info.device.type == "cuda"))
        start, loss_sum, loss_n = 0, 0.0, 0
        if resume:
            state = load_training_state(args.resume, model, optimizer, scaler, rank=info.rank,
                                        world_size=info.world_size)
            start = int(state["iteration"])
            loss_sum, loss_n = state.get("loss_interval", (0.0, 0))   # (the mean being logged goes on)
            self.logger.truncate(stage, start)
            for group, setting in zip(optimizer.param_groups, settings):
                group.update(setting)      # the options' rates and decays (also those of --resume-anyway)
        scheduler = lr_schedule(optimizer, args, iters, start)
        factor = scheduler.lr_lambdas[0]
        ddp = wrap_ddp(model, info)
        ddp.train()
        bar = progress_bar(total=iters, initial=start, desc=stage, leave=True,
                           enabled=not args.no_progress and info.is_main)
        # Without a bar (not a terminal, or --no-progress), one line now and then says how it goes.
        every = args.log_every
        line_every = every * max(1, math.ceil(iters / 20 / every))
        ckpt = self.out.claim("checkpoint.pt")
        last_ckpt = f"the last good checkpoint is {ckpt} (iteration {start})" if start else \
            "no checkpoint was written yet"
        t0 = t_log = time.perf_counter()
        n_log, seen, last_loss, done = 0, 0, math.nan, start
        for it, (images, labels, _, _) in enumerate(self._train_loader(iters, start), start=start):
            images = images.to(info.device, non_blocking=True)
            labels = labels.to(info.device, non_blocking=True)
            try:
                with autocast(info.device, args.amp):
                    loss = loss_fn(ddp, images, labels)
                value = float(loss.detach())
            except ValueError:
                if not _broken(model, images, args.amp):
                    raise
                value = math.nan
            if any_true(not math.isfinite(value)):
                bar.close()
                raise NonFiniteLossError(f"[{stage}] the loss is {value} at iteration {it} (lr {lr:g} × "
                                         f"{factor(it):g}); stopping. {last_ckpt}. Try a lower --lr, or run "
                                         "without --amp.")
            optimizer.zero_grad(set_to_none=True)
            if scaler.is_enabled():
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            done = it + 1
            seen += images.shape[0] * info.world_size
            n_log += images.shape[0] * info.world_size
            loss_sum, loss_n = loss_sum + value, loss_n + 1
            bar.update(1)
            if done % every == 0 or done == iters:
                now, rate = time.perf_counter(), optimizer.param_groups[0]["lr"]
                ips, last_loss = n_log / max(now - t_log, 1e-9), loss_sum / loss_n
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{ips:.1f}", lr=f"{rate:.2g}")
                if bar.disable and info.is_main and (done % line_every == 0 or done == iters):
                    print(f"[{stage}] iteration {done}/{iters}: loss {last_loss:.4f}, {ips:.1f} images/s, "
                          f"lr {rate:.3g}", flush=True)
                self.logger.log(stage, done, loss=last_loss, lr=rate, images_per_s=ips)
                t_log, n_log, loss_sum, loss_n = now, 0, 0.0, 0
            stopping = stop_at is not None and stop_at <= done < iters
            if done % args.ckpt_every == 0 or done == iters or stopping:
                rngs = all_gather_object(capture_rng())   # every process's, for an exact resume
                if info.is_main:
                    save_training_checkpoint(ckpt, model, optimizer=optimizer, iteration=done, scaler=scaler,
                                             rngs=rngs, args=args, stage=stage, loss_interval=(loss_sum, loss_n),
                                             data=self.data, **(extra or {}))
                last_ckpt = f"the last good checkpoint is {ckpt} (iteration {done})"
            if args.eval_every and done % args.eval_every == 0 and done < iters:
                scalars = {f"val_miou_{k}": v["miou"] for k, v in self.evaluate(model, progress=False)[0].items()}
                ddp.train()
                self.logger.log(stage, done, **scalars)
                if info.is_main:
                    bar.write(f"[{stage}] iteration {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
            scheduler.step()
            if stopping:
                break
        bar.close()
        if done < iters:
            log(f"stopped after {stage} iteration {done}; continue with --resume {ckpt}")
        secs = time.perf_counter() - t0
        return {"iterations": done - start, "loss": last_loss, "seconds": secs,
                "images_per_s": seen / max(secs, 1e-9), "stopped": done < iters}

    def _train_loader(self, iters: int, start: int):
        """This process's batches of iterations ``start..iters-1`` (:class:`train.data.StreamBatchSampler`)."""
        args, info = self.args, self.info
        sampler = StreamBatchSampler(len(self.train_set), args.batch_size // info.world_size, iters, seed=args.seed,
                                     start_iter=start, rank=info.rank, world_size=info.world_size)
        # A private generator keeps the DataLoader from drawing on the global torch RNG (dropout's),
        # so a resumed run consumes exactly the random numbers an uninterrupted one does.
        return torch.utils.data.DataLoader(self.train_set, batch_sampler=sampler, collate_fn=pad_collate,
                                           num_workers=args.workers, generator=torch.Generator(),
                                           pin_memory=info.device.type == "cuda")

    def train_dcnn(self, net, iters: int, lr: float, *, resume: bool, stop_at: int | None = None) -> dict:
        """Stage "dcnn": a DeepLab alone, with ``--dcnn-loss`` (see :meth:`train`)."""
        loss = functools.partial(dcnn_loss, full_resolution=self.args.dcnn_loss == "full")
        return self.train(net, loss, "dcnn", iters, lr, resume=resume, stop_at=stop_at)

    def pretrain_dcnn(self, net) -> dict | None:
        """Stage 1 of crf.py and joint.py when they get no trained DCNN: ``--pretrain-iters``
        iterations of ``net`` alone at ``--pretrain-lr`` (continued when ``--resume`` is of this
        stage; skipped when it is of a later one), then ``net`` goes to OUT/dcnn.pt. Returns what
        is left to resume (None once this stage ran)."""
        if self.resumed is not None and self.resumed["stage"] != "dcnn":
            return self.resumed
        log(f"stage 1: DCNN alone, {self.args.pretrain_iters} iterations")
        self.train_dcnn(net, self.args.pretrain_iters, self.args.pretrain_lr, resume=self.resumed is not None)
        if self.info.is_main:
            models.save_checkpoint(self.out.claim("dcnn.pt"), net, data=self.data)
        barrier()
        return None


# ----------------------------------------------------------------------------- evaluation
def eval_loader(dataset, info: DistInfo, batch_size: int, workers: int):
    """A DataLoader over this process's shard of ``dataset`` (every image exactly once overall)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                       sampler=ShardSampler(len(dataset), info.rank, info.world_size),
                                       collate_fn=pad_collate, num_workers=workers, generator=torch.Generator())


def forward_eval(model, images: torch.Tensor, use_crf: bool) -> dict:
    """``{"unary": Tensor[N, C, H, W], "crf": Tensor[N, C, H, W] or None}`` of a DeepLab or a
    DeepLabCRF (its CRF on when ``use_crf`` and it has one); :class:`NonFiniteOutputError` when
    either holds NaN or an infinity."""
    m = models.unwrap(model)
    if hasattr(m, "crf"):
        prev, m.use_crf = m.use_crf, bool(use_crf and m.crf is not None)
        try:
            out = m(images)
        finally:
            m.use_crf = prev
        res = {"unary": out["unary"], "crf": out["crf"]}
    else:
        res = {"unary": m(images, upsample=True), "crf": None}
    for key, what in (("unary", "DCNN's scores hold"), ("crf", "CRF's output holds")):
        if res[key] is not None and not bool(torch.isfinite(res[key]).all()):
            raise NonFiniteOutputError(f"the {what} NaN or infinite values: the model's parameters are "
                                       f"broken ({largest_parameter(m)})")
    return res


@torch.no_grad()
def evaluate(model, loader, device, num_classes: int, bands, *, amp: bool, progress: bool, class_names=None,
             num_examples: int = 0, use_crf: bool = True, desc: str = "eval"):
    """``(results, examples)``: the metrics of a DeepLab or DeepLabCRF ``model`` (in eval mode,
    then put back in its mode) on the batches of ``loader`` (as :func:`eval_loader`'s), summed
    over all processes: ``results["dcnn"]`` of the DCNN alone and, when the model has a CRF and
    ``use_crf``, ``results["crf"]`` with it, each ``{"miou", "pixel_accuracy",
    "mean_class_accuracy", "per_class_iou", "confusion", "band_accuracy"}`` (``bands``: the
    trimap widths, px); ``examples``: this process's first ``num_examples`` as ``{"index",
    "image" uint8[H, W, 3], "label", "dcnn", "crf"}``."""
    m = models.unwrap(model)
    was_training = m.training
    m.eval()
    has_crf = use_crf and getattr(m, "crf", None) is not None
    modes = ["dcnn"] + (["crf"] if has_crf else [])
    cms, bas = {k: ConfusionMatrix(num_classes) for k in modes}, {k: BandAccuracy(bands) for k in modes}
    examples = []
    for images, labels, sizes, indices in progress_bar(loader, desc=desc, leave=False,
                                                       enabled=progress and is_main_process()):
        images = images.to(device)
        with autocast(device, amp):
            out = forward_eval(m, images, has_crf)
        preds = {"dcnn": out["unary"].float().argmax(1).cpu()}
        if has_crf:
            preds["crf"] = out["crf"].float().argmax(1).cpu()
        for k in range(images.shape[0]):
            h, w = int(sizes[k, 0]), int(sizes[k, 1])
            lab = labels[k, :h, :w]
            for mode in modes:
                cms[mode].update(preds[mode][k, :h, :w], lab)
                bas[mode].update(preds[mode][k, :h, :w], lab)
            if len(examples) < num_examples:
                img = denormalize(images[k, :, :h, :w].float().cpu()).round().byte().permute(1, 2, 0).numpy()
                examples.append({"index": int(indices[k]), "image": img, "label": lab.numpy(),
                                 **{mode: preds[mode][k, :h, :w].numpy() for mode in modes}})
    results = {}
    for mode in modes:
        cms[mode].all_reduce(all_reduce_sum)
        bas[mode].all_reduce(all_reduce_sum)
        results[mode] = {**cms[mode].summary(class_names), "band_accuracy": bas[mode].summary()}
    m.train(was_training)
    return results, examples


@torch.no_grad()
def search_grid(samples, make_crf, grid, num_classes: int, *, progress: bool, reduce_sum=None):
    """DeepLab's search of the CRF's parameters: the mIoU of ``make_crf(w1, sxy, srgb)`` (a CRF in
    eval mode) at every ``(w1, sxy, srgb)`` of ``grid``, on ``samples``: ``[(unary Tensor[N, C, H, W],
    image Tensor[N, 3, H, W], labels Tensor[N, H, W], void and padding 255)]`` computed once (each
    point then costs only the CRF); ``reduce_sum`` sums the confusion counts over processes.
    Returns the best point and all of them: ``[{"w1", "sxy", "srgb", "miou"}]``."""
    points = []
    for w1, sxy, srgb in progress_bar(list(grid), desc="grid search", enabled=progress):
        crf = make_crf(w1, sxy, srgb)
        cm = ConfusionMatrix(num_classes)
        for unary, image, labels in samples:
            cm.update(crf(unary, image).argmax(1).cpu(), labels)
        if reduce_sum is not None:
            cm.all_reduce(reduce_sum)
        points.append({"w1": float(w1), "sxy": float(sxy), "srgb": float(srgb), "miou": cm.miou()})
    return max(points, key=lambda p: p["miou"]), points
