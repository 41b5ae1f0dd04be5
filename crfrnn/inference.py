"""Mean-field inference of a fully connected CRF on prebuilt lattices: the functional core that
`CRFRNNLayer` and `dense_crf` run.

One iteration (Zheng et al. 2015, Sec. 4), for kernels m (e.g. bilateral: position + colour,
spatial: position), on channels-last tensors [N, P, C]:

    message passing   Q~_m = K_m(Q)                   normalised Gaussian filter (lattice)
    weighting and
    compatibility     A_m = mu W_m                    one C x C matrix per kernel
    unary addition    L   = U - sum_m A_m Q~_m        U: the unary logits
    normalisation     Q   = softmax(L)

starting from Q = softmax(U); `mean_field` returns the last L.

Conventions, and how they relate to Krähenbühl's densecrf (the test oracle):

- densecrf's energy is E = -U; its iteration is Q = softmax(-E + sum_m w_m Kn_m(Q)) (Potts
  compatibility w applied as -w x). With mu = 1 - I and W_m = w_m I our logits are
  L(l) = U(l) - sum_m w_m (S_m - Kn_m(Q)(l)), with S_m = sum_l' Kn_m(Q)(l'): S_m depends on the
  point but not on the label, so softmax(L) is exactly densecrf's Q. (CRF-RNN's Caffe code
  starts mu at -I, which is the same up to the same per-point shift; 1 - I is the Potts model of
  the paper and keeps L on the scale of U.)
- The kernels include the self term j = i, as densecrf and CRF-RNN's code do (the lattice
  cannot exclude it, and the paper's sum over j != i is only notation there).
- Normalisation: "symmetric", n K(n Q) with n = 1/sqrt(K 1), is densecrf's default
  (NORMALIZE_SYMMETRIC) and therefore ours; "after", K Q / K 1, is CRF-RNN's.
- Features: (x/sxy, y/sxy, r/srgb, g/srgb, b/srgb) with x the column and y the row and colours
  in 0..255, as densecrf's addPairwiseBilateral; (x/sxy, y/sxy) for the spatial kernel.
"""
import math

import numpy as np
import torch
import torch.utils.checkpoint as torch_checkpoint

from . import checks, ops
from .features import bilateral_features, kernel_features, spatial_features
from .lattice import Lattice, cast_result, compute_dtype

__all__ = ["mean_field", "build_crf_lattices", "kernel_lattice", "kernel_lattices", "potts_matrices",
           "sender_thresholds", "sender_mask", "CRFRNN_PARAMS", "DEEPLAB_LARGEFOV_PARAMS", "DEFAULT_PRUNE"]

#: Sender pruning's default for evaluation (`dense_crf`, `CRFRNNLayer` in eval mode; see
#: `mean_field`): with DeepLab's Potts weights (4 + 3) a class sends while its Q reaches 0.01
#: somewhere in the image. Chosen with `bench/classes.py --sweep` (bench/README.md): on 12 VOC
#: images it is where the senders drop to about 2 of 21 from the second iteration, with every
#: label kept and Q within 1.2e-4 of the exact iterations; 10x larger prunes the first iteration
#: too for 3x that change in Q. On learned (non-Potts) matrices it moved Q by 1e-5, pruning little.
DEFAULT_PRUNE = 7e-4

#: CRF-RNN's kernel parameters: bilateral (sigma_xy, sigma_rgb, weight), spatial (sigma_xy, weight).
CRFRNN_PARAMS = {"bilateral": (160.0, 3.0, 5.0), "spatial": (3.0, 3.0)}
#: DeepLab-LargeFOV's cross-validated parameters (w1 4, sigma_alpha 121, sigma_beta 5, w2 3,
#: sigma_gamma 3).
DEEPLAB_LARGEFOV_PARAMS = {"bilateral": (121.0, 5.0, 4.0), "spatial": (3.0, 3.0)}


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


def kernel_lattice(kernel, sigmas, shape=None, positions=None, guide=None, backend="auto", feature_grad="lattice",
                   dtype=torch.float32, device=None):
    """The lattice of one kernel (see `crfrnn.features.kernel_features` for the arguments), over
    per-point features Tensor[N, P, d], so that the mean-field loop runs channels last."""
    features = kernel_features(kernel, sigmas, shape, positions, guide, dtype, device)
    return Lattice(features.flatten(2).transpose(1, 2), backend=backend, feature_grad=feature_grad)


