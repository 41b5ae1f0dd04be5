"""Krähenbühl's densecrf (through pydensecrf2) on the same input as ours: the CRF oracle and peer.

Install: ``pip install pydensecrf2`` (an sdist; pip builds it with Cython in an isolated
environment). It installs the module ``pydensecrf.densecrf``.
"""
import numpy as np

__all__ = ["available", "densecrf_probs"]

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
