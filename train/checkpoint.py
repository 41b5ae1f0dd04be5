"""Training checkpoints: the model (``models.save_checkpoint`` format, atomic), plus what an exact
``--resume`` needs: optimiser state (SGD momentum), AMP scaler, iteration, and every process's
RNG states (torch CPU/CUDA, numpy, python ``random``).

The learning-rate schedule is a pure function of the iteration (:mod:`train.engine`), and the
data order a pure function of ``(seed, iteration)`` (:mod:`train.data.loader`), so these are all
the state there is. Everything is stored as tensors and plain containers, so the file loads with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random

import numpy as np
import torch

import models

from . import distributed as dist_utils


def capture_rng() -> dict:
    """This process's RNG states as a dict of tensors/plain values."""
    np_state = np.random.get_state(legacy=False)
    py = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict):
    """Set this process's RNG states from :func:`capture_rng`'s dict."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
                         "has_gauss": int(n["has_gauss"]), "gauss": float(n["gauss"])})
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def _plain(obj):
    """Make ``obj`` storable with weights_only loading (paths and other objects -> str)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    return str(obj)


def save_training_checkpoint(path, model, *, optimizer=None, iteration: int = 0, scaler=None,
                             args=None, stage: str = "", **extra) -> str | None:
    """Write a resumable checkpoint to ``path`` atomically (rank 0 writes; all ranks must call:
    every rank's RNG state is gathered into the file).

    Args:
        path: file to write.
        model: DeepLab or DeepLabCRF (DDP/compile wrappers are unwrapped).
        optimizer: its ``state_dict`` is stored.
        iteration: iterations completed.
        scaler: a ``torch.amp.GradScaler`` (or None).
        args: the run's argparse namespace or dict (stored for reference).
        stage: a name for the training stage ("dcnn", "crf", "joint").
        **extra: more plain values to store in ``extra``.
    Returns:
        the path on rank 0, None elsewhere.
    """
    rngs = dist_utils.all_gather_object(capture_rng())
    if not dist_utils.is_main_process():
        return None
    train = {
        "iteration": int(iteration),
        "stage": stage,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "rng": rngs,
        "world_size": len(rngs),
        "args": _plain(vars(args) if args is not None and not isinstance(args, dict) else (args or {})),
    }
    return models.save_checkpoint(path, model, train=train, **_plain(extra))


def load_training_state(path, model, optimizer=None, scaler=None, restore_rng_state: bool = True) -> dict:
    """Load a checkpoint written by :func:`save_training_checkpoint` into existing objects.

    The model's weights are copied into ``model`` (which must have the same architecture), the
    optimiser and scaler states restored, and, with ``restore_rng_state``, this rank's RNG state
    (only when the number of processes matches the saved run's; otherwise the RNG stays as
    seeded, and the continuation differs from an uninterrupted run only in dropout masks).

    Returns:
        the ``train`` dict (``iteration``, ``stage``, ``args`` ...) plus ``extra`` (the other
        saved values).
    """
    loaded, extra = models.load_checkpoint(path)
    target = dist_utils.unwrap(model)
    try:
        target.load_state_dict(loaded.state_dict())
    except RuntimeError as e:
        raise ValueError(f"{path}: checkpoint weights do not fit this model ({e}); resume with the "
                         "same --variant/--width/--num-classes/CRF settings it was trained with") from e
    train = dict(extra.get("train") or {})
    if optimizer is not None and train.get("optimizer") is not None:
        optimizer.load_state_dict(train["optimizer"])
    if scaler is not None and train.get("scaler") is not None:
        scaler.load_state_dict(train["scaler"])
    rngs = train.get("rng") or []
    rank, world = dist_utils.get_rank(), dist_utils.get_world_size()
    if restore_rng_state and len(rngs) == world:
        restore_rng(rngs[rank])
    train["extra"] = {k: v for k, v in extra.items() if k != "train"}
    return train


def resume_info(path) -> dict:
    """What :func:`load_training_state` returns (``stage``, ``iteration``, ``args``, ...,
    ``extra``), read without touching any model, optimiser or RNG."""
    _, extra = models.load_checkpoint(path)
    if "train" not in extra:
        raise ValueError(f"{path} holds no training state (not written by train/*.py); "
                         "use it with --init instead of --resume")
    return {**extra["train"], "extra": {k: v for k, v in extra.items() if k != "train"}}


def open_resume(args) -> dict | None:
    """:func:`resume_info` of ``--resume``'s checkpoint, with the resumed stage logged and changed
    options warned about; None without ``--resume``."""
    if not args.resume:
        return None
    resumed = resume_info(args.resume)
    check_resume_args(resumed.get("args", {}), args)
    dist_utils.log(f"resuming {args.resume}: stage {resumed['stage']}, iteration {resumed['iteration']}")
    return resumed


def check_resume_args(saved: dict, args, keys=("dataset", "num_classes", "width", "variant", "batch_size",
                                                "seed", "image_size")):
    """Warn when a resumed run's options differ from the checkpoint's in ways that matter."""
    diffs = [f"--{k.replace('_', '-')} {saved.get(k)} -> {getattr(args, k)}" for k in keys
             if k in saved and hasattr(args, k) and str(saved.get(k)) != str(getattr(args, k))]
    if diffs:
        dist_utils.log("warning: resuming with options that differ from the checkpoint's: " + "; ".join(diffs))


def load_model(path, num_classes: int | None = None):
    """``(net, crf or None)`` from a model checkpoint of any train/ script (``model.pt``,
    ``dcnn.pt`` or ``checkpoint.pt``): a DeepLab, or the parts of a DeepLabCRF. With
    ``num_classes`` (``--num-classes``), a net with another number of classes is a ValueError."""
    model, _ = models.load_checkpoint(path)
    net, crf = (model.net, model.crf) if isinstance(model, models.DeepLabCRF) else (model, None)
    if num_classes is not None and net.config["num_classes"] != num_classes:
        raise ValueError(f"{path} has {net.config['num_classes']} classes, but --num-classes is {num_classes}")
    return net, crf