def kernel_lattices(kernels, sigmas, shape, positions=None, guide=None, backend="auto", dtype=torch.float32,
                    device=None, feature_grad="lattice", kept=None):
    """One `kernel_lattice` per kernel (`sigmas`: one sequence per kernel). With `kept` (a dict,
    kernel name -> (key, Lattice)), a kernel of positions alone on a grid (its lattice depends on
    the grid's shape only) reuses the lattice kept there while N, S, dtype, device, bandwidths and
    backend stay the same, and keeps the one it builds: at a fixed training crop or image size
    every call after the first skips its build (about 50 bytes per pixel for a 2-D spatial kernel).
    A ValueError names the kernel whose features the lattice rejects."""
    lattices = []
    for kernel, kernel_sigmas in zip(kernels, sigmas):
        keep = kept is not None and positions is None and kernel.guide is None
        key = (tuple(shape), dtype, device, tuple(kernel_sigmas), backend)
        if keep and kernel.name in kept and kept[kernel.name][0] == key:
            lattices.append(kept[kernel.name][1])
            continue
        try:
            lattice = kernel_lattice(kernel, kernel_sigmas, shape, positions, guide, backend, feature_grad, dtype,
                                     device)
        except ValueError as exc:  # NaN/Inf or huge values: name the kernel whose features they are
            inputs = [name for name, used in (("positions" if positions is not None else "grid positions",
                                               kernel.positions), ("guide", kernel.guide)) if used]
            raise ValueError(f"{kernel.name} features (its {' and '.join(inputs)}, over their bandwidths) the "
                             f"lattice rejects: {exc}") from exc
        if keep:
            kept[kernel.name] = (key, lattice)
        lattices.append(lattice)
    return lattices


def sender_thresholds(pairwise, prune):
    """Sender pruning's threshold per class, Tensor[C] float64 on the CPU: class j sends in an
    image while its largest Q there, M, has M (s_j + D_j M) >= prune, a bound on how much dropping
    its message could move any Q in one iteration. Its message is at most M times column j of each
    matrix (a normalised filter of values below M is below M); a message the same for every class
    moves no Q, so what counts is how the column differs between classes: between the classes
    l != j by at most s_j = sum over the matrices of (max - min of A[l, j], l != j), which moves
    their Q by up to M s_j, and from the diagonal by at most D_j = sum of max |A[l, j] - A[j, j]|,
    which acts through class j's own Q <= M. theta_j = 2 prune / (s_j + sqrt(s_j^2 + 4 D_j prune))
    is the M where the bound reaches prune: sqrt(prune / sum of the weights) for Potts matrices
    (s_j = 0), about prune / s_j for learned ones (then pruning is first order and prunes less);
    0 for prune = 0 (every class sends), inf for a column that is the same for every class. The
    fused ops compute the same bits (csrc/mean_field_checks.h).

    Matrices with NaN/Inf entries, or whose rows of |entries| sum to more than the dtype's
    largest value / 2^64, are a ValueError: a NaN Q (theirs, or an overflowing iteration's)
    reaches no threshold, so pruning would hide it (see csrc/mean_field_checks.h)."""
    c = pairwise[0].shape[0]
    if prune == 0:
        return torch.zeros(c, dtype=torch.float64)
    rows = torch.stack([m.detach().to("cpu", torch.float64) for m in pairwise])
    largest = rows.abs().sum(dim=(0, 2)).amax() if c else rows.new_zeros(())
    limit = math.ldexp(torch.finfo(pairwise[0].dtype).max, -64)
    finite = torch.isfinite(rows).all()
    non_finite = ("the pairwise matrices hold NaN/Inf values (a NaN/Inf parameter, or compatibility @ weight "
                  "overflowing): with sender pruning they would silence classes unseen")
    too_large = (f"the pairwise matrices are too large for sender pruning: a row of |compatibility @ weight| sums "
                 "to {}" f", above {limit:g}, so the iterations could overflow {pairwise[0].dtype} unseen; use "
                 "smaller weights, or prune=0 (the exact iterations, whose result is checked)")
    if torch.compiler.is_compiling():  # (no values at trace time: checks in the graph)
        torch._assert_async(finite, non_finite)
        torch._assert_async(largest <= limit, too_large.format("more"))
    elif not bool(finite):
        raise ValueError(non_finite)
    elif not bool(largest <= limit):
        raise ValueError(too_large.format(f"{float(largest):g}"))
    spread = torch.zeros(c, dtype=torch.float64)
    diagonal = torch.zeros(c, dtype=torch.float64)
    off = ~torch.eye(c, dtype=torch.bool)
    for a in rows:  # (the matrices in float64 on the CPU, as stacked above)
        if c > 1:
            hi = a.masked_fill(~off, -float("inf")).amax(0)
            lo = a.masked_fill(~off, float("inf")).amin(0)
            spread = spread + (hi - lo)
        diagonal = diagonal + ((a - a.diagonal()[None, :]).abs() * off).amax(0)
    return 2 * prune / (spread + torch.sqrt(spread * spread + 4 * diagonal * prune))


