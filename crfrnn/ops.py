"""The lattice as dispatcher ops, with fake (meta) kernels and autograd.

Two sets of ops with the same signatures:

- ``crfrnn::build_lattice`` / ``crfrnn::lattice_filter`` and the feature gradient's
  ``crfrnn::lattice_filter_weights_backward`` / ``crfrnn::barycentric_weights_backward``: the
  compiled backends. The schema and the CPU (C++) and CUDA kernels come from the extension
  ``crfrnn._C`` (``csrc/ops.cpp``, ``TORCH_LIBRARY``); this file adds their fake kernels and
  autograd.
- the same names with ``_ref`` (``crfrnn::build_lattice_ref``, ...): the pure-PyTorch reference
  (``crfrnn.reference``), defined here, usable on any device.

``build_lattice(features[N, P, d]) -> (vertex_index, weights, neighbors, splat_offsets,
splat_entries)`` (see ``crfrnn.reference.build_lattice`` for the tensors) and
``lattice_filter(values, *lattice, reverse)`` is linear in
``values``; its gradient is the same filter with the blur order reversed (the adjoint), so
its backward is the op itself with ``reverse`` flipped.

Gradients with respect to the features go through the barycentric weights, with the simplices
(the integer tables) held fixed: the filter's backward gives the weights their gradient
(``lattice_filter_weights_backward``, a splat-blur-slice of the values and of the upstream
gradient, dotted with them at every simplex corner), and the build's backward maps it to the
features (``barycentric_weights_backward``, a per-point linear map). Both run only when the
features require grad.

And the fused mean-field ops of the extension (``csrc/cpu/mean_field_cpu.cpp``, and
``csrc/cuda/mean_field_cuda.cpp`` in a CUDA build): all iterations
of the CRF in one op each, on the unary, the lattices, their normalisation scales and the C x C
matrices. ``crfrnn::mean_field_forward`` saves what ``crfrnn::mean_field_backward`` needs;
``crfrnn::mean_field_inference`` saves nothing, and its autograd recomputes the forward in the
backward (gradient checkpointing). Both give the gradients of the unary and of the matrices,
none for the lattices' weights or the scales (they refuse inputs that require one).
"""
import warnings

import torch

from . import reference

try:
    from . import _C  # noqa: F401  (registers the crfrnn:: ops of the C++/CUDA extension)
    EXTENSION_ERROR = None
except ImportError as exc:  # missing or broken build: the reference backend still works
    EXTENSION_ERROR = exc
    warnings.warn(
        f"crfrnn: the compiled lattice extension could not be loaded ({exc}); falling back to "
        "the pure-PyTorch reference backend (correct, but slower). Rebuild with "
        "`pip install --no-build-isolation -e .` to get the C++/CUDA backends.",
        RuntimeWarning, stacklevel=2)


def _device_types_with_kernels(op_names) -> frozenset:
    """The device types ("cpu", "cuda") for which every extension op crfrnn::<name> has a kernel
    of its own (the ops' public OpOverload.has_kernel_for_dispatch_key); none without the
    extension."""
    if EXTENSION_ERROR is not None:
        return frozenset()
    return frozenset(
        device_type for device_type, key in (("cpu", torch.DispatchKey.CPU), ("cuda", torch.DispatchKey.CUDA))
        if all(getattr(torch.ops.crfrnn, name).default.has_kernel_for_dispatch_key(key) for name in op_names))


#: Device types with compiled kernels, fixed at import (a plain set, so torch.compile can read it).
NATIVE_DEVICE_TYPES = _device_types_with_kernels(("build_lattice", "lattice_filter"))


def has_native_kernel(device) -> bool:
    """True when the compiled extension has kernels for `device`'s type (cpu, cuda)."""
    return torch.device(device).type in NATIVE_DEVICE_TYPES


# ---------------------------------------------------------------------------------------------
# Reference ops (pure PyTorch).

@torch.library.custom_op("crfrnn::build_lattice_ref", mutates_args=())
def build_lattice_ref(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                      torch.Tensor, torch.Tensor]:
    return tuple(reference.build_lattice(features))


