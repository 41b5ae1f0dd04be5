"""DeepLabCRF: the DCNN and the CRF-RNN layer as one trainable model.

    crf = crfrnn.CRFRNNLayer.deeplab_largefov(21, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    joint = DeepLabCRF(deeplab("largefov"), crf)
    out = joint(x)        # {"coarse": [N,C,h,w], "unary": [N,C,H,W], "crf": [N,C,H,W] or None}

The stride-8 scores are upsampled bilinearly to the image size (the unary), then refined by the
CRF with the image. The CRF is built outside and handed in; it can be frozen (``freeze_crf``: its
parameters get requires_grad False) or switched off at run time (``use_crf = False``).
"""
from typing import Dict, Optional

import torch
from torch import nn

from .vgg_deeplab import DeepLab, upsample_scores

__all__ = ["DeepLabCRF", "IMAGENET_MEAN", "IMAGENET_STD"]

#: torchvision's ImageNet normalisation (for 0..1 RGB), which DeepLab's input uses.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DeepLabCRF(nn.Module):
    """DCNN + fully connected CRF as an RNN (joint training, or the CRF as post-processing).

    Args:
        net (DeepLab): the DCNN; its stride-8 scores are the CRF's unary after upsampling.
        crf (nn.Module or None): a ``crfrnn.CRFRNNLayer`` (``crf(unary_logits, image)`` ->
            refined logits), with the ``num_classes`` of the net. For an ImageNet-normalised ``x``
            build it with ``image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD`` so that it undoes
            the normalisation; or pass the raw 0..255 image as ``image`` to ``forward``.
        use_crf (bool): initial value of the ``use_crf`` switch.

    Forward:
        x (Tensor[N, 3, H, W]): the DCNN input (ImageNet-normalised RGB).
        image (Tensor[N, 3, H, W], optional): the image the CRF sees, as its layer expects it;
            defaults to ``x``.
    Returns:
        dict with "coarse" (Tensor[N, C, ceil(H/8), ceil(W/8)], the DCNN scores), "unary"
        (Tensor[N, C, H, W], bilinear upsampling of "coarse"), "crf" (Tensor[N, C, H, W] refined
        logits, or None when there is no CRF or ``use_crf`` is False).
    """

    def __init__(self, net: DeepLab, crf: Optional[nn.Module] = None, use_crf: bool = True):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module (models.DeepLab), got {type(net).__name__}")
        if crf is not None and not isinstance(crf, nn.Module):
            raise TypeError(f"crf must be an nn.Module (crfrnn.CRFRNNLayer) or None, got "
                            f"{type(crf).__name__}")
        net_classes = getattr(getattr(net, "cfg", None), "num_classes", None)
        crf_classes = getattr(crf, "num_classes", None)
        if net_classes is not None and crf_classes is not None and int(crf_classes) != net_classes:
            raise ValueError(f"the CRF has num_classes={crf_classes} but the net outputs {net_classes}")
        self.net = net
        self.crf = crf
        self.use_crf = bool(use_crf)

    @property
    def crf_frozen(self) -> bool:
        """True when the CRF has parameters and none of them requires a gradient."""
        params = list(self.crf.parameters()) if self.crf is not None else []
        return bool(params) and not any(p.requires_grad for p in params)

    def freeze_crf(self, frozen: bool = True) -> "DeepLabCRF":
        """Stop (or, with ``frozen=False``, resume) learning the CRF's parameters. Gradients still
        flow through the CRF into the DCNN. Returns self."""
        if self.crf is not None:
            for p in self.crf.parameters():
                p.requires_grad_(not frozen)
        return self

    def unfreeze_crf(self) -> "DeepLabCRF":
        return self.freeze_crf(False)

    def forward(self, x: torch.Tensor, image: Optional[torch.Tensor] = None
                ) -> Dict[str, Optional[torch.Tensor]]:
        coarse = self.net(x)
        unary = upsample_scores(coarse, x.shape[-2:])
        refined = None
        if self.crf is not None and self.use_crf:
            if image is None:
                image = x
            elif not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != 3 \
                    or image.shape[0] != x.shape[0] or image.shape[-2:] != x.shape[-2:]:
                raise ValueError(f"image must be Tensor[N, 3, H, W] matching x {tuple(x.shape)}, got "
                                 f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image)}")
            refined = self.crf(unary, image)
        return {"coarse": coarse, "unary": unary, "crf": refined}

    def extra_repr(self) -> str:
        return f"use_crf={self.use_crf}, crf_frozen={self.crf_frozen}"
