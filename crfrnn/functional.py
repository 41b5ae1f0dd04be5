"""One-call dense CRF post-processing, for users coming from pydensecrf.

    refined = crfrnn.dense_crf(image, probs)          # image [H, W, 3] uint8, probs [C, H, W]

is the same computation as

    d = pydensecrf.densecrf.DenseCRF2D(W, H, C)
    d.setUnaryEnergy(pydensecrf.utils.unary_from_softmax(probs))
    d.addPairwiseGaussian(sxy=spatial[0], compat=spatial[1])
    d.addPairwiseBilateral(sxy=bilateral[0], srgb=bilateral[1], rgbim=image, compat=bilateral[2])
    refined = np.array(d.inference(num_iterations)).reshape(C, H, W)

on the permutohedral lattice of this package (C++ or CUDA when built, any device).
"""
import numpy as np
import torch

from . import checks
from .lattice import NORMALIZATIONS, check_lattice_size
from .inference import CRFRNN_PARAMS, build_crf_lattices, mean_field, potts_matrices

__all__ = ["dense_crf"]


def _as_tensor(name, x, device=None):
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)
    if isinstance(x, torch.Tensor):
        return x if device is None else x.to(device)
    raise TypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(x).__name__}")


def dense_crf(image, probs, num_iterations=10, bilateral=CRFRNN_PARAMS["bilateral"],
              spatial=CRFRNN_PARAMS["spatial"], normalize="symmetric", clip=1e-5, backend="auto"):
    """Refine class probabilities with a fully connected CRF (mean field), in one call.

    Args:
        image (ndarray or Tensor [H, W, 3]): RGB, uint8 (or float or another integer type, in
            0..255).
        probs (ndarray or Tensor [C, H, W]): class probabilities per pixel (e.g. a softmax).
        num_iterations (int): mean-field iterations, 0..crfrnn.MAX_ITERATIONS (default 10).
        bilateral ((sigma_xy, sigma_rgb, weight)): appearance kernel, as pydensecrf's
            addPairwiseBilateral(sxy, srgb, rgbim, compat); default CRF-RNN's (160, 3, 5).
            DeepLab-LargeFOV's is (121, 5, 4); densecrf's demo uses (80, 13, 10).
        spatial ((sigma_xy, weight)): smoothness kernel, as addPairwiseGaussian(sxy, compat);
            default (3, 3).
        normalize (str): "symmetric" (pydensecrf's default), "after" or "none".
        clip (float): probabilities are clipped to [clip, 1] before the log, as pydensecrf's
            unary_from_softmax does (default 1e-5, the same).
        backend (str): lattice backend, "auto" | "reference" | "native".
    Raises ValueError for probabilities that are negative, above 1 or not finite, an image outside 0..255,
    and a non-finite result (kernel weights too large for the arithmetic).

    Returns:
        Refined probabilities [C, H, W]: a float32 ndarray for ndarray `probs`, else a Tensor on
        probs' device (float32, or float64 for float64 probs).

    Example:
        >>> img = np.random.randint(0, 256, (40, 50, 3), dtype=np.uint8)
        >>> p = np.random.dirichlet(np.ones(4), size=(40, 50)).transpose(2, 0, 1).astype(np.float32)
        >>> dense_crf(img, p).shape
        (4, 40, 50)
    """
    numpy_out = isinstance(probs, np.ndarray)
    p = _as_tensor("probs", probs)
    img = _as_tensor("image", image, p.device)
    if p.dim() != 3:
        raise ValueError(f"probs must be [C, H, W], got shape {tuple(p.shape)}")
    if not p.is_floating_point():
        raise TypeError(f"probs must be floating point probabilities, got {p.dtype}")
    if img.dim() != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be [H, W, 3] RGB, got shape {tuple(img.shape)}")
    if tuple(img.shape[:2]) != tuple(p.shape[1:]):
        raise ValueError(f"image {tuple(img.shape)} and probs {tuple(p.shape)} sizes differ: image "
                         "must be [H, W, 3] for probs [C, H, W]")
    checks.image_dtype(img, "[H, W, 3]")
    if p.device.type == "meta":
        raise ValueError("dense_crf needs probabilities with values, got meta tensors")
    check_lattice_size(img.shape[0] * img.shape[1], 5, f"image {tuple(img.shape)}")
    num_iterations = checks.iteration_count(num_iterations)
    checks.choice("normalize", normalize, NORMALIZATIONS)
    if not (isinstance(clip, (int, float)) and 0 < clip < 1):
        raise ValueError(f"clip must be in (0, 1), got {clip!r}")
    bil, spa = checks.kernel_parameters(bilateral, spatial)
    dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
    p = p.to(dtype)
    if not torch.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be finite and non-negative")
    if p.numel() and float(p.max()) > 1.001:  # the clip to [clip, 1] would flatten them silently
        raise ValueError(f"probs must be probabilities in 0..1 (e.g. a softmax over C), got values up to "
                         f"{float(p.max()):g}: scores or logits? pass their softmax")
    if img.dtype != torch.uint8 and img.numel() and (img.amin() < 0 or img.amax() > 255):
        raise ValueError(f"image must be RGB in 0..255 (uint8, or another dtype in that range), got "
                         f"{img.dtype} values in [{img.amin().item():g}, {img.amax().item():g}]")
    if img.is_floating_point() and img.numel() and checks.DARKEST_0_TO_1_MAX < float(img.amax()) <= 1:
        checks.warn_colours_in_0_to_1(stacklevel=2)  # at the caller of dense_crf

    c, h, w = p.shape
    unary = torch.log(p.clamp(min=clip, max=1.0)).flatten(1).t().unsqueeze(0)  # [1, P, C]
    with torch.autocast(device_type=p.device.type, enabled=False):
        lattices = build_crf_lattices(img.permute(2, 0, 1).unsqueeze(0), bil, spa, backend)
        pairwise = potts_matrices(c, (bil[2], spa[1]), dtype=dtype, device=p.device)
        logits = mean_field(unary.contiguous(), lattices, pairwise, num_iterations, normalize)
        q = torch.softmax(logits, dim=-1)[0].t().reshape(c, h, w)
    if not torch.isfinite(q).all():
        raise ValueError(f"the CRF output has {int((~torch.isfinite(q)).sum())} NaN/Inf values: the kernel "
                         f"weights (bilateral {bil[2]:g}, spatial {spa[1]:g}) are too large for {dtype} "
                         "arithmetic")
    return q.detach().cpu().numpy().astype(np.float32) if numpy_out else q
