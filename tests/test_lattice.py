"""The permutohedral lattice: reference vs C++ vs the exact Gaussian, adjoint, gradients, errors."""
import numpy as np
import pytest
import torch

import crfrnn
from crfrnn import reference

NATIVE = crfrnn.has_native_kernel("cpu")
BACKENDS = ["reference"] + (["native"] if NATIVE else [])
needs_native = pytest.mark.skipif(not NATIVE, reason=f"C++ extension not built: {crfrnn.EXTENSION_ERROR}")


def random_points(n, p, d, spread=2.0, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, p, d, generator=g, dtype=dtype) * spread * 4


def raw_filter(lat, values, reverse):
    """The lattice op on flat values [N*P, C], with the blur order of `reverse`."""
    return lat._filter_op(values, lat.vertex_index, lat.weights.to(values.dtype), lat.neighbors,
                          lat.splat_offsets, lat.splat_entries, reverse)


def test_native_backend_is_built():
    """CI builds the extension: a silent fallback to the reference must not pass unnoticed."""
    assert NATIVE, f"C++ backend missing: {crfrnn.EXTENSION_ERROR}"


# ------------------------------------------------------------------------------------------
# Structure of the lattice

@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 16])
def test_barycentric_weights_are_a_partition_of_unity(d):
    lat = crfrnn.Lattice(random_points(2, 200, d), backend="reference")
    w = lat.weights
    assert (w >= -1e-12).all()
    torch.testing.assert_close(w.sum(1), torch.ones(400, dtype=w.dtype))


@pytest.mark.parametrize("d", [1, 2, 5, 8, 16])
def test_simplex_vertices_reconstruct_the_point(d):
    """sum_r bary_r * vertex_r equals the elevated point (Adams et al.'s barycentric identity)."""
    pts = random_points(1, 100, d)[0]
    rem0, rank, bary = reference.embed(pts)
    keys = reference.vertex_keys(rem0, rank).double()  # [P, d+1 vertices, d+1 coords]
    recon = (bary[:, :, None] * keys).sum(1)
    cf = pts * reference.scale_factors(d, pts.device)
    # Elevation E f: coordinate j = sum_{k >= j} cf_k - j cf_{j-1}.
    suffix = torch.flip(torch.cumsum(torch.flip(cf, [1]), 1), [1])
    elevated = torch.cat([suffix, torch.zeros(100, 1, dtype=cf.dtype)], 1)
    elevated[:, 1:] -= torch.arange(1, d + 1, dtype=cf.dtype) * cf
    torch.testing.assert_close(recon, elevated)
    assert (keys.sum(2) == 0).all(), "lattice points lie on the plane sum(x) = 0"
    assert (keys.remainder(d + 1)[:, 0] == 0).all(), "vertex 0 is a remainder-0 point"


@needs_native
@pytest.mark.parametrize("d", [1, 2, 5, 8, 16])
def test_native_lattice_equals_reference_up_to_vertex_numbering(d):
    feats = random_points(3, 150, d)
    ref = crfrnn.Lattice(feats, backend="reference")
    nat = crfrnn.Lattice(feats, backend="native")
    assert nat.num_vertices == ref.num_vertices
    torch.testing.assert_close(nat.weights, ref.weights, rtol=0, atol=1e-12)
    # The two numberings must be one bijection, consistent over every point and corner...
    perm = torch.full((ref.num_vertices + 1,), -1, dtype=torch.long)
    perm[ref.vertex_index.long().flatten()] = nat.vertex_index.long().flatten()
    assert (perm[ref.vertex_index.long()] == nat.vertex_index.long()).all()
    assert len(set(perm[:-1].tolist())) == ref.num_vertices
    # ... under which the blur neighbours agree (M maps to M).
    perm[-1] = nat.num_vertices
    mapped = perm[ref.neighbors.long()]
    expect = nat.neighbors.long()[:, perm[:-1]]
    assert (mapped == expect).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,p,d", [(2, 120, 4), (1, 6000, 2)])  # the C++ sort: 4 and 16 blocks
