"""DeepLab v1: VGG-16 re-purposed with atrous convolution, output stride 8 (Chen et al., ICLR 2015).

    net = deeplab("largefov", num_classes=21)        # DeepLab-LargeFOV
    scores = net(x)                                  # x Tensor[N, 3, H, W] -> Tensor[N, 21, h, w]
    full = net(x, upsample=True)                     # bilinear to Tensor[N, 21, H, W]

The backbone is VGG-16 with pool1-pool3 max 3x3/s2/p1, pool4 and pool5 max 3x3/s1/p1 and conv5_x
dilated by 2 (since pool4 no longer subsamples). The head (fc6, fc7, fc8) is one of the paper's
field-of-view variants (``VARIANTS``); optional MSc heads add multi-scale features.

Output size. Every convolution keeps the size; a 3x3/s2/p1 max pool maps n to
floor((n - 1) / 2) + 1 = ceil(n / 2) (PyTorch's floor mode, which gives the paper's 39x39 for a
306x306 input; Caffe's ceil mode would give 40x40). So the score map of an H x W input is
ceil(H / 8) x ceil(W / 8), and score (i, j) is centred on input pixel (8 i, 8 j): see
``output_size`` and ``upsample_scores``.
"""
import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DeepLab", "DeepLabConfig", "FC6Spec", "VARIANTS", "VGG16_BLOCKS", "MSC_SOURCES",
           "deeplab", "output_size", "upsample_scores", "receptive_field"]