def sender_mask(q, thresholds):
    """Sender pruning's decision: Tensor[N, C] of q's dtype, 1 where class l of image n reaches
    thresholds[l] (`sender_thresholds`) somewhere in Q (Tensor[N, P, C]), else 0."""
    if not q.shape[1]:
        return q.new_ones(q.shape[0], q.shape[2])
    return (q.detach().amax(dim=1) >= thresholds.to(q.device, q.dtype)).to(q.dtype)


def _message_logits(q, unary, lattices, pairwise, normalize, prune=0.0):
    """L = U - sum_m (mu W_m) K_m(Q), on Tensor[N, P, C] (channels last); `normalize`: one per
    lattice; with `prune`, K_m of Q D (D: `sender_mask`)."""
    if prune > 0:
        q = q * sender_mask(q, sender_thresholds(pairwise, prune))[:, None, :]
    n, p, c = q.shape
    logits = None
    for lat, mat, norm in zip(lattices, pairwise, normalize):
        msg = lat.filter(q, normalize=norm).reshape(n * p, c)
        # 1x1 convolution as a matmul: out[i, l] -= sum_l' mat[l, l'] msg[i, l']. The first
        # kernel's addmm makes the output (one copy of U), the others accumulate into it in place.
        if logits is None:
            logits = torch.addmm(unary.reshape(n * p, c), msg, mat.t(), alpha=-1)
        else:
            logits.addmm_(msg, mat.t(), alpha=-1)
    return logits.reshape(n, p, c)


def _iteration(q, unary, lattices, pairwise, normalize, prune=0.0):
    logits = _message_logits(q, unary, lattices, pairwise, normalize, prune)
    return logits, torch.softmax(logits, dim=-1)


def wants_grad(unary, pairwise, lattices):
    """Whether autograd will record the iterations (a gradient to the unary, the matrices or the
    lattices' features)."""
    return torch.is_grad_enabled() and (unary.requires_grad or any(m.requires_grad for m in pairwise)
                                        or any(getattr(lat, "differentiable", False) for lat in lattices))


def can_fuse(unary, lattices):
    """Whether the fused mean-field ops can run these iterations (the one place that decides):
    the device has them, the lattices are the compiled backend's (tensors the ops read directly)
    and none is differentiable in its features. The fused ops give gradients for the unary and
    the C x C matrices only (so any parameter sharing that builds the matrices, e.g. mu @ W, is
    covered by autograd around them); a lattice built for learned bandwidths
    (``Lattice.differentiable``) needs the step-by-step loop, whose filters carry that gradient."""
    return (unary.device.type in ops.FUSED_MEAN_FIELD_DEVICE_TYPES and unary.dtype in (torch.float32, torch.float64)
            and all(getattr(lat, "backend", None) == "native" and not getattr(lat, "differentiable", False)
                    for lat in lattices))


