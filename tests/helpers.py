"""Inputs and parameter lists shared by the test files: `from helpers import random_points`
(pytest puts tests/ on sys.path, as torchvision's tests do with their common_utils).

Every generator draws its numbers on the CPU in float64 from its own seed, then converts: the
same call gives the same points on every device and, up to rounding, in every dtype.
"""
import numpy as np
import pytest
import torch

import crfrnn

#: Whether the C++ extension's CPU kernels are built (the native backend, the fused ops).
NATIVE = crfrnn.has_native_kernel("cpu")
#: Marks a test that needs them.
needs_native = pytest.mark.skipif(not NATIVE, reason=f"C++ extension not built: {crfrnn.EXTENSION_ERROR}")
#: The lattice backends to run a test on.
BACKENDS = ["reference"] + (["native"] if NATIVE else [])

#: The integer tables of a crfrnn.Lattice (besides its float `weights`).
LATTICE_TABLES = ("vertex_index", "neighbors", "splat_offsets", "splat_entries")


def cpu_and_cuda():
    """Parameter list for a `device` argument: cpu always, cuda marked `cuda` (skipped by
    conftest.py on a machine without a GPU), as torchvision's tests do."""
    return ("cpu", pytest.param("cuda", marks=pytest.mark.cuda))


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def random_points(n, p, d, spread=2.0, dtype=torch.float64, seed=0, device="cpu"):
    """Tensor[n, p, d] uniform in [0, 4 spread): with the default spread most points have
    their own simplex and many vertices lack blur neighbours."""
    points = torch.rand(n, p, d, generator=_generator(seed), dtype=torch.float64) * spread * 4
    return points.to(device, dtype)


def clustered_points(n, p, d, dtype=torch.float64, seed=0, device="cpu"):
    """Tensor[n, p, d] around 4 centres per image: vertices shared by many points, most with
    blur neighbours, in any dimension d."""
    g = _generator(seed)
    centres = torch.rand(n, 4, d, generator=g, dtype=torch.float64) * 6
    which = torch.randint(0, 4, (n, p), generator=g)
    noise = torch.randn(n, p, d, generator=g, dtype=torch.float64) * 0.4
    points = torch.gather(centres, 1, which[:, :, None].expand(n, p, d)) + noise
    return points.to(device, dtype)


