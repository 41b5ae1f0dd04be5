"""The lattice features against their formula, written out here: densecrf's (x / sxy, y / sxy)
with x the column and y the row, then the colours / srgb, for every pixel."""
import pytest
import torch

import crfrnn
from helpers import rand


def formula(image, sigma_xy, sigma_rgb=None):
    """Tensor[N, d, H, W] of the features, pixel by pixel (float64)."""
    n, _, h, w = image.shape
    out = torch.empty(n, 2 if sigma_rgb is None else 5, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            out[:, 0, i, j] = j / sigma_xy
            out[:, 1, i, j] = i / sigma_xy
            if sigma_rgb is not None:
                out[:, 2:, i, j] = image[:, :, i, j].double() / sigma_rgb
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.uint8])
def test_bilateral_features_are_the_formula(dtype):
    image = (rand(2, 3, 5, 7, seed=1) * 255).round().to(dtype)
    got = crfrnn.bilateral_features(image, 3.0, 13.0)
    torch.testing.assert_close(got.double(), formula(image, 3.0, 13.0), rtol=1e-6, atol=0)


def test_spatial_features_are_the_formula():
    image = rand(1, 3, 6, 4, seed=2)
    torch.testing.assert_close(crfrnn.spatial_features(image, 2.5).double(), formula(image, 2.5),
                               rtol=1e-7, atol=0)


def test_tensor_bandwidths_give_the_same_features_and_their_gradient():
    """0-dim tensor bandwidths (learned ones) give the same features, differentiable in them:
    d f / d sigma = -f / sigma."""
    image = rand(1, 3, 4, 5, dtype=torch.float64, seed=3) * 255
    sxy = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    srgb = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    features = crfrnn.bilateral_features(image, sxy, srgb)
    torch.testing.assert_close(features, formula(image, 4.0, 20.0))
    grad_xy, grad_rgb = torch.autograd.grad(features.sum(), [sxy, srgb])
    expected = formula(image, 4.0, 20.0)
    torch.testing.assert_close(grad_xy, -expected[:, :2].sum() / 4.0)
    torch.testing.assert_close(grad_rgb, -expected[:, 2:].sum() / 20.0)