def fused_mean_field(unary, lattices, pairwise, num_iterations, normalize, checkpoint=False,
                     keep_marginals=True, prune=0.0):
    """All iterations in one fused op (see csrc/cpu/mean_field_cpu.cpp), where `can_fuse` says
    they apply. The result has `unary`'s memory layout (a channels-first unary stays channels
    first).

    No gradient wanted, or `checkpoint`: crfrnn::mean_field_inference (whose autograd saves only
    its inputs and runs the forward again in the backward); else crfrnn::mean_field_forward,
    which saves the blurred grids of every iteration (a few percent of Tensor[N, P, C] each) and,
    with `keep_marginals`, each iteration's marginals; without them (or when pruning) the backward
    recomputes them from the unary and the saved grids. `normalize`: one for all lattices, or one
    per lattice; `prune`: sender pruning (see `mean_field`)."""
    normalize = checks.normalizations(normalize, len(lattices))
    splat_scales, slice_scales = zip(*(lat.normalization_scales(norm, unary.dtype)
                                       for lat, norm in zip(lattices, normalize)))
    args = (unary, [lat.vertex_index for lat in lattices], [lat.weights_as(unary.dtype) for lat in lattices],
            list(splat_scales), list(slice_scales), [lat.neighbors for lat in lattices],
            [m.to(unary.dtype) for m in pairwise], num_iterations)
    if checkpoint or not wants_grad(unary, pairwise, lattices):
        return torch.ops.crfrnn.mean_field_inference(*args, prune)
    save_marginals = bool(keep_marginals)
    return torch.ops.crfrnn.mean_field_forward(*args, save_marginals, prune)[0]


def mean_field(unary, lattices, pairwise, num_iterations, normalize="symmetric", checkpoint=False, fused=True,
               keep_marginals=True, prune=0.0):
    """Run `num_iterations` mean-field iterations on prebuilt lattices (channels last).

    Args:
        unary (Tensor[N, P, C]): unary logits, float32 or float64, any strides (the fused op
            keeps a channels-first layout, [N, C, P] memory, in its output); float16 and
            bfloat16 are computed in float32 and the result cast back (a RuntimeWarning for
            values that overflow it).
        lattices (sequence of Lattice): one per kernel, built on per-point features [N, P, d],
            on the unary's device.
        pairwise (sequence of Tensor[C, C] or numpy arrays): mu W_m per kernel, real numbers
            (floating point or integer), cast to the dtype the iterations compute in (the
            unary's; float32 for half); tensors on the unary's device (gradients flow back
            through the cast).
        num_iterations (int): T in 0..MAX_ITERATIONS (T = 0 returns a copy of the unary).
        normalize (str or sequence of str): kernel normalisation, see `Lattice.filter`: one for
            every kernel, or one per lattice (as densecrf's addPairwiseEnergy takes one per kernel).
        checkpoint (bool): save only the inputs for the backward and compute the iterations again
            there (the step-by-step loop: each iteration's, keeping one Tensor[N, P, C] per
            iteration; the fused ops: all of them).
        fused (bool): run the fused ops when they apply (default); False forces the step-by-step
            loop (the oracle the fused ops are tested against). The fused ops give the same bits
            on any number of threads; the loop's gradients may differ in the last bits between
            thread counts (torch's CPU softmax backward does).
        keep_marginals (bool): the fused training forward keeps each iteration's marginals
            (T - 1 Tensor[N, P, C]) for the backward (default), which otherwise recomputes them
            from the unary and the saved grids (the same bits either way; False saves that memory
            for about 10% more time on the CPU). On the CPU the op keeps the blocks of what it
            saved between steps (up to 1 GB; see SavedBlocks in csrc/cpu/mean_field_cpu.cpp), so
            they are not mapped and page-faulted afresh every step; a pruned forward always
            recomputes them.
        prune (float): sender pruning, in [0, 1]: the most that dropping one class's message may
            move any Q in one iteration, by a bound. In each iteration, a class whose marginal Q
            stays below its threshold at every point of an image sends no message there (its
            channel is not splatted, blurred or sliced: K_m(Q D), D the senders' 0/1 diagonal,
            `sender_mask`); every class still receives the senders' messages, so absent classes
            stay suppressed. The threshold of class j (`sender_thresholds`) is the largest Q at
            which the bound M (s_j + D_j M) on the change stays below `prune`: for Potts matrices
            (the start of the layer, dense_crf) the change is second order, M^2 times the weights,
            and the threshold sqrt(prune / sum of weights); for learned matrices it is first
            order, and pruning waits for smaller Q. (The logits may move further, by a shift the
            same for every class of a point, which no softmax sees.) Gradients are those of the
            function computed, the senders held fixed. The fused ops then cost what the senders cost (for Potts-like
            matrices the other classes ride along as one); 0 (the default here): the exact
            iterations. `crfrnn.DEFAULT_PRUNE` is the measured safe value that `dense_crf` and
            `CRFRNNLayer` use in evaluation.

    When the lattices are the compiled backend's on a device with the fused ops (CPU; CUDA when
    built with it), all iterations run in one op, which applies the C x C matrices on the lattice
    vertices before the slice, and the backward in one more (``crfrnn::mean_field_forward`` and
    ``crfrnn::mean_field_backward``; ``crfrnn::mean_field_inference`` when no gradient is
    wanted). Their results and gradients (for the unary and the matrices) equal the step-by-step
    loop's up to float rounding; under create_graph=True their backward runs the loop, so that
    second derivatives (gradient penalties, Hessian-vector products) are the loop's too.
    Otherwise (the reference backend) the iterations run step by step, as separate autograd ops.

    Returns:
        Tensor[N, P, C]: the logits L of the last iteration (Q = softmax(L)).
    """
    if isinstance(unary, torch.Tensor):
        checks.dense_layout("unary", unary)
    pairwise = [_pairwise_matrix(i, m, getattr(unary, "device", None)) for i, m in enumerate(pairwise)]
    checks.mean_field_args(unary, lattices, pairwise, num_iterations)
    prune = checks.prune_threshold(prune)
    _check_devices(unary, lattices, pairwise)
    num_iterations = int(num_iterations)  # a numpy integer to the ops' int
    if num_iterations == 0:
        return unary.clone()  # a new tensor, as for T > 0 (never an alias of the input)
    normalize = checks.normalizations(normalize, len(lattices))
    out_dtype = unary.dtype
    unary = unary.to(compute_dtype(unary.dtype))  # half precision: computed in float32
    pairwise = [m.to(unary.dtype) for m in pairwise]
    if fused and can_fuse(unary, lattices):
        logits = fused_mean_field(unary, lattices, pairwise, num_iterations, normalize, checkpoint, keep_marginals,
                                  prune)
        return cast_result(logits, out_dtype, "mean_field")
    use_checkpoint = checkpoint and wants_grad(unary, pairwise, lattices)
    if use_checkpoint:
        # Constants the lattices compute on first use (with a graph, for learned bandwidths)
        # must not be computed first inside a checkpointed iteration, see Lattice.prepare.
        for lat, norm in zip(lattices, normalize):
            if hasattr(lat, "prepare"):
                lat.prepare(norm, unary.dtype)
    unary = unary.contiguous()
    q = torch.softmax(unary, dim=-1)
    logits = unary
    for _ in range(num_iterations):
        if use_checkpoint:
            logits, q = torch_checkpoint.checkpoint(_iteration, q, unary, lattices, pairwise,
                                                    normalize, prune, use_reentrant=False)
        else:
            logits, q = _iteration(q, unary, lattices, pairwise, normalize, prune)
    return cast_result(logits, out_dtype, "mean_field")


