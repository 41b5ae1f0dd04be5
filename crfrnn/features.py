"""Lattice features: each point's positions and guide values divided by their bandwidths (a unit
distance is one standard deviation of the Gaussian kernel), in densecrf's order: the positions
first, then the guide channels in order. On a grid the positions are the indices with the last
tensor axis first (x the column, then y the row, then z the slice), as densecrf's
addPairwiseBilateral builds (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb): the permutohedral
approximation depends on the order, and this one gives densecrf's results.
"""
import math

import torch

from .kernels import GaussianKernel

__all__ = ["kernel_features", "spatial_features", "bilateral_features"]


def _check_sigma(name, sigma, reference, dtype):
    """A bandwidth: a positive finite number, or a 0-dim floating tensor on the image's device
    (cast to `dtype`; not inspected, so that no device sync happens: e.g. the exp of a learned
    log-bandwidth, which is positive by construction)."""
    if isinstance(sigma, torch.Tensor):
        if sigma.dim() != 0 or not sigma.is_floating_point():
            raise ValueError(f"{name} must be a number or a 0-dim floating-point tensor, got a "
                             f"{sigma.dtype} tensor of shape {tuple(sigma.shape)}")
        if sigma.device != reference.device:
            raise ValueError(f"{name} is on {sigma.device} but the image is on {reference.device}")
        return sigma.to(dtype)
    if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"{name} must be a positive finite number, got {sigma!r}")
    return float(sigma)


def _divided(values, sigmas, name, dtype):
    """values (Tensor[N, K, *rest]) / their bandwidths: one (every channel) or one per channel
    (numbers or 0-dim tensors). One number divides as a Python scalar, as it always has (a
    division by a tensor may differ from it in the last bit)."""
    sigmas = [_check_sigma(name, s, values, dtype) for s in sigmas]
    if len(sigmas) == 1 or all(isinstance(s, float) and s == sigmas[0] for s in sigmas):
        return values / sigmas[0]
    column = torch.stack([torch.as_tensor(s, dtype=dtype, device=values.device) for s in sigmas])
    return values / column.view(-1, *([1] * (values.dim() - 2)))


def kernel_features(kernel, sigmas, shape=None, positions=None, guide=None, dtype=torch.float32, device=None):
    """One kernel's features, channels first.

    Args:
        kernel (GaussianKernel): what the kernel is over.
        sigmas (sequence): its bandwidths in the order of `kernel.sigmas` (numbers, or 0-dim
            tensors: the features are then differentiable in them).
        shape ((N, *S)): a grid's batch size and spatial shape (S of rank 1, 2 or 3), when
            `positions` is None.
        positions (Tensor[N, D, P] or None): a point set's positions.
        guide (Tensor[N, G, *S] or Tensor[N, G, P], or None): the guide, in `dtype`.
        dtype, device: of the features (float32 or float64).
    Returns:
        Tensor[N, d, *S] or Tensor[N, d, P]: the position features (grid: last axis first; points:
        in the order given), then the guide's.
    """
    num_positions = len(kernel.positions or ())
    parts = []
    if kernel.positions is not None:
        position_sigmas = sigmas[:num_positions]
        if positions is not None:
            parts.append(_divided(positions.to(dtype), position_sigmas, "position bandwidth", dtype))
        else:
            n, *spatial = shape
            reference = torch.empty(0, device=device)
            axes = []
            for axis in reversed(range(len(spatial))):  # x (the last axis) first
                sigma = _check_sigma("position bandwidth", position_sigmas[axis if num_positions > 1 else 0],
                                     reference, dtype)
                coordinate = torch.arange(spatial[axis], device=device, dtype=dtype) / sigma
                view = [1] * len(spatial)
                view[axis] = spatial[axis]
                axes.append(coordinate.view(view).expand(spatial))
            parts.append(torch.stack(axes)[None].expand(n, len(spatial), *spatial))
    if kernel.guide is not None:
        parts.append(_divided(guide.to(dtype), sigmas[num_positions:], "guide bandwidth", dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def spatial_features(image: torch.Tensor, sigma_xy) -> torch.Tensor:
    """Positions scaled by 1/sigma_xy: (x/s, y/s), x the column and y the row, as densecrf.

    Args:
        image (Tensor[N, C, H, W]): only its shape, device and dtype are used.
        sigma_xy (float, or a 0-dim tensor: the features are then differentiable in it).
    Returns:
        Tensor[N, 2, H, W] (float32, or float64 for a float64 image).
    """
    if image.dim() != 4:
        raise ValueError(f"image must be Tensor[N, C, H, W], got shape {tuple(image.shape)}")
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    sigma = _check_sigma("sigma_xy", sigma_xy, image, dtype)
    return kernel_features(GaussianKernel(1.0, positions=1.0), [sigma], shape=(image.shape[0], *image.shape[2:]),
                           dtype=dtype, device=image.device)


def bilateral_features(image: torch.Tensor, sigma_xy, sigma_rgb) -> torch.Tensor:
    """Position and colour features (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb), as densecrf.

    Args:
        image (Tensor[N, 3, H, W]): RGB, in the range the sigma_rgb refers to (0..255 for the
            usual CRF parameters).
        sigma_xy, sigma_rgb (float, or 0-dim tensors: the features are then differentiable in
            them).
    Returns:
        Tensor[N, 5, H, W] (float32, or float64 for a float64 image).
    """
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be Tensor[N, 3, H, W] (RGB), got shape {tuple(image.shape)}")
    dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
    sigmas = [_check_sigma("sigma_xy", sigma_xy, image, dtype), _check_sigma("sigma_rgb", sigma_rgb, image, dtype)]
    return kernel_features(GaussianKernel(1.0, positions=1.0, guide=1.0), sigmas,
                           shape=(image.shape[0], *image.shape[2:]), guide=image, dtype=dtype, device=image.device)