#: VGG-16 convolution blocks: (channels, number of 3x3 convolutions) for conv1_x .. conv5_x.
VGG16_BLOCKS: Tuple[Tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
#: Output stride of every variant.
OUTPUT_STRIDE = 8


@dataclass(frozen=True)
class FC6Spec:
    """The head of one field-of-view variant.

    kernel: fc6 kernel size; dilation: fc6 dilation ("input stride" in the paper's Table 2);
    channels: fc6/fc7 width; avg_pool: a 3x3/s1/p1 average pool after pool5 (LargeFOV only, as in
    the public DeepLab-LargeFOV prototxt); taps: which of the 7 rows/columns of VGG-16's 7x7 fc6
    the ImageNet initialisation keeps; channel_step: keep every k-th fc6/fc7 filter of the 4096.
    """
    kernel: int
    dilation: int
    channels: int
    avg_pool: bool
    taps: Tuple[int, ...]
    channel_step: int


#: The paper's field-of-view study (Table 2). The taps subsample VGG-16's 7x7 fc6 so that the
#: kept taps sit where they were in the classification net: fc6 there sees pool5 at stride 32,
#: here the map is at stride 8, so tap spacing t (in the 7x7 grid) needs dilation 4 t.
#: 7x7: all taps, dilation 4 (32 px apart). 4x4: taps 0,2,4,6 (spacing 2) -> dilation 8 keeps the
#: geometry ("4x4-d8"); dilation 4 ("4x4") shrinks the field of view to half. LargeFOV: taps 0,3,6
#: (spacing 3, symmetric about the centre tap 3) -> dilation 12 keeps the geometry exactly.
VARIANTS: Dict[str, FC6Spec] = {
    "largefov": FC6Spec(kernel=3, dilation=12, channels=1024, avg_pool=True, taps=(0, 3, 6),
                        channel_step=4),
    "7x7": FC6Spec(kernel=7, dilation=4, channels=4096, avg_pool=False,
                   taps=(0, 1, 2, 3, 4, 5, 6), channel_step=1),
    "4x4": FC6Spec(kernel=4, dilation=4, channels=4096, avg_pool=False, taps=(0, 2, 4, 6),
                   channel_step=1),
    "4x4-d8": FC6Spec(kernel=4, dilation=8, channels=4096, avg_pool=False, taps=(0, 2, 4, 6),
                      channel_step=1),
}

#: MSc heads: (source, stride of its 3x3 conv). Each source map is at stride 1, 2, 4, 8, 8 of the
#: input; the head's 3x3 conv (pad 1) brings it to stride 8 with the same ceil(n / 8) size.
MSC_SOURCES: Tuple[Tuple[str, int], ...] = (("input", 8), ("pool1", 4), ("pool2", 2),
                                            ("pool3", 1), ("pool4", 1))
MSC_CHANNELS = 128


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def output_size(height: int, width: int) -> Tuple[int, int]:
    """Score-map size for an input of ``height x width``: (ceil(H / 8), ceil(W / 8)).

    Each of pool1-pool3 (3x3, stride 2, pad 1, floor mode) maps n to ceil(n / 2), and
    ceil(ceil(ceil(n / 2) / 2) / 2) = ceil(n / 8). Example: 306 -> 39, 321 -> 41.
    """
    return (-(-int(height) // OUTPUT_STRIDE), -(-int(width) // OUTPUT_STRIDE))


def upsample_scores(scores: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear upsampling of stride-8 scores to the input size.

    Args:
        scores (Tensor[N, C, h, w]): scores at stride 8 (h = ceil(H / 8)).
        size ((H, W)): the input size.
    Returns:
        Tensor[N, C, H, W].

    Uses ``align_corners=True``: score (i, j) is centred on input pixel (8 i, 8 j), so the corners
    of the two grids coincide (exactly when H = 8 (h - 1) + 1, e.g. 321 -> 41, as in DeepLab's
    Caffe "Interp" layer; within a fraction of a pixel otherwise). ``align_corners=False`` would
    shift the labels by about half a score cell (4 px).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 4:
        raise ValueError(f"scores must be a Tensor[N, C, h, w], got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores)}")
    # Symbolic sizes stay symbolic (torch.export with dynamic H and W); the shortcut for scores
    # already at the size is a Python-side decision that a traced graph must not bake in.
    size = tuple(s if isinstance(s, torch.SymInt) else int(s) for s in size[:2])
    if not torch.compiler.is_compiling() and tuple(scores.shape[-2:]) == size:
        return scores
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=True)


@dataclass
class DeepLabConfig:
    """Everything needed to rebuild a :class:`DeepLab` (stored in checkpoints)."""
    variant: str = "largefov"
    num_classes: int = 21
    msc: bool = False
    width: float = 1.0
    dropout: float = 0.5

    def validate(self) -> "DeepLabConfig":
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) \
                or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if not isinstance(self.width, (int, float)) or isinstance(self.width, bool) \
                or not math.isfinite(self.width) or self.width <= 0:
            raise ValueError(f"width must be a positive number, got {self.width!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        self.msc = bool(self.msc)
        self.width = float(self.width)
        self.dropout = float(self.dropout)
        return self


class MScHead(nn.Module):
    """One MSc branch: 3x3 conv (stride s, pad 1) + ReLU, 1x1 conv + ReLU, dropout.

    Args:
        in_channels: channels of the source map; channels: 128 in the paper (times width).
        stride: brings the source map to stride 8.
    Shapes: Tensor[N, in_channels, H_s, W_s] -> Tensor[N, channels, ceil(H / 8), ceil(W / 8)].
    """

    def __init__(self, in_channels: int, channels: int, stride: int, dropout: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(F.relu(self.conv2(F.relu(self.conv1(x)))))


class DeepLab(nn.Module):
    """Atrous VGG-16 DeepLab with one of the paper's fc6 variants and optional MSc heads.

    Args:
        variant: "largefov" (fc6 3x3 dilation 12, 1024 channels, after a 3x3 average pool),
            "7x7" (7x7 dilation 4, 4096), "4x4" (4x4 dilation 4, 4096), "4x4-d8" (4x4 dilation 8,
            4096).
        num_classes: output channels of fc8 (21 for PASCAL VOC).
        msc: add the multi-scale heads (128 3x3 + 128 1x1 on the input and on pool1-pool4),
            concatenated to fc7's output before fc8 (640 more channels).
        width: multiplies every channel count (VGG convs, fc6/fc7, MSc heads) for small, fast
            nets with the same topology; ImageNet initialisation needs width 1.
        dropout: after fc6, fc7 and each MSc head (0.5 in the paper).

    Layers are named as in DeepLab's prototxt (``conv1_1`` .. ``conv5_3``, ``fc6``, ``fc7``,
    ``fc8``; MSc heads ``msc.input``, ``msc.pool1`` ..). Fresh weights: convolutions Kaiming
    normal (fan out, as torchvision's VGG), biases 0; fc8 Gaussian std 0.01 as in the paper.

    Forward: x (Tensor[N, 3, H, W], ImageNet-normalised RGB) -> scores (Tensor[N, C, ceil(H/8),
    ceil(W/8)]), or Tensor[N, C, H, W] with ``upsample=True``.

    Example:
        >>> net = DeepLab("largefov", num_classes=21, width=0.125)
        >>> net(torch.randn(1, 3, 306, 306)).shape
        torch.Size([1, 21, 39, 39])
    """

    output_stride = OUTPUT_STRIDE

    def __init__(self, variant: str = "largefov", num_classes: int = 21, msc: bool = False,
                 width: float = 1.0, dropout: float = 0.5):
        super().__init__()
        cfg = DeepLabConfig(variant, num_classes, msc, width, dropout).validate()
        self.cfg = cfg
        spec = VARIANTS[cfg.variant]
        self.spec = spec

        self._conv_names: List[List[str]] = []
        in_ch = 3
        self.block_channels: List[int] = []
        for b, (channels, count) in enumerate(VGG16_BLOCKS, start=1):
            out_ch = _scaled(channels, cfg.width)
            dilation = 2 if b == 5 else 1
            names = []
            for i in range(1, count + 1):
                name = f"conv{b}_{i}"
                self.add_module(name, nn.Conv2d(in_ch, out_ch, 3, padding=dilation, dilation=dilation))
                names.append(name)
                in_ch = out_ch
            self._conv_names.append(names)
            self.block_channels.append(out_ch)
            stride = 2 if b <= 3 else 1
            self.add_module(f"pool{b}", nn.MaxPool2d(3, stride=stride, padding=1))
        self.pool5a = nn.AvgPool2d(3, stride=1, padding=1) if spec.avg_pool else None

        fc_ch = _scaled(spec.channels, cfg.width)
        pad = spec.dilation * (spec.kernel - 1) // 2   # even for all variants: size preserved
        self.fc6 = nn.Conv2d(in_ch, fc_ch, spec.kernel, padding=pad, dilation=spec.dilation)
        self.drop6 = nn.Dropout(cfg.dropout)
        self.fc7 = nn.Conv2d(fc_ch, fc_ch, 1)
        self.drop7 = nn.Dropout(cfg.dropout)

        classifier_in = fc_ch
        if cfg.msc:
            msc_ch = _scaled(MSC_CHANNELS, cfg.width)
            source_ch = {"input": 3, "pool1": self.block_channels[0], "pool2": self.block_channels[1],
                         "pool3": self.block_channels[2], "pool4": self.block_channels[3]}
            self.msc = nn.ModuleDict({name: MScHead(source_ch[name], msc_ch, stride, cfg.dropout)
                                      for name, stride in MSC_SOURCES})
            classifier_in += msc_ch * len(MSC_SOURCES)
        else:
            self.msc = None
        self.fc8 = nn.Conv2d(classifier_in, cfg.num_classes, 1)
        self.reset_parameters()

    # ------------------------------------------------------------------ construction helpers
    @property
    def config(self) -> dict:
        """Constructor arguments as a plain dict: ``DeepLab(**net.config)`` rebuilds the net."""
        return asdict(self.cfg)

    def reset_parameters(self) -> None:
        """Fresh initialisation: Kaiming normal (fan out) convs, zero biases, fc8 N(0, 0.01^2)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.reset_classifier()

    def reset_classifier(self) -> None:
        """fc8 as in the paper: Gaussian weights, std 0.01; zero bias."""
        nn.init.normal_(self.fc8.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc8.bias)

    def conv_layers(self) -> List[Tuple[str, nn.Conv2d]]:
        """The 13 VGG-16 convolutions in order: [("conv1_1", module), ..., ("conv5_3", module)]."""
        return [(n, getattr(self, n)) for names in self._conv_names for n in names]

    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        """Parameters split as the paper's schedule needs them.

        Returns {"backbone": conv1_1..fc7 (lr 0.001 in the paper), "classifier": fc8 and the MSc
        heads (the freshly initialised layers, lr 0.01)}.
        """
        new = set(id(p) for p in self.fc8.parameters())
        if self.msc is not None:
            new |= set(id(p) for p in self.msc.parameters())
        groups = {"backbone": [], "classifier": []}
        for p in self.parameters():
            groups["classifier" if id(p) in new else "backbone"].append(p)
        return groups

    def layer_geometry(self) -> List[Tuple[str, int, int, int]]:
        """The main path as (name, kernel, stride, dilation), input to scores, for receptive-field
        arithmetic (``receptive_field``). The MSc heads are not on it (their fields are smaller).
        """
        geo = []
        for b, names in enumerate(self._conv_names, start=1):
            for n in names:
                conv = getattr(self, n)
                geo.append((n, conv.kernel_size[0], conv.stride[0], conv.dilation[0]))
            pool = getattr(self, f"pool{b}")
            geo.append((f"pool{b}", pool.kernel_size, pool.stride, 1))
        if self.pool5a is not None:
            geo.append(("pool5a", 3, 1, 1))
        for conv, name in ((self.fc6, "fc6"), (self.fc7, "fc7"), (self.fc8, "fc8")):
            geo.append((name, conv.kernel_size[0], conv.stride[0], conv.dilation[0]))
        return geo

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be Tensor[N, 3, H, W] (ImageNet-normalised RGB), got shape "
                             f"{tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.shape[0] > 0 and min(x.shape[2:]) < 1:
            raise ValueError(f"x must have H, W >= 1, got shape {tuple(x.shape)}")
        weight = getattr(self, self._conv_names[0][0]).weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model is on {weight.device}")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x is {x.dtype} but the model's weights are {weight.dtype}: convert one to the "
                            "other, or run under torch.autocast for mixed precision")

    def forward(self, x: torch.Tensor, upsample: bool = False) -> torch.Tensor:
        """x (Tensor[N, 3, H, W]) -> scores (Tensor[N, C, ceil(H/8), ceil(W/8)]), or
        Tensor[N, C, H, W] (bilinear, ``upsample_scores``) when ``upsample`` is True."""
        self._check_input(x)
        side = []
        if self.msc is not None:
            side.append(self.msc["input"](x))
        h = x
        for b, names in enumerate(self._conv_names, start=1):
            for n in names:
                h = F.relu(getattr(self, n)(h))
            h = getattr(self, f"pool{b}")(h)
            if self.msc is not None and b <= 4:
                side.append(self.msc[f"pool{b}"](h))
        if self.pool5a is not None:
            h = self.pool5a(h)
        h = self.drop6(F.relu(self.fc6(h)))
        h = self.drop7(F.relu(self.fc7(h)))
        if side:
            h = torch.cat([h] + side, dim=1)
        scores = self.fc8(h)
        if upsample:
            scores = upsample_scores(scores, x.shape[-2:])
        return scores

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"variant={c.variant!r}, num_classes={c.num_classes}, msc={c.msc}, "
                f"width={c.width:g}, dropout={c.dropout:g}")


def deeplab(variant: str = "largefov", num_classes: int = 21, msc: bool = False,
            width: float = 1.0, dropout: float = 0.5) -> DeepLab:
    """Build a DeepLab by name (the paper's variants): "largefov", "7x7", "4x4", "4x4-d8".

    Args:
        variant, num_classes, msc, width, dropout: see :class:`DeepLab`.
    Returns:
        DeepLab with fresh weights; :func:`models.load_vgg16_imagenet` copies ImageNet VGG-16
        weights into it.

    Example:
        >>> net = deeplab("largefov", num_classes=21, msc=True, width=0.25)
    """
    return DeepLab(variant, num_classes=num_classes, msc=msc, width=width, dropout=dropout)


def receptive_field(layers) -> Tuple[int, int]:
    """Receptive field and jump (stride) of a layer stack, in input pixels.

    Args:
        layers: a :class:`DeepLab` (its ``layer_geometry()``) or a list of
            (name, kernel, stride, dilation).
    Returns:
        (receptive field size, cumulative stride). Each layer adds (dilation (kernel - 1)) x jump.
    """
    if isinstance(layers, DeepLab):
        layers = layers.layer_geometry()
    rf, jump = 1, 1
    for _, k, s, d in layers:
        rf += d * (k - 1) * jump
        jump *= s
    return rf, jump
