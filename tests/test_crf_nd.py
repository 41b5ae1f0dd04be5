"""Any dense CRF: the layer and dense_crf on signals, grayscale and multi-channel images, volumes
and point sets, with any Gaussian kernels, against Krähenbühl's densecrf (pydensecrf2's generic
DenseCRF with the same features, written out here in its order: positions with the last tensor
axis first, then the guide channels), with gradients checked in float64 and the fused ops
against the step-by-step loop."""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import crfrnn
from crfrnn import CRFRNNLayer, GaussianKernel
from helpers import NATIVE

pytest.importorskip("pydensecrf.densecrf")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import densecrf_peer  # noqa: E402  (densecrf, and the features it takes written out)


def scene(spatial, num_classes, channels, seed=0):
    """(labels int[*S], guide float32[G, *S], logits float32[C, *S]) on a grid: ellipsoids of
    distinct guide values, and logits that know the labels roughly (shifted by 2 along the last
    axis, noisy)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in spatial], indexing="ij"))
    labels = np.zeros(spatial, np.int64)
    for k in range(1, num_classes):
        centre = rng.uniform(0.25, 0.75, len(spatial)) * np.array(spatial)
        radius = rng.uniform(0.2, 0.35, len(spatial)) * np.array(spatial)
        labels[(((grid - centre.reshape(-1, *[1] * len(spatial))) / radius.reshape(-1, *[1] * len(spatial))) ** 2)
               .sum(0) < 1] = k
    levels = rng.uniform(20, 230, (channels, num_classes))
    guide = np.stack([levels[g][labels] for g in range(channels)]) + rng.normal(0, 6, (channels, *spatial))
    onehot = np.moveaxis(np.eye(num_classes)[np.roll(labels, 2, axis=-1)], -1, 0)
    logits = 1.5 * onehot + rng.normal(0, 0.8, (num_classes, *spatial))
    return labels, guide.astype(np.float32), logits.astype(np.float32)


def densecrf(logits, kernels, iterations, normalize="symmetric", **inputs):
    """densecrf's marginals [C, P] with the kernels' features written out in densecrf's order."""
    return densecrf_peer.generic_densecrf_probs(logits, kernels, iterations, normalize, **inputs)


def ours(logits, guide, kernels, iterations, positions=None, normalize="symmetric", **options):
    crf = CRFRNNLayer(logits.shape[0], num_eval_iterations=iterations, kernels=kernels, normalize=normalize,
                      **options).eval()
    with torch.no_grad():
        out = crf(torch.from_numpy(logits)[None], None if guide is None else torch.from_numpy(guide)[None],
                  positions=None if positions is None else torch.from_numpy(positions)[None])
    return torch.softmax(out, 1)[0].reshape(logits.shape[0], -1).numpy()


def assert_matches(q, qd, max_abs, what):
    assert (q.argmax(0) == qd.argmax(0)).all(), f"{what}: labels differ on {(q.argmax(0) != qd.argmax(0)).sum()}"
    assert np.abs(q - qd).max() <= max_abs, f"{what}: max |dQ| {np.abs(q - qd).max():.2e}"


# (grid shape, guide channels, kernels, the largest |dQ| measured against densecrf over both
# normalisations; bandwidths that put points exactly on simplex boundaries: GRID_ALIGNED below)
CASES = {
    "signal": ((300,), 1, [GaussianKernel(3.0, positions=6.5, guide=15.0), GaussianKernel(1.0, positions=2.5)],
               8.9e-7),
    "grayscale": ((40, 48), 1, [GaussianKernel(5.0, positions=9.5, guide=12.0), GaussianKernel(3.0, positions=3.0)],
                  6.0e-7),
    "rgbd": ((36, 40), 4, [GaussianKernel(4.0, positions=11.0, guide=(12.0, 12.0, 12.0, 30.0)),
                           GaussianKernel(3.0, positions=3.0)], 1.0e-6),
    "volume": ((10, 24, 28), 2, [GaussianKernel(4.0, positions=(1.3, 2.7, 2.9), guide=(10.0, 20.0)),
                                 GaussianKernel(2.0, positions=2.5)], 9.5e-7),
    "three_kernels": ((30, 36), 3, [GaussianKernel(4.0, positions=13.0, guide=9.0),
                                    GaussianKernel(2.0, guide=(20.0, 25.0, 30.0)),
                                    GaussianKernel(3.0, positions=(1.5, 3.0))], 5.5e-7),
}