@torch.library.custom_op("crfrnn::lattice_filter_ref", mutates_args=())
def lattice_filter_ref(values: torch.Tensor, vertex_index: torch.Tensor, weights: torch.Tensor,
                       neighbors: torch.Tensor, splat_offsets: torch.Tensor,
                       splat_entries: torch.Tensor, reverse: bool) -> torch.Tensor:
    return reference.lattice_filter(values, vertex_index, weights, neighbors, splat_offsets, splat_entries,
                                    reverse=reverse)


@torch.library.custom_op("crfrnn::lattice_filter_weights_backward_ref", mutates_args=())
def lattice_filter_weights_backward_ref(values: torch.Tensor, grad: torch.Tensor,
                                        vertex_index: torch.Tensor, weights: torch.Tensor,
                                        neighbors: torch.Tensor, splat_offsets: torch.Tensor,
                                        splat_entries: torch.Tensor, reverse: bool) -> torch.Tensor:
    return reference.lattice_filter_weights_grad(values, grad, vertex_index, weights, neighbors, splat_offsets,
                                                 splat_entries, reverse)


@torch.library.custom_op("crfrnn::barycentric_weights_backward_ref", mutates_args=())
def barycentric_weights_backward_ref(features: torch.Tensor, grad_weights: torch.Tensor) -> torch.Tensor:
    return reference.barycentric_weights_grad(features, grad_weights)


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd, shared by both pairs.

def _build_fake(features):
    n, p, d = features.shape
    num_vertices = torch.library.get_ctx().new_dynamic_size()
    weight_dtype = torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
    return (features.new_empty((n * p, d + 1), dtype=torch.int32),
            features.new_empty((n * p, d + 1), dtype=weight_dtype),
            features.new_empty((d + 1, num_vertices, 2), dtype=torch.int32),
            features.new_empty((num_vertices + 1,), dtype=torch.int32),
            features.new_empty((n * p * (d + 1),), dtype=torch.int32))


def _filter_fake(values, vertex_index, weights, neighbors, splat_offsets, splat_entries, reverse):
    return torch.empty_like(values)


def _filter_weights_backward_fake(values, grad, vertex_index, weights, neighbors, splat_offsets,
                                  splat_entries, reverse):
    return torch.empty_like(weights)


def _weights_backward_fake(features, grad_weights):
    return torch.empty_like(features, dtype=grad_weights.dtype if features.dtype in
                            (torch.float16, torch.bfloat16) else features.dtype)


def _make_filter_backward(filter_op, weights_backward_op):
    def setup_context(ctx, inputs, output):
        values, vertex_index, weights, *tables, reverse = inputs
        # The values are kept only for the weights' gradient: with constant weights (features
        # without requires_grad) the backward costs one adjoint filter, as before.
        ctx.weights_need_grad = weights.requires_grad
        ctx.save_for_backward(values if weights.requires_grad else None, vertex_index, weights, *tables)
        ctx.reverse = reverse

    def backward(ctx, grad):
        values, *lattice = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = filter_op(grad, *lattice, not ctx.reverse) if ctx.needs_input_grad[0] else None
        grad_weights = None
        if ctx.weights_need_grad and ctx.needs_input_grad[2]:
            grad_weights = weights_backward_op(values, grad, *lattice, ctx.reverse)
        return (grad_values, None, grad_weights) + (None,) * 4

    return setup_context, backward


def _make_build_backward(weights_backward_op):
    def setup_context(ctx, inputs, output):
        (features,) = inputs
        ctx.save_for_backward(features if features.requires_grad else None)

    def backward(ctx, grad_vertex_index, grad_weights, *grad_tables):
        (features,) = ctx.saved_tensors
        if grad_weights is None or features is None:
            return None
        return weights_backward_op(features, grad_weights.contiguous())

    return setup_context, backward


def _register_fakes(build_name, filter_name, filter_weights_backward_name, weights_backward_name):
    for name, fake in ((build_name, _build_fake), (filter_name, _filter_fake),
                       (filter_weights_backward_name, _filter_weights_backward_fake),
                       (weights_backward_name, _weights_backward_fake)):
        torch.library.register_fake(name)(fake)


