"""The lattice as dispatcher ops, with fake (meta) kernels and autograd.

Two pairs of ops with the same signatures:

- ``crfrnn::build_lattice`` / ``crfrnn::lattice_filter``: the compiled backends. The schema and
  the CPU (C++) and CUDA kernels come from the extension ``crfrnn._C``
  (``csrc/ops.cpp``, ``TORCH_LIBRARY``); this file adds their fake kernels and autograd.
- ``crfrnn::build_lattice_ref`` / ``crfrnn::lattice_filter_ref``: the pure-PyTorch reference
  (``crfrnn.reference``), defined here, usable on any device.

``build_lattice(features[N, P, d]) -> (vertex_index, weights, neighbors, splat_offsets,
splat_entries)`` (see ``crfrnn.reference.build_lattice`` for the tensors) and
``lattice_filter(values, *lattice, reverse)`` is linear in
``values``; its gradient is the same filter with the blur order reversed (the adjoint), so
its backward is the op itself with ``reverse`` flipped. The lattice tensors are integer
tables and weights computed from features: no gradient flows to them.
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


def _has_kernels(op_names, dispatch_key) -> bool:
    """Whether every op crfrnn::<name> has a kernel of its own for the dispatch key (e.g.
    torch.DispatchKey.CPU), through the ops' public OpOverload.has_kernel_for_dispatch_key."""
    return all(getattr(torch.ops.crfrnn, name).default.has_kernel_for_dispatch_key(dispatch_key)
               for name in op_names)


def _native_device_types():
    if EXTENSION_ERROR is not None:
        return frozenset()
    return frozenset(
        device_type for device_type, key in (("cpu", torch.DispatchKey.CPU), ("cuda", torch.DispatchKey.CUDA))
        if _has_kernels(("build_lattice", "lattice_filter"), key))


#: Device types with compiled kernels, fixed at import (a plain set, so torch.compile can read it).
NATIVE_DEVICE_TYPES = _native_device_types()


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


def _make_filter_backward(op):
    def setup_context(ctx, inputs, output):
        values, *lattice, reverse = inputs
        ctx.save_for_backward(*lattice)
        ctx.reverse = reverse

    def backward(ctx, grad):
        grad_values = op(grad.contiguous(), *ctx.saved_tensors, not ctx.reverse)
        return (grad_values,) + (None,) * 6

    return setup_context, backward


def _register(build_name, filter_name):
    torch.library.register_fake(build_name)(_build_fake)
    torch.library.register_fake(filter_name)(_filter_fake)
    filter_op = getattr(torch.ops.crfrnn, filter_name.split("::")[1]).default
    setup_context, backward = _make_filter_backward(filter_op)
    torch.library.register_autograd(filter_name, backward, setup_context=setup_context)


_register("crfrnn::build_lattice_ref", "crfrnn::lattice_filter_ref")
if EXTENSION_ERROR is None:
    _register("crfrnn::build_lattice", "crfrnn::lattice_filter")

    @torch.library.register_fake("crfrnn::mean_field_inference")
    def _mean_field_fake(unary, vertex_index, weights, splat_scale, slice_scale, neighbors,
                         pairwise, iterations):
        return torch.empty_like(unary)


def _fused_device_types():
    if EXTENSION_ERROR is None and _has_kernels(("mean_field_inference",), torch.DispatchKey.CPU):
        return frozenset({"cpu"})
    return frozenset()


#: Device types with the fused mean-field inference op (``crfrnn::mean_field_inference``, no
#: autograd): the C++ backend only; CUDA runs the iterations as separate ops.
FUSED_MEAN_FIELD_DEVICE_TYPES = _fused_device_types()


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
