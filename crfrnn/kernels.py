"""The Gaussian kernels of a dense CRF: what each is over (the positions, the guide, or both), with
which bandwidths, and its weight.

    GaussianKernel(weight=4.0, positions=121.0, guide=5.0)      # DeepLab's bilateral kernel
    GaussianKernel(weight=3.0, positions=3.0)                   # its spatial kernel
    GaussianKernel(weight=5.0, positions=(1.0, 3.0, 3.0), guide=(10.0, 20.0))   # a volume, 2 modalities

k(i, j) = exp(-|f_i - f_j|^2 / 2), with f the point's positions, each divided by its bandwidth,
then its guide channels, each divided by its bandwidth: the features of densecrf's
addPairwiseBilateral / addPairwiseGaussian, for any number of axes and channels.
"""
import numbers
from dataclasses import dataclass

from . import checks

__all__ = ["GaussianKernel", "as_kernels", "classic_kernels", "check_sizes", "describe_bandwidths"]


def _bandwidths(name, value):
    """None, or a tuple of positive floats (one number stays a 1-tuple: shared by every axis or
    channel)."""
    if value is None:
        return None
    value = checks.scalar(value)
    values = (value,) if isinstance(value, numbers.Real) else tuple(value)
    if not values:
        raise ValueError(f"{name} needs at least one bandwidth, got {value!r}")
    return tuple(checks.positive(name, v) for v in values)


@dataclass(frozen=True)
class GaussianKernel:
    """One Gaussian kernel of a dense CRF.

    Args:
        weight (float): its initial weight w (the layer starts its C x C weight matrix at w I;
            in densecrf's terms, the Potts compatibility of the kernel).
        positions (float, sequence of float, or None): the bandwidth of the position features,
            in the positions' units (pixels, voxels, or what a point set's positions are in): one
            number for every axis, or one per axis in the tensor's axis order ((sigma_z,
            sigma_y, sigma_x) for [D, H, W]: anisotropic voxel spacing). None: the kernel does
            not look at positions.
        guide (float, sequence of float, or None): the bandwidth of the guide channels, in the
            guide's units (0..255 for RGB images): one number for every channel, or one per
            channel. None: the kernel does not look at the guide.
        name (str or None): names the layer's parameters of this kernel (``{name}_weight``,
            ``{name}_log_sigma``); by default "bilateral" (positions and guide), "spatial"
            (positions only) or "appearance" (guide only), numbered from the second on.
    """

    weight: float
    positions: object = None
    guide: object = None
    name: object = None

    def __post_init__(self):
        object.__setattr__(self, "weight", checks.finite("kernel weight", self.weight))
        object.__setattr__(self, "positions", _bandwidths("kernel positions bandwidth", self.positions))
        object.__setattr__(self, "guide", _bandwidths("kernel guide bandwidth", self.guide))
        if self.positions is None and self.guide is None:
            raise ValueError("a kernel is over the positions, the guide or both: give positions= and/or guide=")
        if self.name is not None and not (isinstance(self.name, str) and self.name.isidentifier()):
            raise ValueError(f"kernel name must be an identifier (it names parameters), got {self.name!r}")

    @property
    def sigmas(self):
        """The bandwidths as stored (positions' first, then the guide's): a tuple of floats."""
        return (self.positions or ()) + (self.guide or ())

    @property
    def kind(self):
        """"bilateral", "spatial" or "appearance": what the kernel is over."""
        if self.positions is not None:
            return "bilateral" if self.guide is not None else "spatial"
        return "appearance"

    def with_sigmas(self, sigmas):
        """The same kernel with other bandwidths (a flat sequence in the order of `sigmas`)."""
        sigmas = tuple(sigmas)
        n = len(self.positions or ())
        return GaussianKernel(self.weight, sigmas[:n] or None, sigmas[n:] or None, self.name)

    def config(self):
        """Plain Python values that rebuild the kernel: ``GaussianKernel(**kernel.config())``."""
        plain = lambda v: None if v is None else (v[0] if len(v) == 1 else list(v))  # noqa: E731
        return {"weight": self.weight, "positions": plain(self.positions), "guide": plain(self.guide),
                "name": self.name}


def as_kernels(kernels):
    """A list of GaussianKernel, each named (unique identifiers), from GaussianKernels or their
    `config()` dicts; ValueError for an empty list, duplicate names or anything else."""
    if isinstance(kernels, (GaussianKernel, dict)) or not hasattr(kernels, "__iter__"):
        raise ValueError(f"kernels must be a list of GaussianKernel, got {kernels!r}")
    kernels = [GaussianKernel(**k) if isinstance(k, dict) else k for k in kernels]
    if not kernels or not all(isinstance(k, GaussianKernel) for k in kernels):
        raise ValueError(f"kernels must be a non-empty list of GaussianKernel, got {kernels!r}")
    named, used = [], set()
    for kernel in kernels:
        name = kernel.name
        if name is None:
            name, number = kernel.kind, 2
            while name in used:
                name, number = f"{kernel.kind}{number}", number + 1
        if name in used:
            raise ValueError(f"two kernels are named {name!r}: kernel names must be unique")
        used.add(name)
        named.append(GaussianKernel(kernel.weight, kernel.positions, kernel.guide, name))
    return named


def classic_kernels(bilateral, spatial):
    """DeepLab's and CRF-RNN's pair: bilateral (sigma_xy, sigma_rgb, weight) and spatial
    (sigma_xy, weight), as kernels named "bilateral" and "spatial"."""
    bil, spa = checks.kernel_parameters(bilateral, spatial)
    return [GaussianKernel(bil[2], positions=bil[0], guide=bil[1], name="bilateral"),
            GaussianKernel(spa[1], positions=spa[0], name="spatial")]


def check_sizes(kernels, num_axes, num_channels, what):
    """ValueError unless every kernel's per-axis and per-channel bandwidths fit `num_axes`
    positions and `num_channels` guide channels (None: no guide given)."""
    for kernel in kernels:
        if kernel.positions is not None and len(kernel.positions) not in (1, num_axes):
            raise ValueError(f"kernel {kernel.name!r} has {len(kernel.positions)} position bandwidths "
                             f"{kernel.positions}, but {what} has {num_axes} position axes: give one number or "
                             f"one per axis")
        if kernel.guide is not None:
            if num_channels is None:
                raise ValueError(f"kernel {kernel.name!r} is over the guide (guide bandwidth {kernel.guide}), but "
                                 "no guide image was given")
            if len(kernel.guide) not in (1, num_channels):
                raise ValueError(f"kernel {kernel.name!r} has {len(kernel.guide)} guide bandwidths {kernel.guide}, "
                                 f"but the guide has {num_channels} channels: give one number or one per channel")


def describe_bandwidths(kernels, sigmas, equals):
    """The kernels' bandwidths in words: "bilateral sigma_xy, sigma_rgb = 121, 5; spatial sigma_xy
    = 3" (`equals` " = "), or "bilateral=(121, 5), spatial=3" (`equals` "=")."""
    def numbers(values):
        return ", ".join(f"{v:.4g}" for v in values)
    parts = []
    for kernel, values in zip(kernels, sigmas):
        if equals == "=":
            shown = f"({numbers(values)})" if len(values) > 1 else numbers(values)
            parts.append(f"{kernel.name}={shown}")
        else:
            labels = ["sigma_xy"] * len(kernel.positions or ()) + ["sigma_rgb"] * len(kernel.guide or ())
            parts.append(f"{kernel.name} {', '.join(labels)} = {numbers(values)}")
    return (", " if equals == "=" else "; ").join(parts)
