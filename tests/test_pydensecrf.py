"""crfrnn.pydensecrf against pydensecrf2 (Krähenbühl's densecrf): the same calls on the same inputs
give the same marginals, labels, KL-divergences, utils arrays and errors.

Measured on these inputs (x86-64 CPU, marginals as max |Q - Q_ref|): synthetic scenes up to
2.5e-5 with NO_NORMALIZATION and a matrix compat (raw sums of tens make large logits), 1.2e-5
in every other form and normalisation; the densecrf demo images 6.5e-6; KL-divergences within
2.3e-6 (relative) on the synthetic scenes, 2.1e-5 on the demo images; labels equal on every pixel.
The bounds below are 2-3 times these. Exact ties of the lattice embedding (TIE_SEED, grid-aligned
bandwidths) are broken as densecrf breaks them.
"""
import logging

import numpy as np
import pytest
import torch

from helpers import synthetic_scene

import crfrnn.pydensecrf
import crfrnn.pydensecrf.densecrf as dcrf
from crfrnn.pydensecrf import utils

dcrf_ref = pytest.importorskip("pydensecrf.densecrf")
utils_ref = pytest.importorskip("pydensecrf.utils")

#: Bound on |Q - Q_ref| on the synthetic inputs (measured up to 2.5e-5, see above).
ATOL = 6e-5
#: On the demo images (measured up to 6.5e-6).
ATOL_DEMO = 2e-5
#: Relative bound on the KL-divergence (measured up to 2.3e-6 synthetic, 2.1e-5 demo).
KL_RTOL = 6e-5
#: The issue's label agreement target.
AGREEMENT = 0.999


def assert_same_marginals(q, q_ref, atol=ATOL):
    q, q_ref = np.array(q), np.array(q_ref)
    assert q.shape == q_ref.shape and q.dtype == np.float32
    np.testing.assert_allclose(q, q_ref, rtol=0, atol=atol)
    assert (q.argmax(0) == q_ref.argmax(0)).mean() >= AGREEMENT


def scene(h=36, w=48, c=4, seed=0):
    """(image uint8 [h, w, 3], unary float32 [c, h*w] = -log softmax)."""
    image, _, logits = synthetic_scene(h, w, c, seed)
    p = np.exp(logits - logits.max(0))
    p /= p.sum(0)
    return image, utils_ref.unary_from_softmax(p)


def compat_of(kind, c, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "scalar":
        return 3.0
    if kind == "vector":
        return rng.uniform(1, 4, c).astype(np.float32)
    return rng.uniform(-1, 4, (c, c)).astype(np.float32)  # not symmetric: both symmetrise it


def both(build):
    """build(module) on pydensecrf's module and ours: (ours, reference)."""
    return build(dcrf), build(dcrf_ref)


# --- DenseCRF2D ---------------------------------------------------------------------------------

@pytest.mark.parametrize("normalization", ["NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER",
                                           "NORMALIZE_SYMMETRIC"])
@pytest.mark.parametrize("kind", ["scalar", "vector", "matrix"])
def test_dense_crf_2d(normalization, kind):
    image, unary = scene()
    h, w = image.shape[:2]
    compat = compat_of(kind, 4)

    def build(m):
        d = m.DenseCRF2D(w, h, 4)
        d.setUnaryEnergy(unary)
        norm = getattr(m, normalization)
        d.addPairwiseGaussian(sxy=(3, 2.5), compat=compat, normalization=norm)
        d.addPairwiseBilateral(sxy=20, srgb=(13, 10, 17), rgbim=image, compat=compat, kernel=m.FULL_KERNEL,
                               normalization=norm)
        return np.array(d.inference(5))

    assert_same_marginals(*both(build))


@pytest.mark.parametrize("sxy,srgb,compat", [(1, 3, 1.0), (5, 30, 10.0), ((2, 7), (5, 60, 9), 4.0)])
def test_dense_crf_2d_bandwidths(sxy, srgb, compat):
    image, unary = scene(seed=1)
    h, w = image.shape[:2]

    def build(m):
        d = m.DenseCRF2D(w, h, 4)
        d.setUnaryEnergy(unary)
        d.addPairwiseBilateral(sxy=sxy, srgb=srgb, rgbim=image, compat=compat)
        d.addPairwiseGaussian(sxy=sxy, compat=compat / 2)
        return np.array(d.inference(8))

    assert_same_marginals(*both(build))


def test_one_normalisation_per_kernel():
    image, unary = scene(seed=2)
    h, w = image.shape[:2]

    def build(m):
        d = m.DenseCRF2D(w, h, 4)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3, normalization=m.NORMALIZE_AFTER)
        d.addPairwiseBilateral(sxy=15, srgb=13, rgbim=image, compat=5, normalization=m.NO_NORMALIZATION)
        d.addPairwiseGaussian(sxy=8, compat=compat_of("vector", 4), normalization=m.NORMALIZE_BEFORE)
        return np.array(d.inference(5))

    assert_same_marginals(*both(build))


