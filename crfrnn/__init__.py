"""crfrnn: fully connected CRFs as differentiable recurrent layers, on the permutohedral lattice.

Public API:
    Lattice, exact_gaussian_filter, bilateral_features, spatial_features, max_lattice_points
        (the lattice engine)
    CRFRNNLayer, mean_field, dense_crf  (the mean-field CRF layer and one-call post-processing)
"""
from .lattice import (FEATURE_GRADIENTS, MAX_FEATURE_DIM, NORMALIZATIONS, Lattice, bilateral_features,
                      exact_gaussian_filter, max_lattice_points, spatial_features)
from .ops import EXTENSION_ERROR, has_native_kernel
from .crf import (COMPATIBILITY_SHARING, CRFRNN_PARAMS, DEEPLAB_LARGEFOV_PARAMS, KERNEL_WEIGHT_SHARING,
                  MAX_ITERATIONS, CRFRNNLayer, build_crf_lattices, mean_field, potts_matrices)
from .functional import dense_crf

__version__ = "0.1.0"
