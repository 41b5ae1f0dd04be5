"""pydensecrf's ``pydensecrf.densecrf`` on crfrnn's permutohedral lattice and fused mean field.

    import crfrnn.pydensecrf.densecrf as dcrf

    d = dcrf.DenseCRF2D(w, h, nlabels)                 # or dcrf.DenseCRF(nvar, nlabels)
    d.setUnaryEnergy(U)                                # U: float32 [nlabels, nvar], -log P
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=img, compat=10)   # img: uint8 [h, w, 3]
    Q = d.inference(5)                                 # np.array(Q): float32 [nlabels, nvar]

The model is Krähenbühl's: E(x) = sum_i U_i(x_i) + sum_m sum_{i<j} mu_m(x_i, x_j) k_m(f_i, f_j), and
mean field from Q = softmax(-U), each iteration Q = softmax(-U - sum_m mu_m K_m Q), with K_m the
Gaussian kernel on the features f_m as densecrf's permutohedral lattice approximates it (crfrnn's
lattice computes the same filter, its 1 / (1 + 2^-d) factor included) under the kernel's
normalisation. `compat` gives mu_m in densecrf's sign convention: a number w is the Potts model
(mu = -w on equal labels: a positive w rewards equal labels), a vector v is diag(v) and a matrix M
is (M + M^T) / 2 (both penalties: positive entries push labels apart).

Arguments, defaults, shapes, dtype rules and errors are pydensecrf's: unary, features and
compat arrays must be float32 and C-contiguous (else ValueError "Buffer dtype mismatch, ..." or
"ndarray is not C-contiguous"), rgbim uint8 [h, w, 3] (bool read as 0/1, as pydensecrf reads it).
Where pydensecrf crashes or silently reads out of bounds (a compat vector of the wrong length, an
unknown normalisation, zero bandwidths, NaN features), this module raises a ValueError that says
why. Two limits of crfrnn's lattice that pydensecrf's has not: features of more than
crfrnn.MAX_FEATURE_DIM (31) dimensions, and features beyond about 1e6 in magnitude (unscaled
positions of a huge grid), are a ValueError. The kernel types (CONST_KERNEL, DIAG_KERNEL,
FULL_KERNEL) only choose which kernel parameters densecrf's learning would adapt; inference
ignores them, here as in densecrf, which takes any integer (or real, truncated) for them. An
empty CRF (nvar = 0, or w or h = 0) gives an empty (nlabels, 0) result.

Speed: all `inference` iterations run in one fused C++ op, multi-threaded over torch's intra-op
thread pool (``torch.set_num_threads``), where pydensecrf runs one thread. The lattices are built
once, at the first inference (not in addPairwise*), and reused by every later call.

GPU: give the unary (``setUnaryEnergy``) or the features (``addPairwiseEnergy``, ``rgbim``) as
torch tensors on a CUDA device, or construct with ``device="cuda"``: the lattices and the mean
field then run there (fused CUDA kernels when crfrnn is built with them), numpy inputs are copied
there, and the returned `MatrixXf` keeps its values there (``Q.tensor``) until ``np.array(Q)``
copies them to the host. Tensors follow the arrays' rules (float32; rgbim uint8) except that
any strides are accepted.
"""
import enum
import numbers
import operator

import numpy as np
import torch

from ..checks import MAX_ITERATIONS
from ..inference import mean_field
from ..lattice import MAX_FEATURE_DIM, Lattice

__all__ = ["DenseCRF", "DenseCRF2D", "MatrixXf", "Unary", "ConstUnary", "LogisticUnary", "NormalizationType",
           "KernelType", "NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC",
           "CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL"]


class NormalizationType(enum.IntEnum):
    """densecrf's kernel normalisations (pydensecrf's values): K the raw lattice filter, K1 its
    response to ones. NO_NORMALIZATION: K Q; NORMALIZE_BEFORE: K(Q / K1); NORMALIZE_AFTER:
    K Q / K1; NORMALIZE_SYMMETRIC (the default): K(Q / sqrt(K1)) / sqrt(K1)."""
    NO_NORMALIZATION = 0
    NORMALIZE_BEFORE = 1
    NORMALIZE_AFTER = 2
    NORMALIZE_SYMMETRIC = 3