def integer_points(n, p, d, dtype=torch.float64, seed=0, device="cpu"):
    """Tensor[n, p, d] of small integers, each point drawn from a pool of p // 2 + 1 per image:
    duplicate points (shared simplices) in any dimension d, and exact ties in the rank decisions."""
    g = _generator(seed)
    pool = torch.randint(-3, 4, (n, p // 2 + 1, d), generator=g).double()
    which = torch.randint(0, p // 2 + 1, (n, p), generator=g)
    points = torch.gather(pool, 1, which[:, :, None].expand(n, p, d))
    return points.to(device, dtype)


#: The point generators by name, for parametrising over kinds of lattice.
POINTS = {"random": random_points, "clustered": clustered_points, "integer": integer_points}


def randn(*shape, dtype=torch.float32, seed=0, device="cpu"):
    """Tensor[shape] of standard normal numbers from `seed`."""
    return torch.randn(*shape, generator=_generator(seed), dtype=torch.float64).to(device, dtype)


def rand(*shape, dtype=torch.float32, seed=0, device="cpu"):
    """Tensor[shape] uniform in [0, 1) from `seed`."""
    return torch.rand(*shape, generator=_generator(seed), dtype=torch.float64).to(device, dtype)


def crf_inputs(n=1, c=3, h=6, w=5, dtype=torch.float64, seed=0, scale=2.0, device="cpu"):
    """(unary Tensor[n, c, h, w], standard normal times `scale`; image Tensor[n, 3, h, w],
    uniform RGB in 0..255), both in `dtype`: the CRF layer's two inputs."""
    g = _generator(seed)
    unary = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * scale
    image = torch.rand(n, 3, h, w, generator=g, dtype=torch.float64) * 255
    return unary.to(device, dtype), image.to(device, dtype)


class ExactLattice:
    """Stand-in for crfrnn.Lattice with the exact O(P^2) Gaussian filter (the same `filter`
    signature; differentiable in its features): the oracle for the lattice's approximation."""

    def __init__(self, features):
        self.features = features

    def filter(self, values, normalize="none"):
        return crfrnn.exact_gaussian_filter(self.features, values, normalize=normalize)


def synthetic_scene(h, w, num_classes=4, seed=0):
    """A scene with real edges and no data files: (image uint8[h, w, 3], labels int64[h, w],
    logits float32[C, h, w]). Ellipses and rectangles of distinct colours on a background, with
    noise and a horizontal shading; logits like a stride-8 DCNN's: the one-hot labels shifted by
    (2, -3) px, averaged over 8 x 8 cells, upsampled bilinearly, log(0.8 p + 0.2 / C) plus noise
    of std 0.3. A CRF with a colour kernel moves the labels back towards the edges."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    labels = np.zeros((h, w), np.int64)
    colours = rng.uniform(30, 225, (num_classes, 3))
    for k in range(1, num_classes):
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        ry, rx = rng.uniform(0.15, 0.35) * h, rng.uniform(0.15, 0.35) * w
        if k % 2:
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        else:
            inside = (abs(yy - cy) < ry) & (abs(xx - cx) < rx)
        labels[inside] = k
    image = colours[labels] + rng.normal(0, 12, (h, w, 3)) + 20 * (xx / w)[..., None]
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    onehot = np.roll(np.eye(num_classes)[labels].transpose(2, 0, 1), (2, -3), axis=(1, 2))
    cells = onehot[:, : h // 8 * 8, : w // 8 * 8].reshape(num_classes, h // 8, 8, w // 8, 8).mean((2, 4))
    coarse = torch.nn.functional.interpolate(torch.from_numpy(cells)[None], size=(h, w), mode="bilinear",
                                             align_corners=False)[0].numpy()
    logits = np.log(0.8 * coarse + 0.2 / num_classes) + rng.normal(0, 0.3, (num_classes, h, w))
    return image, labels, logits.astype(np.float32)


def voc_rgb(shared_data, image_id, shrink=1):
    """Tensor[1, 3, H, W] float32 RGB 0..255 of the shared VOC image `image_id`, its sides
    divided by `shrink` (bilinear resize of the 8-bit image, so colours stay integers)."""
    from PIL import Image
    image = Image.open(shared_data / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{image_id}.jpg").convert("RGB")
    if shrink != 1:
        image = image.resize((image.width // shrink, image.height // shrink), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float()


def normalised_image(*shape, dtype=torch.float32):
    """A random RGB image [N, 3, H, W] normalised as DeepLabCRF's layer declares (ImageNet mean and
    std over 0..1 colours): what the models take, whose colours come back in 0..255."""
    mean = torch.tensor((0.485, 0.456, 0.406), dtype=dtype)[:, None, None]
    std = torch.tensor((0.229, 0.224, 0.225), dtype=dtype)[:, None, None]
    return (torch.rand(*shape, dtype=dtype) - mean) / std


def outputs_per_threads_and_isa(script, tmp_path):
    """The tensors `script` saves (run as ``python -c script THREADS PATH``) with 1 and 2 threads
    and with the generic 4-lane CPU code (CRFRNN_CPU_ISA=generic), in that order: for tests that
    the fused ops give the same bits whatever the thread count and SIMD width."""
    import os
    import subprocess
    import sys
    outputs = []
    for threads, isa in ((1, ""), (2, ""), (2, "generic")):
        path = tmp_path / f"out_{threads}_{isa}.pt"
        subprocess.run([sys.executable, "-c", script, str(threads), str(path)],
                       env=dict(os.environ, CRFRNN_CPU_ISA=isa), check=True, timeout=300)
        outputs.append(torch.load(path))
    return outputs
