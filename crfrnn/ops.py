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

Every op is differentiable to any order: a backward run under create_graph=True (gradient
penalties, Hessian-vector products) is itself differentiable. The filter's backward is the
filter and the weights' gradient ops have autograd of their own; the fused ops' backward then
runs the iterations step by step with the filter op (``mean_field_loop``) and differentiates
that, and ``mean_field_backward`` called directly differentiates the same way. Every op also
checks that its tensors are on one device (the fake kernels too: the dispatcher runs them as
soon as one tensor is on meta), naming the odd one out.
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


#: The most iterations the fused mean-field ops run (the same bound as csrc/mean_field_checks.h's
#: kMaxIterations and crfrnn.MAX_ITERATIONS): a count beyond it is a mistake (a damaged state
#: dict, an overflowed integer) that would allocate [iterations, M, C] per kernel or run for hours.
MAX_ITERATIONS = 1000


def check_devices(op, reference_name, reference, tensors, template="{name} on {device} but {ref} on {ref_device}"):
    """RuntimeError naming the first of `tensors` ((name, Tensor or list of Tensors), ...) that is
    not on `reference`'s device: the dispatcher runs an op's kernel for one device (the meta
    kernel, if any tensor is on meta), which would read the others as if they were on it. Every
    op of this module (reference ops, and the fake kernels of the compiled ones, whose C++
    kernels check the same) calls it; the messages are the C++ checks' (csrc/checks.h)."""
    device = reference.device
    for name, group in tensors:
        listed = isinstance(group, (list, tuple))
        for i, t in enumerate(group if listed else (group,)):
            if t.device != device:
                raise RuntimeError(f"{op}: " + template.format(
                    name=f"{name}[{i}]" if listed else name, device=t.device, ref=reference_name,
                    ref_device=device) + " (all tensors of a call must be on one device)")


def _check_filter_devices(op, values, vertex_index, weights, neighbors, splat_offsets, splat_entries, grad=None):
    named = [("vertex_index", vertex_index), ("weights", weights), ("neighbors", neighbors),
             ("splat_offsets", splat_offsets), ("splat_entries", splat_entries)]
    check_devices(op, "values", values, named, "lattice tensor on {device} but values on {ref_device} ({name})")
    if grad is not None:
        check_devices(op, "values", values, [("grad", grad)])


def _check_iterations(op, iterations):
    if not 1 <= iterations <= MAX_ITERATIONS:
        raise RuntimeError(f"{op}: iterations must be >= 1 and <= {MAX_ITERATIONS}, got {iterations}")


def _check_prune(op, prune):
    if not 0 <= prune <= 1:
        raise RuntimeError(f"{op}: prune must be in [0, 1] (a class sends while its Q reaches it somewhere in the "
                           f"image; 0: every class always), got {prune}")


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
    _check_filter_devices("crfrnn::lattice_filter_ref", values, vertex_index, weights, neighbors, splat_offsets,
                          splat_entries)
    return reference.lattice_filter(values, vertex_index, weights, neighbors, splat_offsets, splat_entries,
                                    reverse=reverse)


@torch.library.custom_op("crfrnn::lattice_filter_weights_backward_ref", mutates_args=())
def lattice_filter_weights_backward_ref(values: torch.Tensor, grad: torch.Tensor,
                                        vertex_index: torch.Tensor, weights: torch.Tensor,
                                        neighbors: torch.Tensor, splat_offsets: torch.Tensor,
                                        splat_entries: torch.Tensor, reverse: bool) -> torch.Tensor:
    _check_filter_devices("crfrnn::lattice_filter_weights_backward_ref", values, vertex_index, weights, neighbors,
                          splat_offsets, splat_entries, grad)
    return reference.lattice_filter_weights_grad(values, grad, vertex_index, weights, neighbors, splat_offsets,
                                                 splat_entries, reverse)