def test_2d_features_are_densecrfs():
    """DenseCRF2D's features in densecrf's float32 arithmetic and order: (x/sx, y/sy, r/sr, g/sg,
    b/sb), x the column, pixels in row-major order."""
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    d = dcrf.DenseCRF2D(7, 5, 2)
    d.addPairwiseGaussian(sxy=(0.3, 7.7), compat=1)
    d.addPairwiseBilateral(sxy=3, srgb=(13, 0.7, 5), rgbim=image, compat=1)
    y, x = np.mgrid[0:5, 0:7].astype(np.float32)
    gauss = np.stack([x / np.float32(0.3), y / np.float32(7.7)], -1).reshape(-1, 2)
    colours = image.reshape(-1, 3).astype(np.float32) / np.array([13, 0.7, 5], np.float32)
    bil = np.concatenate([np.stack([x / np.float32(3), y / np.float32(3)], -1).reshape(-1, 2), colours], 1)
    assert np.array_equal(d._pairwise[0][0].numpy(), gauss)
    assert np.array_equal(d._pairwise[1][0].numpy(), bil)


# --- the generic DenseCRF on other forms ----------------------------------------------------------

def generic(m, unary, features, compats, niter=5):
    d = m.DenseCRF(unary.shape[1], unary.shape[0])
    d.setUnaryEnergy(unary)
    for f, compat in zip(features, compats):
        d.addPairwiseEnergy(f, compat=compat)
    return np.array(d.inference(niter))


def test_generic_2d_image_with_utils_features():
    image, unary = scene(seed=3)
    feats = [utils_ref.create_pairwise_gaussian(sdims=(3, 3), shape=image.shape[:2]),
             utils_ref.create_pairwise_bilateral(sdims=(30, 30), schan=(13, 13, 13), img=image, chdim=2)]
    q, q_ref = both(lambda m: generic(m, unary, feats, [3, 10]))
    assert_same_marginals(q, q_ref)
    # ... and the same as DenseCRF2D with the same kernels, as in pydensecrf
    d = dcrf.DenseCRF2D(image.shape[1], image.shape[0], 4)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=30, srgb=13, rgbim=image, compat=10)
    assert (np.array(d.inference(5)).argmax(0) == q.argmax(0)).mean() >= AGREEMENT


def test_generic_3d_volume():
    rng = np.random.default_rng(4)
    shape, c = (6, 12, 14), 3
    labels = np.zeros(shape, np.int64)
    labels[2:5, 3:9, 4:11] = 1
    labels[:, :, 11:] = 2
    volume = (labels * 60 + rng.normal(0, 10, shape)).clip(0, 255).astype(np.float32)
    noisy = np.where(rng.random(shape) < 0.3, rng.integers(0, c, shape), labels)
    unary = utils_ref.unary_from_labels(noisy, c, gt_prob=0.6, zero_unsure=False)
    feats = [utils_ref.create_pairwise_gaussian(sdims=(1.5, 2, 2.5), shape=shape),
             utils_ref.create_pairwise_bilateral(sdims=(3, 4, 5), schan=20, img=volume, chdim=-1)]
    assert feats[1].shape == (4, volume.size)
    assert_same_marginals(*both(lambda m: generic(m, unary, feats, [3, compat_of("matrix", c)])))


def four_channel_features(seed, chdim=2):
    """(unary, [features [6, nvar]]): positions / 20 and an RGB + grey image (4 channels)."""
    image, unary = scene(seed=seed)
    grey = (image.astype(np.float32).mean(-1, keepdims=True) * 0.5).astype(np.float32)
    four = np.concatenate([image.astype(np.float32), grey], -1)  # [h, w, 4]
    if chdim == 0:
        four = np.ascontiguousarray(four.transpose(2, 0, 1))
    return unary, [utils_ref.create_pairwise_bilateral(sdims=(20, 20), schan=(13, 13, 13, 8), img=four, chdim=chdim)]


@pytest.mark.parametrize("chdim", [0, 2])
def test_generic_multichannel_image(chdim):
    unary, feats = four_channel_features(seed=6, chdim=chdim)
    assert feats[0].shape == (6, unary.shape[1])
    assert_same_marginals(*both(lambda m: generic(m, unary, feats, [compat_of("vector", 4)])))


#: Features with exact ties of the embedding in real arithmetic: points 20 and 40 (row 0, x = 20
#: and 40) have two equal remainders (y / 20 = 0 and x / 20 = 1 or 2). densecrf breaks them by its
#: float32 rounding, and so does crfrnn for float32 features (its simplex decisions are made in
#: densecrf's float32 arithmetic, csrc/lattice_math.h); deciding in float64 put those points into
#: other simplices, the filter of 90 of the 1728 points off by up to 4% and the marginals by 6.1e-3.
TIE_SEED = 5


