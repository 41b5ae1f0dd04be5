"""ImageNet initialisation of DeepLab from torchvision's VGG-16 weights.

    net = models.deeplab("largefov")
    models.load_vgg16_imagenet(net, "vgg16-397923af.pth")   # a torchvision vgg16() state dict
    models.load_vgg16_imagenet(net)                          # torchvision VGG16_Weights (download)

What is copied (torchvision key -> DeepLab layer):
- features.{0,2,5,7,10,12,14,17,19,21,24,26,28} -> conv1_1 .. conv5_3, unchanged (conv5_x only
  gains a dilation, which has no weights).
- classifier.0 (fc6, Linear 25088 -> 4096) is viewed as a 7x7 convolution Tensor[4096, 512, 7, 7]
  (torchvision flattens pool5 as C, H, W) and decimated as the paper does: rows and columns
  ``VARIANTS[v].taps`` (LargeFOV: 0, 3, 6; 4x4: 0, 2, 4, 6; 7x7: all) and every
  ``channel_step``-th filter (LargeFOV: 0, 4, .., 4092 -> 1024; others keep all 4096).
- classifier.3 (fc7, 4096 -> 4096) becomes a 1x1 convolution, decimated in both its output and
  its input channels by the same step (LargeFOV: Tensor[1024, 1024, 1, 1]).
- classifier.6 (fc8, 1000 ImageNet classes) is dropped; fc8 is freshly drawn from N(0, 0.01^2).
- MSc heads keep their fresh initialisation (they do not exist in VGG-16).
"""
import os
from collections.abc import Mapping
from typing import Dict, Union

import torch
from torch import nn

from .files import load_torch_file
from .vgg_deeplab import VARIANTS, DeepLab

__all__ = ["load_vgg16_imagenet", "fetch_torchvision_vgg16", "vgg16_state_dict_from",
           "TORCHVISION_CONV_INDICES", "VGG16_SHAPES"]

#: Indices of VGG-16's 13 convolutions in torchvision's ``vgg16().features``.
TORCHVISION_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_CONV_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
               "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
_CONV_CHANNELS = ((3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
                  (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512))


def _expected_shapes() -> Dict[str, tuple]:
    shapes = {}
    for idx, (cin, cout) in zip(TORCHVISION_CONV_INDICES, _CONV_CHANNELS):
        shapes[f"features.{idx}.weight"] = (cout, cin, 3, 3)
        shapes[f"features.{idx}.bias"] = (cout,)
    shapes["classifier.0.weight"] = (4096, 512 * 7 * 7)
    shapes["classifier.0.bias"] = (4096,)
    shapes["classifier.3.weight"] = (4096, 4096)
    shapes["classifier.3.bias"] = (4096,)
    return shapes


#: The tensors of a torchvision VGG-16 state dict that DeepLab uses, with their shapes.
VGG16_SHAPES: Dict[str, tuple] = _expected_shapes()

_NO_DOWNLOAD_HINT = (
    "download torchvision's VGG-16 ImageNet weights (vgg16-397923af.pth, "
    "https://download.pytorch.org/models/vgg16-397923af.pth) on a machine with internet access and "
    "pass the file with --vgg-weights PATH (or models.load_vgg16_imagenet(net, PATH)); a copy "
    "in $TORCH_HOME/hub/checkpoints/ is also found without a download")


def fetch_torchvision_vgg16(progress: bool = True) -> Dict[str, torch.Tensor]:
    """torchvision's ``VGG16_Weights.IMAGENET1K_V1`` state dict (from the torch hub cache, or
    downloaded). Raises RuntimeError with what to do instead when it cannot be fetched."""
    try:
        from torchvision.models import VGG16_Weights
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        raise RuntimeError(f"torchvision is needed to fetch VGG-16 weights; {_NO_DOWNLOAD_HINT}") from e
    try:
        return VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=progress)
    except Exception as e:  # URLError, OSError, hash mismatch, ...
        raise RuntimeError(f"could not fetch torchvision's VGG-16 ImageNet weights "
                           f"({type(e).__name__}: {e}); {_NO_DOWNLOAD_HINT}") from e