def _pairwise_matrix(i, mat, device):
    """The i-th pairwise matrix as a tensor (a numpy array converted, onto `device`), else
    TypeError: a dense tensor of real numbers (floating point or integer)."""
    if isinstance(mat, np.ndarray):
        if mat.dtype.kind not in "fiu":
            raise TypeError(f"pairwise matrix {i} must hold real numbers, got a numpy array of {mat.dtype}")
        mat = torch.from_numpy(np.ascontiguousarray(mat)).to(device)
    if not isinstance(mat, torch.Tensor):
        raise TypeError(f"pairwise matrix {i} must be a Tensor[C, C] or a numpy array, got {type(mat).__name__}")
    if mat.layout != torch.strided:
        raise TypeError(f"pairwise matrix {i} must be a dense (strided) tensor, got layout {mat.layout}")
    if mat.is_complex() or mat.dtype == torch.bool:
        raise TypeError(f"pairwise matrix {i} must hold real numbers (floating point or integer), got {mat.dtype}")
    return mat


def _check_devices(unary, lattices, pairwise):
    """ValueError naming the first lattice or matrix not on the unary's device."""
    for what, things in (("lattice", lattices), ("pairwise matrix", pairwise)):
        for i, thing in enumerate(things):
            device = getattr(thing, "device", unary.device)
            if device != unary.device:
                raise ValueError(f"{what} {i} is on {device} but unary is on {unary.device}: the unary, lattices "
                                 "and pairwise matrices must be on one device")
