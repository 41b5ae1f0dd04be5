"""crfrnn: fully connected CRFs as differentiable recurrent layers, on the permutohedral lattice.

Public API:
    Lattice, exact_gaussian_filter, bilateral_features, spatial_features  (the lattice engine)
"""
from .lattice import (MAX_FEATURE_DIM, NORMALIZATIONS, Lattice, bilateral_features,
                      exact_gaussian_filter, spatial_features)
from .ops import EXTENSION_ERROR, has_native_kernel

__version__ = "0.1.0"