def _register_autograd(build_name, filter_name, filter_weights_backward_name, weights_backward_name):
    op = {name: getattr(torch.ops.crfrnn, name.split("::")[1]).default
          for name in (filter_name, filter_weights_backward_name, weights_backward_name)}
    setup_context, backward = _make_filter_backward(op[filter_name], op[filter_weights_backward_name])
    torch.library.register_autograd(filter_name, backward, setup_context=setup_context)
    setup_context, backward = _make_build_backward(op[weights_backward_name])
    torch.library.register_autograd(build_name, backward, setup_context=setup_context)


_REFERENCE_OPS = ("crfrnn::build_lattice_ref", "crfrnn::lattice_filter_ref",
                  "crfrnn::lattice_filter_weights_backward_ref", "crfrnn::barycentric_weights_backward_ref")
_register_fakes(*_REFERENCE_OPS)
_register_autograd(*_REFERENCE_OPS)
if EXTENSION_ERROR is None:
    _NATIVE_OPS = ("crfrnn::build_lattice", "crfrnn::lattice_filter", "crfrnn::lattice_filter_weights_backward",
                   "crfrnn::barycentric_weights_backward")
    _register_fakes(*_NATIVE_OPS)
    _register_autograd(*_NATIVE_OPS)

    @torch.library.register_fake("crfrnn::mean_field_inference")
    def _mean_field_fake(unary, vertex_index, weights, splat_scale, slice_scale, neighbors,
                         pairwise, iterations):
        return torch.empty_like(unary)

    @torch.library.register_fake("crfrnn::mean_field_forward")
    def _mean_field_forward_fake(unary, vertex_index, weights, splat_scale, slice_scale, neighbors,
                                 pairwise, iterations, save_marginals):
        n, p, c = unary.shape
        blurred = [unary.new_empty((iterations, nb.shape[1], c)) for nb in neighbors]
        marginals = unary.new_empty((iterations - 1, n, p, c) if save_marginals else (0,))
        return torch.empty_like(unary), blurred, marginals

    @torch.library.register_fake("crfrnn::mean_field_backward")
    def _mean_field_backward_fake(grad_logits, unary, vertex_index, weights, splat_scale, slice_scale,
                                  neighbors, pairwise, blurred, marginals, iterations):
        return torch.empty_like(unary), [m.new_empty(m.shape) for m in pairwise]


# ---------------------------------------------------------------------------------------------
# Autograd of the fused mean-field ops. Their arguments: unary, then per kernel lists of
# vertex_index, weights, splat_scale, slice_scale, neighbors and pairwise, then iterations.

_LATTICE_LISTS = ("vertex_index", "weights", "splat_scale", "slice_scale", "neighbors")


def _refuse_lattice_gradients(op_name, weights, splat_scale, slice_scale):
    """The fused ops differentiate the unary and the matrices only: a lattice weight or scale
    that requires grad (a learned bandwidth) would silently get none."""
    if any(t.requires_grad for group in (weights, splat_scale, slice_scale) for t in group):
        raise RuntimeError(
            f"{op_name} gives gradients for the unary and the pairwise matrices only, but a lattice "
            "weight or normalisation scale requires grad (learned bandwidths?): run the iterations "
            "step by step (crfrnn.mean_field(..., fused=False)), or detach them")


def _save_mean_field_inputs(ctx, unary, lattice, pairwise, iterations, extra=()):
    """Save the unary, the lattice lists, the matrices and `extra` tensors (flattened: the lists'
    lengths are the kernel count)."""
    ctx.num_kernels = len(pairwise)
    ctx.iterations = iterations
    ctx.save_for_backward(unary, *(t for group in lattice for t in group), *pairwise, *extra)


def _saved_mean_field_inputs(ctx):
    """(unary, lattice lists, pairwise, extra tensors) as saved by _save_mean_field_inputs."""
    unary, *rest = ctx.saved_tensors
    k = ctx.num_kernels
    lattice = [rest[i * k:(i + 1) * k] for i in range(len(_LATTICE_LISTS))]
    pairwise = rest[len(_LATTICE_LISTS) * k:(len(_LATTICE_LISTS) + 1) * k]
    return unary, lattice, list(pairwise), rest[(len(_LATTICE_LISTS) + 1) * k:]