@pytest.mark.parametrize("normalize", ["symmetric", "after"])
@pytest.mark.parametrize("case", CASES)
def test_grids_match_densecrf(case, normalize):
    spatial, channels, kernels, measured = CASES[case]
    labels, guide, logits = scene(spatial, 3, channels, seed=len(case))
    q = ours(logits, guide, kernels, 5, normalize=normalize)
    qd = densecrf(logits, kernels, 5, normalize, spatial=spatial, guide=guide)
    assert_matches(q, qd, 3 * measured, f"{case} {normalize}")
    assert (qd.argmax(0) != logits.reshape(3, -1).argmax(0)).mean() > 0.02  # the CRF did something


def test_a_point_cloud_matches_densecrf():
    """Points: positions [N, D, P] in the order given, each over its bandwidth, then the guide."""
    rng = np.random.default_rng(3)
    xyz = rng.uniform(0, 20, (3, 2000))
    labels = (xyz[0] + 0.5 * xyz[1] > 15).astype(np.int64) + (xyz[2] > 14)
    rgb = np.stack([labels * 80.0, 200 - labels * 60.0, np.full(labels.shape, 90.0)]) + rng.normal(0, 5, (3, 2000))
    rgb = rgb.clip(0, 255)  # a three-channel guide is RGB: 0..255
    logits = (1.2 * np.eye(3)[labels].T + rng.normal(0, 0.9, (3, 2000))).astype(np.float32)
    kernels = [GaussianKernel(4.0, positions=(2.5, 2.5, 1.5), guide=12.0), GaussianKernel(2.0, positions=1.5)]
    positions, guide = xyz.astype(np.float32), rgb.astype(np.float32)
    q = ours(logits, guide, kernels, 5, positions=positions)
    qd = densecrf(logits, kernels, 5, positions=positions, guide=guide)
    assert_matches(q, qd, 1e-5, "point cloud")  # measured 3e-7
    assert (qd.argmax(0) != logits.argmax(0)).mean() > 0.02


#: Position bandwidths of 0.5, 1 or 2 voxels in 3-D put points exactly on simplex boundaries (their
#: lattice coordinates are exact binary fractions): densecrf breaks those ties by its float32
#: rounding, and so does our lattice for float32 features (embed_point_scaled of
#: csrc/lattice_math.h decides the simplices in densecrf's float32 arithmetic). Per bandwidth, the
#: largest |dQ| measured over both normalisations; deciding in float64, the marginals differed by
#: up to 0.72, 1.8e-3 and 8.6e-4 (and the labels at sigma 0.5). At sigma 0.5 each voxel is nearly
#: alone under its Gaussian and float32's rounding shows more.
GRID_ALIGNED = {0.5: 3.1e-5, 1.0: 1.1e-6, 2.0: 3.6e-7}


@pytest.mark.parametrize("normalize", ["symmetric", "after"])
@pytest.mark.parametrize("sigma", GRID_ALIGNED)
def test_grid_aligned_bandwidths_match_densecrf(sigma, normalize):
    labels, guide, logits = scene((8, 20, 24), 3, 1, seed=9)
    kernels = [GaussianKernel(4.0, positions=sigma, guide=20.0), GaussianKernel(2.0, positions=sigma)]
    q = ours(logits, guide, kernels, 5, normalize=normalize)
    qd = densecrf(logits, kernels, 5, normalize, spatial=(8, 20, 24), guide=guide)
    assert_matches(q, qd, 3 * GRID_ALIGNED[sigma], f"sigma {sigma} {normalize}")
    assert (qd.argmax(0) != logits.reshape(3, -1).argmax(0)).mean() > 0.02