def test_splat_table_lists_each_vertex_entries_in_order(backend, n, p, d):
    lat = crfrnn.Lattice(random_points(n, p, d), backend=backend)
    off, ent = lat.splat_offsets.long(), lat.splat_entries.long()
    assert off[0] == 0 and off[-1] == ent.numel() == lat.vertex_index.numel()
    owner = torch.repeat_interleave(torch.arange(lat.num_vertices), off.diff())
    assert (lat.vertex_index.flatten().long()[ent] == owner).all()
    same = owner[1:] == owner[:-1]
    assert (ent[1:][same] > ent[:-1][same]).all()


def test_missing_neighbours_are_marked_not_self():
    lat = crfrnn.Lattice(random_points(1, 50, 3, spread=20.0), backend="reference")
    m = lat.num_vertices
    nb = lat.neighbors.long()
    assert (nb == m).any(), "sparse points must have missing neighbours"
    assert not (nb == torch.arange(m)[None, :, None]).any(), "a vertex is never its own neighbour"


# ------------------------------------------------------------------------------------------
# Filtering: backends agree, against the exact filter, adjoint

@needs_native
@pytest.mark.parametrize("d,c,n", [(1, 3, 1), (2, 21, 2), (5, 21, 3), (8, 4, 1), (16, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_filter_matches_reference(d, c, n, dtype):
    feats = random_points(n, 300, d, dtype=dtype)
    vals = torch.randn(n, 300, c, dtype=dtype, generator=torch.Generator().manual_seed(1))
    ref = crfrnn.Lattice(feats, backend="reference")
    nat = crfrnn.Lattice(feats, backend="native")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for norm in crfrnn.NORMALIZATIONS:
        torch.testing.assert_close(nat.filter(vals, norm), ref.filter(vals, norm), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 2, 3, 5])
@pytest.mark.parametrize("spread", [0.5, 2.0])
def test_against_exact_gaussian(backend, d, spread):
    """Documented accuracy (see README): normalised filters within 15% relative L2 error of the
    exact Gaussian; the raw filter has the lattice's known gain below 1 (0.3-1x)."""
    feats = random_points(2, 300, d, spread=spread)
    vals = torch.rand(2, 300, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lat = crfrnn.Lattice(feats, backend=backend)
    for norm in ("after", "symmetric"):
        approx, exact = lat.filter(vals, norm), crfrnn.exact_gaussian_filter(feats, vals, norm)
        assert (approx - exact).norm() / exact.norm() < 0.15, norm
    gain = lat.filter(vals).sum() / crfrnn.exact_gaussian_filter(feats, vals).sum()
    assert 0.3 < gain < 1.05


def test_exact_filter_is_the_gaussian_sum():
    f = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    v = torch.tensor([[[1.0], [10.0], [100.0]]], dtype=torch.float64)
    out = crfrnn.exact_gaussian_filter(f, v)
    e = np.exp
    expect = [1 + 10 * e(-0.5) + 100 * e(-2), e(-0.5) + 10 + 100 * e(-2.5), e(-2) + 10 * e(-2.5) + 100]
    torch.testing.assert_close(out[0, :, 0], torch.tensor(expect, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 5, 16])
def test_reverse_blur_order_is_the_exact_adjoint(backend, d):
    lat = crfrnn.Lattice(random_points(2, 200, d), backend=backend)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(400, 3, dtype=torch.float64, generator=g)
    b = torch.randn(400, 3, dtype=torch.float64, generator=g)
    lhs = (raw_filter(lat, a, False) * b).sum()
    torch.testing.assert_close(lhs, (a * raw_filter(lat, b, True)).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_separate_images(backend):
    """The image index is part of the key: identical features in two images never mix."""
    feats = random_points(3, 100, 3)
    feats[1] = feats[0]  # same positions, different values: must still be filtered apart
    vals = torch.rand(3, 100, 5, dtype=torch.float64)
    batched = crfrnn.Lattice(feats, backend=backend).filter(vals, "after")
    for i in range(3):
        alone = crfrnn.Lattice(feats[i:i + 1], backend=backend).filter(vals[i:i + 1], "after")
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_pixel_layout_equals_per_point_layout(backend):
    img = torch.rand(2, 3, 9, 7, dtype=torch.float64) * 255
    feats = crfrnn.bilateral_features(img, 3.0, 20.0)
    vals = torch.rand(2, 4, 9, 7, dtype=torch.float64)
    pixel = crfrnn.Lattice(feats, backend=backend).filter(vals, "symmetric")
    points = crfrnn.Lattice(feats.flatten(2).transpose(1, 2), backend=backend).filter(
        vals.flatten(2).transpose(1, 2), "symmetric")
    torch.testing.assert_close(pixel.flatten(2).transpose(1, 2), points)


@needs_native
def test_native_filter_is_deterministic():
    feats = random_points(2, 2000, 5, dtype=torch.float32)
    vals = torch.randn(2, 2000, 21)
    outs = [crfrnn.Lattice(feats, backend="native").filter(vals, "symmetric") for _ in range(3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@needs_native
@pytest.mark.parametrize("c", [1, 3])
def test_native_filter_gives_the_same_bits_on_1_and_4_threads(c):
    """With fewer channels than threads the C++ splat gathers through the vertex -> entries
    table instead of splitting the channels: the same sums in the same order."""
    lat = crfrnn.Lattice(random_points(2, 2000, 5, dtype=torch.float32), backend="native")
    vals = torch.randn(2, 2000, c)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 4):
            torch.set_num_threads(n)
            outs.append(lat.filter(vals))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_values_are_accepted_and_accumulated_in_float32(backend):
    feats = random_points(1, 300, 5, dtype=torch.float32)
    vals = torch.rand(1, 300, 4)
    lat = crfrnn.Lattice(feats, backend=backend)
    out = lat.filter(vals.half(), "after")
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), lat.filter(vals, "after"), rtol=2e-3, atol=2e-3)
    half_lat = crfrnn.Lattice(feats.half(), backend=backend)
    assert half_lat.weights.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_work(backend):
    img = torch.rand(2, 3, 10, 8, dtype=torch.float64) * 255
    feats = crfrnn.bilateral_features(img, 3.0, 20.0)
    vals = torch.rand(2, 8, 10, 4, dtype=torch.float64).permute(0, 3, 2, 1)  # [2, 4, 10, 8] strided
    assert not vals.is_contiguous()
    lat = crfrnn.Lattice(feats.transpose(2, 3).contiguous().transpose(2, 3), backend=backend)
    torch.testing.assert_close(lat.filter(vals, "after"),
                               crfrnn.Lattice(feats.contiguous(), backend=backend).filter(vals.contiguous(), "after"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_returns_empty(backend):
    lat = crfrnn.Lattice(torch.zeros(0, 5, 4, 4), backend=backend)
    assert lat.num_vertices == 0
    out = lat.filter(torch.zeros(0, 3, 4, 4), "symmetric")
    assert out.shape == (0, 3, 4, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_pixel_image_is_its_own_mean(backend):
    lat = crfrnn.Lattice(torch.zeros(1, 5, 1, 1), backend=backend)
    vals = torch.tensor([[[[3.0]], [[-2.0]]]])
    torch.testing.assert_close(lat.filter(vals, "after"), vals)


# ------------------------------------------------------------------------------------------
# Gradients, opcheck, torch.compile

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", crfrnn.NORMALIZATIONS)
def test_gradcheck_values(backend, normalize):
    feats = random_points(2, 12, 3, spread=0.7)
    lat = crfrnn.Lattice(feats, backend=backend)
    vals = torch.randn(2, 12, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: lat.filter(v, normalize), (vals,))
    assert torch.autograd.gradgradcheck(lambda v: lat.filter(v, normalize), (vals,))


def test_forward_order_blur_is_not_the_adjoint():
    """The pitfall the adjoint avoids: with the forward blur order the transpose is wrong."""
    lat = crfrnn.Lattice(random_points(1, 300, 5, spread=0.5), backend="reference")
    eye = torch.eye(300, dtype=torch.float64)
    k = raw_filter(lat, eye, False)
    assert torch.allclose(raw_filter(lat, eye, True), k.T, atol=1e-12)
    assert not torch.allclose(raw_filter(lat, eye, False), k.T, atol=1e-6)


def test_features_get_no_gradient():
    """Documented: features are constants of the filter; no gradient flows into them."""
    feats = random_points(1, 30, 2).requires_grad_()
    vals = torch.rand(1, 30, 2, dtype=torch.float64, requires_grad=True)
    crfrnn.Lattice(feats).filter(vals, "after").sum().backward()
    assert feats.grad is None and vals.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    lat = crfrnn.Lattice(random_points(2, 20, 3), backend=backend)
    build = lat._filter_op  # filter op of this backend
    name = "lattice_filter_ref" if backend == "reference" else "lattice_filter"
    vals = torch.randn(40, 3, dtype=torch.float64, requires_grad=True)
    args = (vals, lat.vertex_index, lat.weights, lat.neighbors, lat.splat_offsets, lat.splat_entries, False)
    torch.library.opcheck(build, args)
    build_name = "build_lattice_ref" if backend == "reference" else "build_lattice"
    torch.library.opcheck(getattr(torch.ops.crfrnn, build_name).default, (random_points(2, 20, 3),),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert name in str(build)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    def smooth(feats, vals):
        return crfrnn.Lattice(feats, backend=backend).filter(vals, "symmetric")

    feats = random_points(2, 64, 5, dtype=torch.float32)
    vals = torch.rand(2, 64, 4)
    torch._dynamo.reset()
    compiled = torch.compile(smooth, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(feats, vals), smooth(feats, vals))


# ------------------------------------------------------------------------------------------
# Bad input

def test_bad_inputs_raise_clear_errors():
    lat = crfrnn.Lattice(torch.rand(2, 5, 6, 4))
    with pytest.raises(ValueError, match=r"\(N, H, W\) = \(2, 6, 4\).*got shape \(2, 3, 6, 5\)"):
        lat.filter(torch.rand(2, 3, 6, 5))
    with pytest.raises(ValueError, match="got shape"):
        lat.filter(torch.rand(1, 3, 6, 4))
    with pytest.raises(ValueError, match="got shape"):
        lat.filter(torch.rand(2, 6, 4))
    with pytest.raises(TypeError, match="floating-point"):
        lat.filter(torch.ones(2, 3, 6, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="normalize must be one of"):
        lat.filter(torch.rand(2, 3, 6, 4), normalize="sym")
    with pytest.raises(ValueError, match="on meta but the lattice is on cpu"):
        lat.filter(torch.rand(2, 3, 6, 4, device="meta"))
    with pytest.raises(ValueError, match=r"Tensor\[N, d, H, W\].*got shape \(5, 4\)"):
        crfrnn.Lattice(torch.rand(5, 4))
    with pytest.raises(ValueError, match="d must be in 1..31, got 32"):
        crfrnn.Lattice(torch.rand(1, 10, 32))
    with pytest.raises(ValueError, match="d must be in 1..31, got 0"):
        crfrnn.Lattice(torch.rand(1, 10, 0))
    with pytest.raises(TypeError, match="floating-point"):
        crfrnn.Lattice(torch.ones(1, 10, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        crfrnn.Lattice(np.zeros((1, 10, 2)))
    bad = torch.rand(1, 10, 2)
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        crfrnn.Lattice(bad)
    bad[0, 3, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        crfrnn.Lattice(bad)
    with pytest.raises(ValueError, match="magnitude"):
        crfrnn.Lattice(torch.full((1, 10, 2), 1e9))
    with pytest.raises(ValueError, match="backend must be"):
        crfrnn.Lattice(torch.rand(1, 10, 2), backend="gpu")
    with pytest.raises(ValueError, match="sigma_xy must be a positive"):
        crfrnn.spatial_features(torch.rand(1, 3, 4, 4), 0.0)
    with pytest.raises(ValueError, match=r"Tensor\[N, 3, H, W\]"):
        crfrnn.bilateral_features(torch.rand(1, 4, 4, 4), 3.0, 10.0)


@needs_native
def test_native_op_checks_direct_calls():
    """The C++ TORCH_CHECKs guard direct op calls with the same kind of message."""
    with pytest.raises(RuntimeError, match="features must be \\[N, P, d\\]"):
        torch.ops.crfrnn.build_lattice(torch.rand(4, 3))
    lat = crfrnn.Lattice(random_points(1, 10, 2), backend="native")
    with pytest.raises(RuntimeError, match="values must be \\[N\\*P, C\\]"):
        torch.ops.crfrnn.lattice_filter(torch.rand(10), lat.vertex_index, lat.weights, lat.neighbors,
                                        lat.splat_offsets, lat.splat_entries, False)
    with pytest.raises(RuntimeError, match="weights dtype"):
        torch.ops.crfrnn.lattice_filter(torch.rand(10, 2), lat.vertex_index, lat.weights, lat.neighbors,
                                        lat.splat_offsets, lat.splat_entries, False)


# ------------------------------------------------------------------------------------------
# Real images

@pytest.mark.data
@pytest.mark.parametrize("image_id", ["2007_000123", "2007_001311", "2009_000032"])
def test_backends_agree_on_voc_images(shared_data, image_id):
    from PIL import Image
    path = shared_data / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{image_id}.jpg"
    img = Image.open(path).convert("RGB")
    img = img.resize((img.width // 3, img.height // 3), Image.BILINEAR)  # keep the reference quick
    rgb = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float()
    vals = torch.softmax(torch.randn(1, 21, *rgb.shape[2:], generator=torch.Generator().manual_seed(4)), 1)
    for feats in (crfrnn.bilateral_features(rgb, 80 / 3, 13), crfrnn.spatial_features(rgb, 3)):
        ref = crfrnn.Lattice(feats, backend="reference")
        assert 0 < ref.num_vertices < rgb.shape[2] * rgb.shape[3]
        if NATIVE:
            nat = crfrnn.Lattice(feats, backend="native")
            assert nat.num_vertices == ref.num_vertices
            torch.testing.assert_close(nat.filter(vals, "symmetric"), ref.filter(vals, "symmetric"),
                                       rtol=1e-4, atol=1e-5)


def test_missing_extension_falls_back_to_reference_with_one_warning():
    """A failed or missing build: `import crfrnn` works, warns once, and uses the reference."""
    import subprocess
    import sys
    code = (
        "import sys, warnings\n"
        "sys.modules['crfrnn._C'] = None  # makes `from . import _C` raise ImportError\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import crfrnn, torch\n"
        "    import crfrnn.ops\n"
        "lat = crfrnn.Lattice(torch.rand(1, 3, 5, 4))\n"
        "out = lat.filter(torch.rand(1, 2, 5, 4), 'after')\n"
        "msgs = [str(w.message) for w in caught if 'falling back' in str(w.message)]\n"
        "print(len(msgs), lat.backend, crfrnn.has_native_kernel('cpu'), tuple(out.shape))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "reference", "False", "(1,", "2,", "5,", "4)"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_filter_is_n_times_raw_filter_of_n_times_values(backend, dtype):
    """"symmetric" folds n = 1/sqrt(K 1) into the weights: check it against n K(n v) literally,
    values and gradients."""
    lat = crfrnn.Lattice(random_points(2, 60, 3, dtype=dtype), backend=backend)
    v = torch.rand(2, 60, 4, dtype=dtype, requires_grad=True)
    n = torch.rsqrt(lat.filter(torch.ones(2, 60, 1, dtype=dtype)) + 1e-20)
    literal = n * lat.filter(n * v)
    folded = lat.filter(v, "symmetric")
    torch.testing.assert_close(folded, literal)
    g = torch.rand_like(literal)
    torch.testing.assert_close(torch.autograd.grad(folded, v, g)[0], torch.autograd.grad(literal, v, g)[0])
