"""The layer at its edges: non-finite and huge parameters, meta tensors, empty channels and
sizes, images outside 0..255 or in another colour convention, integer, bool and complex
tensors, odd layouts and huge images. Each case gives a clear error (naming what was expected
and what came) or a correct result: never a crash, a hang or silent garbage."""
import os
import subprocess
import sys
import warnings
from functools import partial

import numpy as np
import pytest
import torch

import crfrnn
from crfrnn import CRFRNNLayer, GaussianKernel
from helpers import NATIVE, crf_inputs

SMALL = dict(bilateral=(5.0, 20.0, 3.0), spatial=(2.0, 1.0))
PARAMETERS = ("bilateral_weight", "spatial_weight", "compatibility")
#: A batch of two 9 x 7 images, float32, unit-variance logits.
make_inputs = partial(crf_inputs, n=2, h=9, w=7, dtype=torch.float32, scale=1.0)


# ------------------------------------------------------------------------------------------
# Non-finite and huge parameters

@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", PARAMETERS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_parameters_raise(name, value, grad):
    unary, image = make_inputs()
    crf = CRFRNNLayer(3, num_iterations=2, **SMALL)
    with torch.no_grad():
        getattr(crf, name)[1, 2] = value
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=rf"CRFRNNLayer.{name} has 1 NaN/Inf"):
        crf(unary, image)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", PARAMETERS)
def test_huge_finite_parameters_raise_or_give_the_float64_result(name, grad):
    """3e38 fits float32, but products and sums of it overflow: wherever it sits, the float32
    layer either raises a clear error or returns what the same layer computes in float64 (where
    nothing overflows), never NaN and never another finite result. (Where the huge weight meets
    a class whose marginal underflows, the exact result is finite: the fused softmax must give
    that class exactly 0, as torch.softmax does, not a floor that 3e38 turns into a message.)"""
    unary, image = make_inputs()
    raised = 0
    for i in range(3):
        for j in range(3):
            crf = CRFRNNLayer(3, num_iterations=2, **SMALL)
            with torch.no_grad():
                getattr(crf, name)[i, j] = 3e38
            exact = CRFRNNLayer(3, num_iterations=2, **SMALL).double()
            exact.load_state_dict(crf.state_dict())
            with torch.no_grad():
                expected = exact(unary.double(), image.double())
            try:
                with torch.set_grad_enabled(grad):
                    out = crf(unary, image)
            except ValueError as exc:
                assert "too large" in str(exc)
                raised += 1
            else:  # measured: 3e-7 relative where it returns
                torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    if not grad:  # the fused op applies the matrices to unnormalised vertex sums: it overflows first
        assert raised > 0


def test_the_reported_huge_parameters_raise():
    """The reported cases, in evaluation (no gradient): 3e38 on the diagonal of compatibility (its
    product with the weights overflows) or of spatial_weight (the output overflows) gave an
    all-NaN output. With sender pruning (evaluation's default) the second is refused before the
    iterations, which could overflow unseen."""
    unary, image = make_inputs()
    for name, match, prune in (
            ("compatibility", "pairwise matrices compatibility @ weight overflow", 0.0),
            ("compatibility", "pairwise matrices compatibility @ weight overflow", crfrnn.DEFAULT_PRUNE),
            ("spatial_weight", "the CRF output has .* NaN/Inf values.*largest \\|value\\| 3e\\+38", 0.0),
            ("spatial_weight", "too large for sender pruning: .* sums to 3e\\+38", crfrnn.DEFAULT_PRUNE)):
        crf = CRFRNNLayer(3, num_iterations=2, eval_prune=prune, **SMALL).eval()
        with torch.no_grad():
            getattr(crf, name)[0, 0] = 3e38
            with pytest.raises(ValueError, match=match):
                crf(unary, image)


