"""Gaussian filtering in feature space through the permutohedral lattice.

    lat = Lattice(features)            # build once: the expensive, feature-only half
    out = lat.filter(values)           # filter many times; differentiable w.r.t. values

The filter computes, approximately, out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j over all points j of
the same image (the point itself included), in O(P d^2) instead of O(P^2).
"""
import contextlib
import warnings

import torch

from . import ops, reference

__all__ = ["Lattice", "MAX_FEATURE_DIM", "NORMALIZATIONS", "FEATURE_GRADIENTS", "max_lattice_points",
           "exact_gaussian_filter"]

#: Largest feature dimension d the lattice accepts (the C++/CUDA code keeps per-point scratch
#: arrays of this size on the stack).
MAX_FEATURE_DIM = reference.MAX_FEATURE_DIM
#: Kernel normalisations (densecrf's NormalizationType): "none" K v, "after" K v / K1,
#: "symmetric" n K(n v) with n = 1 / sqrt(K1), "before" K(v / K1). (Appended in this order: the
#: CRF layer stores a normalisation as its index here.)
NORMALIZATIONS = ("none", "after", "symmetric", "before")
#: How `filter` outputs are differentiated with respect to the features, see `Lattice`.
FEATURE_GRADIENTS = ("lattice", "gaussian")
#: Keys are int32 lattice coordinates of magnitude up to about 100 |f|: the build ops reject
#: features beyond this bound (and NaN/Inf) with a ValueError instead of overflowing.
MAX_ABS_FEATURE = reference.MAX_ABS_FEATURE
max_lattice_points = reference.max_lattice_points
check_lattice_size = reference.check_lattice_size


def _normal_tensors():
    """A context in which new tensors are normal tensors, even under torch.inference_mode().

    A lattice outlives the call that made it (CRFRNNLayer keeps its spatial lattice between
    calls, and `_cached` keeps per-dtype constants): an inference tensor in it would make a later
    autograd call fail ("Inference tensors cannot be saved for backward"). Under inference mode
    its tensors never carry a graph (features cannot require grad there), so they are the same
    whatever the grad mode they were made in. (Under torch.compile nothing outlives the graph, and
    dynamo cannot trace the mode query.)
    """
    if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    return torch.inference_mode(False)


def _check_float(name, tensor):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {tensor.layout}: "
                        "convert it with .to_dense() first")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16/32/64), got {tensor.dtype}")