def test_embedding_ties_broken_as_densecrf():
    unary, feats = four_channel_features(seed=TIE_SEED)
    assert_same_marginals(*both(lambda m: generic(m, unary, feats, [compat_of("vector", 4)])))  # measured 2.4e-7


@pytest.mark.parametrize("sdim", [0.5, 1, 2])
def test_generic_grid_aligned_volume(sdim):
    """A volume with grid-aligned bandwidths and integer values over an integer bandwidth: exact
    ties everywhere, broken as densecrf breaks them (measured up to 2.2e-6; deciding in float64,
    8.8e-2, 2.0e-2 and 1.0e-2)."""
    rng = np.random.default_rng(4)
    shape, c = (6, 12, 14), 3
    labels = np.zeros(shape, np.int64)
    labels[2:5, 3:9, 4:11] = 1
    labels[:, :, 11:] = 2
    volume = (labels * 60 + rng.normal(0, 10, shape)).clip(0, 255).round().astype(np.float32)
    noisy = np.where(rng.random(shape) < 0.3, rng.integers(0, c, shape), labels)
    unary = utils_ref.unary_from_labels(noisy, c, gt_prob=0.6, zero_unsure=False)
    feats = [utils_ref.create_pairwise_gaussian(sdims=(sdim,) * 3, shape=shape),
             utils_ref.create_pairwise_bilateral(sdims=(sdim,) * 3, schan=4, img=volume, chdim=-1)]
    assert_same_marginals(*both(lambda m: generic(m, unary, feats, [3, 5])), atol=1e-5)


@pytest.mark.parametrize("d", [1, 3, 7])
def test_generic_point_set(d):
    rng = np.random.default_rng(d)
    points = rng.normal(0, 1, (300, d)) + rng.integers(0, 3, (300, 1)) * 2.5
    feats = [np.ascontiguousarray(points.T / 0.8).astype(np.float32)]
    unary = rng.uniform(0.1, 3, (3, 300)).astype(np.float32)
    assert_same_marginals(*both(lambda m: generic(m, unary, feats, [4.0], niter=6)))


# --- step-by-step inference, KL-divergence -------------------------------------------------------

def test_start_step_kl_sequence():
    image, unary = scene(seed=6)
    h, w = image.shape[:2]
    runs = []
    for m in (dcrf, dcrf_ref):
        d = m.DenseCRF2D(w, h, 4)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=20, srgb=13, rgbim=image, compat=compat_of("matrix", 4))
        Q, tmp1, tmp2 = d.startInference()
        steps, kls = [np.array(Q)], []
        for _ in range(4):
            kls.append(d.klDivergence(Q))
            d.stepInference(Q, tmp1, tmp2)
            steps.append(np.array(Q))
        runs.append((steps, kls, np.array(d.inference(4))))
    (steps, kls, q), (steps_ref, kls_ref, q_ref) = runs
    for s, s_ref in zip(steps, steps_ref):
        assert_same_marginals(s, s_ref)
    np.testing.assert_allclose(kls, kls_ref, rtol=KL_RTOL)
    np.testing.assert_allclose(steps[-1], q, rtol=0, atol=ATOL)  # 4 steps = inference(4)
    assert_same_marginals(q, q_ref)


def test_q_object_reads_as_pydensecrfs():
    _, unary = scene(8, 10, 3)
    d = dcrf.DenseCRF2D(10, 8, 3)
    d.setUnaryEnergy(unary[:3] * 1)
    d.addPairwiseGaussian(sxy=2, compat=3)
    Q = d.inference(2)
    assert np.array(Q).shape == (3, 80) and np.array(Q).dtype == np.float32
    assert np.array_equal(np.argmax(Q, axis=0), np.array(Q).argmax(0))
    assert torch.equal(Q.tensor, torch.from_numpy(np.array(Q)))
    Q, tmp1, tmp2 = d.startInference()
    view, before = np.asarray(Q), np.array(Q)
    d.stepInference(Q, tmp1, tmp2)  # in place: a view sees the step, a copy does not
    assert not np.array_equal(view, before) and np.array_equal(view, np.array(Q))
    assert np.array(tmp1).shape == (0, 0)


def test_without_unary_or_pairwise():
    for m_ours, m_ref in [(dcrf, dcrf_ref)]:
        for build in (lambda m: m.DenseCRF(5, 3), lambda m: m.DenseCRF2D(3, 2, 4)):
            for call in (lambda d: d.inference(3), lambda d: d.startInference()[0]):
                np.testing.assert_array_equal(np.array(call(build(m_ours))), np.array(call(build(m_ref))))
    unary = np.random.default_rng(0).uniform(0, 3, (3, 20)).astype(np.float32)
    for niter in (0, -2, 3):  # without kernels every iteration is softmax(-U); niter <= 0 too
        q, q_ref = both(lambda m, n=niter: generic(m, unary, [], [], niter=n))
        np.testing.assert_allclose(q, q_ref, rtol=0, atol=ATOL)


