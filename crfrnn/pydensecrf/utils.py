"""pydensecrf's ``pydensecrf.utils``: unaries from labels or probabilities, and the feature
matrices that ``DenseCRF.addPairwiseEnergy`` takes, for data of any number of dimensions.

    from crfrnn.pydensecrf.utils import unary_from_softmax, create_pairwise_bilateral

Same names, arguments, defaults and results as pydensecrf's (numpy in, float32 numpy out, the
same float arithmetic). Beyond pydensecrf: `unary_from_softmax`, `unary_from_labels` and
`create_pairwise_bilateral` also take torch tensors and return float32 tensors on their device
(for a CRF that runs on the GPU, see ``crfrnn.pydensecrf.densecrf``). An argument out of range
(gt_prob, scale) raises an error that is both an AssertionError (what pydensecrf raises) and a
ValueError.
"""
import logging
from numbers import Number

import numpy as np
import torch

__all__ = ["unary_from_labels", "unary_from_softmax", "create_pairwise_gaussian", "create_pairwise_bilateral",
           "compute_unary", "softmax_to_unary"]

_log = logging.getLogger(__name__)


class ArgumentError(ValueError, AssertionError):
    """An argument out of its range: pydensecrf asserts (AssertionError); a ValueError too."""


def unary_from_labels(labels, n_labels, gt_prob, zero_unsure=True):
    """The unary of a classifier that gives the annotated label probability `gt_prob` and shares
    the rest equally among the other labels.

    Args:
        labels (integer array of any shape, or a Tensor): the label map. With `zero_unsure`,
            0 means "unknown" and labels 1..n_labels are classes 0..n_labels-1; else labels are
            0..n_labels-1.
        n_labels (int): number of classes (not counting the 0 of `zero_unsure`).
        gt_prob (float): the annotation's certainty, in (0, 1).
        zero_unsure (bool): pixels labelled 0 get the uniform unary -log(1 / n_labels).

    Returns:
        float32 [n_labels, labels.size] energies (-log P), numpy or a Tensor as `labels`.
    """
    if not 0 < gt_prob < 1:
        raise ArgumentError(f"`gt_prob must be in (0,1), got {gt_prob!r}")
    tensor = isinstance(labels, torch.Tensor)
    flat = labels.flatten()
    other = -np.log((1.0 - gt_prob) / (n_labels - 1))  # ZeroDivisionError for n_labels = 1, as pydensecrf
    annotated = -np.log(gt_prob)
    n = flat.shape[0]
    if tensor:
        energy = torch.full((n_labels, n), float(other), dtype=torch.float32, device=labels.device)
        rows = flat - 1 if zero_unsure else flat
        energy[rows, torch.arange(n, device=labels.device)] = float(annotated)
    else:
        energy = np.full((n_labels, n), other, dtype=np.float32)
        rows = flat - 1 if zero_unsure else flat
        energy[rows, np.arange(n)] = annotated
    if zero_unsure:
        energy[:, flat == 0] = float(-np.log(1.0 / n_labels))
    return energy


def compute_unary(labels, M, GT_PROB=0.5):
    """Deprecated (as in pydensecrf): `unary_from_labels(labels, M, GT_PROB)`."""
    _log.warning("pydensecrf.compute_unary is deprecated, use unary_from_labels instead.")
    return unary_from_labels(labels, M, GT_PROB)


