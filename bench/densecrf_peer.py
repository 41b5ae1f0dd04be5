"""Krähenbühl's densecrf (through pydensecrf2) on the same input as ours: the CRF oracle and peer.

Install: ``pip install pydensecrf2`` (an sdist; pip builds it with Cython in an isolated
environment). It installs the module ``pydensecrf.densecrf``.
"""
import numpy as np

__all__ = ["available", "densecrf_probs", "kernel_features", "generic_densecrf_probs"]

_NORMALIZATIONS = {"symmetric": "NORMALIZE_SYMMETRIC", "after": "NORMALIZE_AFTER",
                   "before": "NORMALIZE_BEFORE", "none": "NO_NORMALIZATION"}


def available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def densecrf_probs(image, unary_logits, num_iterations, bilateral, spatial, normalize="symmetric"):
    """Mean-field marginals of densecrf's DenseCRF2D.

    Args:
        image (ndarray[H, W, 3] uint8): RGB.
        unary_logits (ndarray[C, H, W]): logits (densecrf's unary energy is their negative).
        num_iterations (int): mean-field iterations.
        bilateral ((sigma_xy, sigma_rgb, weight)): addPairwiseBilateral(sxy, srgb, im, weight).
        spatial ((sigma_xy, weight)): addPairwiseGaussian(sxy, weight).
        normalize (str): "symmetric" (densecrf's default), "after", "before" or "none".
    Returns:
        ndarray[C, H, W] float32: the marginals Q after `num_iterations` iterations.
    """
    import pydensecrf.densecrf as dcrf
    c, h, w = unary_logits.shape
    if image.shape != (h, w, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [{h}, {w}, 3], got {image.dtype} {image.shape}")
    norm = getattr(dcrf, _NORMALIZATIONS[normalize])
    crf = dcrf.DenseCRF2D(w, h, c)
    crf.setUnaryEnergy(np.ascontiguousarray(-unary_logits.reshape(c, -1), dtype=np.float32))
    sxy_s, w_s = spatial
    crf.addPairwiseGaussian(sxy=float(sxy_s), compat=float(w_s), kernel=dcrf.DIAG_KERNEL,
                            normalization=norm)
    sxy_b, srgb, w_b = bilateral
    crf.addPairwiseBilateral(sxy=float(sxy_b), srgb=float(srgb), rgbim=np.array(image, dtype=np.uint8, order="C"),
                             compat=float(w_b), kernel=dcrf.DIAG_KERNEL, normalization=norm)
    q = np.array(crf.inference(int(num_iterations)), dtype=np.float32)
    return q.reshape(c, h, w)


def kernel_features(kernel, spatial=None, guide=None, positions=None):
    """A crfrnn.GaussianKernel's features as densecrf's addPairwiseEnergy takes them, float32
    [d, P], written out from their definition (independently of crfrnn's builder): the positions
    (a grid of `spatial` shape: its indices, last axis first; points: `positions` [D, P] in the
    order given), then the guide's channels ([G, *S] or [G, P]), each over its bandwidth.
    Divided in float32 by the float32 bandwidth, as pydensecrf's own feature makers compute them
    (utils.create_pairwise_*: ``mesh[i] /= s`` on float32; DenseCRF2D: ``i / sx`` with float sx):
    a bandwidth that is no float32 (0.6, 1.3) rounds otherwise in the last bit."""
    def divided(values, sigma):
        return np.asarray(values, np.float32).ravel() / np.float32(sigma)

    rows = []
    if kernel.positions is not None:
        if positions is None:
            grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in spatial], indexing="ij")
            axes = list(range(len(spatial)))[::-1]
            coords = [grid[a] for a in axes]
            sigmas = [kernel.positions[a if len(kernel.positions) > 1 else 0] for a in axes]
        else:
            coords = list(positions)
            sigmas = [kernel.positions[i if len(kernel.positions) > 1 else 0] for i in range(len(coords))]
        rows += [divided(c, s) for c, s in zip(coords, sigmas)]
    if kernel.guide is not None:
        rows += [divided(g, kernel.guide[i if len(kernel.guide) > 1 else 0]) for i, g in enumerate(guide)]
    return np.ascontiguousarray(np.stack(rows), dtype=np.float32)


def generic_densecrf_probs(logits, kernels, num_iterations, normalize="symmetric", **inputs):
    """Mean-field marginals [C, P] of densecrf's generic DenseCRF for logits [C, ...] with each
    crfrnn.GaussianKernel's features (`kernel_features(kernel, **inputs)`) and Potts weight."""
    import pydensecrf.densecrf as dcrf
    c = logits.shape[0]
    crf = dcrf.DenseCRF(logits[0].size, c)
    crf.setUnaryEnergy(np.ascontiguousarray(-logits.reshape(c, -1), dtype=np.float32))
    for kernel in kernels:
        crf.addPairwiseEnergy(kernel_features(kernel, **inputs), compat=float(kernel.weight),
                              normalization=getattr(dcrf, _NORMALIZATIONS[normalize]))
    return np.array(crf.inference(int(num_iterations)))