def test_more_iterations_than_the_fused_op_runs(monkeypatch):
    image, unary = scene(12, 14, 4, seed=7)
    monkeypatch.setattr(dcrf, "MAX_ITERATIONS", 3)  # 7 > 3: the step-by-step loop
    q, q_ref = both(lambda m: generic(m, unary, [utils_ref.create_pairwise_bilateral(
        sdims=(5, 5), schan=13, img=image, chdim=2)], [5.0], niter=7))
    assert_same_marginals(q, q_ref)


def test_lattices_built_once_and_rebuilt_for_new_kernels():
    image, unary = scene(10, 12, 4)
    d = dcrf.DenseCRF2D(12, 10, 4)
    d.setUnaryEnergy(unary)
    d.addPairwiseGaussian(sxy=3, compat=3)
    first = np.array(d.inference(3))
    lattices = d._lattices[torch.device("cpu")]
    assert np.array_equal(np.array(d.inference(3)), first) and d._lattices[torch.device("cpu")] is lattices
    d.addPairwiseBilateral(sxy=5, srgb=13, rgbim=image, compat=5)
    ref = dcrf_ref.DenseCRF2D(12, 10, 4)
    ref.setUnaryEnergy(unary)
    ref.addPairwiseGaussian(sxy=3, compat=3)
    ref.addPairwiseBilateral(sxy=5, srgb=13, rgbim=image, compat=5)
    assert_same_marginals(d.inference(3), ref.inference(3))


def test_unary_objects_and_logistic_unary():
    rng = np.random.default_rng(8)
    unary = rng.uniform(0, 2, (3, 20)).astype(np.float32)
    f = rng.uniform(0, 1, (20, 20)).astype(np.float32)
    feats = rng.normal(0, 1, (2, 20)).astype(np.float32)
    for setup in (lambda m, d: d.setUnary(m.ConstUnary(unary)), lambda m, d: d.setUnaryEnergy(unary, f),
                  lambda m, d: d.setUnary(m.LogisticUnary(unary, f))):
        out = []
        for m in (dcrf, dcrf_ref):
            d = m.DenseCRF(20, 3)
            setup(m, d)
            d.addPairwiseEnergy(feats, compat=2)
            out.append(np.array(d.inference(3)))
        np.testing.assert_allclose(*out, rtol=0, atol=ATOL)


def test_tensor_inputs_and_explicit_device():
    """Tensors (here on the CPU) and device= give what the arrays give."""
    image, unary = scene(10, 12, 4, seed=9)
    feats = utils_ref.create_pairwise_gaussian(sdims=(3, 3), shape=image.shape[:2])
    out = []
    for to, device in [(np.asarray, None), (torch.from_numpy, None), (np.asarray, "cpu")]:
        d = dcrf.DenseCRF2D(12, 10, 4, device=device)
        d.setUnaryEnergy(to(unary))
        d.addPairwiseEnergy(to(feats), compat=to(compat_of("vector", 4)))
        d.addPairwiseBilateral(sxy=5, srgb=13, rgbim=to(image), compat=5)
        out.append(np.array(d.inference(4)))
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])


@pytest.mark.cuda
def test_cuda_matches_cpu():
    image, unary = scene(seed=10)
    h, w = image.shape[:2]
    out = []
    for device in ("cpu", "cuda"):
        d = dcrf.DenseCRF2D(w, h, 4, device=device)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3)
        d.addPairwiseBilateral(sxy=20, srgb=13, rgbim=image, compat=compat_of("matrix", 4))
        Q = d.inference(5)
        assert Q.tensor.device.type == device
        out.append(np.array(Q))
    assert_same_marginals(*out)
    d = dcrf.DenseCRF(h * w, 4)  # the device of the tensors given
    d.setUnaryEnergy(torch.from_numpy(unary).cuda())
    d.addPairwiseEnergy(utils.create_pairwise_bilateral((20, 20), 13, torch.from_numpy(image).cuda(), chdim=2),
                        compat=3)
    assert d.inference(2).tensor.is_cuda


# --- utils ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("zero_unsure", [True, False])
@pytest.mark.parametrize("gt_prob", [0.5, 0.7, 0.95])
def test_unary_from_labels(zero_unsure, gt_prob):
    labels = np.random.default_rng(0).integers(0, 4, (6, 7))
    n = 3 if zero_unsure else 4
    out = utils.unary_from_labels(labels, n, gt_prob, zero_unsure=zero_unsure)
    ref = utils_ref.unary_from_labels(labels, n, gt_prob, zero_unsure=zero_unsure)
    assert out.dtype == np.float32 and np.array_equal(out, ref)
    tensor = utils.unary_from_labels(torch.from_numpy(labels), n, gt_prob, zero_unsure=zero_unsure)
    assert tensor.dtype == torch.float32 and np.array_equal(tensor.numpy(), ref)


