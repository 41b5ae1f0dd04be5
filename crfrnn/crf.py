"""Mean-field inference of a fully connected CRF as a recurrent, trainable layer (CRF-as-RNN).

    crf = CRFRNNLayer(num_classes=21)                 # CRF-RNN's kernel parameters
    refined_logits = crf(unary_logits, image)         # image RGB in 0..255

One iteration (Zheng et al. 2015, Sec. 4), for kernels m = bilateral (position + colour) and
spatial (position):

    message passing   Q~_m = K_m(Q)                   normalised Gaussian filter (lattice)
    weighting         Q^  = sum_m W_m Q~_m            W_m: learnable C x C (init w_m I)
    compatibility     Q^  = mu Q^                     mu: learnable C x C (Potts: 1 - I)
    unary addition    L   = U - Q^                    U: the unary logits
    normalisation     Q   = softmax(L)

starting from Q = softmax(U); the layer returns the last L. Both lattices are built once per
forward and reused by every iteration and by the backward pass.

Conventions, and how they relate to Krähenbühl's densecrf (the test oracle):

- densecrf's energy is E = -U; its iteration is Q = softmax(-E + sum_m w_m Kn_m(Q)) (Potts
  compatibility w applied as -w x). With mu = 1 - I and W_m = w_m I our logits are
  L(l) = U(l) - sum_m w_m (S_m - Kn_m(Q)(l)), with S_m = sum_l' Kn_m(Q)(l'): S_m depends on the
  pixel but not on the label, so softmax(L) is exactly densecrf's Q. (CRF-RNN's Caffe code
  starts mu at -I, which is the same up to the same per-pixel shift; 1 - I is the Potts model of
  the paper and keeps L on the scale of U.)
- The kernels include the self term j = i, as densecrf and CRF-RNN's code do (the lattice
  cannot exclude it, and the paper's sum over j != i is only notation there).
- Normalisation: "symmetric", n K(n Q) with n = 1/sqrt(K 1), is densecrf's default
  (NORMALIZE_SYMMETRIC) and therefore ours; "after", K Q / K 1, is CRF-RNN's.
- Features: (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) with x the column and y the row and colours
  in 0..255, as densecrf's addPairwiseBilateral; (x/sxy, y/sxy) for the spatial kernel.
"""
import math
import numbers
import operator
import warnings

import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

from . import ops
from .lattice import (FEATURE_GRADIENTS, NORMALIZATIONS, Lattice, bilateral_features, check_lattice_size,
                      spatial_features)

__all__ = ["CRFRNNLayer", "mean_field", "build_crf_lattices", "potts_matrices",
           "CRFRNN_PARAMS", "DEEPLAB_LARGEFOV_PARAMS", "COMPATIBILITY_SHARING", "KERNEL_WEIGHT_SHARING"]

#: CRF-RNN's kernel parameters: bilateral (sigma_xy, sigma_rgb, weight), spatial (sigma_xy, weight).
CRFRNN_PARAMS = {"bilateral": (160.0, 3.0, 5.0), "spatial": (3.0, 3.0)}
#: DeepLab-LargeFOV's cross-validated parameters (w1 4, sigma_alpha 121, sigma_beta 5, w2 3,
#: sigma_gamma 3).
DEEPLAB_LARGEFOV_PARAMS = {"bilateral": (121.0, 5.0, 4.0), "spatial": (3.0, 3.0)}
#: Parameter sharing of the compatibility mu: "potts" (fixed 1 - I, no parameter), "symmetric"
#: (mu = mu^T: its upper triangle, C (C + 1) / 2 values) or "full" (C x C, CRF-RNN's).
COMPATIBILITY_SHARING = ("potts", "symmetric", "full")
#: Parameter sharing of each kernel's weight W_m: "scalar" (w I: one value), "diagonal" (diag(w):
#: C values) or "full" (C x C, CRF-RNN's).
KERNEL_WEIGHT_SHARING = ("scalar", "diagonal", "full")



#: How far (in 0..255 units) de-normalised colours may stray outside 0..255 before the layer
#: warns that the image seems not normalised as declared (rounding and augmentations stray a bit).
_COLOUR_SLACK = 64.0
#: An image whose colours all lie in 0..1 is warned about only if its brightest is above this: a
#: (nearly) black image is the same in either convention, and rounding leaves a normalised black
#: one a hair above 0.
_DARKEST_0_TO_1_MAX = 0.01

#: The most mean-field iterations a layer runs per call. Mean field settles within tens (CRF-RNN
#: trains with 5, DeepLab infers with 10); a count beyond this, e.g. from a damaged state dict,
#: would make a forward run for hours, so it is refused.
MAX_ITERATIONS = 1000