def unary_from_softmax(sm, scale=None, clip=1e-5):
    """Class probabilities to unary energies, -log(p) per label and element.

    Args:
        sm (float array [n_classes, ...], or a Tensor): probabilities, e.g. a softmax output;
            all axes after the first are flattened.
        scale (float in (0, 1], optional): trust in `sm`: p = scale * sm + (1 - scale) / n_classes.
        clip (float, optional): probabilities are clipped to [clip, 1] before the log (default
            1e-5; None: no clip).

    Returns:
        float32 [n_classes, prod(sm.shape[1:])], numpy or a Tensor on `sm`'s device. The
        arithmetic is in `sm`'s dtype (float64 once `scale` is given), as pydensecrf's.
    """
    num_cls = sm.shape[0]
    if scale is not None and not 0 < scale <= 1:
        raise ArgumentError(f"`scale` needs to be in (0,1], got {scale!r}")
    if isinstance(sm, torch.Tensor):
        p = sm if sm.is_floating_point() else sm.double()
        if scale is not None:
            p = scale * p.double() + (1 - scale) / num_cls
        if clip is not None:
            p = p.clamp(clip, 1.0)
        return (-torch.log(p)).reshape(num_cls, -1).float()
    if scale is not None:
        sm = scale * sm + (1 - scale) * (np.ones(sm.shape) / num_cls)
    if clip is not None:
        sm = np.clip(sm, clip, 1.0)
    return (-np.log(sm)).reshape([num_cls, -1]).astype(np.float32)


def softmax_to_unary(sm, GT_PROB=1):
    """Deprecated (as in pydensecrf): `unary_from_softmax` without clipping."""
    _log.warning("pydensecrf.softmax_to_unary is deprecated, use unary_from_softmax instead.")
    return unary_from_softmax(sm, None if GT_PROB == 1 else GT_PROB, clip=None)


def _scaled_grid(shape, sdims):
    """float32 [len(shape), *shape]: each element's index along each axis, axis i divided by
    sdims[i] (float32 arithmetic, numpy's rules for the divisor)."""
    grid = np.indices(tuple(shape), dtype=np.float32)
    for axis, s in enumerate(sdims):
        grid[axis] /= s
    return grid


def create_pairwise_gaussian(sdims, shape):
    """Features for a smoothness kernel on a grid of any dimension: each element's position
    divided by the bandwidths (`DenseCRF2D.addPairwiseGaussian`'s for a 2-D grid, with the axes
    in array order: sdims = (sy, sx) for an [h, w] image).

    Args:
        sdims (sequence of float): bandwidth per axis, in the order of `shape`.
        shape (sequence of int): the grid's shape.

    Returns:
        float32 [len(sdims), prod(shape)] for ``DenseCRF.addPairwiseEnergy``.
    """
    return _scaled_grid(shape, sdims).reshape([len(sdims), -1])


def create_pairwise_bilateral(sdims, schan, img, chdim=-1):
    """Features for an appearance kernel on a grid of any dimension: positions divided by
    `sdims`, then the image's channels divided by `schan`.

    Args:
        sdims (sequence of float): bandwidth per spatial axis, in array order.
        schan (float or sequence of float): bandwidth per channel (one for all, or one each).
        img (array or Tensor): the image; its spatial axes are all axes but `chdim`.
        chdim (int): the channel axis (2 for an [h, w, 3] image); -1: the image has no channel
            axis (a single channel; every axis is spatial).

    Returns:
        float32 [len(sdims) + channels, number of elements], numpy or a Tensor on `img`'s device.
    """
    if isinstance(img, torch.Tensor):
        channels = (img[None] if chdim == -1 else img.movedim(chdim, 0)).float()
        if isinstance(schan, Number):
            channels = channels / torch.tensor(np.float32(schan), device=img.device)
        else:
            channels = channels.clone()
            for c, s in enumerate(schan):
                channels[c] /= torch.tensor(np.float32(s), device=img.device)
        grid = torch.from_numpy(_scaled_grid(channels.shape[1:], sdims)).to(img.device)
        feats = torch.cat([grid, channels])
        return feats.reshape(feats.shape[0], -1)
    channels = (img[np.newaxis] if chdim == -1 else np.moveaxis(img, chdim, 0)).astype(np.float32)
    if isinstance(schan, Number):
        channels /= schan
    else:
        for c, s in enumerate(schan):
            channels[c] /= s
    feats = np.concatenate([_scaled_grid(channels.shape[1:], sdims), channels])
    return feats.reshape([feats.shape[0], -1])