class KernelType(enum.IntEnum):
    """densecrf's kernel parametrisations for learning (pydensecrf's values); inference is the
    same for all three."""
    CONST_KERNEL = 0
    DIAG_KERNEL = 1
    FULL_KERNEL = 2


NO_NORMALIZATION = NormalizationType.NO_NORMALIZATION
NORMALIZE_BEFORE = NormalizationType.NORMALIZE_BEFORE
NORMALIZE_AFTER = NormalizationType.NORMALIZE_AFTER
NORMALIZE_SYMMETRIC = NormalizationType.NORMALIZE_SYMMETRIC
CONST_KERNEL = KernelType.CONST_KERNEL
DIAG_KERNEL = KernelType.DIAG_KERNEL
FULL_KERNEL = KernelType.FULL_KERNEL

#: densecrf's normalisation -> crfrnn.Lattice.filter's name for the same filter.
_NORMALIZE = {NO_NORMALIZATION: "none", NORMALIZE_BEFORE: "before", NORMALIZE_AFTER: "after",
              NORMALIZE_SYMMETRIC: "symmetric"}

#: numpy's buffer characters -> the C type names Cython's "Buffer dtype mismatch" message uses.
_C_NAMES = {"?": "bool", "b": "signed char", "B": "unsigned char", "h": "short", "H": "unsigned short",
            "i": "int", "I": "unsigned int", "l": "long", "L": "unsigned long", "q": "long long",
            "Q": "unsigned long long", "f": "float", "d": "double", "g": "long double"}


# --- argument conversion, with pydensecrf's (Cython's) rules and messages --------------------------

def _c_int(value, name):
    """A C int argument as Cython converts one: any real number (truncated), else TypeError."""
    if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real):
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"an integer is required ({name}, got {type(value).__name__})") from None
    value = int(value)
    if not -2 ** 31 <= value < 2 ** 31:
        raise OverflowError(f"value too large to convert to int ({name} = {value})")
    return value


def _c_float(value):
    """A C float argument as Cython converts one: any real number, rounded to float32."""
    if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real):
        raise TypeError(f"must be real number, not {type(value).__name__}")
    return np.float32(value)


def _enum(value, kind, name):
    """A KernelType/NormalizationType argument: an int (or the enum) naming one of its members."""
    try:
        index = operator.index(value)
    except TypeError:
        raise TypeError(f"an integer is required ({name}: one of {[m.name for m in kind]}, got "
                        f"{type(value).__name__})") from None
    try:
        return kind(index)
    except ValueError:
        raise ValueError(f"{name} must be one of {[f'{m.name} ({m.value})' for m in kind]}, got {value!r}") from None


def _dtype_mismatch(expected, got):
    return ValueError(f"Buffer dtype mismatch, expected '{expected}' but got '{got}'")


def _buffer(name, value, ndim, dtype=np.float32, expected="float"):
    """`value` as pydensecrf's ``float[:, ::1]`` (or ``unsigned char[:, :, ::1]``) argument reads
    it: a buffer of `ndim` dimensions, of `dtype`, C-contiguous; else pydensecrf's error.
    Returns a torch tensor (numpy inputs copied: later changes to the array do not reach the CRF;
    tensors are cloned on their device). Read-only arrays are accepted (pydensecrf refuses them)."""
    if value is None:
        raise TypeError(f"Argument '{name}' must not be None")
    if isinstance(value, torch.Tensor):
        if value.dim() != ndim:
            raise ValueError(f"Buffer has wrong number of dimensions (expected {ndim}, got {value.dim()}) "
                             f"for {name}")
        if value.dtype != torch.from_numpy(np.empty(0, dtype)).dtype:
            raise _dtype_mismatch(expected, value.dtype)
        return value.detach().clone()
    array = value if isinstance(value, np.ndarray) else np.asarray(memoryview(value))
    if array.ndim != ndim:
        raise ValueError(f"Buffer has wrong number of dimensions (expected {ndim}, got {array.ndim})")
    if array.dtype != dtype:
        if array.dtype.char in _C_NAMES:
            raise _dtype_mismatch(expected, _C_NAMES[array.dtype.char])
        raise ValueError(f"Does not understand character buffer dtype format string ('{array.dtype.char}')")
    if not array.flags.c_contiguous:
        raise ValueError("ndarray is not C-contiguous")
    return torch.from_numpy(array.copy())