def _iteration_count(value, name="num_iterations"):
    """`value` as a Python int, if it is an integer (numpy ones too, not bool) in
    0..MAX_ITERATIONS; else ValueError naming `name`. Every iteration count the library takes
    (the layer's, mean_field's, dense_crf's) passes here."""
    if not isinstance(value, bool):
        try:
            value = operator.index(value)  # numpy integers (also as torch.compile passes them)
        except TypeError:
            pass
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ITERATIONS:
        raise ValueError(f"{name} must be an int in 0..{MAX_ITERATIONS}, got {value!r}")
    return value


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _finite(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _parse_kernels(bilateral, spatial):
    """Validate ((sxy, srgb, w), (sxy, w)) -> tuples of floats."""
    if not (isinstance(bilateral, (tuple, list)) and len(bilateral) == 3):
        raise ValueError(f"bilateral must be (sigma_xy, sigma_rgb, weight), got {bilateral!r}")
    if not (isinstance(spatial, (tuple, list)) and len(spatial) == 2):
        raise ValueError(f"spatial must be (sigma_xy, weight), got {spatial!r}")
    bil = (_positive("bilateral sigma_xy", bilateral[0]), _positive("bilateral sigma_rgb", bilateral[1]),
           _finite("bilateral weight", bilateral[2]))
    spa = (_positive("spatial sigma_xy", spatial[0]), _finite("spatial weight", spatial[1]))
    return bil, spa


def potts_matrices(num_classes, weights, dtype=torch.float32, device=None):
    """Per-kernel pairwise matrices mu W_m of densecrf's Potts model: w_m (1 - I).

    Args:
        num_classes (int): C.
        weights (sequence of float): w_m per kernel.
    Returns:
        list of Tensor[C, C].
    """
    potts = 1.0 - torch.eye(num_classes, dtype=dtype, device=device)
    return [w * potts for w in weights]


def build_crf_lattices(image, bilateral, spatial, backend="auto", spatial_lattice=None,
                       feature_grad="lattice"):
    """The bilateral and spatial lattices of a batch of images.

    Args:
        image (Tensor[N, 3, H, W]): RGB in 0..255 (float or uint8).
        bilateral ((sigma_xy, sigma_rgb, ...)), spatial ((sigma_xy, ...)): bandwidths (numbers,
            or 0-dim tensors: the lattices are then differentiable in them); extra entries
            (weights) are ignored.
        backend (str): Lattice backend ("auto", "reference", "native").
        feature_grad (str): how the lattices differentiate their features ("lattice" or
            "gaussian", see `Lattice`), when the bandwidths require grad.
        spatial_lattice (Lattice or None): a spatial lattice built before for images of the same
            N, H, W, dtype, device and sigma_xy, returned instead of a new one (the spatial
            features are the pixel positions: they depend on the shape only).
    Returns:
        (Lattice, Lattice) over per-point features Tensor[N, H*W, 5] and Tensor[N, H*W, 2]:
        per-point so that the mean-field loop runs channels-last (N, H*W, C) without copies.
    """
    if not image.is_floating_point():
        image = image.float()
    f_bil = bilateral_features(image, bilateral[0], bilateral[1])
    lat_bil = Lattice(f_bil.flatten(2).transpose(1, 2), backend=backend, feature_grad=feature_grad)
    lat_spa = spatial_lattice
    if lat_spa is None:
        lat_spa = Lattice(spatial_features(image, spatial[0]).flatten(2).transpose(1, 2), backend=backend,
                          feature_grad=feature_grad)
    return lat_bil, lat_spa


def _message_logits(q, unary, lattices, pairwise, normalize):
    """L = U - sum_m (mu W_m) K_m(Q), on Tensor[N, P, C] (channels last)."""
    n, p, c = q.shape
    logits = None
    for lat, mat in zip(lattices, pairwise):
        msg = lat.filter(q, normalize=normalize).reshape(n * p, c)
        # 1x1 convolution as a matmul: out[i, l] -= sum_l' mat[l, l'] msg[i, l']. The first
        # kernel's addmm makes the output (one copy of U), the others accumulate into it in place.
        if logits is None:
            logits = torch.addmm(unary.reshape(n * p, c), msg, mat.t(), alpha=-1)
        else:
            logits.addmm_(msg, mat.t(), alpha=-1)
    return logits.reshape(n, p, c)


def _iteration(q, unary, lattices, pairwise, normalize):
    logits = _message_logits(q, unary, lattices, pairwise, normalize)
    return logits, torch.softmax(logits, dim=-1)


def _wants_grad(unary, pairwise, lattices):
    """Whether autograd will record the iterations (a gradient to the unary, the matrices or the
    lattices' features)."""
    return torch.is_grad_enabled() and (unary.requires_grad or any(m.requires_grad for m in pairwise)
                                        or any(getattr(lat, "differentiable", False) for lat in lattices))


def _can_fuse(unary, lattices):
    """Whether the fused mean-field ops can run these iterations (the one place that decides):
    the device has them, the lattices are the compiled backend's (tensors the ops read directly)
    and none is differentiable in its features. The fused ops give gradients for the unary and
    the C x C matrices only (so any parameter sharing that builds the matrices, e.g. mu @ W, is
    covered by autograd around them); a lattice built for learned bandwidths
    (``Lattice.differentiable``) needs the step-by-step loop, whose filters carry that gradient."""
    return (unary.device.type in ops.FUSED_MEAN_FIELD_DEVICE_TYPES and unary.dtype in (torch.float32, torch.float64)
            and all(getattr(lat, "backend", None) == "native" and not getattr(lat, "differentiable", False)
                    for lat in lattices))


def _fused_mean_field(unary, lattices, pairwise, num_iterations, normalize, checkpoint=False,
                      keep_marginals=False):
    """All iterations in one fused op (see csrc/cpu/mean_field_cpu.cpp). The result has `unary`'s
    memory layout (a channels-first unary stays channels first).

    No gradient wanted, or `checkpoint`: crfrnn::mean_field_inference (whose autograd saves only
    its inputs and runs the forward again in the backward); else crfrnn::mean_field_forward,
    which saves the blurred grids of every iteration (a few percent of Tensor[N, P, C] each) and,
    on CUDA, the marginals (its splat reads them from memory anyway). On the CPU the backward
    recomputes each iteration's marginals from the unary and the saved grids, in the pass over
    the points it makes anyway, instead of keeping a Tensor[N, P, C] per iteration, unless
    `keep_marginals`."""
    splat_scales, slice_scales = zip(*(lat.normalization_scales(normalize, unary.dtype) for lat in lattices))
    args = (unary, [lat.vertex_index for lat in lattices], [lat.weights_as(unary.dtype) for lat in lattices],
            list(splat_scales), list(slice_scales), [lat.neighbors for lat in lattices],
            [m.to(unary.dtype) for m in pairwise], num_iterations)
    if checkpoint or not _wants_grad(unary, pairwise, lattices):
        return torch.ops.crfrnn.mean_field_inference(*args)
    save_marginals = unary.device.type == "cuda" or bool(keep_marginals)
    return torch.ops.crfrnn.mean_field_forward(*args, save_marginals)[0]


def _check_mean_field_args(unary, lattices, pairwise, num_iterations):
    """ValueError/TypeError unless unary is Tensor[N, P, C] of every lattice's (N, P), with one
    C x C matrix per lattice and an int T in 0..MAX_ITERATIONS (see _iteration_count). (The fused
    ops check only N * P: a unary of another batch layout would mix images silently.)"""
    _iteration_count(num_iterations)
    if not isinstance(unary, torch.Tensor) or unary.dim() != 3:
        got = tuple(unary.shape) if isinstance(unary, torch.Tensor) else type(unary).__name__
        raise ValueError(f"unary must be Tensor[N, P, C], got {got}")
    if not unary.is_floating_point():
        raise TypeError(f"unary must be a floating-point tensor, got {unary.dtype}")
    n, p, c = unary.shape
    if len(lattices) != len(pairwise):
        raise ValueError(f"one C x C matrix per lattice: got {len(lattices)} lattices and {len(pairwise)} matrices")
    for i, (lat, mat) in enumerate(zip(lattices, pairwise)):
        built_on = (getattr(lat, "batch_size", n), getattr(lat, "num_points", p))  # any object with filter()
        if built_on != (n, p):
            raise ValueError(f"unary is Tensor[N, P, C] with (N, P) = {(n, p)}, but lattice {i} was built on "
                             f"(N, P) = {built_on}")
        if tuple(mat.shape) != (c, c):
            raise ValueError(f"pairwise matrix {i} must be [C, C] = [{c}, {c}], got {tuple(mat.shape)}")


def mean_field(unary, lattices, pairwise, num_iterations, normalize="symmetric", checkpoint=False, fused=True,
               keep_marginals=False):
    """Run `num_iterations` mean-field iterations on prebuilt lattices (channels last).

    Args:
        unary (Tensor[N, P, C]): unary logits, float32 or float64, any strides (the fused op
            keeps a channels-first layout, [N, C, P] memory, in its output).
        lattices (sequence of Lattice): one per kernel, built on per-point features [N, P, d].
        pairwise (sequence of Tensor[C, C]): mu W_m per kernel (same dtype as `unary`).
        num_iterations (int): T in 0..MAX_ITERATIONS (T = 0 returns a copy of the unary).
        normalize (str): kernel normalisation, see `Lattice.filter`.
        checkpoint (bool): save only the inputs for the backward and compute the iterations again
            there (the step-by-step loop: each iteration's, keeping one Tensor[N, P, C] per
            iteration; the fused ops: all of them).
        fused (bool): run the fused ops when they apply (default); False forces the step-by-step
            loop (the oracle the fused ops are tested against).
        keep_marginals (bool): on the CPU, the fused training forward keeps each iteration's
            marginals (T - 1 Tensor[N, P, C]) for the backward instead of the backward
            recomputing them from the unary and the saved grids (the same bits either way).
            About 10% off forward+backward, but only where freed large blocks stay in the heap:
            glibc maps every block over 32 MB afresh, and the page faults of a new
            [T - 1, N, P, C] block each step then cost more than the recomputation saves (the
            training scripts set both). On CUDA the marginals are always kept.

    When the lattices are the compiled backend's on a device with the fused ops (CPU; CUDA when
    built with it), all iterations run in one op, which applies the C x C matrices on the lattice
    vertices before the slice, and the backward in one more (``crfrnn::mean_field_forward`` and
    ``crfrnn::mean_field_backward``; ``crfrnn::mean_field_inference`` when no gradient is
    wanted). Their results and gradients (for the unary and the matrices) equal the step-by-step
    loop's up to float rounding. Otherwise (the reference backend) the iterations run step by
    step, as separate autograd ops.

    Returns:
        Tensor[N, P, C]: the logits L of the last iteration (Q = softmax(L)).
    """
    _check_mean_field_args(unary, lattices, pairwise, num_iterations)
    num_iterations = int(num_iterations)  # a numpy integer to the ops' int
    if num_iterations == 0:
        return unary.clone()  # a new tensor, as for T > 0 (never an alias of the input)
    use_ckpt = checkpoint and _wants_grad(unary, pairwise, lattices)
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if fused and _can_fuse(unary, lattices):
        return _fused_mean_field(unary, lattices, pairwise, num_iterations, normalize, checkpoint, keep_marginals)
    unary = unary.contiguous()
    q = torch.softmax(unary, dim=-1)
    logits = unary
    for _ in range(num_iterations):
        if use_ckpt:
            logits, q = torch_checkpoint.checkpoint(_iteration, q, unary, lattices, pairwise,
                                                    normalize, use_reentrant=False)
        else:
            logits, q = _iteration(q, unary, lattices, pairwise, normalize)
    return logits


#: Image dtypes the layer reads (what torch's CPU and CUDA reductions cover: no uint16/32/64,
#: float8, bool or complex).
_IMAGE_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
                 torch.float32, torch.float64)