def vgg16_state_dict_from(source: Union[None, str, os.PathLike, Mapping, nn.Module],
                          progress: bool = True) -> Dict[str, torch.Tensor]:
    """A torchvision VGG-16 state dict from a path, a mapping, a ``torchvision vgg16()`` module, or
    None (torchvision's ImageNet weights). A ``module.`` prefix (DataParallel) is removed, and a
    checkpoint dict holding the weights under ``"state_dict"`` or ``"model"`` is unwrapped."""
    if source is None:
        return fetch_torchvision_vgg16(progress=progress)
    if isinstance(source, nn.Module):
        source = source.state_dict()
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        source = load_torch_file(path, "VGG-16 weights file")
        if not isinstance(source, Mapping):
            raise ValueError(f"{path!r}: expected a VGG-16 state dict (a mapping of tensors), got a "
                             f"{type(source).__name__}")
    if not isinstance(source, Mapping):
        raise TypeError(f"expected a VGG-16 state dict (a mapping of tensors), a path or None, got "
                        f"{type(source).__name__}")
    for wrapper in ("state_dict", "model"):
        if wrapper in source and isinstance(source[wrapper], Mapping) \
                and not isinstance(source[wrapper], torch.Tensor):
            source = source[wrapper]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in source.items()}


def _validate(state: Mapping) -> None:
    missing = [k for k in VGG16_SHAPES if k not in state]
    wrong = [f"{k}: expected {VGG16_SHAPES[k]}, got {tuple(state[k].shape)}"
             for k in VGG16_SHAPES
             if k in state and (not isinstance(state[k], torch.Tensor)
                                or tuple(state[k].shape) != VGG16_SHAPES[k])]
    if missing or wrong:
        msg = ["not a torchvision VGG-16 state dict (torchvision.models.vgg16(), no batch norm)"]
        if missing:
            msg.append(f"missing keys: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if wrong:
            msg.append(f"wrong shapes: {wrong[:4]}{' ...' if len(wrong) > 4 else ''}")
        if any(k.startswith("features.") and k.endswith("running_mean") for k in state):
            msg.append("this looks like vgg16_bn, which DeepLab does not use")
        raise ValueError("; ".join(msg))


@torch.no_grad()
def load_vgg16_imagenet(net: DeepLab, state_dict_or_path=None, progress: bool = True) -> DeepLab:
    """Initialise a DeepLab from VGG-16 ImageNet weights (see the module docstring for the map).

    Args:
        net (DeepLab): width 1 (the channel counts must be VGG-16's).
        state_dict_or_path: a torchvision ``vgg16()`` state dict, a path to one (``.pth``), a
            torchvision VGG module, or None to use ``torchvision.models.VGG16_Weights.IMAGENET1K_V1``
            (cache or download; without internet this raises RuntimeError naming
            --vgg-weights).
    Returns:
        net, modified in place: VGG convs and decimated fc6/fc7 copied, fc8 N(0, 0.01^2).
    Raises:
        TypeError for a net that is not a DeepLab; ValueError for width != 1 or a state dict that
        is not VGG-16 (missing keys or wrong shapes); FileNotFoundError for a missing file.
    """
    if not isinstance(net, DeepLab):
        raise TypeError(f"net must be a models.DeepLab, got {type(net).__name__}")
    if net.cfg.width != 1.0:
        raise ValueError(f"ImageNet VGG-16 weights fit only width=1.0 nets, got width={net.cfg.width:g}")
    state = vgg16_state_dict_from(state_dict_or_path, progress=progress)
    _validate(state)

    for name, idx in zip(_CONV_NAMES, TORCHVISION_CONV_INDICES):
        conv = getattr(net, name)
        conv.weight.copy_(state[f"features.{idx}.weight"])
        conv.bias.copy_(state[f"features.{idx}.bias"])

    spec = VARIANTS[net.cfg.variant]
    keep = torch.arange(0, 4096, spec.channel_step)
    taps = torch.tensor(spec.taps)
    w6 = state["classifier.0.weight"].reshape(4096, 512, 7, 7)
    w6 = w6.index_select(0, keep).index_select(2, taps).index_select(3, taps)
    net.fc6.weight.copy_(w6)
    net.fc6.bias.copy_(state["classifier.0.bias"].index_select(0, keep))
    w7 = state["classifier.3.weight"].index_select(0, keep).index_select(1, keep)
    net.fc7.weight.copy_(w7.reshape(len(keep), len(keep), 1, 1))
    net.fc7.bias.copy_(state["classifier.3.bias"].index_select(0, keep))
    net.reset_classifier()
    return net