def _compatibility(compat, nlabels):
    """densecrf's label compatibility as the C x C matrix A (float32) with which one iteration
    subtracts A (K Q) from the logits: a number w (Potts) -> -w I, a vector v -> diag(v), a
    matrix M -> (M + M^T) / 2."""
    if isinstance(compat, numbers.Number):
        return torch.eye(nlabels) * -float(np.float32(compat))
    if isinstance(compat, torch.Tensor):
        ndim = compat.dim()
    else:
        ndim = memoryview(compat).ndim  # TypeError for lists and other non-buffers, as pydensecrf
    if ndim not in (1, 2):
        raise ValueError("LabelCompatibility of dimension >2 not meaningful.")
    values = _buffer("compat", compat, ndim).cpu()
    if ndim == 1:
        if values.shape[0] != nlabels:
            raise ValueError(f"a compat vector needs one entry per label ({nlabels}), got {values.shape[0]}")
        return torch.diag(values)
    if tuple(values.shape) != (nlabels, nlabels):
        raise ValueError(f"a compat matrix must be nlabels x nlabels = {(nlabels, nlabels)}, got "
                         f"{tuple(values.shape)}")
    return (values + values.t()) * 0.5


def _iterations(niter):
    return _c_int(niter, "niter")


# --- the marginals object ------------------------------------------------------------------------

class MatrixXf:
    """A float32 (nlabels, nvar) matrix of marginals, as pydensecrf's ``eigen.MatrixXf``:
    ``np.array(Q)``, ``np.asarray(Q)`` and numpy functions (``np.argmax(Q, axis=0)``) read it.
    ``stepInference`` updates it in place (an ``np.asarray`` view of a CPU one sees the update,
    as with pydensecrf). Beyond pydensecrf: ``Q.tensor`` is the torch tensor (on the CRF's
    device; a view, not a copy), ``Q.shape`` its shape."""

    __slots__ = ("_tensor",)

    def __init__(self, tensor=None):
        self._tensor = torch.empty(0, 0) if tensor is None else tensor

    @property
    def tensor(self):
        """Tensor[nlabels, nvar] float32, on the device the CRF ran on."""
        return self._tensor

    @property
    def shape(self):
        return tuple(self._tensor.shape)

    def __array__(self, dtype=None, copy=None):
        t = self._tensor.detach()
        on_host = t.device.type == "cpu"
        if copy is False and (not on_host or (dtype is not None and np.dtype(dtype) != np.float32)):
            raise ValueError(f"MatrixXf on {t.device} as {dtype}: a copy is needed")
        array = t.cpu().numpy() if not on_host else t.numpy()
        if dtype is not None and np.dtype(dtype) != array.dtype:
            return array.astype(dtype)
        return array.copy(order="A") if copy and on_host else array

    def __repr__(self):
        return f"MatrixXf(shape={self.shape}, device={self._tensor.device})"


def _matrix_arg(name, value):
    if not isinstance(value, MatrixXf):
        raise TypeError(f"Argument '{name}' has incorrect type (expected {__name__}.MatrixXf, got "
                        f"{type(value).__module__}.{type(value).__qualname__})")
    return value


# --- unaries given as objects (pydensecrf's setUnary) --------------------------------------------

class Unary:
    """Base of the unary energies `DenseCRF.setUnary` takes."""

    def _energy(self):  # Tensor[nlabels, nvar] float32
        raise NotImplementedError


class ConstUnary(Unary):
    """A fixed unary energy u, float32 [nlabels, nvar] (-log P)."""

    def __init__(self, u):
        self._u = _buffer("u", u, 2)

    def _energy(self):
        return self._u


class LogisticUnary(Unary):
    """The unary energy L @ f: L float32 [nlabels, k], f float32 [k, nvar]."""

    def __init__(self, L, f):
        self._L, self._f = _buffer("L", L, 2), _buffer("f", f, 2)
        if self._L.shape[1] != self._f.shape[0]:
            raise ValueError(f"LogisticUnary needs L [nlabels, k] and f [k, nvar], got {tuple(self._L.shape)} "
                             f"and {tuple(self._f.shape)}")

    def _energy(self):
        f = self._f.to(self._L.device)
        return self._L @ f


# --- the CRFs ------------------------------------------------------------------------------------

