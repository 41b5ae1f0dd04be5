"""Training checkpoints and trained models.

A training checkpoint is a model file (``models.save_checkpoint``: atomic, loadable with
``torch.load(weights_only=True)``) with, under ``extra["train"]``, what an exact ``--resume``
needs: the iteration, the optimiser and AMP scaler states and every process's RNG states. The
learning rate is a function of the iteration and the data order one of ``(seed, iteration)``
(:mod:`train.data.loader`), so that is all the state there is.
"""
from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np
import torch

import models


def capture_rng() -> dict:
    """This process's RNG states, as tensors and plain values."""
    np_state, py = np.random.get_state(legacy=False), random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"bit_generator": np_state["bit_generator"],
                       "key": torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64)),
                       "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                       "gauss": float(np_state["gauss"])},
             "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict):
    """Set this process's RNG states from :func:`capture_rng`'s dict."""
    torch.set_rng_state(state["torch"].cpu())
    n, p = state["numpy"], state["python"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
                         "has_gauss": int(n["has_gauss"]), "gauss": float(n["gauss"])})
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def plain(obj):
    """``obj`` storable with weights_only loading: containers kept, numpy arrays as tensors, paths
    and other objects as str."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return obj
    return str(obj)


def save_training_checkpoint(path, model, *, optimizer, iteration: int, scaler, rngs: list, args,
                             stage: str, loss_interval=(0.0, 0), **extra) -> str:
    """Write a resumable checkpoint of ``model`` atomically: ``iteration``: the iterations done;
    ``rngs``: :func:`capture_rng` of every process, in rank order; ``args``: the run's options (a
    namespace or dict); ``stage``: "dcnn", "crf" or "joint"; ``loss_interval``: (sum, count) of
    the losses since the last logged mean, so that a resumed run logs the same means; ``extra``:
    more plain values."""
    train = {"iteration": int(iteration), "stage": stage, "optimizer": optimizer.state_dict(),
             "loss_interval": [float(loss_interval[0]), int(loss_interval[1])],
             "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
             "rng": rngs, "world_size": len(rngs), "args": plain(args if isinstance(args, dict) else vars(args))}
    return models.save_checkpoint(path, model, train=train, **plain(extra))


def load_training_state(path, model, optimizer, scaler, *, rank: int, world_size: int) -> dict:
    """Load a checkpoint of :func:`save_training_checkpoint` into ``model``, ``optimizer`` and
    ``scaler`` (or None), and set process ``rank``'s RNG states (when the saved run had
    ``world_size`` processes too; otherwise only the dropout masks differ from an uninterrupted
    run). Returns the saved ``train`` dict (``iteration``, ``stage``, ``args`` ...)."""
    loaded, extra = models.load_checkpoint(path)
    try:
        models.unwrap(model).load_state_dict(loaded.state_dict())
    except RuntimeError as e:
        raise ValueError(f"{path}: checkpoint weights do not fit this model ({e}); resume with the "
                         "same --variant/--width/--num-classes/CRF settings it was trained with") from e
    train = extra["train"]
    if optimizer is not None:
        optimizer.load_state_dict(train["optimizer"])
    if scaler is not None and train["scaler"] is not None:
        scaler.load_state_dict(train["scaler"])
    if len(train["rng"]) == world_size:
        restore_rng(train["rng"][rank])
    return train


def resume_info(path) -> dict:
    """The ``train`` dict of a checkpoint, with ``extra``: its other saved values."""
    _, extra = models.load_checkpoint(path)
    if "train" not in extra:
        raise ValueError(f"{path} holds no training state (not written by train/*.py); "
                         "use it with --init instead of --resume")
    return {**extra["train"], "extra": {k: v for k, v in extra.items() if k != "train"}}


#: The stages of each training script, for checkpoints that do not record their script.
SCRIPT_STAGES = {"dcnn": ("dcnn",), "crf": ("dcnn", "crf"), "joint": ("dcnn", "joint")}


def check_resume_script(path, resumed: dict, script: str):
    """``ValueError`` unless the checkpoint of :func:`resume_info` (``resumed``) was written by
    train/``script``.py: another script's run has other stages, schedules and outputs."""
    written_by = resumed.get("args", {}).get("script")
    if written_by is None and resumed.get("stage") not in SCRIPT_STAGES.get(script, ()):
        written_by = next((name for name, stages in SCRIPT_STAGES.items() if resumed.get("stage") in stages), None)
    if written_by is not None and written_by != script:
        raise ValueError(f"--resume {path} continues a run of train/{written_by}.py (stage {resumed.get('stage')}): "
                         f"resume it with that script, not train/{script}.py (or start from it with --init/--dcnn)")


