"""crfrnn: fully connected CRFs as differentiable recurrent layers, on the permutohedral lattice.

Public API:
    Lattice, exact_gaussian_filter, bilateral_features, spatial_features, max_lattice_points
        (the lattice engine: crfrnn.lattice, crfrnn.features)
    mean_field, build_crf_lattices, potts_matrices, CRFRNN_PARAMS, DEEPLAB_LARGEFOV_PARAMS,
        DEFAULT_PRUNE (the functional mean field: crfrnn.inference)
    CRFRNNLayer (the trainable layer: crfrnn.layer), dense_crf (one-call post-processing:
        crfrnn.functional), GaussianKernel (a kernel over positions and/or a guide: crfrnn.kernels)
    crfrnn.pydensecrf (pydensecrf's API, for its scripts unchanged)
    COMPATIBILITY_SHARING, KERNEL_WEIGHT_SHARING (parameter sharing: crfrnn.sharing),
        MAX_ITERATIONS (crfrnn.checks)
"""
from .lattice import (FEATURE_GRADIENTS, MAX_FEATURE_DIM, NORMALIZATIONS, Lattice, exact_gaussian_filter,
                      max_lattice_points)
from .features import bilateral_features, spatial_features
from .ops import EXTENSION_ERROR, has_native_kernel
from .checks import MAX_ITERATIONS
from .sharing import COMPATIBILITY_SHARING, KERNEL_WEIGHT_SHARING
from .inference import (CRFRNN_PARAMS, DEEPLAB_LARGEFOV_PARAMS, DEFAULT_PRUNE, build_crf_lattices, mean_field,
                        potts_matrices)
from .kernels import GaussianKernel
from .layer import CRFRNNLayer
from .functional import dense_crf

__all__ = ["Lattice", "exact_gaussian_filter", "bilateral_features", "spatial_features", "max_lattice_points",
           "FEATURE_GRADIENTS", "MAX_FEATURE_DIM", "NORMALIZATIONS", "EXTENSION_ERROR", "has_native_kernel",
           "mean_field", "build_crf_lattices", "potts_matrices", "CRFRNN_PARAMS", "DEEPLAB_LARGEFOV_PARAMS",
           "DEFAULT_PRUNE", "CRFRNNLayer", "dense_crf", "GaussianKernel", "COMPATIBILITY_SHARING",
           "KERNEL_WEIGHT_SHARING", "MAX_ITERATIONS"]
__version__ = "0.1.0"