def test_compute_unary_is_deprecated_unary_from_labels(caplog):
    labels = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
    with caplog.at_level(logging.WARNING):
        out = utils.compute_unary(labels, 3, GT_PROB=0.8)
    assert "deprecated" in caplog.text
    assert np.array_equal(out, utils_ref.unary_from_labels(labels, 3, 0.8))


@pytest.mark.parametrize("scale", [None, 0.9, 1.0])
@pytest.mark.parametrize("clip", [1e-5, 0.01, None])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unary_from_softmax(scale, clip, dtype):
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), size=(5, 6)).transpose(2, 0, 1).astype(dtype)
    p[0, 0, :3] = 0  # exact zeros: the clip (or inf without it)
    with np.errstate(divide="ignore"):
        ref = utils_ref.unary_from_softmax(p, scale=scale, clip=clip)
        out = utils.unary_from_softmax(p, scale=scale, clip=clip)
    assert out.dtype == np.float32 and out.shape == (4, 30) and np.array_equal(out, ref)
    tensor = utils.unary_from_softmax(torch.from_numpy(p), scale=scale, clip=clip)
    assert tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor.numpy(), ref, rtol=1e-6)
    with np.errstate(divide="ignore"):
        assert np.array_equal(utils.softmax_to_unary(p, GT_PROB=0.8), utils_ref.softmax_to_unary(p, GT_PROB=0.8))


@pytest.mark.parametrize("sdims,shape", [((3, 3), (5, 7)), ((80, 0.3), (4, 6)), ((1.5, 2, 2.5), (3, 4, 5)),
                                         ((7,), (9,))])
def test_create_pairwise_gaussian(sdims, shape):
    out = utils.create_pairwise_gaussian(sdims=sdims, shape=shape)
    ref = utils_ref.create_pairwise_gaussian(sdims=sdims, shape=shape)
    assert out.dtype == np.float32 and np.array_equal(out, ref)


@pytest.mark.parametrize("chdim,schan,shape", [(2, (13, 13, 13), (5, 6, 3)), (2, 7.5, (5, 6, 3)),
                                               (0, (3, 0.7), (2, 5, 6)), (-1, 20, (4, 5, 6)), (-1, 3, (5, 6))])
def test_create_pairwise_bilateral(chdim, schan, shape):
    img = np.random.default_rng(2).integers(0, 256, shape).astype(np.uint8)
    sdims = (80, 70, 60)[: len(shape) - (chdim != -1)]
    out = utils.create_pairwise_bilateral(sdims=sdims, schan=schan, img=img, chdim=chdim)
    ref = utils_ref.create_pairwise_bilateral(sdims=sdims, schan=schan, img=img, chdim=chdim)
    assert out.dtype == np.float32 and np.array_equal(out, ref)
    tensor = utils.create_pairwise_bilateral(sdims=sdims, schan=schan, img=torch.from_numpy(img), chdim=chdim)
    assert tensor.dtype == torch.float32 and np.array_equal(tensor.numpy(), ref)


def test_utils_argument_errors():
    for module in (utils, utils_ref):
        with pytest.raises(AssertionError):
            module.unary_from_labels(np.zeros(3, np.int64), 2, 1.0)
        with pytest.raises(AssertionError):
            module.unary_from_softmax(np.full((2, 3), 0.5), scale=0)
        with pytest.raises(ZeroDivisionError):
            module.unary_from_labels(np.zeros(3, np.int64), 1, 0.5)
    with pytest.raises(ValueError, match="gt_prob"):  # ours is a ValueError too
        utils.unary_from_labels(np.zeros(3, np.int64), 2, 0.0)


# --- errors --------------------------------------------------------------------------------------

U2 = np.ones((2, 12), np.float32)
F3 = np.ones((3, 12), np.float32)
IMG = np.zeros((3, 4, 3), np.uint8)
READ_ONLY_U = U2.copy()
READ_ONLY_U.flags.writeable = False