def compute_dtype(dtype):
    """The dtype the lattice computes values of `dtype` in: float32 and float64 as they are,
    float16 and bfloat16 in float32 (the blur's weights multiply values by up to 2^(d+1))."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def cast_result(out, dtype, what):
    """`out` (computed in float32 for a half-precision input) in the input's `dtype`, with a
    RuntimeWarning when finite values overflow that dtype (float16 ends at 65504: they come back
    as inf; compute in float32 to keep them). `what` names the computation in the warning. (One
    device sync, only for half precision; none under torch.compile.)"""
    if out.dtype == dtype:
        return out
    result = out.to(dtype)
    if dtype in (torch.float16, torch.bfloat16) and not torch.compiler.is_compiling():
        overflow = int((torch.isinf(result) & torch.isfinite(out)).sum())
        if overflow:
            warnings.warn(f"{what}: {overflow} values of the {out.dtype} result overflow {dtype} (largest "
                          f"|value| {float(out.abs().max()):g}, {dtype} ends at {torch.finfo(dtype).max:g}) and "
                          f"are inf in the result: pass {out.dtype} inputs to keep them",
                          RuntimeWarning, stacklevel=3)
    return result


class Lattice:
    """A permutohedral lattice built from a batch of feature maps or point sets.

    Args:
        features (Tensor[N, d, H, W] or Tensor[N, P, d]): per-pixel or per-point features,
            already divided by their bandwidths (a unit distance is one standard deviation).
            When they require grad (and grad mode is on), `filter` outputs are differentiable
            with respect to them, see below; otherwise they are constants and cost nothing extra.
        backend (str): "auto" (compiled kernels for the features' device when built, else the
            reference), "reference" (pure PyTorch) or "native" (compiled, error if missing).
        feature_grad (str): how outputs are differentiated with respect to features that
            require grad: "lattice" (default) or "gaussian", see below.

    The batch is one lattice whose keys include the image index, so images never mix.
    Attributes (plain tensors, see ``crfrnn.reference.build_lattice``): ``vertex_index``
    (Tensor[N*P, d+1] int32), ``weights`` (Tensor[N*P, d+1]), ``neighbors`` (Tensor[d+1, M, 2]
    int32, M = missing), ``splat_offsets`` (Tensor[M+1]) and ``splat_entries``
    (Tensor[N*P*(d+1)]): the vertex -> points table that makes the splat a deterministic gather.
    The filter ops check these tables before reading them (a corrupted one raises, see README).
    A lattice pickles, and its tensors are normal tensors even when built under
    ``torch.inference_mode()``, so it can serve later autograd calls.

    Gradients with respect to the features (both kinds compose through autograd with the
    normalisations "after" and "symmetric", whose normaliser K 1 depends on the features too):

    - "lattice": the gradient of the filter the lattice computes, through the barycentric
      weights of the splat and the slice, with every point's simplex held fixed (the integer
      tables are piecewise constant in the features). Exact for the approximation, but it
      follows the approximation's piecewise-linear interpolation: per point a noisy estimate of
      the Gaussian's gradient, and summed into a colour bandwidth's derivative on real images it
      can have the wrong sign (bench/bandwidth_gradient.py). Costs a splat and blur of the
      values and of the upstream gradient per filter backward (about two filters).
    - "gaussian": the derivative of the Gaussian kernel, d k_ij / d f_i = -k_ij (f_i - f_j),
      evaluated with the lattice's filter K: for out = K v and upstream gradient g,
      grad f_i = -g_i . (f_i (K v)_i - K(f v)_i) - v_i . (f_i (K^T g)_i - K^T(f g)_i), with K^T
      the reversed-blur filter. It is not the derivative of the approximation but the true
      kernel's derivative formula with the approximate kernel in it: smooth in the features, and
      the bandwidth derivatives it gives agree in sign with the exact Gaussian's where the
      "lattice" gradient's do not (bench/bandwidth_gradient.py). Costs 2d + 1 filters of the
      values' width more per backward (d = feature dimension). A bandwidth's derivative is a
      sum over the points of terms that largely cancel: in float32 it keeps only 2-3 digits
      (measured up to 0.6% off the float64 one, on either backend, which differ by as much);
      compute in float64 where that matters.

    Both kinds are differentiable again (create_graph=True: gradient penalties, Hessian-vector
    products): "lattice" gives the approximation's second derivatives (the backward ops have an
    autograd of their own; the weights' Jacobian in the features is constant per simplex),
    "gaussian" differentiates its formula with the same formula for every filter in it: the
    exact Gaussian's second derivatives, evaluated with the lattice.

    Features that do not require grad (or built under ``torch.no_grad()``) cost nothing extra
    either way. A lattice built from features that require grad belongs to their autograd graph,
    like any tensor computed from them: one backward per build (or ``retain_graph=True``).

    Example:
        >>> f = torch.rand(2, 5, 40, 30) * 4
        >>> lat = Lattice(f)
        >>> out = lat.filter(torch.rand(2, 21, 40, 30), normalize="symmetric")
    """

    def __init__(self, features: torch.Tensor, backend: str = "auto", feature_grad: str = "lattice"):
        _check_float("features", features)
        if feature_grad not in FEATURE_GRADIENTS:
            raise ValueError(f"feature_grad must be one of {FEATURE_GRADIENTS}, got {feature_grad!r}")
        if features.dim() == 4:
            n, d, h, w = features.shape
            self.per_pixel, self.spatial = True, (h, w)
            points = features.flatten(2).transpose(1, 2)
        elif features.dim() == 3:
            n, _, d = features.shape
            self.per_pixel, self.spatial = False, (features.shape[1],)
            points = features
        else:
            raise ValueError("features must be Tensor[N, d, H, W] (per pixel) or Tensor[N, P, d] "
                             f"(per point), got shape {tuple(features.shape)}")
        if not 1 <= d <= MAX_FEATURE_DIM:
            raise ValueError(f"feature dimension d must be in 1..{MAX_FEATURE_DIM}, got {d} "
                             f"(features of shape {tuple(features.shape)})")
        if features.device.type == "meta":
            raise ValueError("features are on the meta device: a lattice's size (its vertex count) "
                             "depends on the feature values, which meta tensors do not have")
        check_lattice_size(n * points.shape[1], d)
        self.batch_size, self.feature_dim = n, d
        #: whether filter outputs carry gradients to the features
        self.differentiable = features.requires_grad and torch.is_grad_enabled()
        self.feature_grad = feature_grad
        # "gaussian": the filter's own autograd node gets the features (flat [N*P, d]); the
        # lattice is built from constants.
        self._gaussian_points = None
        if self.differentiable and feature_grad == "gaussian":
            self._gaussian_points = points.reshape(-1, d)
        if not self.differentiable or feature_grad == "gaussian":
            points = points.detach()
        self.num_points = points.shape[1]
        self.device, self.dtype = features.device, features.dtype
        build, self._filter_op = ops.ops_for(backend, features.device)
        self.backend = "reference" if build is torch.ops.crfrnn.build_lattice_ref.default else "native"
        with _normal_tensors():
            (self.vertex_index, self.weights, self.neighbors, self.splat_offsets,
             self.splat_entries) = build(points.contiguous())
        self._cache = {}

    def __getstate__(self):
        # The filter op is a handle into the dispatcher, which pickle cannot store; it is looked
        # up again from the backend name and the device on unpickling.
        state = self.__dict__.copy()
        del state["_filter_op"]
        return state

    def __setstate__(self, state):
        # (Lattices pickled before feature gradients existed were constants.)
        self.__dict__.update({"differentiable": False, "feature_grad": "lattice", "_gaussian_points": None})
        self.__dict__.update(state)
        self._filter_op = ops.ops_for(self.backend, self.device)[1]

    @property
    def num_vertices(self) -> int:
        """Number of lattice vertices M (all images together)."""
        return self.neighbors.shape[1]

    def __repr__(self):
        return (f"Lattice(batch={self.batch_size}, points={self.num_points}, d={self.feature_dim}, "
                f"vertices={self.num_vertices}, backend={self.backend!r}, device={self.device})")

    def _to_points(self, values):
        """Tensor[N, C, H, W] or Tensor[N, P, C] -> (Tensor[N*P, C] contiguous, channels)."""
        _check_float("values", values)
        n = self.batch_size
        if self.per_pixel:
            expected = "Tensor[N, C, H, W] with (N, H, W) = " + str((n, *self.spatial))
            ok = values.dim() == 4 and values.shape[0] == n and tuple(values.shape[2:]) == self.spatial
            if ok:
                c = values.shape[1]
                return values.permute(0, 2, 3, 1).reshape(n * self.num_points, c).contiguous(), c
        else:
            expected = f"Tensor[N, P, C] with (N, P) = {(n, self.num_points)}"
            ok = values.dim() == 3 and tuple(values.shape[:2]) == (n, self.num_points)
            if ok:
                c = values.shape[2]
                return values.reshape(n * self.num_points, c).contiguous(), c
        raise ValueError(f"values must be {expected} to match the lattice's features, "
                         f"got shape {tuple(values.shape)}")

    def _from_points(self, flat, c):
        n = self.batch_size
        if self.per_pixel:
            return flat.reshape(n, *self.spatial, c).permute(0, 3, 1, 2)
        return flat.reshape(n, self.num_points, c)

    def _raw(self, flat, scale=None):
        """Raw filter of Tensor[N*P, C] (float32/64): K v, or with `scale` n (Tensor[N*P])
        n * K(n * v), computed as the raw filter with every barycentric weight w_i scaled by n_i
        (the splat weights of the points j become w_j n_j, the slice weights w_i n_i)."""
        weights = self.weights_as(flat.dtype) if scale is None else self._cached(("scaled", flat.dtype))
        tables = (self.vertex_index, weights, self.neighbors, self.splat_offsets, self.splat_entries)
        if self._gaussian_points is not None:
            # The weights stay constants: the gradients of the features and of n are the
            # Function's own (n's needs no weight gradient, see _GaussianFeatureGradient).
            return _GaussianFeatureGradient.apply(flat, self._gaussian_points, scale, self.batch_size,
                                                  self._filter_op, False, tables[0], weights.detach(), *tables[2:])
        return self._filter_op(flat, *tables, False)

    def weights_as(self, dtype):
        """The barycentric weights (Tensor[N*P, d+1]) in `dtype`, cast once and kept."""
        return self.weights if self.weights.dtype == dtype else self._cached(("weights", dtype))

    def _cached(self, key):
        """Per-dtype constants of the lattice, computed once:
        ("weights" | "norm" | "scaled", dtype)."""
        if key not in self._cache:
            kind, dtype = key
            with _normal_tensors():
                if kind == "weights":
                    value = self.weights.to(dtype)
                elif kind == "norm":  # the filter's response to all-ones, Tensor[N*P, 1]
                    ones = torch.ones(self.batch_size * self.num_points, 1, device=self.device, dtype=dtype)
                    value = self._raw(ones)
                else:  # "scaled": barycentric weights times n = 1/sqrt(K 1), see `_raw`
                    n = self.normalization_scales("symmetric", dtype)[0]
                    value = (self.weights_as(dtype) * n[:, None]).contiguous()
            self._cache[key] = value
        return self._cache[key]

    def prepare(self, normalize: str, dtype: torch.dtype):
        """Compute now the per-dtype constants that ``filter(values, normalize)`` uses for values
        of `dtype` (the weights in that dtype, the response to ones, the normalisation's scales
        and scaled weights), which are otherwise computed on first use and kept. `mean_field`
        calls it before checkpointed iterations: a constant first computed inside a
        checkpointed region (of a lattice differentiable in its features: the constant then has
        a graph) would be saved by that region's forward but not by its recomputation
        (torch.utils.checkpoint's CheckpointError), and later iterations would hang on it."""
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        dtype = compute_dtype(dtype)
        self.weights_as(dtype)
        if normalize != "none":
            self.normalization_scales(normalize, dtype)
        if normalize == "symmetric":
            self._cached(("scaled", dtype))

    def normalization_scales(self, normalize: str, dtype: torch.dtype):
        """(splat scale, slice scale), Tensor[N*P] each: `filter(values, normalize)` is the raw
        filter of ``splat_scale * values`` times ``slice_scale``: "none" (1, 1), "after"
        (1, 1 / K1), "symmetric" (n, n) with n = 1/sqrt(K1), "before" (1 / K1, 1). For fused kernels
        (``crfrnn::mean_field_inference``); dtype float32 or float64."""
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        key = ("scales", normalize, dtype)
        if key not in self._cache:
            with _normal_tensors():
                if normalize == "none":
                    ones = torch.ones(self.batch_size * self.num_points, device=self.device, dtype=dtype)
                    self._cache[key] = (ones, ones)
                else:
                    norm = self._cached(("norm", dtype)).flatten() + 1e-20
                    if normalize == "after":
                        self._cache[key] = (torch.ones_like(norm), 1.0 / norm)
                    elif normalize == "before":
                        self._cache[key] = (1.0 / norm, torch.ones_like(norm))
                    else:
                        n = torch.rsqrt(norm)
                        self._cache[key] = (n, n)
        return self._cache[key]

    def filter(self, values: torch.Tensor, normalize: str = "none") -> torch.Tensor:
        """Gaussian-filter `values` over the lattice.

        Args:
            values (Tensor[N, C, H, W] for per-pixel features, Tensor[N, P, C] for per-point):
                any C >= 1, float16/bfloat16/32/64 (half is computed in float32 and cast
                back, with a RuntimeWarning for values that overflow it).
            normalize (str): "none": the raw linear filter K v. "before": K(v / K 1) (densecrf's
                NORMALIZE_BEFORE, the adjoint of "after"). "after": K v / K 1 (a weighted
                mean; densecrf's NORMALIZE_AFTER). "symmetric": n * K(n * v) with n = 1/sqrt(K 1)
                (densecrf's NORMALIZE_SYMMETRIC, pydensecrf's default).
        Returns:
            Tensor of the same shape and dtype as `values`.
        """
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        _check_float("values", values)
        if values.device != self.device:
            raise ValueError(f"values are on {values.device} but the lattice is on {self.device}")
        flat, c = self._to_points(values)
        if flat.numel() == 0:
            return values.clone()
        out_dtype = values.dtype
        flat = flat.to(compute_dtype(flat.dtype))  # half precision: accumulate in float32
        if normalize == "none":
            out = self._raw(flat)
        elif normalize == "after":
            out = self._raw(flat) / (self._cached(("norm", flat.dtype)) + 1e-20)
        elif normalize == "before":
            out = self._raw(flat / (self._cached(("norm", flat.dtype)) + 1e-20))
        else:
            # n K(n v), as the raw filter with scaled weights: two fewer full-size
            # multiplications per call, and the backward stays the adjoint.
            out = self._raw(flat, self.normalization_scales("symmetric", flat.dtype)[0])
        return self._from_points(cast_result(out, out_dtype, "Lattice.filter"), c)


class _GaussianFeatureGradient(torch.autograd.Function):
    """The raw lattice filter out = K v (Tensor[N*P, C]; its adjoint K^T v if `reverse`), or
    n * K(n * v) with a per-point scale n (Tensor[N*P], the symmetric normalisation; `weights`
    are then the barycentric weights times n), differentiated for the features (Tensor[N*P, d])
    by the Gaussian kernel's derivative formula evaluated with this filter (see `Lattice`), for
    the values by the adjoint filter, and for n by the product rule: d<g, n K(n v)>/dn_i =
    g_i . K(n v)_i + v_i . K^T(n g)_i = (g_i . out_i + v_i . grad_values_i) / n_i, products of
    rows at hand that need neither a filter nor the weights' gradient.

    Under create_graph=True the backward is differentiable again, to any order: its filters are
    this Function too (differentiated for the features by the same formula), and the features
    enter the formula as they are: second derivatives are the exact Gaussian's second
    derivatives, evaluated with the lattice (exactly those with an exact filter)."""

    @staticmethod
    def forward(ctx, values, points, scale, num_images, filter_op, reverse, vertex_index, weights, *tables):
        out = filter_op(values, vertex_index, weights, *tables, reverse)
        ctx.save_for_backward(values, points, scale, out, vertex_index, weights, *tables)
        ctx.filter_op, ctx.num_images, ctx.reverse = filter_op, num_images, reverse
        return out

    @staticmethod
    def backward(ctx, grad):
        values, points, scale, out, *lattice = ctx.saved_tensors
        grad = grad.contiguous()
        if torch.is_grad_enabled():  # create_graph=True: filters differentiable in the features too
            def filter_fn(x, reverse):
                return _GaussianFeatureGradient.apply(x, points, scale, ctx.num_images, ctx.filter_op,
                                                      reverse != ctx.reverse, *lattice)
        else:
            def filter_fn(x, reverse):
                return ctx.filter_op(x, *lattice, reverse != ctx.reverse)
        grad_values = filter_fn(grad, True)  # the adjoint on g: also a term of the formula
        grad_scale = grad_points = None
        if ctx.needs_input_grad[2]:
            grad_scale = ((grad * out).sum(1) + (values * grad_values).sum(1)) / scale
        if ctx.needs_input_grad[1]:
            grad_points = _gaussian_feature_grad(values, grad, out, grad_values, points, ctx.num_images, filter_fn)
        return (grad_values if ctx.needs_input_grad[0] else None, grad_points, grad_scale,
                *([None] * (len(lattice) + 3)))


def _gaussian_feature_grad(values, grad, out, grad_values, points, num_images, filter_fn):
    """grad f_i = -g_i . (f_i (K v)_i - K(f v)_i) - v_i . (f_i (K^T g)_i - K^T(f g)_i), all
    Tensor[N*P, .]; out = K v, grad_values = K^T g, filter_fn(x, reverse) the raw filter (K, or
    K^T if `reverse`).

    The formula is invariant to a translation of each image's features (exactly, with any linear
    K), so they are centred per image first: that keeps the products f v small and their float
    rounding with them. For the same reason the gradient sums to zero over each image; the
    float residue of that sum is removed too (it would otherwise multiply the mean feature in a
    bandwidth's derivative, sum_i f_i . grad f_i). Differentiable in every argument (the
    features included) when grad mode is on."""
    c, d = values.shape[1], points.shape[1]
    dtype = values.dtype
    per_image = (points if torch.is_grad_enabled() else points.detach()).to(torch.float64).reshape(num_images, -1, d)
    f = (per_image - per_image.mean(1, keepdim=True)).reshape(-1, d).to(dtype)
    f_values = (f[:, :, None] * values[:, None, :]).reshape(-1, d * c)
    f_grad = (f[:, :, None] * grad[:, None, :]).reshape(-1, d * c)
    k_f_values = filter_fn(f_values.contiguous(), False).reshape(-1, d, c)
    kt_f_grad = filter_fn(f_grad.contiguous(), True).reshape(-1, d, c)
    grad_f = -(f * (grad * out).sum(1, keepdim=True) - (grad[:, None, :] * k_f_values).sum(2)
               + f * (values * grad_values).sum(1, keepdim=True) - (values[:, None, :] * kt_f_grad).sum(2))
    grad_f = grad_f.reshape(num_images, -1, d)
    grad_f = grad_f - grad_f.mean(1, keepdim=True)
    return grad_f.reshape(-1, d).to(points.dtype)


def exact_gaussian_filter(features: torch.Tensor, values: torch.Tensor, normalize: str = "none"):
    """Exact O(P^2) Gaussian filter: out_i = sum_j exp(-|f_i - f_j|^2 / 2) v_j (j = i included).

    For tests and benchmarks on small inputs only. Same shapes and `normalize` modes as
    `Lattice.filter`; computed in float64.
    """
    _check_float("features", features)
    _check_float("values", values)
    if values.device != features.device:
        raise ValueError(f"values are on {values.device} but features are on {features.device}")
    per_pixel = features.dim() == 4
    if per_pixel:
        ok = values.dim() == 4 and values.shape[0] == features.shape[0] and values.shape[2:] == features.shape[2:]
        expected = f"features [N, d, H, W] = {tuple(features.shape)} and values [N, C, H, W] of the same N, H, W"
    else:
        ok = features.dim() == 3 and values.dim() == 3 and values.shape[:2] == features.shape[:2]
        expected = "features [N, P, d] and values [N, P, C] of the same N and P (or per pixel: [N, d, H, W])"
    if not ok:
        raise ValueError(f"exact_gaussian_filter takes {expected}, got features {tuple(features.shape)} and values "
                         f"{tuple(values.shape)}")
    f = features.flatten(2).transpose(1, 2) if per_pixel else features
    v = values.flatten(2).transpose(1, 2) if per_pixel else values
    f, v = f.double(), v.double()
    kernel = torch.exp(-0.5 * torch.cdist(f, f).square())  # [N, P, P]
    out = kernel @ v
    if normalize == "after":
        out = out / kernel.sum(2, keepdim=True)
    elif normalize == "before":
        out = kernel @ (v / kernel.sum(2, keepdim=True))
    elif normalize == "symmetric":
        n = kernel.sum(2, keepdim=True).rsqrt()
        out = n * (kernel @ (n * v))
    elif normalize != "none":
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    out = out.to(values.dtype)
    return out.transpose(1, 2).reshape(values.shape) if per_pixel else out
