"""How a CRFRNNLayer persists: the checks of a state dict loaded into it (its sharing and class
count, the iteration counts and normalisation it carries), and layers pickled by earlier versions.
"""
import math

import torch

from . import checks, sharing
from .bandwidths import FixedBandwidths
from .inference import DEFAULT_PRUNE
from .kernels import classic_kernels
from .lattice import NORMALIZATIONS

__all__ = ["state_dict_problem", "loaded_settings", "upgrade_pickled_state"]


def state_dict_problem(state_dict, prefix, matrix_parameters, num_classes):
    """Why a state dict cannot be loaded into a layer of these matrix parameters ((name, option,
    sharing, the option's choices) each) and class count: another sharing or class count, or
    damaged iteration counts or normalisation. Checked before anything is copied: a refused state
    dict leaves the layer as it was."""
    problem = sharing.mismatch(state_dict, prefix, matrix_parameters, num_classes)
    stored, norm = state_dict[prefix + "iterations"], state_dict[prefix + "normalization"]
    if not problem and isinstance(stored, torch.Tensor) and (stored.is_floating_point() or stored.is_complex()):
        problem = (f"{prefix}iterations holds {stored.dtype} values {stored.tolist()}: expected integer counts "
                   "(a damaged file?)")
    # (Of other shapes the load itself reports, copying neither.)
    if not problem and isinstance(stored, torch.Tensor) and isinstance(norm, torch.Tensor) and \
            stored.shape == (2,) and norm.shape == ():
        settings = loaded_settings(stored, norm, prefix)
        problem = settings if isinstance(settings, str) else None
    return problem


def loaded_settings(iterations, normalization, prefix):
    """((training, evaluation) iteration counts, normalisation name) of loaded buffers, or a
    message saying why they are not valid."""
    counts = [int(v) for v in iterations.tolist()]
    norm = int(normalization)
    if not all(0 <= n <= checks.MAX_ITERATIONS for n in counts) or not 0 <= norm < len(NORMALIZATIONS):
        return (f"{prefix}iterations {counts} / normalization {norm}: expected counts in "
                f"0..{checks.MAX_ITERATIONS} and an index into {NORMALIZATIONS}")
    return tuple(counts), NORMALIZATIONS[norm]


def upgrade_pickled_state(state):
    """A pickled layer's `__dict__` in today's form. Layers pickled before these settings existed
    get the defaults a layer built today has (fused, keeping the marginals, sender pruning only in
    eval mode, at DEFAULT_PRUNE); they had the (bilateral, spatial) pair, kept their fixed
    bandwidths' floats in `_fixed_sigmas` and their kept spatial lattice in `_last_spatial`."""
    state = {"fused": True, "keep_marginals": True, "prune": 0.0, "eval_prune": DEFAULT_PRUNE, "_kept": {}, **state}
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