#: (name, call on a fresh DenseCRF2D(4, 3, 2) of a module, None if the message is pydensecrf's, else a
#: phrase of pydensecrf's message that ours contains too: ours says more, e.g. what was given)
ERRORS = [
    ("float64 unary", lambda m, d: d.setUnaryEnergy(U2.astype(np.float64)), None),
    ("int unary", lambda m, d: d.setUnaryEnergy(U2.astype(np.int32)), None),
    ("float16 unary", lambda m, d: d.setUnaryEnergy(U2.astype(np.float16)), None),
    ("Fortran unary", lambda m, d: d.setUnaryEnergy(np.asfortranarray(U2)), None),
    ("strided unary", lambda m, d: d.setUnaryEnergy(np.ones((2, 24), np.float32)[:, ::2]), None),
    ("1-D unary", lambda m, d: d.setUnaryEnergy(U2.ravel()), None),
    ("list unary", lambda m, d: d.setUnaryEnergy(U2.tolist()), "a bytes-like object is required, not 'list'"),
    ("None unary", lambda m, d: d.setUnaryEnergy(None), None),
    ("unary shape", lambda m, d: d.setUnaryEnergy(np.ones((3, 12), np.float32)), None),
    ("float64 features", lambda m, d: d.addPairwiseEnergy(F3.astype(np.float64), compat=3), None),
    ("features shape", lambda m, d: d.addPairwiseEnergy(np.ones((3, 11), np.float32), compat=3), None),
    ("None features", lambda m, d: d.addPairwiseEnergy(None, compat=3), None),
    ("float64 compat vector", lambda m, d: d.addPairwiseGaussian(sxy=3, compat=np.array([1.0, 2.0])), None),
    ("float64 compat matrix", lambda m, d: d.addPairwiseEnergy(F3, compat=np.ones((2, 2))), None),
    ("Fortran compat", lambda m, d: d.addPairwiseEnergy(F3, compat=np.asfortranarray(
        np.arange(4, dtype=np.float32).reshape(2, 2))), None),
    ("list compat", lambda m, d: d.addPairwiseEnergy(F3, compat=[1.0, 2.0]), None),
    ("0-d compat", lambda m, d: d.addPairwiseEnergy(F3, compat=np.array(2, np.float32)), None),
    ("3-d compat", lambda m, d: d.addPairwiseEnergy(F3, compat=np.ones((2, 2, 2), np.float32)), None),
    ("str normalization", lambda m, d: d.addPairwiseEnergy(F3, compat=1, normalization="x"),
     "an integer is required"),
    ("float rgbim", lambda m, d: d.addPairwiseBilateral(sxy=3, srgb=3, rgbim=IMG.astype(np.float32), compat=1),
     None),
    ("rgbim size", lambda m, d: d.addPairwiseBilateral(sxy=3, srgb=3, rgbim=np.zeros((4, 3, 3), np.uint8), compat=1),
     "Bad shape for pairwise bilateral (Need (3, 4, 3), got "),  # pydensecrf's shape prints as 8 numbers
    ("4-channel rgbim", lambda m, d: d.addPairwiseBilateral(sxy=3, srgb=3, rgbim=np.zeros((3, 4, 4), np.uint8),
                                                            compat=1), None),
    ("2-D rgbim", lambda m, d: d.addPairwiseBilateral(sxy=3, srgb=3, rgbim=np.zeros((3, 4), np.uint8), compat=1),
     None),
    ("strided rgbim", lambda m, d: d.addPairwiseBilateral(sxy=3, srgb=3, rgbim=np.zeros((3, 8, 3), np.uint8)[:, ::2],
                                                          compat=1), None),
    ("short sxy", lambda m, d: d.addPairwiseBilateral(sxy=[3], srgb=3, rgbim=IMG, compat=1), None),
    ("short srgb", lambda m, d: d.addPairwiseBilateral(sxy=3, srgb=[3, 3], rgbim=IMG, compat=1), None),
    ("str sxy", lambda m, d: d.addPairwiseGaussian(sxy="ab", compat=1), None),
    ("str niter", lambda m, d: d.inference("2"), "an integer is required"),
    ("ndarray Q", lambda m, d: d.stepInference(np.ones((2, 12), np.float32), *d.startInference()[1:]),
     "Argument 'Q' has incorrect type"),
    ("ndarray Q for KL", lambda m, d: d.klDivergence(np.ones((2, 12), np.float32)),
     "Argument 'Q' has incorrect type"),
    ("keyword Q for KL", lambda m, d: d.klDivergence(Q=d.startInference()[0]), "klDivergence()"),
]


