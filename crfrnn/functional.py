"""One-call dense CRF post-processing, for users coming from pydensecrf.

    refined = crfrnn.dense_crf(image, probs)          # image [H, W, 3] uint8, probs [C, H, W]

is the same computation as

    d = pydensecrf.densecrf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(pydensecrf.utils.unary_from_softmax(probs))
    d.addPairwiseGaussian(sxy=spatial[0], compat=spatial[1])
    d.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1], rgbim=image, compat=bilateral[2])
    refined = np.array(d.inference(num_iterations)).reshape(C, H, W)

on the permutohedral lattice of this package (C++ or CUDA when built, any device), and for
grayscale or multi-channel images, volumes, signals and point sets as naturally.
(`crfrnn.pydensecrf` runs pydensecrf scripts unchanged.)
"""
import numbers

import numpy as np
import torch

from . import checks
from .inference import CRFRNN_PARAMS, DEFAULT_PRUNE, kernel_lattices, mean_field, potts_matrices
from .kernels import as_kernels, classic_kernels

__all__ = ["dense_crf"]


def _as_tensor(name, x, device=None):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)
    if isinstance(x, torch.Tensor):
        checks.dense_layout(name, x)
        return x if device is None else x.to(device)
    raise TypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(x).__name__}")


def _channels_first(img, spatial, points):
    """The guide [*S, G] or [*S] (grayscale) as Tensor[1, G, *S]; ValueError naming the layouts
    that fit otherwise."""
    if tuple(img.shape) == spatial:
        img = img[..., None]
    if img.dim() != len(spatial) + 1 or tuple(img.shape[:-1]) != spatial:
        s = "P" if points else {1: "L", 2: "H, W", 3: "D, H, W"}[len(spatial)]
        example = " (e.g. RGB [H, W, 3])" if len(spatial) == 2 else ""
        raise ValueError(f"image {tuple(img.shape)} and probs sizes differ: for probs [C, {s}] = "
                         f"{spatial} give image [{s}, G]{example} or [{s}] (one channel)")
    return img.movedim(-1, 0)[None]