@torch.library.custom_op("crfrnn::barycentric_weights_backward_ref", mutates_args=())
def barycentric_weights_backward_ref(features: torch.Tensor, grad_weights: torch.Tensor) -> torch.Tensor:
    check_devices("crfrnn::barycentric_weights_backward_ref", "features", features, [("grad_weights", grad_weights)])
    return reference.barycentric_weights_grad(features, grad_weights)


# ---------------------------------------------------------------------------------------------
# Fake kernels and autograd, shared by both pairs. The fake kernels are also the ops' meta
# kernels, which the dispatcher runs as soon as one argument is on the meta device: they check
# that every tensor is on one device (a CPU tensor among meta ones would otherwise get an
# unwritten CPU result).

def _make_build_fake(name):
    def fake(features):
        n, p, d = features.shape
        num_vertices = torch.library.get_ctx().new_dynamic_size()
        weight_dtype = torch.float32 if features.dtype in (torch.float16, torch.bfloat16) else features.dtype
        return (features.new_empty((n * p, d + 1), dtype=torch.int32),
                features.new_empty((n * p, d + 1), dtype=weight_dtype),
                features.new_empty((d + 1, num_vertices, 2), dtype=torch.int32),
                features.new_empty((num_vertices + 1,), dtype=torch.int32),
                features.new_empty((n * p * (d + 1),), dtype=torch.int32))
    return fake


def _make_filter_fake(name):
    def fake(values, vertex_index, weights, neighbors, splat_offsets, splat_entries, reverse):
        _check_filter_devices(name, values, vertex_index, weights, neighbors, splat_offsets, splat_entries)
        return torch.empty_like(values)
    return fake


def _make_filter_weights_backward_fake(name):
    def fake(values, grad, vertex_index, weights, neighbors, splat_offsets, splat_entries, reverse):
        _check_filter_devices(name, values, vertex_index, weights, neighbors, splat_offsets, splat_entries, grad)
        return torch.empty_like(weights)
    return fake


def _make_weights_backward_fake(name):
    def fake(features, grad_weights):
        check_devices(name, "features", features, [("grad_weights", grad_weights)])
        return torch.empty_like(features, dtype=grad_weights.dtype if features.dtype in
                                (torch.float16, torch.bfloat16) else features.dtype)
    return fake