@pytest.mark.parametrize("name,call,phrase", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_as_pydensecrfs(name, call, phrase):
    with pytest.raises(Exception) as ref:
        call(dcrf_ref, dcrf_ref.DenseCRF2D(4, 3, 2))
    with pytest.raises(Exception) as ours:
        call(dcrf, dcrf.DenseCRF2D(4, 3, 2))
    assert type(ours.value) is type(ref.value), (ours.value, ref.value)
    if phrase is None:
        assert str(ours.value) == str(ref.value)
    else:
        assert phrase in str(ours.value) and phrase in str(ref.value)


#: Where pydensecrf crashes or silently misreads, ours raises (it would abort, read out of
#: bounds, or treat an unknown normalisation as none).
CLEAR_ERRORS = [
    ("compat vector length", lambda d: d.addPairwiseEnergy(F3, compat=np.ones(3, np.float32)), ValueError),
    ("compat matrix shape", lambda d: d.addPairwiseEnergy(F3, compat=np.ones((2, 3), np.float32)), ValueError),
    ("unknown normalization", lambda d: d.addPairwiseEnergy(F3, compat=1, normalization=9), ValueError),
    ("Q of another shape", lambda d: d.klDivergence(dcrf.DenseCRF(5, 2).startInference()[0]), ValueError),
    ("None scratch", lambda d: d.stepInference(d.startInference()[0], None, None), TypeError),
    ("tensor unary float64", lambda d: d.setUnaryEnergy(torch.ones(2, 12, dtype=torch.float64)), ValueError),
    ("logistic unary f shape", lambda d: d.setUnaryEnergy(U2, np.ones((5, 12), np.float32)), ValueError),
]


@pytest.mark.parametrize("name,call,error", CLEAR_ERRORS, ids=[e[0] for e in CLEAR_ERRORS])
def test_clear_errors_where_pydensecrf_crashes(name, call, error):
    with pytest.raises(error):
        call(dcrf.DenseCRF2D(4, 3, 2))


def test_limits_of_crfrnns_lattice_that_pydensecrfs_has_not():
    """More than 31 feature dimensions, or features beyond ~1e6: pydensecrf's lattice takes them,
    crfrnn's says it does not (rather than compute something else)."""
    with pytest.raises(ValueError, match="1..31 dimensions"):
        dcrf.DenseCRF2D(4, 3, 2).addPairwiseEnergy(np.ones((40, 12), np.float32), compat=1)
    d = dcrf.DenseCRF2D(4, 3, 2)
    d.setUnaryEnergy(U2)
    d.addPairwiseEnergy(np.full((2, 12), 2e6, np.float32), compat=1)
    with pytest.raises(ValueError, match="at most .* in magnitude"):
        d.inference(1)


def test_what_pydensecrf_takes_and_inference_ignores_or_reads_as_numbers():
    """Any integer kernel type (and a whole real one: Cython truncates), a real normalisation
    value, a bool image (0/1): the same results as pydensecrf's."""
    image = np.ascontiguousarray(np.random.default_rng(1).random((3, 4, 3)) > 0.5)
    unary = np.random.default_rng(2).random((2, 12)).astype(np.float32) * 3
    results = []
    for m in (dcrf_ref, dcrf):
        d = m.DenseCRF2D(4, 3, 2)
        d.setUnaryEnergy(unary)
        d.addPairwiseGaussian(sxy=3, compat=3, kernel=1.0)
        d.addPairwiseBilateral(sxy=5, srgb=0.5, rgbim=image, compat=4, kernel=7)
        d.addPairwiseEnergy(F3, compat=2, kernel=-1, normalization=m.NORMALIZE_AFTER)
        results.append(np.array(d.inference(3)))
    np.testing.assert_allclose(results[1], results[0], atol=1e-5)
    start = np.exp(-unary) / np.exp(-unary).sum(0)
    assert np.abs(results[0] - start).max() > 0.1  # the kernels did something
    d = dcrf.DenseCRF2D(4, 3, 2)
    d.addPairwiseEnergy(F3, compat=2, normalization=2.0)
    assert d._pairwise[-1][2] == "after"


def test_an_empty_crf_gives_an_empty_result():
    """(An empty crop in a pipeline; pydensecrf returns an empty matrix too, printing errors.)"""
    for d in (dcrf.DenseCRF(0, 3), dcrf.DenseCRF2D(0, 5, 3), dcrf.DenseCRF2D(5, 0, 3)):
        assert np.array(d.inference(2)).shape == (3, 0)
        d.setUnaryEnergy(np.zeros((3, 0), np.float32))
        d.addPairwiseEnergy(np.zeros((2, 0), np.float32), compat=3)
        q = np.array(d.inference(2))
        assert q.shape == (3, 0) and q.dtype == np.float32
        Q, tmp1, tmp2 = d.startInference()
        d.stepInference(Q, tmp1, tmp2)
        assert d.klDivergence(Q) == 0.0
    d = dcrf.DenseCRF2D(0, 5, 3)
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=3, srgb=3, rgbim=np.zeros((5, 0, 3), np.uint8), compat=3)
    assert np.array(d.inference(2)).shape == (3, 0)


def test_constructor_arguments():
    with pytest.raises(ValueError, match="nvar >= 0"):
        dcrf.DenseCRF(-1, 2)
    with pytest.raises(TypeError):
        dcrf.DenseCRF("3", 2)
    assert dcrf.DenseCRF2D(w=4, h=3, nlabels=2)._nvar == 12  # pydensecrf: only positional
    d = dcrf.DenseCRF2D(4, 3, 2)
    d.setUnaryEnergy(READ_ONLY_U)  # pydensecrf refuses read-only arrays; nothing is written to them