def check_resume_args(saved: dict, args, free, warn) -> str:
    """Compare a resumed run's options with those its checkpoint saved: a changed option that
    changes the arithmetic (in neither ``free`` nor ``warn``) is a ``ValueError`` unless
    ``--resume-anyway``. Returns the warning to show for the others (empty when none)."""
    now = plain(vars(args))
    show = lambda k: f"--{k.replace('_', '-')} {_show(saved[k])} -> {_show(now[k])}"  # noqa: E731
    changes = [k for k in sorted(now) if k in saved and saved[k] != now[k] and k not in free]
    math_changes = [show(k) for k in changes if k not in warn]
    if math_changes and not args.resume_anyway:
        raise ValueError(
            f"--resume {args.resume}: options that change the training differ from the run being resumed: "
            + "; ".join(math_changes) + ". An exact resume takes the run's own options (--help of --resume "
            "says which may change): pass the run's values, or --resume-anyway to continue with the new ones")
    if not changes:
        return ""
    return ("warning: resuming with options that differ from the checkpoint's: " + "; ".join(map(show, changes))
            + (" (--resume-anyway: not an exact continuation)" if math_changes else ""))


def _show(value) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, list) else str(value)


# ----------------------------------------------------------------------------- trained models
class Trained(NamedTuple):
    """A trained model read back by :func:`load_model`."""
    net: models.DeepLab
    crf: object            # the CRF layer, or None (a DCNN checkpoint)
    data: dict | None      # what it was trained on (:func:`data_description`); None: not recorded


def data_description(args, class_names) -> dict:
    """What a run trains on, stored in its checkpoints: ``{"dataset", "class_names"}``, and for
    the synthetic set the ``image_size`` and ``data_seed`` that regenerate it."""
    data = {"dataset": str(args.dataset), "class_names": [str(n) for n in class_names]}
    if args.dataset == "synthetic":
        data.update(image_size=int(args.image_size), data_seed=int(args.data_seed))
    return data


def describe_data(data: dict | None) -> str:
    """``the synthetic shapes (classes background, ellipse, ...)``: a checkpoint's data in words."""
    if not data:
        return "unrecorded data (a checkpoint from before the data was stored)"
    what = "the synthetic shapes" if data.get("dataset") == "synthetic" else f"{data.get('dataset')}"
    return f"{what} (classes {', '.join(data.get('class_names', []))})"


def load_model(path, num_classes: int | None) -> Trained:
    """The :class:`Trained` model of any train/ script's checkpoint. With ``num_classes``, a net
    with another number of classes is a ``ValueError``; so is a CRF whose parameters overflow."""
    model, extra = models.load_checkpoint(path)
    net, crf = (model.net, model.crf) if isinstance(model, models.DeepLabCRF) else (model, None)
    if num_classes is not None and net.config["num_classes"] != num_classes:
        raise ValueError(f"{path} has {net.config['num_classes']} classes, but --num-classes is {num_classes}")
    check_crf_arithmetic(crf, path)
    return Trained(net, crf, extra.get("data"))     # (None: a checkpoint from before the data was stored)


def check_crf_arithmetic(crf, path):
    """``ValueError`` naming ``path`` and the parameter when the CRF's pairwise matrices overflow
    float32 (finite but huge parameters of a run that diverged; non-finite ones are refused by
    ``models.load_checkpoint``)."""
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
