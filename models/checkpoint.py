"""Checkpoints that rebuild the model from the file alone: state dict + model config.

    models.save_checkpoint("runs/x/last.pt", model, epoch=3, optimizer=opt.state_dict())
    model, extra = models.load_checkpoint("runs/x/last.pt")       # extra == {"epoch": 3, ...}

File layout (a dict, ``torch.save``): {"format": FORMAT, "arch": "deeplab" | "deeplab_crf",
"config": DeepLab config, "crf": None or {"class": "crfrnn.<...>.CRFRNNLayer", "config": {...}},
"use_crf": bool, "state_dict": ..., "extra": {...}}. Written to a temporary file in the same folder
and moved into place with ``os.replace`` (:func:`models.files.atomic_write`), so a crash, a kill or
a full disk never leaves a half-written checkpoint. Loading refuses, with a ``ValueError`` naming
the file, anything that is not such a checkpoint (an empty, truncated or foreign file), and a
checkpoint whose weights hold NaN or infinite values.
"""
import importlib
import inspect
import io
import os
from typing import Any, Dict, Tuple

import torch
from torch import nn

import crfrnn

from .files import atomic_write, load_torch_file
from .joint import DeepLabCRF
from .vgg_deeplab import DeepLab

__all__ = ["save_checkpoint", "load_checkpoint", "build_model", "model_config", "unwrap", "FORMAT"]

FORMAT = "crfrnn.models/1"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile / DataParallel / DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def _plain(value):
    """Constructor arguments as plain containers (safe for weights_only loading)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().flatten().tolist()
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def _crf_config(crf: nn.Module) -> Dict[str, Any]:
    """{"class": import path, "config": constructor kwargs} of a CRF layer.

    Uses ``crf.config`` (a dict, or a method returning one) when the layer has it; otherwise reads
    the attributes named like the constructor's parameters (``crfrnn.CRFRNNLayer`` keeps every
    argument under its own name; image_mean/image_std come back from their buffers). Learned
    weights are in the state dict, not here.
    """
    cls = type(crf)
    config = getattr(crf, "config", None)
    if callable(config):
        config = config()
    if config is None:
        config = {}
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                continue
            if hasattr(crf, name):
                config[name] = getattr(crf, name)
            elif param.default is param.empty:
                raise TypeError(f"cannot checkpoint the CRF {cls.__name__}: its constructor argument "
                                f"{name!r} is not kept as an attribute and it has no `config`")
    if not isinstance(config, dict):
        raise TypeError(f"{cls.__name__}.config must be a dict of constructor arguments, got "
                        f"{type(config).__name__}")
    # The package's own name for its classes ("crfrnn.CRFRNNLayer"), which survives a move
    # between its modules.
    module = "crfrnn" if getattr(crfrnn, cls.__qualname__, None) is cls else cls.__module__
    return {"class": f"{module}.{cls.__qualname__}",
            "config": {k: _plain(v) for k, v in config.items()}}


def model_config(model: nn.Module) -> Dict[str, Any]:
    """What ``build_model`` needs to rebuild ``model`` (a DeepLab or a DeepLabCRF)."""
    model = unwrap(model)
    if isinstance(model, DeepLabCRF):
        net = unwrap(model.net)
        if not isinstance(net, DeepLab):
            raise TypeError(f"DeepLabCRF.net must be a models.DeepLab to be checkpointed, got "
                            f"{type(net).__name__}")
        crf = None if model.crf is None else _crf_config(unwrap(model.crf))
        return {"arch": "deeplab_crf", "config": net.config, "crf": crf, "use_crf": model.use_crf}
    if isinstance(model, DeepLab):
        return {"arch": "deeplab", "config": model.config, "crf": None, "use_crf": False}
    raise TypeError(f"model must be a models.DeepLab or models.DeepLabCRF, got {type(model).__name__}")


def _build_crf(entry: Dict[str, Any]) -> nn.Module:
    module_name, _, qualname = entry["class"].rpartition(".")
    if module_name == "crfrnn.crf":  # checkpoints written when the layer lived in crfrnn/crf.py
        module_name = "crfrnn"
    if not (module_name == "crfrnn" or module_name.startswith("crfrnn.")):
        raise ValueError(f"refusing to rebuild CRF class {entry['class']!r}: only crfrnn classes are "
                         f"rebuilt from checkpoints")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj(**entry["config"])


def build_model(meta: Dict[str, Any]) -> nn.Module:
    """A fresh model from ``model_config``'s dict (weights not loaded)."""
    net = DeepLab(**meta["config"])
    if meta["arch"] == "deeplab":
        return net
    if meta["arch"] == "deeplab_crf":
        crf = None if meta.get("crf") is None else _build_crf(meta["crf"])
        return DeepLabCRF(net, crf, use_crf=meta.get("use_crf", True))
    raise ValueError(f"unknown model arch {meta['arch']!r} in checkpoint")