@pytest.mark.parametrize("normalize", ["symmetric", "after"])
def test_integer_colours_over_integer_bandwidths_match_densecrf(normalize):
    """Integer colours over integer bandwidths, positions over 1: a few points lie on exact ties
    (three here), decided as densecrf decides them (measured 1.8e-5; 4.4e-5 deciding in float64)."""
    labels, guide, logits = scene((30, 36), 3, 3, seed=2)
    guide = np.round(guide).astype(np.float32)
    kernels = [GaussianKernel(4.0, positions=1.0, guide=5.0), GaussianKernel(3.0, positions=1.0)]
    q = ours(logits, guide, kernels, 5, normalize=normalize)
    qd = densecrf(logits, kernels, 5, normalize, spatial=(30, 36), guide=guide)
    assert_matches(q, qd, 3.5e-5, f"integer colours {normalize}")


def test_dense_crf_takes_grayscale_volumes_and_points():
    """dense_crf's channels-last images: grayscale [H, W] and [H, W, 1], a volume [D, H, W, G],
    points [P, G] with positions [P, D]; each the layer's result for the same kernels."""
    labels, guide, logits = scene((20, 24), 3, 1, seed=4)
    probs = torch.softmax(torch.from_numpy(logits), 0).numpy()
    kernels = CASES["grayscale"][2]
    expected = ours(np.log(np.clip(probs, 1e-5, 1)).astype(np.float32), guide, kernels, 5)
    for image in (guide[0], guide[0][..., None]):
        got = crfrnn.dense_crf(image, probs, num_iterations=5, kernels=kernels)
        assert got.shape == probs.shape
        np.testing.assert_allclose(got.reshape(3, -1), expected, atol=1e-6)
    # The classic arguments on a grayscale image: one colour bandwidth for its one channel.
    got = crfrnn.dense_crf(guide[0], probs, num_iterations=5, bilateral=(9.5, 12.0, 5.0), spatial=(3.0, 3.0))
    np.testing.assert_allclose(got.reshape(3, -1), expected, atol=1e-6)
    labels, guide, logits = scene((6, 12, 14), 2, 2, seed=5)
    probs = torch.softmax(torch.from_numpy(logits), 0).numpy()
    kernels = [GaussianKernel(4.0, positions=(1.5, 3.0, 3.0), guide=(10.0, 20.0)), GaussianKernel(2.0, positions=2.5)]
    got = crfrnn.dense_crf(np.moveaxis(guide, 0, -1), probs, num_iterations=4, kernels=kernels)
    expected = ours(np.log(np.clip(probs, 1e-5, 1)).astype(np.float32), guide, kernels, 4)
    np.testing.assert_allclose(got.reshape(2, -1), expected, atol=1e-6)
    positions = np.random.default_rng(6).uniform(0, 10, (300, 3)).astype(np.float32)
    colours = np.random.default_rng(7).uniform(0, 255, (300, 3)).astype(np.float32)
    probs = np.random.default_rng(8).dirichlet(np.ones(4), 300).T.astype(np.float32)
    kernels = [GaussianKernel(3.0, positions=2.5, guide=30.0)]
    got = crfrnn.dense_crf(colours, probs, num_iterations=3, kernels=kernels, positions=positions)
    expected = ours(np.log(np.clip(probs, 1e-5, 1)).astype(np.float32), colours.T.copy(), kernels, 3,
                    positions=positions.T.copy())
    np.testing.assert_allclose(got, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Gradients: float64 gradcheck (the lattice's own bandwidth gradient is the derivative of what
# it computes; the "gaussian" estimator is the Gaussian's, not the approximation's)

def small_problems():
    g = torch.Generator().manual_seed(0)
    signal = dict(kernels=[GaussianKernel(2.0, positions=2.3, guide=7.0), GaussianKernel(1.0, positions=1.7)],
                  unary=torch.randn(1, 3, 14, generator=g, dtype=torch.float64),
                  image=torch.rand(1, 1, 14, generator=g, dtype=torch.float64) * 40)
    volume = dict(kernels=[GaussianKernel(2.0, positions=(1.3, 2.1, 2.2), guide=(9.0, 13.0)),
                           GaussianKernel(1.0, positions=1.7)],
                  unary=torch.randn(1, 2, 3, 4, 5, generator=g, dtype=torch.float64),
                  image=torch.rand(1, 2, 3, 4, 5, generator=g, dtype=torch.float64) * 40)
    points = dict(kernels=[GaussianKernel(2.0, positions=(1.9, 2.4), guide=11.0), GaussianKernel(1.0, guide=17.0)],
                  unary=torch.randn(2, 3, 16, generator=g, dtype=torch.float64),
                  image=torch.rand(2, 3, 16, generator=g, dtype=torch.float64) * 40,
                  positions=torch.rand(2, 2, 16, generator=g, dtype=torch.float64) * 5)
    return {"signal": signal, "volume": volume, "points": points}


@pytest.mark.parametrize("form", ["signal", "volume", "points"])
def test_gradcheck_of_every_form(form):
    """To the unary, the kernel weights and compatibility, and the bandwidths (learned through
    the lattice's own gradient, on the reference backend, at bandwidths where no point sits on
    a simplex boundary within the step)."""
    problem = small_problems()[form]
    crf = CRFRNNLayer(problem["unary"].shape[1], num_iterations=2, kernels=problem["kernels"], learn_bandwidths=True,
                      bandwidth_grad="lattice", backend="reference").double()
    params = list(crf.parameters())
    positions = problem.get("positions")

    def run(unary, *values):
        for p, v in zip(params, values):
            p.data = v
        return crf(unary, problem["image"], positions=positions)

    # (Parameters as inputs: gradcheck perturbs each and compares with autograd's gradient.)
    inputs = [problem["unary"].clone().requires_grad_()] + [p.detach().clone().requires_grad_() for p in params]

    def functional(unary, *values):
        backup = [p.data for p in params]
        try:
            return torch.func.functional_call(crf, dict(zip([n for n, _ in crf.named_parameters()], values)),
                                              (unary, problem["image"]), {"positions": positions})
        finally:
            for p, b in zip(params, backup):
                p.data = b
    assert torch.autograd.gradcheck(functional, inputs, eps=1e-7, atol=1e-5, rtol=1e-3)


@pytest.mark.skipif(not NATIVE, reason="the fused ops need the C++ extension")
@pytest.mark.parametrize("form", ["signal", "volume", "points"])
def test_fused_ops_equal_the_step_by_step_loop_on_every_form(form):
    """Values and gradients (unary and every parameter) of the fused ops equal the loop's."""
    problem = small_problems()[form]
    results = []
    for fused in (True, False):
        crf = CRFRNNLayer(problem["unary"].shape[1], num_iterations=3, kernels=problem["kernels"],
                          compatibility="symmetric", fused=fused).double()
        unary = problem["unary"].clone().requires_grad_()
        out = crf(unary, problem["image"], positions=problem.get("positions"))
        out.square().sum().backward()
        results.append([out.detach(), unary.grad] + [p.grad for p in crf.parameters()])
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------------------------
# Every layer option works for any kernels

def test_kernel_lists_learn_share_freeze_save_and_rescale():
    kernels = [GaussianKernel(4.0, positions=(1.5, 3.0, 3.0), guide=(10.0, 20.0), name="appearance3d"),
               GaussianKernel(2.0, positions=2.5)]
    crf = CRFRNNLayer(3, kernels=kernels, learn_bandwidths=True, compatibility="potts", kernel_weights="diagonal")
    names = {n for n, _ in crf.named_parameters()}
    assert names == {"appearance3d_log_sigma", "appearance3d_weight", "spatial_log_sigma", "spatial_weight"}
    assert crf.appearance3d_log_sigma.shape == (5,)
    crf.freeze_classes([1])
    labels, guide, logits = scene((4, 6, 7), 3, 2)
    out = crf(torch.from_numpy(logits)[None], torch.from_numpy(guide)[None])
    out.logsumexp(1).sum().backward()
    assert (crf.appearance3d_weight.grad[1] == 0).all() and (crf.appearance3d_weight.grad[[0, 2]] != 0).all()
    assert (crf.appearance3d_log_sigma.grad != 0).all()
    again = CRFRNNLayer(**crf.config())
    again.load_state_dict(crf.state_dict())
    assert again.config() == crf.config() and again.sigmas() == crf.sigmas()
    fixed = CRFRNNLayer(3, kernels=kernels)
    fixed.scale_spatial_bandwidths(2.0)
    assert fixed.sigmas() == ((3.0, 6.0, 6.0, 10.0, 20.0), (5.0,))
    assert [k.config() for k in fixed.kernel_bandwidths()] == [
        {"weight": 4.0, "positions": [3.0, 6.0, 6.0], "guide": [10.0, 20.0], "name": "appearance3d"},
        {"weight": 2.0, "positions": 5.0, "guide": None, "name": "spatial"}]


def test_kernel_names_are_made_unique_and_checked():
    crf = CRFRNNLayer(2, kernels=[GaussianKernel(1.0, positions=2.0), GaussianKernel(1.0, positions=3.0),
                                  GaussianKernel(1.0, guide=5.0)])
    assert [k.name for k in crf.kernels] == ["spatial", "spatial2", "appearance"]
    with pytest.raises(ValueError, match="two kernels are named 'a'"):
        CRFRNNLayer(2, kernels=[GaussianKernel(1.0, positions=2.0, name="a"), GaussianKernel(1.0, guide=2.0, name="a")])
    with pytest.raises(ValueError, match="either as kernels= or as bilateral=/spatial="):
        CRFRNNLayer(2, kernels=[GaussianKernel(1.0, positions=2.0)], bilateral=(80, 13, 10))
    with pytest.raises(ValueError, match="over the positions, the guide or both"):
        GaussianKernel(1.0)
    with pytest.raises(ValueError, match="positive finite"):
        GaussianKernel(1.0, positions=(2.0, -1.0))


# ------------------------------------------------------------------------------------------
# Bad input: a ValueError that names what came and what was expected

def test_bad_inputs_are_named():
    crf = CRFRNNLayer(2, kernels=[GaussianKernel(1.0, positions=(1.0, 2.0, 2.0), guide=(5.0, 6.0))])
    unary, image = torch.randn(1, 2, 4, 5, 6), torch.rand(1, 2, 4, 5, 6) * 50
    crf(unary, image)
    with pytest.raises(ValueError, match=r"image \(1, 2, 4, 5, 7\) and unary \(1, 2, 4, 5, 6\) must share"):
        crf(unary, torch.rand(1, 2, 4, 5, 7))
    with pytest.raises(ValueError, match="2 guide bandwidths .* but the guide has 3 channels"):
        crf(unary, torch.rand(1, 3, 4, 5, 6))
    with pytest.raises(ValueError, match="3 position bandwidths .* but unary .* has 2 position axes"):
        crf(torch.randn(1, 2, 5, 6), torch.rand(1, 2, 5, 6))
    with pytest.raises(ValueError, match="over the guide .* but no guide image was given"):
        crf(unary)
    with pytest.raises(ValueError, match=r"unary must be Tensor\[N, C, \*S\]"):
        crf(torch.randn(1, 2, 2, 3, 4, 5), torch.rand(1, 2, 2, 3, 4, 5))
    points = CRFRNNLayer(2, kernels=[GaussianKernel(1.0, positions=2.0)])
    with pytest.raises(ValueError, match=r"positions must be a real Tensor\[N, D, P\]"):
        points(torch.randn(1, 2, 10), positions=torch.rand(1, 3, 9))
    with pytest.raises(ValueError, match=r"positions must be a real Tensor\[N, D, P\].* got torch.bool"):
        points(torch.randn(1, 2, 10), positions=torch.rand(1, 3, 10) > 0.5)
    integer = torch.randint(0, 20, (1, 3, 10))  # voxel indices: taken as numbers
    torch.testing.assert_close(points(torch.randn(1, 2, 10, generator=torch.Generator().manual_seed(0)),
                                      positions=integer),
                               points(torch.randn(1, 2, 10, generator=torch.Generator().manual_seed(0)),
                                      positions=integer.float()))
    with pytest.raises(ValueError, match=r"unary must be Tensor\[N, C, P\]"):
        points(torch.randn(1, 2, 3, 4), positions=torch.rand(1, 3, 12))
    bad = torch.rand(1, 3, 10)
    bad[0, 1, 4] = float("nan")
    with pytest.raises(ValueError, match="features .*NaN"):
        points(torch.randn(1, 2, 10), positions=bad)
    with pytest.raises(ValueError, match="more than a lattice can index"):
        points(torch.empty(1, 2, 200_000_000, device="meta"), positions=torch.empty(1, 3, 200_000_000, device="meta"))
    many = CRFRNNLayer(2, kernels=[GaussianKernel(1.0, guide=1.0)])
    with pytest.raises(ValueError, match="40 features .* more than a lattice takes"):
        many(torch.randn(1, 2, 8), torch.rand(1, 40, 8))
    with pytest.raises(ValueError, match="declare a normalised RGB image, but the guide has 2 channels"):
        CRFRNNLayer(2, kernels=[GaussianKernel(1.0, guide=1.0)], image_mean=(0.5,) * 3, image_std=(0.2,) * 3)(
            torch.randn(1, 2, 8), torch.rand(1, 2, 8))


def test_three_channel_guides_other_than_rgb_images_are_taken_in_their_own_units():
    """RGB's 0..255 check and colour warnings are for a 3-channel image on a 2-D grid (or one
    image_mean/image_std declare): surface normals of a point cloud, a 3-modality volume in
    Hounsfield units or a signal's three sensors are used as they are, as 1- and 2-channel guides
    are; and a guide no kernel reads is not checked at all."""
    g = torch.Generator().manual_seed(0)
    normals = torch.nn.functional.normalize(torch.randn(1, 3, 200, generator=g), dim=1)   # in -1..1
    cloud = CRFRNNLayer(3, kernels=[GaussianKernel(3.0, positions=0.3, guide=0.5)])
    scan = torch.rand(1, 3, 6, 8, 10, generator=g) * 1400 - 1000                          # -1000..400 HU
    volume = CRFRNNLayer(2, kernels=[GaussianKernel(3.0, positions=2.0, guide=100.0)])
    sensors = torch.rand(1, 3, 50, generator=g) * 0.01                                     # in 0..0.01
    signal = CRFRNNLayer(2, kernels=[GaussianKernel(3.0, positions=2.0, guide=0.005)])
    spatial_only = CRFRNNLayer(2, kernels=[GaussianKernel(3.0, positions=2.0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no colour warning either
        for crf, args in ((cloud, (torch.randn(1, 3, 200), normals, torch.rand(1, 3, 200, generator=g))),
                          (volume, (torch.randn(1, 2, 6, 8, 10), scan)),
                          (signal, (torch.randn(1, 2, 50), sensors)),
                          (spatial_only, (torch.randn(1, 2, 9, 7), torch.rand(1, 3, 9, 7) * 1000))):
            assert torch.isfinite(crf(*args[:2], positions=args[2] if len(args) > 2 else None)).all()
        rgb = np.random.default_rng(0).uniform(-1, 1, (200, 3)).astype(np.float32)
        probs = np.full((3, 200), 1 / 3, np.float32)
        crfrnn.dense_crf(rgb, probs, kernels=[GaussianKernel(3.0, positions=0.3, guide=0.5)],
                         positions=np.random.default_rng(1).uniform(0, 1, (200, 3)))
    # A 3-channel image on a 2-D grid is RGB: checked as before.
    with pytest.raises(ValueError, match="image has values in .* pass RGB in 0..255"):
        CRFRNNLayer(2)(torch.randn(1, 2, 9, 7), torch.rand(1, 3, 9, 7) * 1000)
    with pytest.raises(ValueError, match="RGB in 0..255"):
        crfrnn.dense_crf(np.full((9, 7, 3), 300.0, np.float32), np.full((2, 9, 7), 0.5, np.float32))