def _mean_field_gradients(ctx, grad_unary, grad_pairwise):
    """The backward's return value, shaped as the op's inputs (a list for each list input): the
    unary's and the matrices' gradients where asked for, None elsewhere."""
    needs = ctx.needs_input_grad  # shaped as the inputs
    grads = [[None] * len(n) if isinstance(n, (list, tuple)) else None for n in needs]
    if needs[0]:
        grads[0] = grad_unary
    at = 1 + len(_LATTICE_LISTS)  # the pairwise matrices
    grads[at] = [g if need else None for g, need in zip(grad_pairwise, needs[at])]
    return tuple(grads)


if EXTENSION_ERROR is None:
    def _forward_setup_context(ctx, inputs, output):
        unary, *lattice, pairwise, iterations, _ = inputs
        _refuse_lattice_gradients("crfrnn::mean_field_forward", *lattice[1:4])
        _, blurred, marginals = output
        ctx.mark_non_differentiable(*blurred, marginals)
        # Autograd would otherwise hand the backward zero-filled gradients of the saved grids and
        # marginals (tens of MB to fill at 500x375, a tenth of a training step), never read.
        ctx.set_materialize_grads(False)
        _save_mean_field_inputs(ctx, unary, lattice, pairwise, iterations, extra=(*blurred, marginals))

    def _forward_backward(ctx, grad_logits, _grad_blurred, _grad_marginals):
        unary, lattice, pairwise, saved = _saved_mean_field_inputs(ctx)
        if grad_logits is None:  # not materialised (see above): no gradient reached the logits
            grad_logits = torch.zeros_like(unary)
        grad_unary, grad_pairwise = torch.ops.crfrnn.mean_field_backward(
            grad_logits, unary, *lattice, pairwise, list(saved[:-1]), saved[-1], ctx.iterations)
        return _mean_field_gradients(ctx, grad_unary, grad_pairwise)

    torch.library.register_autograd("crfrnn::mean_field_forward", _forward_backward,
                                    setup_context=_forward_setup_context)

    def _inference_setup_context(ctx, inputs, output):
        unary, *lattice, pairwise, iterations = inputs
        _refuse_lattice_gradients("crfrnn::mean_field_inference", *lattice[1:4])
        _save_mean_field_inputs(ctx, unary, lattice, pairwise, iterations)

    def _inference_backward(ctx, grad_logits):
        # Gradient checkpointing: the forward again, saving its blurred grids (the marginals are
        # recomputed from them in the backward op), then the backward.
        unary, lattice, pairwise, _ = _saved_mean_field_inputs(ctx)
        _, blurred, marginals = torch.ops.crfrnn.mean_field_forward(unary, *lattice, pairwise, ctx.iterations, False)
        grad_unary, grad_pairwise = torch.ops.crfrnn.mean_field_backward(
            grad_logits, unary, *lattice, pairwise, blurred, marginals, ctx.iterations)
        return _mean_field_gradients(ctx, grad_unary, grad_pairwise)

    torch.library.register_autograd("crfrnn::mean_field_inference", _inference_backward,
                                    setup_context=_inference_setup_context)


#: Device types with the fused mean-field ops (``crfrnn::mean_field_inference``,
#: ``mean_field_forward``, ``mean_field_backward``), fixed at import.
FUSED_MEAN_FIELD_DEVICE_TYPES = _device_types_with_kernels(
    ("mean_field_inference", "mean_field_forward", "mean_field_backward"))


def ops_for(backend: str, device: torch.device):
    """(build op, filter op) for a backend name ("auto", "reference", "native") and device."""
    if backend not in ("auto", "reference", "native"):
        raise ValueError(f"backend must be 'auto', 'reference' or 'native', got {backend!r}")
    native = has_native_kernel(device)
    if backend == "native" and not native:
        reason = (f"the extension failed to load ({EXTENSION_ERROR})" if EXTENSION_ERROR
                  else f"it was built without {torch.device(device).type} kernels")
        raise RuntimeError(f"backend='native' asked for on {device}, but {reason}")
    if backend == "reference" or not native:
        return torch.ops.crfrnn.build_lattice_ref.default, torch.ops.crfrnn.lattice_filter_ref.default
    return torch.ops.crfrnn.build_lattice.default, torch.ops.crfrnn.lattice_filter.default