def dense_crf(image, probs, num_iterations=10, bilateral=None, spatial=None, normalize="symmetric", clip=1e-5,
              backend="auto", kernels=None, positions=None, prune=DEFAULT_PRUNE):
    """Refine class probabilities with a fully connected CRF (mean field), in one call.

    Args:
        image (ndarray or Tensor [*S, G], [*S], or None): the guide, channels last as
            pydensecrf's `rgbim`: RGB [H, W, 3] (uint8, or float or another integer type, in
            0..255), grayscale [H, W] or [H, W, 1], a volume [D, H, W, G], any channels; for
            points [P, G]. None when no kernel is over the guide. Its bandwidths are in its units
            (0..255 for RGB, which a 3-channel image on a 2-D grid is taken to be, and checked).
        probs (ndarray or Tensor [C, *S] or [C, P]): class probabilities per point (e.g. a
            softmax), on a grid S of rank 1, 2 or 3 ([C, L], [C, H, W], [C, D, H, W]), or of a
            point set with `positions`.
        num_iterations (int): mean-field iterations, 0..crfrnn.MAX_ITERATIONS (default 10).
        bilateral ((sigma_xy, sigma_rgb, weight)): appearance kernel, as pydensecrf's
            addPairwiseBilateral(sxy, srgb, rgbim, compat); default CRF-RNN's (160, 3, 5).
            DeepLab-LargeFOV's is (121, 5, 4); densecrf's demo uses (80, 13, 10).
        spatial ((sigma_xy, weight)): smoothness kernel, as addPairwiseGaussian(sxy, compat);
            default (3, 3).
        normalize (str): "symmetric" (pydensecrf's default), "after", "before" or "none".
        clip (float): probabilities are clipped to [clip, 1] before the log, as pydensecrf's
            unary_from_softmax does (default 1e-5, the same): a point whose probabilities are
            all below it (all 0) starts uniform, and they need not sum to 1.
        backend (str): lattice backend, "auto" | "reference" | "native".
        kernels (sequence of GaussianKernel or None): any Gaussian kernels instead of the
            (bilateral, spatial) pair (see `crfrnn.GaussianKernel`: per-axis and per-channel
            bandwidths, kernels over the guide alone).
        positions (ndarray or Tensor [P, D] or None): a point set's positions; probs is then
            [C, P] and the image [P, G].
        prune (float): sender pruning's epsilon (see `crfrnn.mean_field`): in each iteration a
            class whose probability stays below it everywhere sends no message (it still
            receives); the cost then follows the classes present, not C. Default
            crfrnn.DEFAULT_PRUNE, measured to leave the labels as they are; 0: exact.
    Raises ValueError for probabilities that are negative, above 1 or not finite, an RGB image
    outside 0..255, and a non-finite result (kernel weights too large for the arithmetic; with
    pruning, weights large enough that the iterations could overflow are refused up front).

    Returns:
        Refined probabilities of probs' shape: a float32 ndarray for ndarray `probs`, else a
        Tensor on probs' device (float32, or float64 for float64 probs).

    Example:
        >>> img = np.random.randint(0, 256, (40, 50, 3), dtype=np.uint8)
        >>> p = np.random.dirichlet(np.ones(4), size=(40, 50)).transpose(2, 0, 1).astype(np.float32)
        >>> dense_crf(img, p).shape
        (4, 40, 50)
    """
    backend = checks.choice("backend", backend, ("auto", "reference", "native"))
    numpy_out = isinstance(probs, np.ndarray)
    p = _as_tensor("probs", probs)
    img = None if image is None else _as_tensor("image", image, p.device)
    pos = None if positions is None else _as_tensor("positions", positions, p.device)
    if kernels is None:
        kernels = classic_kernels(CRFRNN_PARAMS["bilateral"] if bilateral is None else bilateral,
                                  CRFRNN_PARAMS["spatial"] if spatial is None else spatial)
    elif bilateral is not None or spatial is not None:
        raise ValueError("give the kernels either as kernels= or as bilateral=/spatial=, not both")
    kernels = as_kernels(kernels)
    if not 2 <= p.dim() <= 4 or (pos is not None and p.dim() != 2):
        raise ValueError(f"probs must be [C, H, W] (or [C, L], [C, D, H, W]; [C, P] with positions), got shape "
                         f"{tuple(p.shape)}")
    if not p.is_floating_point():
        raise TypeError(f"probs must be floating point probabilities, got {p.dtype}")
    if p.device.type == "meta":
        raise ValueError("dense_crf needs probabilities with values, got meta tensors")
    spatial_shape = tuple(p.shape[1:])
    guide = None if img is None else _channels_first(img, spatial_shape, pos is not None)
    if guide is not None:
        checks.image_dtype(guide, "[H, W, 3]" if guide.shape[1] == 3 else "[*S, G]")
    if pos is not None:
        if pos.dim() != 2 or pos.shape[0] != spatial_shape[0]:
            raise ValueError(f"positions must be [P, D] with probs [C, P]'s P = {spatial_shape[0]}, got shape "
                             f"{tuple(pos.shape)}")
        pos = pos.t()[None]
    checks.crf_inputs(p[None], guide, pos, None, kernels)
    num_iterations = checks.iteration_count(num_iterations)
    prune = checks.prune_threshold(prune)
    normalize = checks.normalizations(normalize, len(kernels))
    clip = checks.scalar(clip)
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not 0 < clip < 1:
        raise ValueError(f"clip must be in (0, 1), got {clip!r}")
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    p = p.to(dtype)
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be finite and non-negative")
    if p.numel() and float(p.max()) > 1.001:  # the clip to [clip, 1] would flatten them silently
        raise ValueError(f"probs must be probabilities in 0..1 (e.g. a softmax over C), got values up to "
                         f"{float(p.max()):g}: scores or logits? pass their softmax")
    # (RGB: 3 channels on a 2-D grid that a kernel reads; other guides are in their own units.)
    rgb = guide is not None and guide.shape[1] == 3 and pos is None and len(spatial_shape) == 2 and \
        any(k.guide is not None for k in kernels)
    if rgb and guide.dtype != torch.uint8 and guide.numel() and (guide.amin() < 0 or guide.amax() > 255):
        raise ValueError(f"image must be RGB in 0..255 (uint8, or another dtype in that range), got "
                         f"{guide.dtype} values in [{guide.amin().item():g}, {guide.amax().item():g}]")
    if rgb and guide.is_floating_point() and guide.numel() and checks.DARKEST_0_TO_1_MAX < float(guide.amax()) <= 1:
        checks.warn_colours_in_0_to_1(stacklevel=2)  # at the caller of dense_crf

    c = p.shape[0]
    unary = torch.log(p.clamp(min=clip, max=1.0)).flatten(1).t().unsqueeze(0)  # [1, P, C]
    with torch.autocast(device_type=p.device.type, enabled=False):
        if guide is not None:
            guide = guide.to(torch.float64 if guide.dtype == torch.float64 else torch.float32)
        reference = next(t for t in (guide, pos) if t is not None) if guide is not None or pos is not None else p
        features_dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
        lattices = kernel_lattices(kernels, [k.sigmas for k in kernels], (1, *spatial_shape), pos, guide, backend,
                                   features_dtype, p.device)
        pairwise = potts_matrices(c, [k.weight for k in kernels], dtype=dtype, device=p.device)
        logits = mean_field(unary.contiguous(), lattices, pairwise, num_iterations, normalize, prune=prune)
        q = torch.softmax(logits, dim=-1)[0].t().reshape(c, *spatial_shape)
    if not torch.isfinite(q).all():
        weights = ", ".join(f"{k.name} {k.weight:g}" for k in kernels)
        raise ValueError(f"the CRF output has {int((~torch.isfinite(q)).sum())} NaN/Inf values: the kernel "
                         f"weights ({weights}) are too large for {dtype} arithmetic")
    return q.detach().cpu().numpy().astype(np.float32) if numpy_out else q