def _vjp_by_recomputation(fn, inputs, needs, grad_outputs):
    """The gradients of <grad_outputs, fn(*inputs)> for the `inputs` marked in `needs` (None for
    the others), by autograd through `fn` run again here: the backward of a backward op, and
    the backward of a fused op under create_graph=True. With grad mode on (create_graph) the
    result is itself differentiable, in `inputs` and in `grad_outputs`; else it is computed on
    detached copies and carries no graph. `fn` returns a list of tensors."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = [x if create_graph or not need else x.detach().requires_grad_() for x, need in zip(inputs, needs)]
        outputs = fn(*leaves)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
    wanted = [x for x, need in zip(leaves, needs) if need]
    if not pairs or not wanted:
        return [None] * len(inputs)
    outs, gouts = zip(*pairs)
    grads = iter(torch.autograd.grad(outs, wanted, gouts, create_graph=create_graph, allow_unused=True,
                                     materialize_grads=True))
    return [next(grads) if need else None for need in needs]


def _make_filter_backward(filter_op, weights_backward_op):
    def setup_context(ctx, inputs, output):
        values, vertex_index, weights, *tables, reverse = inputs
        # The values are kept only for the weights' gradient: with constant weights (features
        # without requires_grad) the backward costs one adjoint filter, as before.
        ctx.weights_need_grad = weights.requires_grad
        ctx.save_for_backward(values if weights.requires_grad else None, vertex_index, weights, *tables)
        ctx.reverse = reverse

    def backward(ctx, grad):
        # Both ops below have an autograd of their own: under create_graph=True this is
        # differentiable again (values, grad and weights: second derivatives in the features).
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


def _make_filter_weights_backward_backward():
    """Autograd of lattice_filter_weights_backward (the weights' gradient of the filter): by
    autograd through crfrnn.reference.lattice_filter_weights_grad, the same bilinear map in
    plain torch operations, for the values, the upstream gradient and the weights."""
    def setup_context(ctx, inputs, output):
        values, grad, vertex_index, weights, *tables, reverse = inputs
        ctx.save_for_backward(values, grad, vertex_index, weights, *tables)
        ctx.reverse = reverse

    def backward(ctx, grad_grad_weights):
        values, grad, vertex_index, weights, *tables = ctx.saved_tensors
        needs = ctx.needs_input_grad

        def fn(v, g, w):
            # (The tables were checked by the op's forward call.)
            return [reference.lattice_filter_weights_grad(v, g, vertex_index, w, *tables, ctx.reverse,
                                                          check_tables=False)]

        grad_values, grad_grad, grad_weights = _vjp_by_recomputation(
            fn, (values, grad, weights), (needs[0], needs[1], needs[3]), [grad_grad_weights])
        return grad_values, grad_grad, None, grad_weights, None, None, None, None

    return setup_context, backward


def _make_weights_backward_backward():
    """Autograd of barycentric_weights_backward: linear in grad_weights (its derivative there is
    the weights' own Jacobian, by autograd through crfrnn.reference.barycentric_weights_grad);
    its derivative in the features is zero, exactly: with the simplices held fixed the weights
    are linear in the features, so their Jacobian does not depend on them."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_grad_features):
        features, grad_weights = ctx.saved_tensors
        (grad_grad_weights,) = _vjp_by_recomputation(
            lambda g: [reference.barycentric_weights_grad(features.detach(), g)], (grad_weights,),
            (ctx.needs_input_grad[1],), [grad_grad_features])
        return None, grad_grad_weights  # None: the zero derivative in the features

    return setup_context, backward


def _register_fakes(build_name, filter_name, filter_weights_backward_name, weights_backward_name):
    for name, make in ((build_name, _make_build_fake), (filter_name, _make_filter_fake),
                       (filter_weights_backward_name, _make_filter_weights_backward_fake),
                       (weights_backward_name, _make_weights_backward_fake)):
        torch.library.register_fake(name)(make(name))


def _register_autograd(build_name, filter_name, filter_weights_backward_name, weights_backward_name):
    op = {name: getattr(torch.ops.crfrnn, name.split("::")[1]).default
          for name in (filter_name, filter_weights_backward_name, weights_backward_name)}
    setup_context, backward = _make_filter_backward(op[filter_name], op[filter_weights_backward_name])
    torch.library.register_autograd(filter_name, backward, setup_context=setup_context)
    setup_context, backward = _make_build_backward(op[weights_backward_name])
    torch.library.register_autograd(build_name, backward, setup_context=setup_context)
    # The backward ops are differentiable too (second derivatives in the features).
    setup_context, backward = _make_filter_weights_backward_backward()
    torch.library.register_autograd(filter_weights_backward_name, backward, setup_context=setup_context)
    setup_context, backward = _make_weights_backward_backward()
    torch.library.register_autograd(weights_backward_name, backward, setup_context=setup_context)


_REFERENCE_OPS = ("crfrnn::build_lattice_ref", "crfrnn::lattice_filter_ref",
                  "crfrnn::lattice_filter_weights_backward_ref", "crfrnn::barycentric_weights_backward_ref")
_register_fakes(*_REFERENCE_OPS)
_register_autograd(*_REFERENCE_OPS)


#: The per-kernel lattice lists of the fused mean-field ops' arguments, in order.
_LATTICE_LISTS = ("vertex_index", "weights", "splat_scale", "slice_scale", "neighbors")


def _check_mean_field_devices(op, unary, lattice, pairwise, extra=()):
    """check_devices for the fused ops' arguments: the unary, the per-kernel lists, `extra`."""
    named = [(name, group) for name, group in zip(_LATTICE_LISTS, lattice)] + [("pairwise", pairwise), *extra]
    check_devices(op, "the unary", unary, named)


if EXTENSION_ERROR is None:
    _NATIVE_OPS = ("crfrnn::build_lattice", "crfrnn::lattice_filter", "crfrnn::lattice_filter_weights_backward",
                   "crfrnn::barycentric_weights_backward")
    _register_fakes(*_NATIVE_OPS)
    _register_autograd(*_NATIVE_OPS)

    @torch.library.register_fake("crfrnn::mean_field_inference")
    def _mean_field_fake(unary, vertex_index, weights, splat_scale, slice_scale, neighbors,
                         pairwise, iterations, prune=0.0):
        op = "crfrnn::mean_field_inference"
        _check_mean_field_devices(op, unary, (vertex_index, weights, splat_scale, slice_scale, neighbors), pairwise)
        _check_iterations(op, iterations)
        _check_prune(op, prune)
        return torch.empty_like(unary)

    @torch.library.register_fake("crfrnn::mean_field_forward")
    def _mean_field_forward_fake(unary, vertex_index, weights, splat_scale, slice_scale, neighbors,
                                 pairwise, iterations, save_marginals, prune=0.0):
        op = "crfrnn::mean_field_forward"
        _check_mean_field_devices(op, unary, (vertex_index, weights, splat_scale, slice_scale, neighbors), pairwise)
        _check_iterations(op, iterations)
        _check_prune(op, prune)
        n, p, c = unary.shape
        blurred = [unary.new_empty((iterations, nb.shape[1], c)) for nb in neighbors]
        marginals = unary.new_empty((iterations - 1, n, p, c) if save_marginals and prune == 0 else (0,))
        senders = unary.new_empty((iterations, n, c) if prune > 0 else (0,), dtype=torch.uint8)
        return torch.empty_like(unary), blurred, marginals, senders

    @torch.library.register_fake("crfrnn::mean_field_backward")
    def _mean_field_backward_fake(grad_logits, unary, vertex_index, weights, splat_scale, slice_scale,
                                  neighbors, pairwise, blurred, marginals, iterations, senders=None):
        op = "crfrnn::mean_field_backward"
        extra = [("grad_logits", grad_logits), ("blurred", blurred), ("marginals", marginals)]
        if senders is not None:
            extra.append(("senders", senders))
        _check_mean_field_devices(op, unary, (vertex_index, weights, splat_scale, slice_scale, neighbors), pairwise,
                                  extra)
        _check_iterations(op, iterations)
        return torch.empty_like(unary), [m.new_empty(m.shape) for m in pairwise]


# ---------------------------------------------------------------------------------------------
# Autograd of the fused mean-field ops. Their arguments: unary, then per kernel lists of
# vertex_index, weights, splat_scale, slice_scale, neighbors and pairwise, then iterations.

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


def splat_tables(vertex_index, num_vertices):
    """(splat_offsets Tensor[M+1], splat_entries Tensor[N*P*(d+1)]), int32: the vertex ->
    (point, corner) table in CSR form of a lattice's vertex_index (Tensor[N*P, d+1]), as the
    builds make it (entries p*(d+1) + r of each vertex in increasing order)."""
    flat = vertex_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    vertices = torch.arange(num_vertices + 1, device=flat.device, dtype=flat.dtype)
    offsets = torch.searchsorted(flat[order], vertices, out_int32=True)
    return offsets, order.to(torch.int32)


def mean_field_loop(unary, vertex_index, weights, splat_scale, slice_scale, neighbors, pairwise, iterations,
                    senders=None):
    """What the fused ops compute (their arguments, in order), step by step with ops that autograd
    differentiates to any order: crfrnn::lattice_filter for K_m(Q) = slice_scale *
    filter(splat_scale * Q), matmuls for the C x C matrices. The fused ops' backward runs it
    under create_graph=True (and the backward op's own backward), so that second derivatives
    (gradient penalties, Hessian-vector products) are those of the iterations. senders: a pruned
    forward's (Tensor[T, N, C] uint8), held fixed: iteration t filters Q D_t, or None (all)."""
    n, p, c = unary.shape
    u = unary.reshape(n * p, c)
    tables = [(vi, w, nb, *splat_tables(vi, nb.shape[1])) for vi, w, nb in zip(vertex_index, weights, neighbors)]
    logits = u
    for t in range(iterations):
        q = torch.softmax(logits, dim=-1)
        if senders is not None and senders.numel() > 0:
            q = (q.reshape(n, p, c) * senders[t].to(q.dtype)[:, None, :]).reshape(n * p, c)
        logits = u
        for (vi, w, nb, offsets, entries), a, b, mat in zip(tables, splat_scale, slice_scale, pairwise):
            filtered = torch.ops.crfrnn.lattice_filter(
                (q * a[:, None]).contiguous(), vi, w, nb, offsets, entries, False)
            logits = logits - (filtered * b[:, None]) @ mat.t()
    return logits.reshape(n, p, c)


def _mean_field_vjp(grad_logits, unary, lattice, pairwise, iterations, needs_unary, needs_pairwise, senders=None):
    """(grad_unary, grad_pairwise) for `grad_logits`, by autograd through `mean_field_loop` (with
    a pruned forward's senders): differentiable again under grad mode (see
    _vjp_by_recomputation)."""
    grads = _vjp_by_recomputation(lambda u, *mats: [mean_field_loop(u, *lattice, list(mats), iterations, senders)],
                                  (unary, *pairwise), (needs_unary, *needs_pairwise), [grad_logits])
    return grads[0], grads[1:]


if EXTENSION_ERROR is None:
    def _pairwise_needs(ctx):
        return ctx.needs_input_grad[0], ctx.needs_input_grad[1 + len(_LATTICE_LISTS)]

    def _forward_setup_context(ctx, inputs, output):
        unary, *lattice, pairwise, iterations, _, _ = inputs
        _refuse_lattice_gradients("crfrnn::mean_field_forward", *lattice[1:4])
        _, blurred, marginals, senders = output
        ctx.mark_non_differentiable(*blurred, marginals, senders)
        # Autograd would otherwise hand the backward zero-filled gradients of the saved grids and
        # marginals (tens of MB to fill at 500x375, a tenth of a training step), never read.
        ctx.set_materialize_grads(False)
        _save_mean_field_inputs(ctx, unary, lattice, pairwise, iterations, extra=(*blurred, marginals, senders))

    def _forward_backward(ctx, grad_logits, _grad_blurred, _grad_marginals, _grad_senders):
        unary, lattice, pairwise, saved = _saved_mean_field_inputs(ctx)
        *blurred, marginals, senders = saved
        if grad_logits is None:  # not materialised (see above): no gradient reached the logits
            grad_logits = torch.zeros_like(unary)
        if torch.is_grad_enabled():  # create_graph=True: a backward that is differentiable again
            return _mean_field_gradients(ctx, *_mean_field_vjp(grad_logits, unary, lattice, pairwise, ctx.iterations,
                                                               *_pairwise_needs(ctx), senders))
        grad_unary, grad_pairwise = torch.ops.crfrnn.mean_field_backward(
            grad_logits, unary, *lattice, pairwise, blurred, marginals, ctx.iterations, senders)
        return _mean_field_gradients(ctx, grad_unary, grad_pairwise)

    torch.library.register_autograd("crfrnn::mean_field_forward", _forward_backward,
                                    setup_context=_forward_setup_context)

    def _inference_setup_context(ctx, inputs, output):
        unary, *lattice, pairwise, iterations, prune = inputs
        _refuse_lattice_gradients("crfrnn::mean_field_inference", *lattice[1:4])
        _save_mean_field_inputs(ctx, unary, lattice, pairwise, iterations)
        ctx.prune = prune

    def _inference_backward(ctx, grad_logits):
        unary, lattice, pairwise, _ = _saved_mean_field_inputs(ctx)
        if torch.is_grad_enabled():  # create_graph=True, as in _forward_backward
            senders = None
            if ctx.prune > 0:  # the senders the forward had (the same op code, the same decisions)
                with torch.no_grad():
                    senders = torch.ops.crfrnn.mean_field_forward(unary, *lattice, pairwise, ctx.iterations, False,
                                                                  ctx.prune)[3]
            return _mean_field_gradients(ctx, *_mean_field_vjp(grad_logits, unary, lattice, pairwise, ctx.iterations,
                                                               *_pairwise_needs(ctx), senders))
        # Gradient checkpointing: the forward again, saving its blurred grids (the marginals are
        # recomputed from them in the backward op) and senders, then the backward.
        _, blurred, marginals, senders = torch.ops.crfrnn.mean_field_forward(
            unary, *lattice, pairwise, ctx.iterations, False, ctx.prune)
        grad_unary, grad_pairwise = torch.ops.crfrnn.mean_field_backward(
            grad_logits, unary, *lattice, pairwise, blurred, marginals, ctx.iterations, senders)
        return _mean_field_gradients(ctx, grad_unary, grad_pairwise)

    torch.library.register_autograd("crfrnn::mean_field_inference", _inference_backward,
                                    setup_context=_inference_setup_context)

    def _backward_setup_context(ctx, inputs, output):
        grad_logits, unary, *lattice, pairwise, blurred, marginals, iterations, senders = inputs
        _refuse_lattice_gradients("crfrnn::mean_field_backward", *lattice[1:4])
        ctx.num_kernels, ctx.iterations = len(pairwise), iterations
        ctx.save_for_backward(grad_logits, unary, *(t for group in lattice for t in group), *pairwise,
                              torch.empty(0, dtype=torch.uint8) if senders is None else senders)

    def _backward_backward(ctx, grad_grad_unary, grad_grad_pairwise):
        # The backward op is the map (grad_logits, unary, pairwise) -> (grad_unary, grad_pairwise)
        # (the saved grids and marginals are functions of the unary and the matrices, not inputs
        # of their own): its derivatives by autograd through the loop's.
        grad_logits, *rest, senders = ctx.saved_tensors
        k = ctx.num_kernels
        unary, lattice = rest[0], [rest[1 + i * k:1 + (i + 1) * k] for i in range(len(_LATTICE_LISTS))]
        pairwise = list(rest[1 + len(_LATTICE_LISTS) * k:])
        needs = ctx.needs_input_grad
        needs_pairwise = needs[2 + len(_LATTICE_LISTS)]

        def fn(gl, u, *mats):
            # (Inputs that no gradient is asked for are constants here, but the op's outputs are
            # their gradients: differentiate in all of them.)
            u, *mats = (x if x.requires_grad else x.detach().requires_grad_() for x in (u, *mats))
            grad_unary, grad_pairwise = _mean_field_vjp(gl, u, lattice, mats, ctx.iterations, True, [True] * k, senders)
            return [grad_unary, *grad_pairwise]

        grads = _vjp_by_recomputation(fn, (grad_logits, unary, *pairwise), (needs[0], needs[1], *needs_pairwise),
                                      [grad_grad_unary, *grad_grad_pairwise])
        out = [[None] * len(n) if isinstance(n, (list, tuple)) else None for n in needs]
        out[0], out[1], out[2 + len(_LATTICE_LISTS)] = grads[0], grads[1], grads[2:]
        return tuple(out)

    torch.library.register_autograd("crfrnn::mean_field_backward", _backward_backward,
                                    setup_context=_backward_setup_context)


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