class DenseCRF:
    """A fully connected CRF over `nvar` variables with `nlabels` labels (pydensecrf's
    ``DenseCRF``): set a unary, add pairwise Gaussian kernels on any features, run inference.

    Args:
        nvar (int): number of variables (pixels, voxels, points).
        nlabels (int): number of labels.
        device (str or torch.device, optional): where to build the lattices and run mean field;
            by default the device of the tensors given (unary, features), else the CPU.
    """

    def __init__(self, nvar, nlabels, *, device=None):
        self._nvar, self._nlabel = _c_int(nvar, "nvar"), _c_int(nlabels, "nlabels")
        if self._nvar < 0 or self._nlabel < 1:
            raise ValueError(f"DenseCRF needs nvar >= 0 and nlabels >= 1, got nvar={self._nvar}, "
                             f"nlabels={self._nlabel}")
        self._device = None if device is None else torch.device(device)
        self._unary = None      # Tensor[nlabels, nvar] float32: the energy E (-log P)
        self._pairwise = []     # (features Tensor[nvar, d] float32, A Tensor[C, C] float32, normalize)
        self._lattices = {}     # device -> [Lattice], built at the first inference there

    def __repr__(self):
        return (f"{type(self).__name__}(nvar={self._nvar}, nlabels={self._nlabel}, "
                f"kernels={len(self._pairwise)}, device={self._run_device()})")

    # setup

    def addPairwiseEnergy(self, features, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """Add a Gaussian kernel exp(-|f_i - f_j|^2 / 2) on `features` with label compatibility
        `compat`.

        Args:
            features (float32 [d, nvar], C-contiguous; or a Tensor): already divided by their
                bandwidths (see ``utils.create_pairwise_gaussian``/``create_pairwise_bilateral``);
                d in 1..crfrnn.MAX_FEATURE_DIM.
            compat (number, float32 [nlabels] or [nlabels, nlabels]): Potts weight (rewards equal
                labels), per-label penalty diag(v), or a penalty matrix (symmetrised).
            kernel (KernelType): accepted for compatibility; no effect on inference.
            normalization (NormalizationType): default NORMALIZE_SYMMETRIC.
        """
        feats = _buffer("features", features, 2)
        if feats.shape[1] != self._nvar:
            raise ValueError(f"Bad shape for pairwise energy (Need (?, {self._nvar}), got "
                             f"{(feats.shape[0], feats.shape[1])})")
        self._add(feats.t().contiguous(), compat, kernel, normalization)

    def _add(self, points, compat, kernel, normalization):
        """points: Tensor[nvar, d] float32 (owned)."""
        _c_int(kernel, "kernel")  # (any int: inference ignores it, as densecrf's does)
        normalization = _enum(_c_int(normalization, "normalization"), NormalizationType, "normalization")
        matrix = _compatibility(compat, self._nlabel)
        if not 1 <= points.shape[1] <= MAX_FEATURE_DIM:
            raise ValueError(f"features must have 1..{MAX_FEATURE_DIM} dimensions (rows), got {points.shape[1]}")
        self._pairwise.append((points, matrix, _NORMALIZE[normalization]))
        self._lattices = {}

    def setUnaryEnergy(self, u, f=None):
        """Set the unary energy u: float32 [nlabels, nvar] (C-contiguous; or a Tensor), the
        negative log-probability of each label at each variable (``utils.unary_from_softmax``).
        With `f` (float32 [nvar, nvar]) the energy is u @ f (densecrf's LogisticUnaryEnergy)."""
        u = _buffer("u", u, 2)
        if tuple(u.shape) != (self._nlabel, self._nvar):
            raise ValueError(f"Bad shape for unary energy (Need {(self._nlabel, self._nvar)}, got "
                             f"{(u.shape[0], u.shape[1])})")
        self._set_unary(LogisticUnary(u, f)._energy() if f is not None else u)

    def setUnary(self, u):
        """Set the unary from a `ConstUnary` or `LogisticUnary` object."""
        if not isinstance(u, Unary):
            raise TypeError(f"Argument 'u' has incorrect type (expected {__name__}.Unary, got "
                            f"{type(u).__name__})")
        self._set_unary(u._energy())

    def _set_unary(self, energy):
        if tuple(energy.shape) != (self._nlabel, self._nvar):
            raise ValueError(f"Bad shape for unary energy (Need {(self._nlabel, self._nvar)}, got "
                             f"{tuple(energy.shape)})")
        self._unary = energy

    # inference

    def _run_device(self):
        """The explicit device, else the non-CPU device of the tensors given, else the CPU."""
        if self._device is not None:
            return self._device
        devices = {t.device for t in [self._unary] + [p[0] for p in self._pairwise]
                   if t is not None and t.device.type != "cpu"}
        if len(devices) > 1:
            raise ValueError(f"the unary and features are on several devices {sorted(map(str, devices))}: "
                             "put them on one, or construct the CRF with device=")
        return devices.pop() if devices else torch.device("cpu")

    def _kernels(self, device):
        """(lattices, C x C matrices, normalisations) on `device`; lattices built once."""
        if device not in self._lattices:
            self._lattices[device] = [Lattice(points.to(device)[None]) for points, _, _ in self._pairwise]
        mats = [m.to(device) for _, m, _ in self._pairwise]
        return self._lattices[device], mats, [n for _, _, n in self._pairwise]

    def _energy(self, device):
        if self._unary is None:
            return torch.zeros(self._nlabel, self._nvar, device=device)
        return self._unary.to(device)

    def _logits(self, q, energy, device):
        """One iteration's logits -E - sum_m A_m K_m(Q), Tensor[nvar, nlabels], from marginals q
        Tensor[nvar, nlabels]."""
        logits = -energy.t()
        lattices, mats, norms = self._kernels(device)
        for lat, mat, norm in zip(lattices, mats, norms):
            msg = lat.filter(q[None], normalize=norm)[0]
            logits = torch.addmm(logits, msg, mat.t(), alpha=-1)
        return logits

    def inference(self, niter):
        """Run `niter` mean-field iterations from Q = softmax(-unary).

        Returns:
            MatrixXf: the marginals, float32 (nlabels, nvar): ``np.array(Q)``, and
            ``np.argmax(Q, axis=0)`` gives the labels.
        """
        niter = _iterations(niter)
        device = self._run_device()
        with torch.no_grad():
            energy = self._energy(device)
            if niter <= 0 or not self._pairwise:
                q = torch.softmax(-energy, dim=0)
            elif niter <= MAX_ITERATIONS:
                lattices, mats, norms = self._kernels(device)
                logits = mean_field((-energy).t()[None], lattices, mats, niter, norms)
                q = torch.softmax(logits[0].t(), dim=0)  # (the op's output is [C, P] in memory)
            else:  # beyond what the fused op runs: step by step
                q = torch.softmax(-energy.t(), dim=-1)
                for _ in range(niter):
                    q = torch.softmax(self._logits(q.contiguous(), energy, device), dim=-1)
                q = q.t()
        return MatrixXf(q)

    def startInference(self):
        """(Q, tmp1, tmp2): Q = softmax(-unary) (zeros without a unary, as densecrf), and two
        scratch matrices for `stepInference` (empty, as pydensecrf's)."""
        device = self._run_device()
        with torch.no_grad():
            if self._unary is None:
                q = torch.zeros(self._nvar, self._nlabel, device=device)
            else:
                q = torch.softmax(-self._energy(device).t(), dim=-1)
        return MatrixXf(q.t()), MatrixXf(), MatrixXf()

    def _checked_marginals(self, Q):
        if Q.shape != (self._nlabel, self._nvar):
            raise ValueError(f"Q must be (nlabels, nvar) = {(self._nlabel, self._nvar)}, got {Q.shape}")
        return Q.tensor

    def stepInference(self, Q, tmp1, tmp2):
        """One mean-field iteration on Q (from `startInference`), in place."""
        _matrix_arg("Q", Q), _matrix_arg("tmp1", tmp1), _matrix_arg("tmp2", tmp2)
        target = self._checked_marginals(Q)
        device = self._run_device()
        with torch.no_grad():
            q = target.to(device).t().contiguous()
            new = torch.softmax(self._logits(q, self._energy(device), device), dim=-1)
            target.copy_(new.t())

    def klDivergence(self, Q, /):
        """densecrf's KL-divergence of the marginals Q (up to the log-partition constant):
        sum Q log Q + sum unary Q + sum_m sum Q (A_m K_m Q), with pairwise terms as in
        densecrf (every ordered pair counted)."""
        _matrix_arg("Q", Q)
        target = self._checked_marginals(Q)
        device = self._run_device()
        with torch.no_grad():
            q = target.to(device).t().contiguous()
            q64 = q.double()
            kl = (q64 * torch.log(q64.clamp(min=1e-20))).sum()
            if self._unary is not None:
                kl = kl + (self._energy(device).t().double() * q64).sum()
            lattices, mats, norms = self._kernels(device) if self._pairwise else ([], [], [])
            for lat, mat, norm in zip(lattices, mats, norms):
                applied = lat.filter(q[None], normalize=norm)[0] @ mat.t()
                kl = kl + (q64 * applied.double()).sum()
        return float(kl)


class DenseCRF2D(DenseCRF):
    """A dense CRF on a w x h image grid (pydensecrf's ``DenseCRF2D``): variable j * w + i is the
    pixel in row j, column i (the row-major order of an [h, w] array).

    Args:
        w (int): image width; h (int): image height; nlabels (int): number of labels.
        device: as for `DenseCRF`.
    """

    def __init__(self, w, h, nlabels, *, device=None):
        w, h = _c_int(w, "w"), _c_int(h, "h")
        if w < 0 or h < 0:
            raise ValueError(f"DenseCRF2D needs w >= 0 and h >= 0, got w={w}, h={h}")
        super().__init__(w * h, nlabels, device=device)
        self._w, self._h = w, h

    def _positions(self, sxy, device):
        """Tensor[h * w, 2] float32: (x / sx, y / sy), x the column, y the row, in float32
        arithmetic as densecrf computes them."""
        sxy = (sxy, sxy) if isinstance(sxy, numbers.Number) else sxy
        sx, sy = (torch.tensor(_c_float(s), device=device) for s in (sxy[0], sxy[1]))
        xs = torch.arange(self._w, dtype=torch.float32, device=device) / sx
        ys = torch.arange(self._h, dtype=torch.float32, device=device) / sy
        return torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1).reshape(-1, 2)

    def addPairwiseGaussian(self, sxy, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """Add the smoothness kernel on the features (x / sx, y / sy).

        Args:
            sxy (number or (sx, sy)): spatial bandwidth in pixels.
            compat, kernel, normalization: as for `addPairwiseEnergy`.
        """
        device = self._device or torch.device("cpu")
        self._add(self._positions(sxy, device), compat, kernel, normalization)

    def addPairwiseBilateral(self, sxy, srgb, rgbim, compat, kernel=DIAG_KERNEL, normalization=NORMALIZE_SYMMETRIC):
        """Add the appearance kernel on the features (x / sx, y / sy, r / sr, g / sg, b / sb).

        Args:
            sxy (number or (sx, sy)): spatial bandwidth in pixels.
            srgb (number or (sr, sg, sb)): colour bandwidth in 0..255 units.
            rgbim (uint8 [h, w, 3], C-contiguous; or a uint8 Tensor [h, w, 3]): the image.
            compat, kernel, normalization: as for `addPairwiseEnergy`.
        """
        sxy = (sxy, sxy) if isinstance(sxy, numbers.Number) else sxy
        srgb = (srgb, srgb, srgb) if isinstance(srgb, numbers.Number) else srgb
        sxy, srgb = (sxy[0], sxy[1]), [_c_float(s) for s in (srgb[0], srgb[1], srgb[2])]  # IndexError if short
        if isinstance(rgbim, np.ndarray) and rgbim.dtype == np.bool_:
            rgbim = rgbim.view(np.uint8)  # (0/1, as pydensecrf's buffer reads a bool image)
        elif isinstance(rgbim, torch.Tensor) and rgbim.dtype == torch.bool:
            rgbim = rgbim.to(torch.uint8)
        image = _buffer("rgbim", rgbim, 3, np.uint8, "unsigned char")
        if image.shape[0] != self._h or image.shape[1] != self._w:
            raise ValueError(f"Bad shape for pairwise bilateral (Need {(self._h, self._w, 3)}, got "
                             f"{tuple(image.shape)})")
        if image.shape[2] != 3:
            raise ValueError("addPairwiseBilateral only works for RGB images. For other types, use "
                             "`utils.create_pairwise_bilateral` to construct your own pairwise energy and "
                             "add it through `addPairwiseEnergy`.")
        device = self._device or image.device
        scales = torch.tensor(srgb, dtype=torch.float32, device=device)
        colours = image.to(device).reshape(-1, 3).float() / scales
        self._add(torch.cat([self._positions(sxy, device), colours], dim=1), compat, kernel, normalization)