def _check_unary_image(unary, image, num_classes=None):
    """Shape/dtype/device checks of (unary Tensor[N, C, H, W], image Tensor[N, 3, H, W])."""
    if not isinstance(unary, torch.Tensor):
        raise TypeError(f"unary must be a torch.Tensor of logits [N, C, H, W], got {type(unary).__name__}")
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor [N, 3, H, W], got {type(image).__name__}")
    if not unary.is_floating_point():
        raise TypeError(f"unary must be floating point (logits), got {unary.dtype}")
    if unary.dim() != 4:
        raise ValueError(f"unary must be Tensor[N, C, H, W], got shape {tuple(unary.shape)}")
    if num_classes is not None and unary.shape[1] != num_classes:
        raise ValueError(f"unary has {unary.shape[1]} channels but the layer was built for "
                         f"num_classes={num_classes} (unary shape {tuple(unary.shape)})")
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be Tensor[N, 3, H, W] (RGB), got shape {tuple(image.shape)}")
    if image.shape[0] != unary.shape[0] or image.shape[2:] != unary.shape[2:]:
        raise ValueError(f"image {tuple(image.shape)} and unary {tuple(unary.shape)} must share N, H "
                         "and W (upsample the unary to the image size first)")
    if image.device != unary.device:
        raise ValueError(f"image is on {image.device} but unary is on {unary.device}")
    if image.dtype not in _IMAGE_DTYPES:
        hint = " (a 16-bit image? scale it to 0..255 first: image.float() / 257)" if image.dtype == torch.uint16 else ""
        raise TypeError(f"image must be uint8, a signed integer or float16/bfloat16/32/64 tensor, got "
                        f"{image.dtype}{hint}")
    # Before anything of the image's size is allocated: the bilateral lattice (d = 5) is the larger.
    check_lattice_size(image.shape[0] * image.shape[2] * image.shape[3], 5, f"image {tuple(image.shape)}")