def save_checkpoint(path, model: nn.Module, **extra) -> str:
    """Write model weights + config (+ ``extra``, e.g. epoch, optimizer state) atomically.

    Args:
        path: file to write (its folder is created).
        model (DeepLab or DeepLabCRF, possibly wrapped by torch.compile or DataParallel).
        **extra: anything torch.save can store; with ``load_checkpoint``'s default
            weights_only=True keep to tensors, numbers, strings, lists and dicts.
    Returns:
        the path written.
    """
    model = unwrap(model)
    meta = model_config(model)
    payload = {"format": FORMAT, **meta, "state_dict": model.state_dict(), "extra": dict(extra)}
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Serialised in memory first: a failed write then raises the system's error (disk full, ...)
    # instead of torch's "unexpected pos", and atomic_write leaves the old file in place.
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(path, buffer.getvalue())


def load_checkpoint(path, map_location="cpu", weights_only: bool = True) -> Tuple[nn.Module, Dict]:
    """Rebuild the model saved by ``save_checkpoint`` and load its weights.

    Args:
        path: the checkpoint file.
        map_location: where tensors go (default "cpu"; move the model afterwards).
        weights_only: torch.load's safe mode (plain containers and tensors only). Pass False only
            for a trusted file whose ``extra`` holds other objects.
    Returns:
        (model, extra): a DeepLab or DeepLabCRF in train mode, and the saved ``extra`` dict.
    """
    path = os.fspath(path)
    payload = load_torch_file(path, "checkpoint", map_location, weights_only)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path!r} is not a checkpoint of models.save_checkpoint (format {FORMAT!r} expected, got "
                         f"{got!r}); for VGG-16 ImageNet weights use models.load_vgg16_imagenet")
    state_dict = payload.get("state_dict")
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path!r}: a checkpoint without a state_dict of weights (got "
                         f"{type(state_dict).__name__}): a damaged file?")
    check_finite(state_dict, path)
    try:
        model = build_model(payload)
        model.load_state_dict(state_dict)
    except (KeyError, TypeError, RuntimeError, AttributeError, ImportError) as e:  # ImportError: a CRF class that is gone
        raise ValueError(f"{path!r}: a checkpoint whose model cannot be rebuilt "
                         f"({' '.join(str(e).split())})") from e
    return model, payload.get("extra", {})


def check_finite(state_dict: Dict[str, torch.Tensor], path="the checkpoint"):
    """``ValueError`` naming the first floating-point tensor of ``state_dict`` that holds NaN or
    an infinity (a model that would compute NaN everywhere)."""
    for name, value in state_dict.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = value[~finite].flatten()[0].item()
                raise ValueError(f"{os.fspath(path)!r}: parameter {name} holds {int((~finite).sum())} "
                                 f"non-finite value(s) (e.g. {bad}); the file is broken (saved from a "
                                 "run that diverged?): use an earlier checkpoint")
    return True
