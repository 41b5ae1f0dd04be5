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
from typing import NamedTuple

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


#: Options a resumed run may change freely: where the files go and how the run is watched and
#: checkpointed. None of them changes a number of the run.
RESUME_FREE = ("out_dir", "overwrite", "no_progress", "log", "log_every", "ckpt_every", "eval_every",
               "stop_at", "resume", "resume_anyway", "workers", "examples")
#: Options a resumed run may change with a warning: they do not change the training arithmetic,
#: but where the data or weights are read from (the same files may have moved), or the
#: evaluation and its report.
RESUME_WARN = ("data_root", "sbd_root", "vgg_weights", "device", "val_split", "val_samples",
               "eval_batch_size", "bands", "crf_eval_iters")
# Every other option (the data, model, CRF, optimiser, schedule, seed, --amp, --threads, ...)
# changes the arithmetic: a resume with another value is no longer the run it continues.


def open_resume(args) -> dict | None:
    """:func:`resume_info` of ``--resume``'s checkpoint, with the resumed stage logged and the
    options checked against the checkpoint's (:func:`check_resume_args`); None without
    ``--resume``."""
    if not args.resume:
        return None
    resumed = resume_info(args.resume)
    check_resume_args(resumed.get("args", {}), args)
    dist_utils.log(f"resuming {args.resume}: stage {resumed['stage']}, iteration {resumed['iteration']}")
    return resumed


def changed_options(saved: dict, args) -> list:
    """``[(option, saved value, value now)]`` for every option of ``args`` that the checkpoint's
    ``saved`` options hold with another value (options only one of them knows are skipped)."""
    now = _plain(vars(args))
    return [(k, saved[k], now[k]) for k in sorted(now) if k in saved and saved[k] != now[k]]


def check_resume_args(saved: dict, args):
    """Compare the options of a resumed run with those saved in its checkpoint: a change of an
    option that changes the arithmetic (not in :data:`RESUME_FREE` or :data:`RESUME_WARN`) is a
    ``ValueError`` unless ``--resume-anyway``; the :data:`RESUME_WARN` ones, and any change
    under ``--resume-anyway``, are logged as a warning."""
    show = lambda k, a, b: f"--{k.replace('_', '-')} {_show(a)} -> {_show(b)}"  # noqa: E731
    changes = [c for c in changed_options(saved, args) if c[0] not in RESUME_FREE]
    math_changes = [show(*c) for c in changes if c[0] not in RESUME_WARN]
    if math_changes and not getattr(args, "resume_anyway", False):
        raise ValueError(
            f"--resume {args.resume}: options that change the training differ from the run being resumed: "
            + "; ".join(math_changes) + ". An exact resume takes the run's own options (--help of --resume "
            "says which may change): pass the run's values, or --resume-anyway to continue with the new ones")
    if changes:
        dist_utils.log("warning: resuming with options that differ from the checkpoint's: "
                       + "; ".join(show(*c) for c in changes)
                       + (" (--resume-anyway: not an exact continuation)" if math_changes else ""))


def _show(value) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, list) else str(value)


class Trained(NamedTuple):
    """A trained model read back by :func:`load_model`."""
    net: models.DeepLab
    crf: object            # the CRF layer, or None (a DCNN checkpoint)
    data: dict | None      # what it was trained on (:func:`data_description`); None: not recorded


def data_description(args, class_names) -> dict:
    """What a run trains on, stored in its checkpoints (``data=``) so that the scripts that use
    them can say so: ``{"dataset", "class_names"}``, and for the synthetic set the
    ``image_size`` and ``data_seed`` that regenerate it."""
    data = {"dataset": str(args.dataset), "class_names": [str(n) for n in class_names]}
    if args.dataset == "synthetic":
        data.update(image_size=int(args.image_size), data_seed=int(args.data_seed))
    return data


def describe_data(data: dict | None) -> str:
    """``the synthetic shapes (classes background, ellipse, ...)``: a checkpoint's training data in
    words, for notes to the user."""
    if not data:
        return "unrecorded data (a checkpoint from before the data was stored)"
    what = "the synthetic shapes" if data.get("dataset") == "synthetic" else f"{data.get('dataset')}"
    return f"{what} (classes {', '.join(data.get('class_names', []))})"


def load_model(path, num_classes: int | None = None) -> Trained:
    """The :class:`Trained` model ``(net, crf or None, data)`` of a model checkpoint of any train/
    script (``model.pt``, ``dcnn.pt`` or ``checkpoint.pt``): a DeepLab, or the parts of a
    DeepLabCRF. With ``num_classes`` (``--num-classes``), a net with another number of classes
    is a ValueError, and so is a CRF whose parameters overflow (:func:`check_crf_arithmetic`).
    Checkpoints written before the training data was stored give ``data`` None."""
    model, extra = models.load_checkpoint(path)
    net, crf = (model.net, model.crf) if isinstance(model, models.DeepLabCRF) else (model, None)
    if num_classes is not None and net.config["num_classes"] != num_classes:
        raise ValueError(f"{path} has {net.config['num_classes']} classes, but --num-classes is {num_classes}")
    check_crf_arithmetic(crf, path)
    data = extra.get("data")
    if not (isinstance(data, dict) and isinstance(data.get("class_names"), list)
            and len(data["class_names"]) == net.config["num_classes"]):
        data = None
    return Trained(net, crf, data)


def check_crf_arithmetic(crf, path):
    """``ValueError`` naming ``path`` when the CRF's pairwise matrices (compatibility @ kernel
    weight) overflow float32: finite but huge parameters (e.g. 3e38, a diverged run) with which
    every output would be NaN. (Non-finite parameters are refused by ``models.load_checkpoint``.)"""
    if crf is None or not hasattr(crf, "pairwise_matrices"):
        return
    with torch.no_grad():
        matrices = crf.pairwise_matrices()
    if not all(bool(torch.isfinite(m).all()) for m in matrices):
        raise ValueError(f"{path}: the CRF's parameters are too large: compatibility @ kernel weight overflows "
                         f"float32 ({largest_parameter(crf, 'crf.')}); the file is broken (saved from a run that "
                         "diverged?): use an earlier checkpoint")


def largest_parameter(model, prefix: str = "") -> str:
    """``largest |parameter|: crf.compatibility 3e+38``: where a model's broken value most likely is
    (NaN counts as the largest)."""
    name, value = max(((n, p.detach().abs().max().item()) for n, p in model.named_parameters() if p.numel()),
                      key=lambda item: (item[1] != item[1], item[1]), default=("none", 0.0))
    return f"largest |parameter|: {prefix}{name} {value:.3g}"