class CRFRNNLayer(nn.Module):
    """Fully connected CRF (bilateral + spatial Gaussian kernels), mean field unrolled as an RNN.

    Args:
        num_classes (int): C.
        num_iterations (int): mean-field iterations in training mode (CRF-RNN: 5).
        num_eval_iterations (int or None): iterations in eval mode (CRF-RNN: 10); None = same as
            `num_iterations`.
        bilateral ((sigma_xy, sigma_rgb, weight)): appearance kernel; default CRF-RNN's
            (160, 3, 5). sigma_rgb refers to colours in 0..255.
        spatial ((sigma_xy, weight)): smoothness kernel; default (3, 3).
        image_mean, image_std (sequence of 3 floats or None): when given, `image` is taken as
            normalised from 0..1 RGB, (rgb/255 - mean)/std (torchvision's convention), and the
            layer undoes it. When None, `image` is RGB in 0..255 (uint8 or float).
        normalize (str): kernel normalisation, "symmetric" (densecrf's default; n K(n Q) with
            n = 1/sqrt(K 1)) or "after" (K Q / K 1, CRF-RNN's), or "none".
        checkpoint (bool): save only the inputs for the backward and run the forward again there
            (the fused ops save a few percent of the unary's size per iteration without it, the
            step-by-step loop several unary-sized tensors).
        backend (str): lattice backend, "auto" | "reference" | "native".
        learn_bandwidths (bool): make the three bandwidths (sigma_xy and sigma_rgb of the
            bilateral kernel, sigma_xy of the spatial one) parameters, through their logarithms
            (positive by construction). Default False: they are fixed, and the spatial lattice is
            kept between calls and inference runs the fused op, as without the option.
        compatibility (str): sharing of the compatibility matrix, one of COMPATIBILITY_SHARING:
            "potts" (fixed 1 - I), "symmetric" or "full" (default, CRF-RNN's).
        kernel_weights (str): sharing of each kernel's weight matrix, one of
            KERNEL_WEIGHT_SHARING: "scalar", "diagonal" or "full" (default, CRF-RNN's).
        bandwidth_grad (str): how the bandwidths are differentiated when they are learned:
            "gaussian" (default; the Gaussian's derivative formula evaluated with the lattice) or
            "lattice" (the lattice's own gradient; cheaper, but its colour-bandwidth derivative
            can have the wrong sign on real images: bench/bandwidth_gradient.py). See `Lattice`.
        fused (bool): run all iterations in the fused ops where they apply (default); False runs
            the step-by-step autograd loop (the same results to float rounding; the oracle the
            fused ops are tested against, and a baseline to time them against).
        keep_marginals (bool): see `mean_field`: the CPU's fused training forward keeps each
            iteration's marginals for the backward (faster only where the process keeps freed
            large blocks in its heap, as the training scripts make it). A setting of the
            process, not of the model: `config()` leaves it out.

    Learnable parameters (initial values from `bilateral`/`spatial`): ``bilateral_weight`` and
    ``spatial_weight`` (W_m: Tensor[] for "scalar", Tensor[C] for "diagonal", Tensor[C, C] for
    "full", starting at w_m I), ``compatibility`` (mu, Potts start 1 - I: Tensor[C, C] for
    "full", its upper triangle Tensor[C (C + 1) / 2] for "symmetric", absent for "potts"), and
    with `learn_bandwidths` ``bilateral_log_sigma`` (Tensor[2]: log sigma_xy, log sigma_rgb)
    and ``spatial_log_sigma`` (Tensor[1]). `kernel_weight_matrices()` and
    `compatibility_matrix()` give the C x C matrices whatever the sharing. At the start the
    layer's softmax equals densecrf's mean-field marginals for the same unary (logits = minus
    densecrf's unary energy), image and parameters. No gradient flows into the image.

    The state dict holds everything that defines the computation: the parameters, and as
    buffers the bandwidths (when not learned), ``iterations`` (training, evaluation) and
    ``normalization``. Loading one carries them into the layer; loading one of another sharing
    or class count fails with a message that says so (a Potts one has no ``compatibility``
    entry: a missing key, kept at the layer's own value with ``strict=False``).
    `scale_spatial_bandwidths(factor)` adapts the spatial bandwidths to images `factor` times
    larger.

    Speed: with the compiled lattices (the default backend), all iterations run in one fused op
    and the backward in another (``crfrnn::mean_field_forward``/``mean_field_backward``, or
    ``mean_field_inference`` when no gradient is wanted; see bench/crf.py for their times). With
    the reference backend, or lattices differentiable in their features, they run step by step,
    as separate autograd ops. Both compute the same logits and gradients up to float rounding.
    The spatial lattice depends on the image shape only:
    the layer keeps the last one and reuses it for inputs of the same N, H and W
    (``clear_lattice_cache()`` frees it; pickling and ``copy.deepcopy`` leave it out), unless it
    has to be differentiable in a learned bandwidth. Learning the bandwidths costs about 2d + 1
    filters more per kernel and iteration in backward with "gaussian" (d = 5 and 2), about two
    with "lattice".

    Shapes:
        unary (Tensor[N, C, H, W]): logits (e.g. a DCNN's scores upsampled to the image).
        image (Tensor[N, 3, H, W]): RGB, see image_mean/image_std.
        returns (Tensor[N, C, H, W]): refined logits, float32 (float64 for a float64 unary;
        half-precision unaries and autocast regions are computed in float32).

    Example:
        >>> crf = CRFRNNLayer(21)
        >>> logits = crf(torch.randn(2, 21, 64, 48), torch.rand(2, 3, 64, 48) * 255)
        >>> logits.shape
        torch.Size([2, 21, 64, 48])
    """

    def __init__(self, num_classes, num_iterations=5, num_eval_iterations=10,
                 bilateral=CRFRNN_PARAMS["bilateral"], spatial=CRFRNN_PARAMS["spatial"],
                 image_mean=None, image_std=None, normalize="symmetric", checkpoint=False,
                 backend="auto", learn_bandwidths=False, compatibility="full", kernel_weights="full",
                 bandwidth_grad="gaussian", fused=True, keep_marginals=False):
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        num_classes = int(num_classes)  # numpy integers too
        if num_eval_iterations is None:
            num_eval_iterations = num_iterations
        if backend not in ("auto", "reference", "native"):
            raise ValueError(f"backend must be 'auto', 'reference' or 'native', got {backend!r}")
        for name, value, allowed in (("compatibility", compatibility, COMPATIBILITY_SHARING),
                                     ("kernel_weights", kernel_weights, KERNEL_WEIGHT_SHARING),
                                     ("bandwidth_grad", bandwidth_grad, FEATURE_GRADIENTS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.num_classes = num_classes
        bilateral, spatial = _parse_kernels(bilateral, spatial)
        self.checkpoint = bool(checkpoint)
        self.fused = bool(fused)
        self.keep_marginals = bool(keep_marginals)
        self.backend = backend
        self.learn_bandwidths = bool(learn_bandwidths)
        self.compatibility_sharing = compatibility
        self.kernel_weight_sharing = kernel_weights
        self.bandwidth_grad = bandwidth_grad
        self._initial_weights = (bilateral[2], spatial[1])

        # What defines the computation travels in the state dict: iteration counts and the
        # normalisation as buffers (mirrored by plain attributes, see the properties), the
        # bandwidths as parameters or buffers.
        self.register_buffer("iterations", torch.zeros(2, dtype=torch.int64))
        self.register_buffer("normalization", torch.zeros((), dtype=torch.int64))
        self.num_iterations, self.num_eval_iterations = num_iterations, num_eval_iterations
        self.normalize = normalize
        log_sigmas = {"bilateral_log_sigma": torch.tensor([bilateral[0], bilateral[1]]).log(),
                      "spatial_log_sigma": torch.tensor([spatial[0]]).log()}
        for name, value in log_sigmas.items():
            if self.learn_bandwidths:
                setattr(self, name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)
        # Bandwidths as Python floats, read when they are fixed (no device sync per call).
        self._fixed_sigmas = (bilateral[:2], spatial[:1])
        self._follow_bandwidth_buffers()  # their logs as the buffers hold them now

        self.bilateral_weight = nn.Parameter(_initial_kernel_weight(kernel_weights, bilateral[2], num_classes))
        self.spatial_weight = nn.Parameter(_initial_kernel_weight(kernel_weights, spatial[1], num_classes))
        initial_compatibility = _initial_compatibility(compatibility, num_classes)
        if initial_compatibility is None:
            self.compatibility = None
        else:
            self.compatibility = nn.Parameter(initial_compatibility)

        if (image_mean is None) != (image_std is None):
            raise ValueError("give both image_mean and image_std (for normalised 0..1 images) or "
                             "neither (images in 0..255)")
        if image_mean is not None:
            mean = torch.as_tensor(image_mean, dtype=torch.float32).flatten()
            std = torch.as_tensor(image_std, dtype=torch.float32).flatten()
            if mean.numel() != 3 or std.numel() != 3:
                raise ValueError(f"image_mean and image_std need 3 values (RGB), got {mean.numel()} "
                                 f"and {std.numel()}")
            if not (torch.isfinite(std).all() and (std > 0).all() and torch.isfinite(mean).all()):
                raise ValueError(f"image_std must be positive and finite, got {std.tolist()}")
            self.register_buffer("image_mean", mean.view(1, 3, 1, 1), persistent=False)
            self.register_buffer("image_std", std.view(1, 3, 1, 1), persistent=False)
        else:
            self.image_mean = self.image_std = None
        # (key, Lattice): the last spatial lattice, reused while the key holds (see _lattices).
        self._last_spatial = None

    # -- presets ---------------------------------------------------------------------------------
    @classmethod
    def deeplab_largefov(cls, num_classes=21, **kwargs):
        """DeepLab-LargeFOV's CRF: w1 4, sigma_alpha 121, sigma_beta 5, w2 3, sigma_gamma 3,
        10 iterations (training and evaluation unless overridden)."""
        kwargs.setdefault("num_iterations", 10)
        kwargs.setdefault("num_eval_iterations", 10)
        return cls(num_classes, **DEEPLAB_LARGEFOV_PARAMS, **kwargs)

    @classmethod
    def crfasrnn(cls, num_classes=21, **kwargs):
        """CRF-RNN's: w1 5, sigma_alpha 160, sigma_beta 3, w2 3, sigma_gamma 3; 5 iterations in
        training, 10 in evaluation."""
        kwargs.setdefault("num_iterations", 5)
        kwargs.setdefault("num_eval_iterations", 10)
        return cls(num_classes, **CRFRNN_PARAMS, **kwargs)

    # -- what the state dict carries, as plain attributes ----------------------------------------
    @property
    def num_iterations(self):
        """Mean-field iterations in training mode (kept in the ``iterations`` buffer)."""
        return self._iterations[0]

    @num_iterations.setter
    def num_iterations(self, value):
        self._set_iterations(value, 0)

    @property
    def num_eval_iterations(self):
        """Mean-field iterations in eval mode (kept in the ``iterations`` buffer)."""
        return self._iterations[1]

    @num_eval_iterations.setter
    def num_eval_iterations(self, value):
        self._set_iterations(value, 1)

    def _set_iterations(self, value, slot):
        value = _iteration_count(value, ("num_iterations", "num_eval_iterations")[slot])
        counts = list(getattr(self, "_iterations", (0, 0)))
        counts[slot] = value
        self._iterations = tuple(counts)
        with torch.no_grad():
            self.iterations.fill_(0).add_(torch.tensor(counts, dtype=torch.int64))

    @property
    def normalize(self):
        """Kernel normalisation (kept in the ``normalization`` buffer as its index in
        NORMALIZATIONS)."""
        return self._normalize

    @normalize.setter
    def normalize(self, value):
        if value not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {value!r}")
        self._normalize = value
        with torch.no_grad():
            self.normalization.fill_(NORMALIZATIONS.index(value))

    def sigmas(self):
        """Current bandwidths as floats: ((bilateral sigma_xy, sigma_rgb), (spatial sigma_xy,))."""
        if not self.learn_bandwidths:
            if not torch.compiler.is_compiling():  # no Python-side state inside a traced graph
                self._follow_bandwidth_buffers()
            return self._fixed_sigmas
        # math.exp, as _take_changed_bandwidths uses: torch's exp may differ from it in the last
        # bit on some CPUs, and a fixed layer loaded from this one must report the same floats.
        return tuple(tuple(math.exp(v) for v in logs.detach().double().cpu().tolist())
                     for logs in (self.bilateral_log_sigma, self.spatial_log_sigma))

    def _follow_bandwidth_buffers(self):
        """Fixed bandwidths are used as the floats `_fixed_sigmas` (exact: 121.0, not the exp of
        its float32 log) and stored as their logs in the bandwidth buffers (the state dict).
        load_state_dict and `_set_fixed_sigmas` keep the two in step; this catches the other
        way the buffers change, an in-place edit: the floats then follow the buffers, while a
        move to another dtype or device keeps them. A change is seen by the buffers' version
        counters and storage, with no device sync; only then are the buffers read. Not seen:
        edits through ``.data`` (which bypass the version counter), edits of inference tensors
        (which have none), and, under torch.compile, edits since the last eager call."""
        buffers = (self.bilateral_log_sigma, self.spatial_log_sigma)
        if any(b.device.type == "meta" or b.is_inference() for b in buffers):
            return
        stamp = tuple((b.data_ptr(), b._version, b.dtype) for b in buffers)
        seen = getattr(self, "_bandwidths_seen", None)  # (stamp, logs in float64): absent on old pickles
        if seen is not None and seen[0] == stamp:
            return
        logs = [b.detach().to("cpu", torch.float64, copy=True) for b in buffers]
        if seen is not None:  # the values last seen, cast to the buffers' dtype: what a move gives
            self._take_changed_bandwidths([before.to(b.dtype).double() for before, b in zip(seen[1], buffers)], logs)
        self._bandwidths_seen = (stamp, logs)

    def _take_changed_bandwidths(self, before, after):
        """Fixed bandwidths whose log changed from `before` to `after` (per buffer, Tensor[2] and
        Tensor[1]) become exp(after); the others keep their exact floats."""
        changed = False
        sigmas = []
        for floats, old, new in zip(self._fixed_sigmas, before, after):
            old, new = old.detach().double().cpu().tolist(), new.detach().double().cpu().tolist()
            changed |= old != new
            sigmas.append(tuple(f if o == n else math.exp(n) for f, o, n in zip(floats, old, new)))
        if changed:
            self._fixed_sigmas = tuple(sigmas)
            self.clear_lattice_cache()

    @property
    def bilateral(self):
        """(sigma_xy, sigma_rgb, initial weight w1): the current bandwidths, as floats."""
        return (*self.sigmas()[0], self._initial_weights[0])

    @property
    def spatial(self):
        """(sigma_xy, initial weight w2): the current bandwidth, as a float."""
        return (*self.sigmas()[1], self._initial_weights[1])

    @torch.no_grad()
    def scale_spatial_bandwidths(self, factor):
        """Multiply the spatial bandwidths (sigma_xy of both kernels) by `factor`: for images
        `factor` times larger (or smaller, factor < 1) than the ones the bandwidths were set or
        learned for. The colour bandwidth and the weights do not depend on the resolution.

        Example: a layer learned on images shrunk by 2, used at full size:
        ``crf.scale_spatial_bandwidths(2.0)``.
        """
        factor = _positive("factor", factor)
        if self.learn_bandwidths:
            self.bilateral_log_sigma[0] += math.log(factor)
            self.spatial_log_sigma[0] += math.log(factor)
        else:  # the floats stay exact (121 * 0.5 is 60.5, not exp(log(121) + log(0.5)))
            (bxy, brgb), (sxy,) = self.sigmas()
            self._set_fixed_sigmas(((bxy * factor, brgb), (sxy * factor,)))
        self.clear_lattice_cache()
        return self

    def freeze_classes(self, classes):
        """Keep the matrix entries that involve any of `classes` (ints in [0, C)) at their
        present values while the rest learns: their gradients are zeroed (a hook on the
        compatibility and kernel-weight parameters; shared values such as "scalar" weights,
        which belong to every class, still learn). For classes the training data never shows:
        with no evidence about them, learning could only move them by their interactions with
        other classes, which over-fits (they keep their start instead). An optimiser with
        weight decay still moves the frozen entries. Calling it again replaces the classes;
        ``freeze_classes([])`` frees them all. The hooks belong to this layer: a copy
        (``copy.deepcopy``, pickling) learns every class. Returns self.
        """
        frozen = torch.zeros(self.num_classes, dtype=torch.bool)
        for c in classes:  # ints, numpy or 0-d tensor integers
            try:
                index = None if isinstance(c, bool) else operator.index(c)
            except TypeError:
                index = None
            if index is None or not 0 <= index < self.num_classes:
                raise ValueError(f"freeze_classes: expected class indices in [0, {self.num_classes}), got {c!r}")
            frozen[index] = True
        for handle in getattr(self, "_freeze_hooks", []):
            handle.remove()
        self._freeze_hooks = []
        learns = (~frozen)[:, None] & (~frozen)[None, :]  # entry (a, b): neither class frozen
        for name, _, sharing, _ in self._matrix_parameters():
            mask = _sharing_entries(learns, sharing)
            param = getattr(self, name)
            if mask is None or bool(mask.all()):
                continue
            self._freeze_hooks.append(param.register_hook(lambda g, m=mask: g * m.to(g.device, g.dtype)))
        return self

    def _set_fixed_sigmas(self, sigmas):
        """Fixed bandwidths ((sxy, srgb), (sxy,)): the floats used, and their log in the buffers."""
        self._fixed_sigmas = (tuple(sigmas[0]), tuple(sigmas[1]))
        with torch.no_grad():
            self.bilateral_log_sigma.copy_(torch.tensor(sigmas[0], dtype=torch.float64).log())
            self.spatial_log_sigma.copy_(torch.tensor(sigmas[1], dtype=torch.float64).log())
        self._bandwidths_seen = None
        self._follow_bandwidth_buffers()  # the new logs: the floats' own

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints written before the bandwidths, iterations and normalisation were in the
        # state dict: the layer keeps its own (the ones it was built with from the checkpoint's
        # config).
        for name in ("bilateral_log_sigma", "spatial_log_sigma", "iterations", "normalization"):
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        problem = self._sharing_mismatch(state_dict, prefix)
        if problem:
            error_msgs.append(problem)
            return
        stored = state_dict[prefix + "iterations"]
        if isinstance(stored, torch.Tensor) and (stored.is_floating_point() or stored.is_complex()):
            error_msgs.append(f"{prefix}iterations holds {stored.dtype} values {stored.tolist()}: expected integer "
                              "counts (a damaged file?)")
            return
        if not self.learn_bandwidths:
            self._follow_bandwidth_buffers()  # an in-place edit since the last call counts first
        log_sigmas_before = [self.bilateral_log_sigma.detach().clone(), self.spatial_log_sigma.detach().clone()]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        counts = [int(v) for v in self.iterations.tolist()]
        norm = int(self.normalization)
        if not all(0 <= n <= MAX_ITERATIONS for n in counts) or not 0 <= norm < len(NORMALIZATIONS):
            error_msgs.append(f"{prefix}iterations {counts} / normalization {norm}: expected counts in "
                              f"0..{MAX_ITERATIONS} and an index into {NORMALIZATIONS}")
            return
        self._iterations = tuple(counts)
        self._normalize = NORMALIZATIONS[norm]
        if not self.learn_bandwidths:
            # Other bandwidths than this layer's: take the state dict's. (The same ones keep the
            # exact floats the layer was built with: float32 logs round them.)
            self._take_changed_bandwidths(log_sigmas_before, (self.bilateral_log_sigma, self.spatial_log_sigma))
            self._bandwidths_seen = None
            self._follow_bandwidth_buffers()  # the loaded logs: the floats' own
        self.clear_lattice_cache()

    def _matrix_parameters(self):
        """(name, constructor option, its value, the option's choices) of each parameter that
        holds C x C matrix entries."""
        return (("bilateral_weight", "kernel_weights", self.kernel_weight_sharing, KERNEL_WEIGHT_SHARING),
                ("spatial_weight", "kernel_weights", self.kernel_weight_sharing, KERNEL_WEIGHT_SHARING),
                ("compatibility", "compatibility", self.compatibility_sharing, COMPATIBILITY_SHARING))

    def _sharing_mismatch(self, state_dict, prefix):
        """A message when the state dict's parameter shapes are another sharing's or class
        count's, else None. A missing entry is left to load_state_dict: strict, it names the
        missing key; strict=False keeps the layer's own value (PyTorch does not tell a module
        which of the two it is)."""
        c = self.num_classes
        for name, option, sharing, kinds in self._matrix_parameters():
            shapes = {kind: _sharing_shape(kind, c) for kind in kinds}
            if prefix + name not in state_dict:
                continue
            got = tuple(state_dict[prefix + name].shape)
            if got == shapes[sharing]:
                continue
            guess = [kind for kind, shape in shapes.items() if shape == got]
            found = f"shape {list(got)}"
            found += f" ({option}='{guess[0]}')" if guess else " (another number of classes?)"
            needed = "no entry" if shapes[sharing] is None else f"shape {list(shapes[sharing])}"
            return (f"{prefix}{name}: the state dict has {found}, but this layer was built with "
                    f"{option}='{sharing}' for {c} classes, which needs {needed}")
        return None

    def config(self):
        """Constructor arguments (plain Python values) that rebuild this layer:
        ``CRFRNNLayer(**crf.config())``; the learned parameters are in ``state_dict()``."""
        def plain(t):
            return None if t is None else [float(v) for v in t.flatten().tolist()]
        return {"num_classes": self.num_classes, "num_iterations": self.num_iterations,
                "num_eval_iterations": self.num_eval_iterations, "bilateral": list(self.bilateral),
                "spatial": list(self.spatial), "image_mean": plain(self.image_mean),
                "image_std": plain(self.image_std), "normalize": self.normalize,
                "checkpoint": self.checkpoint, "backend": self.backend,
                "learn_bandwidths": self.learn_bandwidths, "compatibility": self.compatibility_sharing,
                "kernel_weights": self.kernel_weight_sharing, "bandwidth_grad": self.bandwidth_grad,
                "fused": self.fused}

    def extra_repr(self):
        (bxy, brgb), (sxy,) = self.sigmas()
        s = (f"num_classes={self.num_classes}, num_iterations={self.num_iterations}, "
             f"num_eval_iterations={self.num_eval_iterations}, sigmas: bilateral=({bxy:.4g}, {brgb:.4g}), "
             f"spatial={sxy:.4g}, normalize={self.normalize!r}, compatibility={self.compatibility_sharing!r}, "
             f"kernel_weights={self.kernel_weight_sharing!r}")
        if self.learn_bandwidths:
            s += f", learn_bandwidths=True, bandwidth_grad={self.bandwidth_grad!r}"
        if self.image_mean is not None:
            s += f", image_mean={self.image_mean.flatten().tolist()}, image_std={self.image_std.flatten().tolist()}"
        if self.checkpoint:
            s += ", checkpoint=True"
        if not self.fused:
            s += ", fused=False"
        return s

    # -- forward ---------------------------------------------------------------------------------
    def rgb255(self, image):
        """Tensor[N, 3, H, W] as float RGB in 0..255 (undoing the declared normalisation)."""
        dtype = torch.float64 if image.dtype == torch.float64 else torch.float32
        image = image.to(dtype)
        if self.image_mean is not None:
            image = (image * self.image_std.to(dtype) + self.image_mean.to(dtype)) * 255.0
        return image

    def _bandwidth_tensors(self, dtype):
        """((sigma_xy, sigma_rgb), (sigma_xy,)) as 0-dim tensors differentiable in the learned
        log-bandwidths."""
        bil = self.bilateral_log_sigma.to(dtype).exp()
        spa = self.spatial_log_sigma.to(dtype).exp()
        return (bil[0], bil[1]), (spa[0],)

    def _lattices(self, rgb):
        """(bilateral, spatial) lattices of `rgb` (Tensor[N, 3, H, W], float, 0..255).

        The spatial lattice depends on the image shape only, so the last one (with its
        normalisation) is kept and reused while N, H, W, dtype, device, sigma_xy and backend
        stay the same: at a fixed training crop or image size every forward after the first
        skips its build. It holds about 50 bytes per pixel; `clear_lattice_cache()` frees it.
        With learned bandwidths and grad mode on, both lattices are built differentiable in
        them, every call.
        """
        if self.learn_bandwidths and torch.is_grad_enabled():
            bilateral, spatial = self._bandwidth_tensors(rgb.dtype)
            return build_crf_lattices(rgb, bilateral, spatial, self.backend, feature_grad=self.bandwidth_grad)
        bilateral, spatial = self.sigmas()
        key = (tuple(rgb.shape), rgb.dtype, rgb.device, float(spatial[0]), self.backend)
        compiling = torch.compiler.is_compiling()  # no Python-side state inside a traced graph
        last = None if compiling else getattr(self, "_last_spatial", None)  # (absent on old pickles)
        reuse = last[1] if last is not None and last[0] == key else None
        lattices = build_crf_lattices(rgb, bilateral, spatial, self.backend, spatial_lattice=reuse)
        if not compiling:
            self._last_spatial = (key, lattices[1])
        return lattices

    def clear_lattice_cache(self):
        """Forget the kept spatial lattice (see `_lattices`); the next forward builds it again."""
        self._last_spatial = None

    def __getstate__(self):
        # Pickling (torch.save of a whole model, copy.deepcopy) leaves the kept spatial lattice
        # out: it is a cache of about 50 bytes per pixel that the next forward rebuilds.
        state = super().__getstate__()  # a copy of __dict__
        state["_last_spatial"] = None
        state.pop("_freeze_hooks", None)  # the copy's parameters carry no hooks
        return state

    def __setstate__(self, state):
        # (Layers pickled before these settings existed ran fused, recomputing the marginals.)
        self.__dict__.update({"fused": True, "keep_marginals": False})
        super().__setstate__(state)

    def kernel_weight_matrices(self, dtype=torch.float32):
        """[W_bilateral, W_spatial]: each kernel's C x C weight matrix, whatever the sharing."""
        return [_kernel_weight_matrix(w.to(dtype), self.kernel_weight_sharing, self.num_classes)
                for w in (self.bilateral_weight, self.spatial_weight)]

    def compatibility_matrix(self, dtype=torch.float32):
        """mu: the C x C compatibility matrix, whatever the sharing."""
        param = None if self.compatibility is None else self.compatibility.to(dtype)
        return _compatibility_matrix(param, self.compatibility_sharing, self.num_classes, dtype,
                                     self.bilateral_weight.device)

    def pairwise_matrices(self, dtype=torch.float32):
        """[mu W_bilateral, mu W_spatial]: the C x C matrices applied to each kernel's message."""
        mu = self.compatibility_matrix(dtype)
        return [mu @ w for w in self.kernel_weight_matrices(dtype)]

    def forward(self, unary, image, num_iterations=None):
        """Refine `unary` (Tensor[N, C, H, W] logits) with the CRF on `image` (Tensor[N, 3, H, W]).

        num_iterations (int or None) overrides the mode's iteration count for this call.
        Returns Tensor[N, C, H, W] logits. Raises ValueError for NaN/Inf in the unary or the
        parameters, an image outside 0..255 (when no image_mean/image_std were given), and a
        non-finite output (parameters or logits too large for the arithmetic); see
        `_check_values`. Meta tensors give a meta result of the right shape and dtype.
        """
        _check_unary_image(unary, image, self.num_classes)
        self._check_layer_matches(unary, image)
        if num_iterations is None:
            num_iterations = self.num_iterations if self.training else self.num_eval_iterations
        else:
            num_iterations = _iteration_count(num_iterations)
        dtype = torch.float64 if unary.dtype == torch.float64 else torch.float32
        n, c, h, w = unary.shape
        if unary.numel() == 0:
            return unary.to(dtype).clone()
        if unary.device.type == "meta":  # shapes only (model summaries, FLOP counters)
            return torch.empty((n, c, h, w), dtype=dtype, device="meta")
        with torch.autocast(device_type=unary.device.type, enabled=False):
            rgb = self.rgb255(image.detach())  # no gradient into the image
            try:
                lattices = self._lattices(rgb)
            except ValueError as exc:  # NaN/Inf or huge values: features the lattice rejects
                for name in ("bilateral_log_sigma", "spatial_log_sigma"):  # a diverged bandwidth, not the image
                    if not bool(torch.isfinite(getattr(self, name)).all()):
                        raise ValueError(f"CRFRNNLayer.{name} has NaN/Inf values: the layer's bandwidths must "
                                         "be finite (a diverged training run or a damaged checkpoint?)") from exc
                bilateral, spatial = self.sigmas()
                raise ValueError(f"image gives bilateral features (colours / sigma_rgb) the lattice "
                                 f"rejects: {exc} (bandwidths: bilateral sigma_xy, sigma_rgb = "
                                 f"{bilateral[0]:.4g}, {bilateral[1]:.4g}; spatial {spatial[0]:.4g})") from exc
            pairwise = self.pairwise_matrices(dtype)
            # [N, P, C], a view of the channels-first memory: the fused op reads and writes that
            # layout directly (the loop makes it contiguous).
            u = unary.to(dtype).flatten(2).transpose(1, 2)
            logits = mean_field(u, lattices, pairwise, num_iterations, self.normalize, self.checkpoint,
                                fused=self.fused, keep_marginals=self.keep_marginals)
            out = logits.transpose(1, 2).reshape(n, c, h, w)
        self._check_values(unary, image, rgb, pairwise, out)
        return out

    def _check_layer_matches(self, unary, image):
        """The layer's parameters on the inputs' device; an integer image only without declared
        normalisation (a normalised image is float)."""
        if self.bilateral_weight.device != unary.device:
            raise ValueError(f"the layer's parameters are on {self.bilateral_weight.device} but unary is on "
                             f"{unary.device}: move the layer with .to({str(unary.device)!r})")
        if self.image_mean is not None and not image.is_floating_point():
            raise TypeError(f"image_mean/image_std were given, so image must be a normalised float tensor, "
                            f"got {image.dtype} (pass RGB 0..255 to a layer built without them)")

    def _check_values(self, unary, image, rgb, pairwise, out):
        """ValueError, most specific cause first, for: NaN/Inf in a parameter or in the unary, an
        image outside 0..255 (when no normalisation was declared), pairwise matrices mu W_m or an
        output that overflow (finite but huge parameters or logits). A UserWarning for colours
        (`rgb`: the image in 0..255 units, normalisation undone) that look like another
        convention's: all in 0..1 (an image from ToTensor() given as 0..255), or far outside
        0..255 once the declared normalisation is undone (an image not normalised that way).

        One device sync for all of them, after the work (errors are rare: a failing call wastes
        its work, a passing one waits once). The unary and the output are checked through their
        sums, a twentieth of the cost of an elementwise isfinite: a NaN/Inf anywhere makes the
        sum non-finite, and an overflowing sum of finite values is told apart afterwards. Under
        torch.compile the checks are exact and asynchronous (torch._assert_async: no graph break,
        no sync; the message then gives no counts).
        """
        unary, image, rgb, out = unary.detach(), image.detach(), rgb.detach(), out.detach()
        params = {name: p.detach() for name, p in self.named_parameters()}
        compiling = torch.compiler.is_compiling()

        def maybe_not_finite(t):  # exact when compiling; else may be a false alarm from overflow
            return ~torch.isfinite(t).all() if compiling else ~torch.isfinite(t.sum())

        checks = {f"parameter {name}": (~torch.isfinite(p).all(), f"CRFRNNLayer.{name} has NaN/Inf values")
                  for name, p in params.items()}
        checks["unary"] = (maybe_not_finite(unary), "unary contains NaN/Inf values; the CRF needs finite logits")
        if self.image_mean is not None or image.dtype != torch.uint8:
            low, high = torch.aminmax(rgb)
            if self.image_mean is None:
                checks["image"] = ((low < 0) | (high > 255), "image is outside 0..255 but no normalisation "
                                   "was declared: pass RGB in 0..255, or build the layer with image_mean/image_std")
                checks["colours in 0..1"] = ((low >= 0) & (high > _DARKEST_0_TO_1_MAX) & (high <= 1), None)
            else:  # de-normalised colours far outside 0..255: an image normalised otherwise, or not at all
                checks["colour range"] = ((low < -_COLOUR_SLACK) | (high > 255 + _COLOUR_SLACK), None)
        checks["pairwise"] = (~torch.isfinite(torch.stack([m.detach() for m in pairwise])).all(),
                              "the pairwise matrices compatibility @ weight overflow: the CRF parameters "
                              "are too large")
        checks["output"] = (maybe_not_finite(out), "the CRF output has NaN/Inf values: its parameters or "
                            "logits are too large for the arithmetic")
        flags = torch.stack([flag for flag, _ in checks.values()])
        if compiling:  # the errors only: warnings need the values
            for flag, (_, message) in zip(flags.unbind(), checks.values()):
                if message is not None:
                    torch._assert_async(~flag, message)
            return
        raised = dict(zip(checks, flags.tolist()))  # the sync
        # (The messages are the same every call, so that Python's default filter shows each once;
        # stacklevel: at the line that called the layer, through nn.Module.__call__.)
        if raised.pop("colours in 0..1", False):
            _warn_colours_in_0_to_1(stacklevel=6)
        if raised.pop("colour range", False):
            warnings.warn(f"the image, with the declared image_mean/image_std undone, has colours more than "
                          f"{_COLOUR_SLACK:g} outside 0..255: was it normalised as declared, "
                          "(rgb / 255 - image_mean) / image_std?", stacklevel=5)
        if not any(raised.values()):
            return
        # Something may be wrong: find what, exactly (slow is fine here).
        for name, p in params.items():
            count = int((~torch.isfinite(p)).sum())
            if count:
                raise ValueError(f"CRFRNNLayer.{name} has {count} NaN/Inf values (of {p.numel()}): the "
                                 "layer's parameters must be finite (a diverged training run or a damaged "
                                 "checkpoint?)")
        count = int((~torch.isfinite(unary)).sum()) if raised["unary"] else 0
        if count:
            raise ValueError(f"unary contains {count} NaN/Inf values (shape {tuple(unary.shape)}); "
                             "the CRF needs finite logits")
        if raised.get("image"):
            raise ValueError(f"image has values in [{low.item():g}, {high.item():g}] but no normalisation "
                             "was declared: pass RGB in 0..255, or build the layer with image_mean/image_std")
        largest = max(float(p.abs().max()) for p in params.values())
        if raised["pairwise"]:
            raise ValueError(f"the pairwise matrices compatibility @ weight overflow {pairwise[0].dtype} "
                             f"(largest |parameter| {largest:g}): the CRF parameters are too large")
        count = int((~torch.isfinite(out)).sum()) if raised["output"] else 0
        if count:
            raise ValueError(f"the CRF output has {count} NaN/Inf values though the unary, image and "
                             f"parameters are finite: the parameters (largest |value| {largest:g}) or the "
                             f"logits (largest |value| {float(unary.abs().max()):g}) are too large for "
                             f"{out.dtype} arithmetic")


def _warn_colours_in_0_to_1(stacklevel):
    """The UserWarning for an image whose colours all lie within 0..1 (and not all near 0)."""
    warnings.warn("the image's colours all lie within 0..1, but the CRF takes RGB in 0..255 (sigma_rgb is in "
                  "those units): an image in 0..1 (e.g. from ToTensor()) makes every colour alike and the "
                  "bilateral kernel merely spatial. Multiply it by 255 (or, for CRFRNNLayer, declare "
                  "image_mean/image_std).", stacklevel=stacklevel)


def _sharing_entries(matrix, sharing):
    """The entries of a C x C `matrix` that a parameter of `sharing` holds: all of them ("full",
    Tensor[C, C]), its upper triangle ("symmetric", Tensor[C (C + 1) / 2], row by row) or its
    diagonal ("diagonal", Tensor[C]); None for the sharings without per-class entries ("potts":
    no parameter, "scalar": one value shared by every class)."""
    if sharing in ("potts", "scalar"):
        return None
    if sharing == "symmetric":
        rows, cols = torch.triu_indices(*matrix.shape, device=matrix.device)
        return matrix[rows, cols]
    if sharing == "diagonal":
        return torch.diag(matrix)
    return matrix


def _sharing_shape(sharing, num_classes):
    """Shape of a parameter of `sharing` (None: no parameter)."""
    if sharing == "scalar":
        return ()
    entries = _sharing_entries(torch.empty(num_classes, num_classes), sharing)
    return None if entries is None else tuple(entries.shape)


def _initial_kernel_weight(sharing, weight, num_classes):
    """w I in the parametrisation of `sharing`: Tensor[] ("scalar"), [C] ("diagonal"), [C, C]."""
    if sharing == "scalar":
        return torch.tensor(float(weight))
    return _sharing_entries(float(weight) * torch.eye(num_classes), sharing)


def _kernel_weight_matrix(param, sharing, num_classes):
    if sharing == "scalar":
        return param * torch.eye(num_classes, dtype=param.dtype, device=param.device)
    if sharing == "diagonal":
        return torch.diag(param)
    return param


def _initial_compatibility(sharing, num_classes):
    """The Potts start 1 - I in the parametrisation of `sharing` (None for "potts": fixed)."""
    return _sharing_entries(1.0 - torch.eye(num_classes), sharing)


def _compatibility_matrix(param, sharing, num_classes, dtype, device):
    if sharing == "potts":
        return 1.0 - torch.eye(num_classes, dtype=dtype, device=device)
    if sharing == "symmetric":
        rows, cols = torch.triu_indices(num_classes, num_classes, device=param.device)
        upper = torch.zeros(num_classes, num_classes, dtype=param.dtype, device=param.device)
        upper = upper.index_put((rows, cols), param)
        return upper + upper.triu(1).t()
    return param
