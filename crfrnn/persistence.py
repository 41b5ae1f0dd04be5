"""How a CRFRNNLayer persists: loading a state dict into it (checked against its sharing and class
count, carrying the bandwidths, iteration counts and normalisation), and reading layers pickled by
earlier versions.
"""
import math

import torch

from . import checks, sharing
from .bandwidths import FixedBandwidths
from .kernels import classic_kernels
from .lattice import NORMALIZATIONS

__all__ = ["load_state_dict", "upgrade_pickled_state"]


def load_state_dict(layer, state_dict, prefix, error_msgs, load):
    """The body of `layer._load_from_state_dict`; `load()` runs nn.Module's own load of the
    entries. A state dict of another sharing or class count, or with damaged counts, appends a
    message to `error_msgs` instead (load_state_dict raises it); fixed bandwidths that the state
    dict changes are taken into the layer's floats, the same ones keep their exact floats."""
    # Checkpoints written before the bandwidths, iterations and normalisation were in the state
    # dict: the layer keeps its own (the ones it was built with from the checkpoint's config).
    for name in (*(f"{k.name}_log_sigma" for k in layer.kernels), "iterations", "normalization"):
        state_dict.setdefault(prefix + name, getattr(layer, name).detach().clone())
    problem = sharing.mismatch(state_dict, prefix, layer._matrix_parameters(), layer.num_classes)
    stored = state_dict[prefix + "iterations"]
    if not problem and isinstance(stored, torch.Tensor) and (stored.is_floating_point() or stored.is_complex()):
        problem = (f"{prefix}iterations holds {stored.dtype} values {stored.tolist()}: expected integer "
                   "counts (a damaged file?)")
    if problem:
        error_msgs.append(problem)
        return
    if layer.learn_bandwidths:
        load()
    else:  # other bandwidths than this layer's: take the state dict's
        layer._bandwidths.load(layer._bandwidth_buffers(), load)
    counts = [int(v) for v in layer.iterations.tolist()]
    norm = int(layer.normalization)
    if not all(0 <= n <= checks.MAX_ITERATIONS for n in counts) or not 0 <= norm < len(NORMALIZATIONS):
        error_msgs.append(f"{prefix}iterations {counts} / normalization {norm}: expected counts in "
                          f"0..{checks.MAX_ITERATIONS} and an index into {NORMALIZATIONS}")
        return
    layer._iterations = tuple(counts)
    layer._normalize = NORMALIZATIONS[norm]
    layer.clear_lattice_cache()


def upgrade_pickled_state(state):
    """A pickled layer's `__dict__` in today's form. Layers pickled before these settings existed
    ran fused, recomputing the marginals, had the (bilateral, spatial) pair, kept their fixed
    bandwidths' floats in `_fixed_sigmas` and their kept spatial lattice in `_last_spatial`."""
    state = {"fused": True, "keep_marginals": True, "_kept": {}, **state}
    if "kernels" not in state:
        logs = [state["_buffers"].get(name, state["_parameters"].get(name))
                for name in ("bilateral_log_sigma", "spatial_log_sigma")]
        sigmas = state.get("_fixed_sigmas", [[math.exp(v) for v in log.double().tolist()] for log in logs])
        weights = state.pop("_initial_weights")
        state["kernels"] = tuple(classic_kernels((*sigmas[0], weights[0]), (*sigmas[1], weights[1])))
    if "_bandwidths" not in state:
        state["_bandwidths"] = FixedBandwidths(state.pop("_fixed_sigmas", [k.sigmas for k in state["kernels"]]))
    for old in ("_bandwidths_seen", "_last_spatial"):
        state.pop(old, None)
    return state
