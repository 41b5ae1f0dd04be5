"""A drop-in for pydensecrf (Krähenbühl's dense CRF, lucasb-eyer/pydensecrf) on crfrnn.

Migrating a pydensecrf script is the import change and nothing else:

    import crfrnn.pydensecrf.densecrf as dcrf                  # was: import pydensecrf.densecrf as dcrf
    from crfrnn.pydensecrf.utils import unary_from_softmax     # was: from pydensecrf.utils import ...

`densecrf` has ``DenseCRF(nvar, nlabels)``, ``DenseCRF2D(w, h, nlabels)``, ``setUnaryEnergy``,
``setUnary`` (``ConstUnary``, ``LogisticUnary``), ``addPairwiseEnergy``, ``addPairwiseGaussian``,
``addPairwiseBilateral``, ``inference``, ``startInference``/``stepInference``, ``klDivergence``
and the KernelType and NormalizationType constants; `utils` has ``unary_from_labels``,
``unary_from_softmax``, ``create_pairwise_gaussian``, ``create_pairwise_bilateral`` and the
deprecated ``compute_unary``/``softmax_to_unary``. Argument names, defaults, shapes, sign
conventions, normalisations, dtype rules and error messages are pydensecrf's.

What is faster: `inference` runs all its iterations in one fused C++ op, multi-threaded over
torch's intra-op thread pool (``torch.set_num_threads`` sets how many threads), where pydensecrf
runs one thread; the lattices are built once per CRF (at the first inference) and reused.

The GPU: give the unary or the features as torch tensors on a CUDA device, or construct with
``device="cuda"`` (``DenseCRF2D(w, h, n, device="cuda")``); lattices and mean field then run
there, and the returned marginals stay there (``Q.tensor``) until ``np.array(Q)`` copies them.

What differs: the results are pydensecrf's up to float rounding (the same permutohedral lattice,
1 / (1 + 2^-d) factor included, and the same iterations; marginals agree within about 2e-5,
labels on every pixel measured), with one exception: a point that lies exactly on a simplex
boundary in real arithmetic (grid features where a position / bandwidth is a whole number, with a
coordinate at 0) can land in another simplex, because crfrnn's lattice embeds the features in
float64 and densecrf in float32; the lattices then differ by a few vertices and the marginals
near those points by up to about 1e-2 (labels still agree; tests/test_pydensecrf.py, TIE_SEED).
Beyond that, only errors: where pydensecrf crashes or silently misreads
(a compat vector or matrix of the wrong size, a normalisation or kernel type outside the enums,
nvar < 1, a Q of another CRF's shape, None for stepInference's scratch matrices) this raises a
ValueError/TypeError; read-only arrays are accepted (pydensecrf refuses them); `MatrixXf` is a
small class of ours with ``__array__`` (no buffer protocol: ``memoryview(Q)`` does not work,
``np.asarray(Q)`` does). Lattices are built at the first inference, so bad feature values
(NaN, beyond the lattice's range) are reported there rather than in addPairwise*.
"""
from . import densecrf, utils

__all__ = ["densecrf", "utils"]
