"""Lattice features of images: each pixel's position, and colour, divided by their bandwidths
(a unit distance is one standard deviation of the Gaussian kernel), in densecrf's order: x (the
column) first, then y (the row), then the colour channels.
"""
import math

import torch

__all__ = ["spatial_features", "bilateral_features"]


def _pixel_grid(reference: torch.Tensor, sigma_xy, dtype):
    n, _, h, w = reference.shape
    ys = torch.arange(h, device=reference.device, dtype=dtype) / sigma_xy
    xs = torch.arange(w, device=reference.device, dtype=dtype) / sigma_xy
    grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])
    return grid[None].expand(n, 2, h, w)


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
    return _pixel_grid(image, _check_sigma("sigma_xy", sigma_xy, image, dtype), dtype)


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
    sigma_xy = _check_sigma("sigma_xy", sigma_xy, image, dtype)
    sigma_rgb = _check_sigma("sigma_rgb", sigma_rgb, image, dtype)
    colour = image.to(dtype) / sigma_rgb
    return torch.cat([_pixel_grid(image, sigma_xy, dtype), colour], 1)