def test_constants_and_names():
    for name in ("NO_NORMALIZATION", "NORMALIZE_BEFORE", "NORMALIZE_AFTER", "NORMALIZE_SYMMETRIC",
                 "CONST_KERNEL", "DIAG_KERNEL", "FULL_KERNEL"):
        assert getattr(dcrf, name) == getattr(dcrf_ref, name) and getattr(dcrf, name).name == name
    assert [(m.name, m.value) for m in dcrf.NormalizationType] == \
        [(m.name, m.value) for m in dcrf_ref.NormalizationType]
    assert crfrnn.pydensecrf.densecrf is dcrf and crfrnn.pydensecrf.utils is utils


# --- the migrated example --------------------------------------------------------------------------

def pydensecrf_example(img, anno_rgb, dcrf, unary_from_labels, create_pairwise_bilateral,
                       create_pairwise_gaussian, use_2d):
    """pydensecrf's examples/inference.py (its logic, without file I/O and prints): the modules
    are arguments, so only the import differs between the two runs."""
    anno_rgb = anno_rgb.astype(np.uint32)
    anno_lbl = anno_rgb[:, :, 0] + (anno_rgb[:, :, 1] << 8) + (anno_rgb[:, :, 2] << 16)
    colors, labels = np.unique(anno_lbl, return_inverse=True)
    has_unk = 0 in colors
    n_labels = len(set(labels.flat)) - int(has_unk)
    if use_2d:
        d = dcrf.DenseCRF2D(img.shape[1], img.shape[0], n_labels)
        d.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=0.7, zero_unsure=has_unk))
        d.addPairwiseGaussian(sxy=(3, 3), compat=3, kernel=dcrf.DIAG_KERNEL,
                              normalization=dcrf.NORMALIZE_SYMMETRIC)
        d.addPairwiseBilateral(sxy=(80, 80), srgb=(13, 13, 13), rgbim=img, compat=10, kernel=dcrf.DIAG_KERNEL,
                               normalization=dcrf.NORMALIZE_SYMMETRIC)
    else:
        d = dcrf.DenseCRF(img.shape[1] * img.shape[0], n_labels)
        d.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=0.7, zero_unsure=has_unk))
        feats = create_pairwise_gaussian(sdims=(3, 3), shape=img.shape[:2])
        d.addPairwiseEnergy(feats, compat=3, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
        feats = create_pairwise_bilateral(sdims=(80, 80), schan=(13, 13, 13), img=img, chdim=2)
        d.addPairwiseEnergy(feats, compat=10, kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_SYMMETRIC)
    Q = d.inference(5)
    MAP = np.argmax(Q, axis=0)
    Q_steps, tmp1, tmp2 = d.startInference()
    kls = []
    for _ in range(5):
        kls.append(d.klDivergence(Q_steps))
        d.stepInference(Q_steps, tmp1, tmp2)
    return np.array(Q), MAP, np.array(Q_steps), kls


def run_example(img, anno_rgb, use_2d, atol):
    out = pydensecrf_example(img, anno_rgb, dcrf, utils.unary_from_labels, utils.create_pairwise_bilateral,
                             utils.create_pairwise_gaussian, use_2d)
    ref = pydensecrf_example(img, anno_rgb, dcrf_ref, utils_ref.unary_from_labels,
                             utils_ref.create_pairwise_bilateral, utils_ref.create_pairwise_gaussian, use_2d)
    assert (out[1] == ref[1]).mean() >= AGREEMENT
    assert_same_marginals(out[0], ref[0], atol)
    assert_same_marginals(out[2], ref[2], atol)
    np.testing.assert_allclose(out[3], ref[3], rtol=KL_RTOL)


@pytest.mark.parametrize("use_2d", [False, True])
def test_migrated_example_on_synthetic_scribbles(use_2d):
    image, labels, _ = synthetic_scene(60, 80, 4, seed=11)
    rng = np.random.default_rng(11)
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], np.uint8)
    scribbles = np.where(rng.random(labels.shape) < 0.1, labels + 1, 0)  # 10% annotated, rest unknown
    run_example(image, palette[scribbles], use_2d, ATOL)


@pytest.mark.data
@pytest.mark.parametrize("k", [1, 2, 3])
def test_migrated_example_on_densecrf_demo(shared_data, k):
    from PIL import Image
    folder = shared_data / "densecrf-demo"
    if not folder.is_dir():
        pytest.skip(f"{folder} not found")
    image = np.asarray(Image.open(folder / f"im{k}.png").convert("RGB")).copy()
    anno = np.asarray(Image.open(folder / f"anno{k}.png").convert("RGB"))
    for use_2d in (False, True):
        run_example(image, anno, use_2d, ATOL_DEMO)