def test_dense_crf_non_finite_weights_and_outputs_raise():
    img = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    probs = np.full((3, 6, 5), 1 / 3, np.float32)
    probs[0, :3] = 0.8
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number"):
            crfrnn.dense_crf(img, probs, bilateral=(80, 13, bad))
        with pytest.raises(ValueError, match="finite number"):
            crfrnn.dense_crf(img, probs, spatial=(3, bad))
    with pytest.raises(ValueError, match=r"output has \d+ NaN/Inf values.*spatial 3e\+38"):
        crfrnn.dense_crf(img, probs, spatial=(3, 3e38), prune=0)
    with pytest.raises(ValueError, match=r"too large for sender pruning"):
        crfrnn.dense_crf(img, probs, spatial=(3, 3e38))
    expected = crfrnn.dense_crf(img, torch.from_numpy(probs).double(), bilateral=(80, 13, 3e38)).numpy()
    try:
        q = crfrnn.dense_crf(img, probs, bilateral=(80, 13, 3e38))
    except ValueError as exc:
        assert "too large" in str(exc)
    else:  # the float64 computation, where nothing overflows
        np.testing.assert_allclose(q, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Meta tensors, zero channels, integer images

def test_meta_inputs_give_a_meta_result_or_a_clear_error():
    crf = CRFRNNLayer(3, num_iterations=2).to("meta")
    out = crf(torch.empty(2, 3, 9, 7, device="meta"), torch.empty(2, 3, 9, 7, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3, 9, 7) and out.dtype == torch.float32
    out = crf(torch.empty(2, 3, 9, 7, device="meta", dtype=torch.float64), torch.empty(2, 3, 9, 7, device="meta"))
    assert out.dtype == torch.float64
    with pytest.raises(ValueError, match="image is on cpu but unary is on meta"):
        crf(torch.empty(1, 3, 4, 4, device="meta"), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="parameters are on cpu but unary is on meta"):
        CRFRNNLayer(3)(torch.empty(1, 3, 4, 4, device="meta"), torch.empty(1, 3, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="meta device.*depends on the feature values"):
        crfrnn.Lattice(torch.empty(1, 3, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="on meta but the lattice is on cpu"):
        crfrnn.Lattice(torch.rand(1, 3, 4, 4)).filter(torch.empty(1, 2, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="got meta tensors"):
        crfrnn.dense_crf(torch.empty(4, 4, 3, device="meta"), torch.empty(2, 4, 4, device="meta"))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("normalize", crfrnn.NORMALIZATIONS)
def test_filter_of_zero_channels_is_empty(backend, normalize):
    per_pixel = crfrnn.Lattice(torch.rand(2, 3, 5, 4) * 3, backend=backend)
    out = per_pixel.filter(torch.rand(2, 0, 5, 4, dtype=torch.float64), normalize)
    assert out.shape == (2, 0, 5, 4) and out.dtype == torch.float64
    per_point = crfrnn.Lattice(torch.rand(2, 7, 3) * 3, backend=backend)
    assert per_point.filter(torch.rand(2, 7, 0), normalize).shape == (2, 7, 0)
    filter_op = per_point._filter_op
    tables = (per_point.vertex_index, per_point.weights, per_point.neighbors, per_point.splat_offsets,
              per_point.splat_entries)
    assert filter_op(torch.rand(14, 0), *tables, False).shape == (14, 0)


@pytest.mark.parametrize("dtype,low,high", [(torch.int8, -3, 100), (torch.int16, 0, 1000),
                                            (torch.int32, 0, 256), (torch.int64, -1, 0),
                                            (torch.float32, 0, 255.5), (torch.float16, -0.5, 2)])
def test_images_outside_0_255_raise(dtype, low, high):
    unary, _ = make_inputs(n=1, h=4, w=5)
    image = torch.zeros(1, 3, 4, 5, dtype=dtype)
    image[0, 0, 0, 0], image[0, 1, 2, 3] = low, high
    crf = CRFRNNLayer(3, num_iterations=2)
    with pytest.raises(ValueError, match=rf"image has values in \[{low:g}, {high:g}\] but no normalisation"):
        crf(unary, image)
    with pytest.raises(ValueError, match=rf"image must be RGB in 0..255.*\[{low:g}, {high:g}\]"):
        crfrnn.dense_crf(image[0].permute(1, 2, 0), torch.full((3, 4, 5), 1 / 3))


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _warnings_of(crf, image):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        crf(torch.randn(1, 3, 10, 12), image)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_an_image_in_0_to_1_given_as_0_to_255_is_warned_about():
    """ToTensor()'s 0..1 image to a layer that takes 0..255 would make every colour alike (the
    bilateral kernel merely spatial): the layer says so instead of smoothing silently."""
    crf = CRFRNNLayer(3, num_iterations=1)
    rgb01 = torch.rand(1, 3, 10, 12)
    messages = _warnings_of(crf, rgb01)
    assert len(messages) == 1 and "colours all lie within 0..1" in messages[0] and "Multiply it by 255" in messages[0]
    assert _warnings_of(crf, rgb01 * 255) == []
    assert _warnings_of(crf, (rgb01 * 255).to(torch.uint8)) == []
    assert _warnings_of(crf, torch.zeros(1, 3, 10, 12)) == []  # black: nothing to tell
    with warnings.catch_warnings(record=True) as caught:  # Python's default filter: once per call site
        warnings.simplefilter("default")
        for _ in range(3):
            crf(torch.randn(1, 3, 10, 12), torch.rand(1, 3, 10, 12))
    assert len(caught) == 1 and caught[0].filename == __file__
    probs = torch.full((3, 10, 12), 1 / 3)
    with pytest.warns(UserWarning, match=r"colours all lie within 0\.\.1.*Multiply it by 255"):
        crfrnn.dense_crf(rgb01[0].permute(1, 2, 0), probs)


def test_an_image_not_normalised_as_declared_is_warned_about():
    crf = CRFRNNLayer(3, num_iterations=1, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    rgb01 = torch.rand(1, 3, 10, 12)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert _warnings_of(crf, (rgb01 - mean) / std) == []
    assert _warnings_of(crf, (torch.zeros(1, 3, 10, 12) - mean) / std) == []  # black: 0..7.6e-6 once undone
    messages = _warnings_of(crf, rgb01 * 255)  # not normalised at all
    assert len(messages) == 1 and "was it normalised as declared" in messages[0]


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.float16, torch.float64])
def test_images_of_any_real_dtype_in_0_255_equal_uint8(dtype):
    unary, image = make_inputs()
    rgb = image.round().to(torch.uint8)
    crf = CRFRNNLayer(3, num_iterations=2, **SMALL)
    with torch.no_grad():
        torch.testing.assert_close(crf(unary, rgb.to(dtype)), crf(unary, rgb))
    probs = torch.softmax(unary[0], 0)
    torch.testing.assert_close(crfrnn.dense_crf(rgb[0].permute(1, 2, 0).to(dtype), probs),
                               crfrnn.dense_crf(rgb[0].permute(1, 2, 0), probs))


def test_an_integer_image_with_declared_normalisation_raises():
    unary, image = make_inputs()
    crf = CRFRNNLayer(3, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    with pytest.raises(TypeError, match="must be a normalised float tensor, got torch.uint8"):
        crf(unary, image.to(torch.uint8))


# ------------------------------------------------------------------------------------------
# Layouts, dtypes, sizes

@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_channels_last_and_non_contiguous_inputs_equal_contiguous_ones(grad):
    unary, image = make_inputs(h=10, w=8)
    crf = CRFRNNLayer(3, num_iterations=2, **SMALL)
    with torch.set_grad_enabled(grad):
        expected = crf(unary, image)
        cases = {
            "channels_last": (unary.to(memory_format=torch.channels_last),
                              image.to(memory_format=torch.channels_last)),
            "transposed": (unary.transpose(2, 3).contiguous().transpose(2, 3),
                           image.transpose(2, 3).contiguous().transpose(2, 3)),
            "strided": (torch.stack([unary, unary], -1)[..., 0], torch.stack([image, image], -1)[..., 0]),
        }
        for name, (u, im) in cases.items():
            assert not u.is_contiguous()
            torch.testing.assert_close(crf(u, im), expected, msg=name)
    one = crf(unary[:1].expand(3, -1, -1, -1), image[:1].expand(3, -1, -1, -1))  # stride-0 batch
    torch.testing.assert_close(one, crf(unary[:1], image[:1]).expand(3, -1, -1, -1))


def test_mixed_real_dtypes_of_unary_and_image_work():
    unary, image = make_inputs()
    crf = CRFRNNLayer(3, num_iterations=2, **SMALL)
    with torch.no_grad():
        expected = crf(unary.double(), image.double())
        torch.testing.assert_close(crf(unary.double(), image.float()), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(crf(unary, image.double()).double(), expected, rtol=1e-4, atol=1e-4)


def test_empty_heights_and_widths_give_empty_results():
    crf = CRFRNNLayer(3)
    for shape in ((1, 3, 0, 5), (2, 3, 4, 0), (0, 3, 4, 5)):
        assert crf(torch.zeros(shape), torch.zeros(shape)).shape == shape
    assert crfrnn.dense_crf(np.zeros((0, 5, 3), np.uint8), np.zeros((3, 0, 5), np.float32)).shape == (3, 0, 5)


def test_huge_images_raise_before_allocating():
    """Expanded (stride-0) inputs cost no memory; a copy of them would cost gigabytes."""
    big = (1, 3, 9000, 9000)  # 81 million pixels: over the int32 limit of the bilateral lattice
    with pytest.raises(ValueError, match=r"81000000 points .* at most 71582788 for d = 5"):
        CRFRNNLayer(3)(torch.zeros(1, 3, 1, 1).expand(big), torch.zeros(1, 3, 1, 1).expand(big))
    with pytest.raises(ValueError, match="at most 71582788 for d = 5"):
        crfrnn.dense_crf(torch.zeros(1, 1, 3, dtype=torch.uint8).expand(9000, 9000, 3),
                         torch.zeros(2, 1, 1).expand(2, 9000, 9000))
    with pytest.raises(ValueError, match=f"at most {crfrnn.max_lattice_points(2)} for d = 2"):
        crfrnn.Lattice(torch.zeros(1, 1, 2).expand(1, crfrnn.max_lattice_points(2) + 1, 2))


def test_nan_in_the_image_raises_naming_the_image():
    unary, image = make_inputs()
    image[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="image contains 1 NaN/Inf values.*bilateral features"):
        CRFRNNLayer(3)(unary, image)
    crf = CRFRNNLayer(3, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match="image contains 1 NaN/Inf values.*bilateral features"):
        crf(unary, image / 255)
    with pytest.raises(ValueError, match="^image gives bilateral features .* at most"):
        CRFRNNLayer(3)(unary, torch.full_like(image, 1e30))  # finite, but too large for the lattice


def test_bad_positions_raise_naming_the_positions():
    """NaN/Inf or huge positions of a point set are blamed on the positions, not the guide."""
    crf = CRFRNNLayer(2, kernels=[GaussianKernel(3.0, positions=1.0, guide=10.0)])
    unary, colours, xyz = torch.randn(1, 2, 50), torch.rand(1, 3, 50) * 255, torch.rand(1, 3, 50)
    xyz[0, 1, 7] = float("inf")
    with pytest.raises(ValueError, match="^positions contain 1 NaN/Inf values"):
        crf(unary, colours, positions=xyz)
    with pytest.raises(ValueError, match="^image and positions give bilateral features .its positions and guide"):
        crf(unary, colours, positions=xyz.nan_to_num(posinf=0.0) * 1e30)


def test_bool_and_complex_tensors_raise_type_errors():
    unary, image = make_inputs()
    crf = CRFRNNLayer(3)
    for bad in (unary > 0, unary.to(torch.complex64)):
        with pytest.raises(TypeError, match="unary must be floating point"):
            crf(bad, image)
    for bad in (image > 100, image.to(torch.complex64), image.to(torch.uint16)):  # uint16: no reductions in torch
        with pytest.raises(TypeError, match=f"image .* must be real RGB .* a signed integer .* got {bad.dtype}"):
            crf(unary, bad)
    with pytest.raises(TypeError, match="image .* must be real RGB .* got torch.uint16"):
        crfrnn.dense_crf(np.zeros((4, 5, 3), np.uint16), np.full((2, 4, 5), 0.5, np.float32))
    for bad in (torch.ones(1, 5, 2, dtype=torch.bool), torch.ones(1, 5, 2, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="features must be a floating-point"):
            crfrnn.Lattice(bad)
    lat = crfrnn.Lattice(torch.rand(1, 5, 2))
    for bad in (torch.ones(1, 5, 3, dtype=torch.bool), torch.ones(1, 5, 3, dtype=torch.complex128)):
        with pytest.raises(TypeError, match="values must be a floating-point"):
            lat.filter(bad)
    img = np.zeros((4, 5, 3), np.uint8)
    for bad in (np.ones((3, 4, 5), bool), np.ones((3, 4, 5), np.complex64)):
        with pytest.raises(TypeError, match="probs must be floating point"):
            crfrnn.dense_crf(img, bad)
    for bad in (img > 0, img.astype(np.complex64)):
        with pytest.raises(TypeError, match="image .* must be real RGB"):
            crfrnn.dense_crf(bad, np.full((3, 4, 5), 1 / 3, np.float32))


@pytest.mark.parametrize("op", ["build_lattice", "build_lattice_ref"])
def test_build_ops_check_their_features_on_direct_calls(op):
    """Both build ops refuse what the lattice cannot hold (the C++ op with RuntimeError, the
    reference with ValueError/TypeError), instead of building a lattice of garbage."""
    if op == "build_lattice" and not NATIVE:
        pytest.skip("C++ extension not built")
    build = getattr(torch.ops.crfrnn, op)
    cases = [(torch.rand(1, 4, 0), "d must be in 1..31, got 0"), (torch.rand(1, 4, 32), "d must be in 1..31, got 32"),
             (torch.rand(4, 3), r"features must be \[N, P, d\]"),
             (torch.ones(1, 4, 2, dtype=torch.int32), "features must be floating point"),
             (torch.ones(1, 4, 2, dtype=torch.complex64), "features must be floating point"),
             (torch.full((1, 4, 2), float("nan")), "features contain 8 NaN/Inf values")]
    for features, match in cases:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
            build(features)
    with pytest.raises((RuntimeError, ValueError), match="too many points|more than a lattice can index"):
        build(torch.zeros(1, 1, 2).expand(1, 2 ** 30, 2))
    with pytest.raises(ValueError, match="d must be in 1..31, got 32"):
        crfrnn.Lattice(torch.rand(1, 4, 32), backend="reference")


def test_dense_crf_refuses_scores_passed_as_probabilities():
    """Values above 1 would be clipped to 1 before the log, flattening the unary silently."""
    image = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(ValueError, match="probabilities in 0..1 .* got values up to 50"):
        crfrnn.dense_crf(image, np.full((2, 4, 5), 50.0, np.float32))
    crfrnn.dense_crf(image, np.full((2, 4, 5), 0.5, np.float32))  # probabilities pass


def test_a_refused_state_dict_leaves_the_layer_as_it_was():
    """Damaged iteration counts or normalisation are refused before anything is copied: the layer
    keeps its own, and its next state dict loads anywhere."""
    crf = CRFRNNLayer(3)
    before = {k: v.clone() for k, v in crf.state_dict().items()}
    for key, bad in (("iterations", torch.tensor([5, 10 ** 9])), ("normalization", torch.tensor(7)),
                     ("iterations", torch.tensor([-1, 10]))):
        state = crf.state_dict()
        state[key] = bad
        state["compatibility"] = state["compatibility"] + 1.0  # would be copied by a load that went ahead
        with pytest.raises(RuntimeError, match="iterations .* normalization"):
            crf.load_state_dict(state)
        for k, v in crf.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert (crf.num_iterations, crf.num_eval_iterations, crf.normalize) == (5, 10, "symmetric")
        CRFRNNLayer(3).load_state_dict(crf.state_dict())


def test_weights_that_overflow_the_parameters_are_refused_when_built():
    with pytest.raises(ValueError, match="'spatial'.s weight 1e\\+39 overflows torch.float32"):
        CRFRNNLayer(3, spatial=(3.0, 1e39))
    with pytest.raises(ValueError, match="'spatial'.s weight 1e\\+200 overflows"):
        CRFRNNLayer(3, kernels=[crfrnn.GaussianKernel(1e200, positions=1.0)])


def test_sparse_inputs_and_a_bad_backend_are_named():
    unary, image = make_inputs()
    crf = CRFRNNLayer(3)
    for args in ((unary.to_sparse(), image), (unary, image.to_sparse())):
        with pytest.raises(TypeError, match="must be a dense .strided. tensor, got layout torch.sparse_coo"):
            crf(*args)
    probs = torch.softmax(unary[0], 0)
    rgb = image[0].permute(1, 2, 0).contiguous()
    with pytest.raises(TypeError, match="probs must be a dense .strided. tensor"):
        crfrnn.dense_crf(rgb, probs.to_sparse())
    with pytest.raises(ValueError, match="backend must be one of"):
        crfrnn.dense_crf(rgb, probs, backend="cuda")


def test_bandwidths_weights_and_clip_may_be_numpy_scalars_arrays_or_tensors():
    """Numbers read back from tensors or arrays are numbers: the same kernels and results as floats."""
    unary, image = make_inputs()
    as_floats = CRFRNNLayer(3, bilateral=(80.0, 13.0, 10.0), spatial=(3.0, 3.0)).eval()
    for bilateral, spatial in ((np.array([80.0, 13.0, 10.0]), torch.tensor([3.0, 3.0])),
                               ((torch.tensor(80.0), np.float32(13.0), 10), (np.float64(3.0), torch.tensor(3)))):
        crf = CRFRNNLayer(3, bilateral=bilateral, spatial=spatial).eval()
        assert crf.bilateral == as_floats.bilateral and crf.spatial == as_floats.spatial
        torch.testing.assert_close(crf(unary, image), as_floats(unary, image), rtol=0, atol=0)
    kernel = crfrnn.GaussianKernel(torch.tensor(2.0), positions=torch.tensor(3.0), guide=np.array([4.0, 5.0, 6.0]))
    assert (kernel.weight, kernel.positions, kernel.guide) == (2.0, (3.0,), (4.0, 5.0, 6.0))
    with pytest.raises(ValueError, match="must be a positive finite number"):
        crfrnn.GaussianKernel(1.0, positions=torch.tensor(-1.0))
    probs = torch.softmax(unary[0], 0).numpy()
    rgb = image[0].permute(1, 2, 0).contiguous().numpy()
    np.testing.assert_array_equal(crfrnn.dense_crf(rgb, probs, clip=np.float32(1e-4)),
                                  crfrnn.dense_crf(rgb, probs, clip=float(np.float32(1e-4))))


_OUT_OF_MEMORY = """
import resource, torch, crfrnn
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
crf = crfrnn.CRFRNNLayer(100, num_iterations=50).train()
try:
    crf(torch.randn(1, 100, 200, 200, requires_grad=True), torch.rand(1, 3, 200, 200) * 255)
except torch.OutOfMemoryError as e:
    print(e)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not NATIVE, reason="RLIMIT_AS; the fused op")
def test_a_training_forward_that_cannot_keep_its_grids_says_so():
    """50 iterations of 100 classes keep ~4 GB of grids for the backward: under a 6 GB address
    space the fused op says what and what to do, not a bare std::bad_alloc."""
    run = subprocess.run([sys.executable, "-c", _OUT_OF_MEMORY], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert "crfrnn: not enough memory for the" in run.stdout and "keep_marginals=False or checkpoint=True" in \
        run.stdout, run.stdout + run.stderr
