"""The training and evaluation loops and their parts: learning-rate schedules, parameter groups,
losses, the non-finite-loss guard, and a metrics log.

The schedule is a pure function of the iteration (``lr = base · mult · factor(it)``), so an
exact ``--resume`` needs only the iteration, the optimiser state and the RNG states
(:mod:`train.checkpoint`).
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.files import atomic_write

from . import distributed as dist_utils
from .checkpoint import largest_parameter, save_training_checkpoint
from .data import VOID, ShardSampler, StreamBatchSampler, pad_collate
from .data.transforms import denormalize
from .metrics import BandAccuracy, ConfusionMatrix

LR_POLICIES = ("step", "poly")
OPTIMIZERS = ("sgd", "adam")


# ----------------------------------------------------------------------------- schedule
def lr_factor(it: int, policy: str = "step", max_iter: int = 6000, step_size: int = 2000,
              gamma: float = 0.1, power: float = 0.9) -> float:
    """Multiplier of the base learning rate at iteration ``it`` (0-based).

    ``"step"``: ``gamma ** (it // step_size)`` (DeepLab: ×0.1 every 2000 iterations).
    ``"poly"``: ``(1 - it / max_iter) ** power``.
    """
    if policy == "step":
        if step_size <= 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        return gamma ** (it // step_size)
    if policy == "poly":
        return max(0.0, 1.0 - it / max(1, max_iter)) ** power
    raise ValueError(f"unknown lr policy {policy!r}; expected one of {LR_POLICIES}")


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float):
    """Set every group's lr to ``base_lr * group['lr_mult'] * factor``."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g.get("lr_mult", 1.0) * factor


# ----------------------------------------------------------------------------- optimiser
def parameter_groups(model, *, classifier_lr_mult: float = 10.0, crf_lr_mult: float = 1.0,
                     weight_decay: float = 5e-4, crf_weight_decay: float = 0.0) -> list:
    """Optimiser groups for a DeepLab or DeepLabCRF (only parameters with ``requires_grad``).

    - ``backbone``: conv1_1..fc7, lr ×1, weight decay;
    - ``classifier``: fc8 (and MSc heads), lr ×``classifier_lr_mult`` (10 in the paper);
    - ``crf``: the CRF-RNN layer's kernel weights and compatibility, lr ×``crf_lr_mult``,
      ``crf_weight_decay`` (0 by default: decay would pull the Potts compatibility to zero).

    Empty groups are left out. Each group carries ``name`` and ``lr_mult``.
    """
    m = dist_utils.unwrap(model)
    net = getattr(m, "net", m)
    crf = getattr(m, "crf", None)
    groups = net.parameter_groups() if hasattr(net, "parameter_groups") else {"backbone": list(net.parameters()), "classifier": []}
    spec = [("backbone", groups["backbone"], 1.0, weight_decay),
            ("classifier", groups["classifier"], classifier_lr_mult, weight_decay)]
    if crf is not None:
        spec.append(("crf", list(crf.parameters()), crf_lr_mult, crf_weight_decay))
    out = []
    for name, params, mult, wd in spec:
        params = [p for p in params if p.requires_grad]
        if params:
            out.append({"params": params, "name": name, "lr_mult": float(mult), "weight_decay": float(wd)})
    if not out:
        raise ValueError("the model has no trainable parameters")
    return out


def build_optimizer(model, *, name: str = "sgd", lr: float = 1e-3, momentum: float = 0.9,
                    weight_decay: float = 5e-4, classifier_lr_mult: float = 10.0,
                    crf_lr_mult: float = 1.0, crf_weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's) or Adam, over :func:`parameter_groups`."""
    groups = parameter_groups(model, classifier_lr_mult=classifier_lr_mult, crf_lr_mult=crf_lr_mult,
                              weight_decay=weight_decay, crf_weight_decay=crf_weight_decay)
    for g in groups:
        g["lr"] = lr * g["lr_mult"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adam":
        # Adam's weight decay is L2 as in SGD (added to the gradient).
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


# ----------------------------------------------------------------------------- losses
def downsample_labels(labels: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour subsampling of ``labels`` (Tensor[N, H, W] int64) to ``size`` (h, w),
    as DeepLab's training compares the stride-8 scores with the ground truth subsampled by 8."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def dcnn_loss(model, images: torch.Tensor, labels: torch.Tensor, full_resolution: bool = False):
    """Cross-entropy of a DeepLab's scores (void ignored): on the stride-8 map against the
    subsampled labels (the paper), or, with ``full_resolution``, on the upsampled scores.

    ``model``: DeepLab (possibly DDP-wrapped); ``images`` Tensor[N, 3, H, W]; ``labels`` Tensor[N, H, W].
    """
    scores = model(images).float()
    if full_resolution:
        scores = F.interpolate(scores, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    target = downsample_labels(labels, scores.shape[-2:])
    return F.cross_entropy(scores, target, ignore_index=VOID)


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


#: Losses of the CRF's refined logits (logits [N, C, H, W], labels [N, H, W]) -> scalar.
CRF_LOSSES = {"ce": lambda logits, labels: F.cross_entropy(logits, labels, ignore_index=VOID),
              "lovasz": lovasz_softmax}


def joint_loss(model, images: torch.Tensor, labels: torch.Tensor, unary_weight: float = 0.0,
               loss: str = "ce"):
    """`loss` (CRF_LOSSES: "ce", CRF-RNN's cross-entropy, or "lovasz") of a DeepLabCRF's refined
    logits at full resolution, plus ``unary_weight`` × the DCNN's own stride-8 cross-entropy (0
    by default, as in CRF-RNN)."""
    out = model(images)
    if out["crf"] is None:
        raise ValueError("joint_loss needs a DeepLabCRF with a CRF and use_crf=True")
    total = CRF_LOSSES[loss](out["crf"].float(), labels)
    if unary_weight:
        coarse = out["coarse"].float()
        total = total + unary_weight * F.cross_entropy(coarse, downsample_labels(labels, coarse.shape[-2:]),
                                                       ignore_index=VOID)
    return total


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops, keeping the last good checkpoint."""


# ----------------------------------------------------------------------------- logging
class MetricLogger:
    """Scalars to a CSV file (columns: time, stage, iteration, name, value) and, with
    ``tensorboard=True``, to TensorBoard event files in a ``tensorboard`` folder beside it. Only
    rank 0 writes.

    ``path``: the CSV file (``OUT/metrics.csv``). A new run (``resume=False``) starts it afresh,
    so the rows of an earlier run in the same file (replaced with ``--overwrite``) are not mixed
    with this run's; a resumed run keeps it and drops what follows its checkpoint
    (:meth:`truncate`).
    """

    FIELDS = ("time", "stage", "iteration", "name", "value")

    def __init__(self, path, tensorboard: bool = False, enabled: bool = True, resume: bool = False):
        self.enabled = enabled
        self.path = Path(path)
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
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
        """Drop rows of ``stage`` logged after ``iteration`` (a resumed run logs them again)."""
        if not self.enabled or not self.path.is_file():
            return
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        self._write_rows([r for r in rows if not (r["stage"] == stage and int(r["iteration"]) > iteration)])

    def log(self, stage: str, iteration: int, **scalars):
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.FIELDS)
            now = f"{time.time():.3f}"
            for k, v in scalars.items():
                w.writerow({"time": now, "stage": stage, "iteration": iteration, "name": k, "value": v})
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{stage}/{k}", v, iteration)

    def close(self):
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- training loop
def progress_bar(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm progress bar, drawn only when ``enabled`` and stderr is a terminal (tqdm's
    ``disable=None``): a log redirected to a file gets no bar redraws. ``bar.disable`` says
    whether it is hidden."""
    return tqdm(iterable, disable=None if enabled else True, dynamic_ncols=True, **kwargs)


@dataclass
class LoopConfig:
    """What :func:`train_loop` needs besides the model, data and optimiser.

    ``batch_size`` is the global batch (split evenly over processes); ``lr`` the base rate;
    ``ckpt_every``/``eval_every``/``log_every`` in iterations (0 = never, except a final
    checkpoint that is always written when ``ckpt_path`` is set). ``stop_at``: end the run after
    that iteration, checkpointed, as if it had been killed there (for time-limited jobs: continue
    with ``--resume``)."""

    max_iter: int
    batch_size: int
    lr: float
    lr_policy: str = "step"
    lr_step: int = 2000
    lr_gamma: float = 0.1
    poly_power: float = 0.9
    seed: int = 0
    amp: bool = False
    workers: int = 0
    ckpt_path: str | None = None
    ckpt_every: int = 0
    eval_every: int = 0
    log_every: int = 10
    stage: str = "train"
    progress: bool = True
    stop_at: int | None = None


def make_train_loader(dataset, cfg: LoopConfig, info: dist_utils.DistInfo, start_iter: int = 0):
    """A DataLoader yielding this process's batches for iterations ``start_iter..max_iter-1``."""
    if cfg.batch_size % info.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes "
                         f"({info.world_size})")
    sampler = StreamBatchSampler(len(dataset), cfg.batch_size // info.world_size, cfg.max_iter,
                                 seed=cfg.seed, start_iter=start_iter, rank=info.rank,
                                 world_size=info.world_size)
    # A private generator keeps the DataLoader from drawing on the global torch RNG (dropout's),
    # so a resumed run consumes exactly the random numbers an uninterrupted one does.
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=pad_collate,
                                       num_workers=cfg.workers, generator=torch.Generator(),
                                       persistent_workers=False, pin_memory=info.device.type == "cuda")


def make_eval_loader(dataset, info: dist_utils.DistInfo, batch_size: int = 1, workers: int = 0):
    """A DataLoader over this process's shard of ``dataset`` (every image exactly once overall)."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                       sampler=ShardSampler(len(dataset), info.rank, info.world_size),
                                       collate_fn=pad_collate, num_workers=workers,
                                       generator=torch.Generator())


def autocast(device: torch.device, enabled: bool):
    """Mixed precision: float16 on CUDA, bfloat16 on CPU."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def train_loop(model, dataset, loss_fn, optimizer, cfg: LoopConfig, info: dist_utils.DistInfo, *,
               start_iter: int = 0, scaler=None, logger: MetricLogger | None = None,
               eval_fn=None, args=None, ckpt_extra: dict | None = None) -> dict:
    """Run iterations ``start_iter .. cfg.max_iter - 1``.

    Args:
        model: the module to train (DDP-wrapped when distributed), already on ``info.device``.
        dataset: a :class:`train.data.SegmentationSet` with the training transform.
        loss_fn: ``loss_fn(model, images, labels) -> scalar loss``.
        optimizer: from :func:`build_optimizer` (groups carry ``lr_mult``).
        cfg: :class:`LoopConfig`.
        info: this process's :class:`train.distributed.DistInfo`.
        start_iter: first iteration (after ``--resume``).
        scaler: ``torch.amp.GradScaler`` for float16 AMP (None otherwise).
        logger: metrics log (rank 0 writes).
        eval_fn: ``eval_fn(iteration) -> dict of scalars``, called every ``cfg.eval_every``
            iterations on every rank (it must all-reduce its metrics itself).
        args: stored in checkpoints.
        ckpt_extra: more plain values stored in every checkpoint (e.g. earlier results).
    Returns:
        ``{"iterations" (run now), "loss" (mean over the last log interval), "seconds",
        "images_per_s", "stopped" (True when ``stop_at`` ended it early)}``.
    Raises:
        NonFiniteLossError: on a NaN/Inf loss (no checkpoint is written after it).
    """
    model.train()
    loader = make_train_loader(dataset, cfg, info, start_iter)
    bar = progress_bar(total=cfg.max_iter, initial=start_iter, desc=cfg.stage, leave=True,
                       enabled=cfg.progress and info.is_main)
    # Without a bar (not a terminal, or --no-progress), one line now and then says how it goes.
    line_every = max(1, cfg.log_every) * max(1, math.ceil(cfg.max_iter / 20 / max(1, cfg.log_every)))
    last_ckpt = (cfg.ckpt_path, start_iter) if start_iter and cfg.ckpt_path else None
    t0 = time.perf_counter()
    t_log, n_log, loss_sum, loss_n = t0, 0, 0.0, 0
    seen, last_loss, it = 0, math.nan, start_iter
    for it, (images, labels, _, _) in enumerate(loader, start=start_iter):
        images = images.to(info.device, non_blocking=True)
        labels = labels.to(info.device, non_blocking=True)
        set_lr(optimizer, cfg.lr, lr_factor(it, cfg.lr_policy, cfg.max_iter, cfg.lr_step,
                                            cfg.lr_gamma, cfg.poly_power))
        try:
            with autocast(info.device, cfg.amp):
                loss = loss_fn(model, images, labels)
            value = float(loss.detach())
        except ValueError as e:  # the CRF layer refuses non-finite unaries before any loss exists
            if "NaN" not in str(e):
                raise
            value = math.nan
        if dist_utils.any_true(not math.isfinite(value)):
            bar.close()
            where = (f"the last good checkpoint is {last_ckpt[0]} (iteration {last_ckpt[1]})"
                     if last_ckpt else "no checkpoint was written yet")
            raise NonFiniteLossError(
                f"[{cfg.stage}] the loss is {value} at iteration {it} (lr {cfg.lr:g} × "
                f"{lr_factor(it, cfg.lr_policy, cfg.max_iter, cfg.lr_step, cfg.lr_gamma, cfg.poly_power):g}); "
                f"stopping. {where}. Try a lower --lr, or run without --amp.")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        done = it + 1
        seen += images.shape[0] * info.world_size
        n_log += images.shape[0] * info.world_size
        loss_sum += value
        loss_n += 1
        bar.update(1)
        if done % max(1, cfg.log_every) == 0 or done == cfg.max_iter:
            now = time.perf_counter()
            ips = n_log / max(now - t_log, 1e-9)
            mean_loss = loss_sum / loss_n
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{ips:.1f}", lr=f"{optimizer.param_groups[0]['lr']:.2g}")
            if bar.disable and info.is_main and (done % line_every == 0 or done == cfg.max_iter):
                print(f"[{cfg.stage}] iteration {done}/{cfg.max_iter}: loss {mean_loss:.4f}, {ips:.1f} images/s, "
                      f"lr {optimizer.param_groups[0]['lr']:.3g}", flush=True)
            if logger is not None and info.is_main:
                logger.log(cfg.stage, done, loss=mean_loss, lr=optimizer.param_groups[0]["lr"], images_per_s=ips)
            t_log, n_log, last_loss, loss_sum, loss_n = now, 0, mean_loss, 0.0, 0
        stopping = cfg.stop_at is not None and done >= cfg.stop_at and done < cfg.max_iter
        if cfg.ckpt_path and ((cfg.ckpt_every and done % cfg.ckpt_every == 0) or done == cfg.max_iter
                              or stopping):
            save_training_checkpoint(cfg.ckpt_path, model, optimizer=optimizer, iteration=done,
                                     scaler=scaler, args=args, stage=cfg.stage, **(ckpt_extra or {}))
            last_ckpt = (cfg.ckpt_path, done)
        if eval_fn is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_iter:
            scalars = eval_fn(done)
            model.train()
            if logger is not None and info.is_main and scalars:
                logger.log(cfg.stage, done, **scalars)
            if info.is_main and scalars:
                bar.write(f"[{cfg.stage}] iteration {done}: " +
                          ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
        if stopping:
            break
    bar.close()
    secs = time.perf_counter() - t0
    done = it + 1 if seen else start_iter
    return {"iterations": done - start_iter, "loss": last_loss, "seconds": secs,
            "images_per_s": seen / max(secs, 1e-9), "stopped": done < cfg.max_iter}


# ----------------------------------------------------------------------------- evaluation
class NonFiniteOutputError(ValueError):
    """The model computed NaN or infinite scores: its parameters are broken (a checkpoint of a
    run that diverged, a damaged file), and every label it gives would be garbage."""


def forward_eval(model, images: torch.Tensor, use_crf: bool) -> dict:
    """``{"unary": Tensor[N, C, H, W], "crf": Tensor[N, C, H, W] or None}`` for a DeepLab (no CRF)
    or a DeepLabCRF (CRF on when ``use_crf`` and it has one). Raises
    :class:`NonFiniteOutputError` when either holds NaN or an infinity."""
    m = dist_utils.unwrap(model)
    if hasattr(m, "crf"):
        prev = m.use_crf
        m.use_crf = bool(use_crf and m.crf is not None)
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
def evaluate(model, loader, num_classes: int, device, *, use_crf: bool = True,
             bands=(1, 2, 3, 4, 6, 8, 12, 16, 20, 30, 40), class_names=None, amp: bool = False,
             num_examples: int = 0, progress: bool = False, desc: str = "eval"):
    """Metrics of the DCNN alone (``"dcnn"``) and, when the model has a CRF and ``use_crf``,
    with it (``"crf"``), summed over all processes.

    Args:
        model: DeepLab or DeepLabCRF (wrappers allowed); evaluated in eval mode (so the CRF runs
            its evaluation iteration count), then put back in its previous mode.
        loader: yields ``(images Tensor[N, 3, H, W], labels Tensor[N, H, W], sizes Tensor[N, 2],
            indices)`` as :func:`make_eval_loader`.
        num_classes: C.
        device: where to run.
        bands: trimap band widths (pixels) for :class:`train.metrics.BandAccuracy`.
        class_names: names for the per-class IoU.
        num_examples: keep this many ``{"index", "image" uint8[H, W, 3], "label", "dcnn",
            "crf"}`` examples (this process's first ones).
    Returns:
        ``(results, examples)``: ``results[mode] = {"miou", "pixel_accuracy",
        "mean_class_accuracy", "per_class_iou", "confusion", "band_accuracy": {...}}``.
    """
    m = dist_utils.unwrap(model)
    was_training = m.training
    m.eval()
    has_crf = use_crf and getattr(m, "crf", None) is not None
    modes = ["dcnn"] + (["crf"] if has_crf else [])
    cms = {k: ConfusionMatrix(num_classes) for k in modes}
    bas = {k: BandAccuracy(bands) for k in modes}
    examples = []
    for images, labels, sizes, indices in progress_bar(loader, desc=desc, leave=False,
                                                       enabled=progress and dist_utils.is_main_process()):
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
                p = preds[mode][k, :h, :w]
                cms[mode].update(p, lab)
                bas[mode].update(p, lab)
            if len(examples) < num_examples:
                img = denormalize(images[k, :, :h, :w].float().cpu()).round().byte().permute(1, 2, 0).numpy()
                ex = {"index": int(indices[k]), "image": img, "label": lab.numpy()}
                for mode in modes:
                    ex[mode] = preds[mode][k, :h, :w].numpy()
                examples.append(ex)
    results = {}
    for mode in modes:
        cms[mode].all_reduce()
        bas[mode].all_reduce()
        res = cms[mode].summary(class_names)
        res["band_accuracy"] = bas[mode].summary()
        results[mode] = res
    m.train(was_training)
    return results, examples


def seed_everything(seed: int, rank: int = 0):
    """Seed torch, numpy and ``random`` (``seed + rank``, so processes drop out differently)."""
    import random

    s = int(seed) + int(rank)
    torch.manual_seed(s)
    np.random.seed(s % (2 ** 32))
    random.seed(s)
