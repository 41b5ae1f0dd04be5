"""The permutohedral lattice on every device: reference vs compiled backend vs the exact
Gaussian, adjoint, gradients, opcheck, errors, edge sizes, real images.

Most tests take a `device` (cpu always; cuda, marked `cuda` and skipped without a GPU) and a
`backend` (the pure-PyTorch reference, and the compiled C++/CUDA one when it is built). The
last sections hold what only a GPU can check: the CUDA build and filter equal the C++ CPU
backend's bit for bit (the CUDA build numbers vertices in order of first appearance, as the
serial CPU build does, so the tables must be identical, not merely equivalent), streams and
devices. Run all the GPU cases, the 4000x3000 image included, with
`python -m pytest -m cuda tests/test_lattice.py`. Without a GPU, test_cuda_logic_on_cpu.py runs
the CUDA kernels' per-thread code on the CPU against the same C++ backend.
"""
import subprocess
import sys

import numpy as np
import pytest
import torch

import crfrnn
from crfrnn import reference
from helpers import (BACKENDS, LATTICE_TABLES, NATIVE, POINTS, clustered_points, cpu_and_cuda, integer_points,
                     needs_native, rand, randn, random_points, voc_rgb)

VOC_IDS = ["2007_000123", "2007_001311", "2009_000032"]


def raw_filter(lat, values, reverse=False):
    """The lattice's filter op on flat values [N*P, C], with the blur order of `reverse`."""
    return lat._filter_op(values, lat.vertex_index, lat.weights.to(values.dtype), lat.neighbors,
                          lat.splat_offsets, lat.splat_entries, reverse)


def forward_backward(lat, values, upstream, normalize):
    """(filter output, gradient of <output, upstream> w.r.t. values)."""
    values = values.detach().clone().requires_grad_()
    out = lat.filter(values, normalize)
    (grad,) = torch.autograd.grad(out, values, upstream)
    return out.detach(), grad


def assert_close_scaled(actual, expected, rtol):
    """allclose on the CPU, with the absolute tolerance scaled to the expected magnitude (the raw
    filter's outputs grow with the blur gain)."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def assert_same_lattice(gpu, cpu):
    """The CUDA lattice equals the CPU one: identical integer tables and weights."""
    assert gpu.num_vertices == cpu.num_vertices
    for name in LATTICE_TABLES:
        a, b = getattr(gpu, name), getattr(cpu, name)
        assert a.device.type == "cuda" and a.dtype == b.dtype == torch.int32, name
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.equal(a.cpu(), b), f"{name} differs between the CUDA and the CPU build"
    assert gpu.weights.dtype == cpu.weights.dtype
    # Same double-precision arithmetic on both sides (nvcc --fmad=false): equal to rounding.
    atol = 1e-12 if cpu.weights.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=0, atol=atol)


@pytest.mark.parametrize("device", cpu_and_cuda())
def test_native_kernels_are_built(device):
    """CI builds the extension (and, on a GPU machine, its CUDA kernels): a silent fallback to
    the reference must not pass unnoticed."""
    assert crfrnn.has_native_kernel(device), (
        f"crfrnn was built without {device} kernels (extension error: {crfrnn.EXTENSION_ERROR}); "
        "rebuild it (for cuda: with a CUDA toolkit, FORCE_CUDA=1 when no GPU is visible at build time)")


# ------------------------------------------------------------------------------------------
# Structure of the lattice

@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("d", [1, 2, 3, 5, 8, 16])
def test_barycentric_weights_are_a_partition_of_unity(device, d):
    lat = crfrnn.Lattice(random_points(2, 200, d, device=device), backend="reference")
    w = lat.weights
    assert (w >= -1e-12).all()
    torch.testing.assert_close(w.sum(1), torch.ones(400, dtype=w.dtype, device=device))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("d", [1, 2, 5, 8, 16])
def test_simplex_vertices_reconstruct_the_point(device, d):
    """sum_r bary_r * vertex_r equals the elevated point (Adams et al.'s barycentric identity)."""
    pts = random_points(1, 100, d, device=device)[0]
    rem0, rank, bary = reference.embed(pts)
    keys = reference.vertex_keys(rem0, rank).double()  # [P, d+1 vertices, d+1 coords]
    recon = (bary[:, :, None] * keys).sum(1)
    cf = pts * reference.scale_factors(d, pts.device)
    # Elevation E f: coordinate j = sum_{k >= j} cf_k - j cf_{j-1}.
    suffix = torch.flip(torch.cumsum(torch.flip(cf, [1]), 1), [1])
    elevated = torch.cat([suffix, torch.zeros(100, 1, dtype=cf.dtype, device=device)], 1)
    elevated[:, 1:] -= torch.arange(1, d + 1, dtype=cf.dtype, device=device) * cf
    torch.testing.assert_close(recon, elevated)
    assert (keys.sum(2) == 0).all(), "lattice points lie on the plane sum(x) = 0"
    assert (keys.remainder(d + 1)[:, 0] == 0).all(), "vertex 0 is a remainder-0 point"


@needs_native
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("kind,d,n,p", [("random", d, 3, 150) for d in (1, 2, 5, 8, 16)]
                         + [("clustered", 5, 3, 400)])
def test_native_lattice_equals_reference_up_to_vertex_numbering(device, kind, d, n, p):
    feats = POINTS[kind](n, p, d, device=device)
    assert_same_lattice_up_to_numbering(crfrnn.Lattice(feats, backend="native"),
                                        crfrnn.Lattice(feats, backend="reference"))


def assert_same_lattice_up_to_numbering(nat, ref):
    """Two lattices of the same features (the reference numbers its vertices its own way): the
    same vertices, weights and blur neighbours under one bijection of the numbers."""
    device = ref.weights.device
    assert nat.num_vertices == ref.num_vertices
    torch.testing.assert_close(nat.weights, ref.weights, rtol=0, atol=1e-12)
    # The two numberings must be one bijection, consistent over every point and corner...
    perm = torch.full((ref.num_vertices + 1,), -1, dtype=torch.long, device=device)
    perm[ref.vertex_index.long().flatten()] = nat.vertex_index.long().flatten()
    assert (perm[ref.vertex_index.long()] == nat.vertex_index.long()).all()
    assert perm[:-1].unique().numel() == ref.num_vertices
    # ... under which the blur neighbours agree (M maps to M).
    perm[-1] = nat.num_vertices
    mapped = perm[ref.neighbors.long()]
    expect = nat.neighbors.long()[:, perm[:-1]]
    assert (mapped == expect).all()


@needs_native
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("d", [3, 4, 5, 8, 16])
def test_float32_features_decide_their_simplices_in_float32(device, d):
    """float32 half-integers lie on exact ties, which float32 and float64 break differently (for
    7 to 45 of the 800 points here): the simplices are float32's (densecrf's, as
    reference.embed(float_decisions=True) decides), the weights float64's relative to them, and
    the native lattice equals the reference's bit for bit."""
    feats = (integer_points(2, 400, d, seed=d) / 2).float().to(device)
    points = feats.reshape(-1, d).double()
    rem0, rank, bary = reference.embed(points, float_decisions=True)
    rem0_d, rank_d, _ = reference.embed(points)
    assert ((rem0 != rem0_d) | (rank != rank_d)).any(1).sum() > 0
    assert bary.min() > -1e-15  # exact ties: the weights either side are zero to rounding
    ref = crfrnn.Lattice(feats, backend="reference")
    nat = crfrnn.Lattice(feats, backend="native")
    assert torch.equal(nat.weights, bary.float()) and torch.equal(ref.weights, nat.weights)
    assert_same_lattice_up_to_numbering(nat, ref)
    # The lattice's vertices are the float32 simplices' (keys with the image index: 2 images).
    keys = torch.cat([torch.arange(2, device=device).repeat_interleave(400)[:, None, None].expand(800, d + 1, 1),
                      reference.vertex_keys(rem0, rank)[:, :, :d]], 2)
    assert nat.num_vertices == torch.unique(keys.reshape(-1, d + 1), dim=0).shape[0]


@needs_native
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_float32_features_far_out_decide_in_float64(device):
    """float32 points with an elevated coordinate beyond FLOAT_DECISION_LIMIT (2^15, densecrf's
    int16 key range) are decided in float64: float32's rounding there would put points into
    simplices they lie outside of (weights down to -0.14 at features of 1e6); the points within
    it in float32. Native equals reference bit for bit."""
    near = random_points(1, 500, 5, seed=1)
    far = random_points(1, 500, 5, seed=2) * 1e6 / 8
    feats = torch.cat([near, far, near + 1e4], 1).float()
    points = feats[0].double()
    rem0, rank, bary = reference.embed(points, float_decisions=True)
    rem0_d, rank_d, bary_d = reference.embed(points)
    assert torch.equal(rem0[500:1000], rem0_d[500:1000]) and torch.equal(bary[500:1000], bary_d[500:1000])
    assert bary[500:1000].min() >= 0
    ref = crfrnn.Lattice(feats.to(device), backend="reference")
    nat = crfrnn.Lattice(feats.to(device), backend="native")
    assert torch.equal(nat.weights.cpu(), bary.float()) and torch.equal(ref.weights, nat.weights)
    assert_same_lattice_up_to_numbering(nat, ref)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,p,d", [(2, 120, 4), (1, 6000, 2)])  # the C++ sort: 4 and 16 blocks
def test_splat_table_lists_each_vertex_entries_in_order(device, backend, n, p, d):
    lat = crfrnn.Lattice(random_points(n, p, d, device=device), backend=backend)
    off, ent = lat.splat_offsets.long(), lat.splat_entries.long()
    assert off[0] == 0 and off[-1] == ent.numel() == lat.vertex_index.numel()
    owner = torch.repeat_interleave(torch.arange(lat.num_vertices, device=device), off.diff())
    assert (lat.vertex_index.flatten().long()[ent] == owner).all()
    same = owner[1:] == owner[:-1]
    assert (ent[1:][same] > ent[:-1][same]).all()


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_neighbours_are_marked_not_self(device, backend):
    lat = crfrnn.Lattice(random_points(1, 50, 3, spread=20.0, device=device), backend=backend)
    m = lat.num_vertices
    nb = lat.neighbors.long()
    assert (nb == m).any(), "sparse points must have missing neighbours"
    assert not (nb == torch.arange(m, device=device)[None, :, None]).any(), "a vertex is never its own neighbour"


# ------------------------------------------------------------------------------------------
# Filtering: backends agree, against the exact filter, adjoint

@needs_native
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("d,c,n", [(1, 3, 1), (2, 21, 2), (5, 21, 3), (8, 4, 1), (16, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_filter_matches_reference(device, d, c, n, dtype):
    """Forward and backward (the adjoint filter), every normalisation."""
    feats = random_points(n, 300, d, dtype=dtype, device=device)
    vals, upstream = (randn(n, 300, c, dtype=dtype, seed=seed, device=device) for seed in (1, 2))
    ref = crfrnn.Lattice(feats, backend="reference")
    nat = crfrnn.Lattice(feats, backend="native")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    for norm in crfrnn.NORMALIZATIONS:
        out, grad = forward_backward(nat, vals, upstream, norm)
        out_ref, grad_ref = forward_backward(ref, vals, upstream, norm)
        torch.testing.assert_close(out, out_ref, **tol)
        torch.testing.assert_close(grad, grad_ref, **tol)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, 2, 3, 5])
@pytest.mark.parametrize("spread", [0.5, 2.0])
def test_against_exact_gaussian(device, backend, d, spread):
    """The normalised filters' relative L2 error against the exact Gaussian stays within 1.5x of
    what was measured on these points (every backend builds the same lattice, so the error is the
    same on each: the bound is a regression bound, and features scaled by 1.25 exceed it); the
    raw filter has the lattice's known gain below 1 (0.36-0.92 here)."""
    # Measured ("after", "symmetric") relative errors per (d, spread):
    measured = {(1, 0.5): (0.0021, 0.0122), (1, 2.0): (0.0026, 0.0062), (2, 0.5): (0.0028, 0.0138),
                (2, 2.0): (0.0090, 0.0133), (3, 0.5): (0.0040, 0.0165), (3, 2.0): (0.0252, 0.0387),
                (5, 0.5): (0.0073, 0.0229), (5, 2.0): (0.1171, 0.1186)}[(d, spread)]
    feats = random_points(2, 300, d, spread=spread, device=device)
    vals = rand(2, 300, 3, dtype=torch.float64, seed=2, device=device)
    lat = crfrnn.Lattice(feats, backend=backend)
    for norm, error in zip(("after", "symmetric"), measured):
        approx, exact = lat.filter(vals, norm), crfrnn.exact_gaussian_filter(feats, vals, norm)
        assert (approx - exact).norm() / exact.norm() < 1.5 * error, norm
    gain = lat.filter(vals).sum() / crfrnn.exact_gaussian_filter(feats, vals).sum()
    assert 0.3 < gain < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_before_normalisation_filters_values_divided_by_the_response_to_ones(backend):
    """densecrf's NORMALIZE_BEFORE: K(v / K1), on the lattice and in the exact filter."""
    feats = clustered_points(2, 150, 3, seed=4)
    vals = rand(2, 150, 2, dtype=torch.float64, seed=5)
    lat = crfrnn.Lattice(feats, backend=backend)
    ones = torch.ones(2, 150, 1, dtype=torch.float64)
    torch.testing.assert_close(lat.filter(vals, "before"), lat.filter(vals / lat.filter(ones), "none"))
    exact_ones = crfrnn.exact_gaussian_filter(feats, ones)
    torch.testing.assert_close(crfrnn.exact_gaussian_filter(feats, vals, "before"),
                               crfrnn.exact_gaussian_filter(feats, vals / exact_ones))


def test_exact_filter_is_the_gaussian_sum():
    f = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    v = torch.tensor([[[1.0], [10.0], [100.0]]], dtype=torch.float64)
    out = crfrnn.exact_gaussian_filter(f, v)
    e = np.exp
    expect = [1 + 10 * e(-0.5) + 100 * e(-2), e(-0.5) + 10 + 100 * e(-2.5), e(-2) + 10 * e(-2.5) + 100]
    torch.testing.assert_close(out[0, :, 0], torch.tensor(expect, dtype=torch.float64))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["random", "clustered"])  # clustered: most vertices have neighbours
@pytest.mark.parametrize("d", [2, 5, 16])
def test_reverse_blur_order_is_the_exact_adjoint(device, backend, kind, d):
    lat = crfrnn.Lattice(POINTS[kind](2, 200, d, seed=5, device=device), backend=backend)
    a, b = (randn(400, 3, dtype=torch.float64, seed=seed, device=device) for seed in (6, 7))
    lhs = (raw_filter(lat, a) * b).sum()
    torch.testing.assert_close(lhs, (a * raw_filter(lat, b, reverse=True)).sum(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_separate_images(device, backend):
    """The image index is part of the key: identical features in two images never mix."""
    feats = random_points(3, 100, 3, device=device)
    feats[1] = feats[0]  # same positions, different values: must still be filtered apart
    vals = rand(3, 100, 5, dtype=torch.float64, device=device)
    batched = crfrnn.Lattice(feats, backend=backend).filter(vals, "after")
    for i in range(3):
        alone = crfrnn.Lattice(feats[i:i + 1], backend=backend).filter(vals[i:i + 1], "after")
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_pixel_layout_equals_per_point_layout(device, backend):
    img = rand(2, 3, 9, 7, dtype=torch.float64, device=device) * 255
    feats = crfrnn.bilateral_features(img, 3.0, 20.0)
    vals = rand(2, 4, 9, 7, dtype=torch.float64, seed=1, device=device)
    pixel = crfrnn.Lattice(feats, backend=backend).filter(vals, "symmetric")
    points = crfrnn.Lattice(feats.flatten(2).transpose(1, 2), backend=backend).filter(
        vals.flatten(2).transpose(1, 2), "symmetric")
    torch.testing.assert_close(pixel.flatten(2).transpose(1, 2), points)


@needs_native
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_build_and_filter_are_deterministic(device):
    """Heavy sharing of vertices (the CUDA hash inserts race on it): the tables, the filter and
    its gradient must not depend on the run."""
    feats = clustered_points(2, 30000, 5, dtype=torch.float32, seed=13, device=device)
    vals, upstream = (randn(2, 30000, 21, seed=seed, device=device) for seed in (14, 15))
    lats = [crfrnn.Lattice(feats, backend="native") for _ in range(3)]
    for lat in lats[1:]:
        for name in LATTICE_TABLES + ("weights",):
            assert torch.equal(getattr(lat, name), getattr(lats[0], name)), name
    runs = [forward_backward(lat, vals, upstream, "symmetric") for lat in lats]
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


@needs_native
@pytest.mark.parametrize("kind,d", [("clustered", 5), ("integer", 5), ("random", 5), ("clustered", 3),
                                    ("random", 9)])
def test_native_build_gives_the_same_tables_on_any_thread_count(kind, d):
    """The C++ build numbers the vertices in order of first appearance in (point, corner) order on
    any number of threads (each thread numbers those of its chunk of points, then the chunks'
    tables are merged in order; a chunk groups its points by a table of simplices or by runs, as
    is cheaper): the same tables and weights, bit for bit, the reference's lattice."""
    feats = POINTS[kind](2, 40000, d, dtype=torch.float32, seed=21)
    threads = torch.get_num_threads()
    try:
        lats = []
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            lats.append(crfrnn.Lattice(feats, backend="native"))
    finally:
        torch.set_num_threads(threads)
    for lat in lats[1:]:
        for name in LATTICE_TABLES + ("weights",):
            assert torch.equal(getattr(lat, name), getattr(lats[0], name)), name
    flat = lats[0].vertex_index.flatten().long()
    first = torch.full((lats[0].num_vertices,), flat.numel(), dtype=torch.long)
    first.scatter_reduce_(0, flat, torch.arange(flat.numel()), "amin")
    assert (first[1:] > first[:-1]).all(), "vertices numbered in order of first appearance"
    assert_same_lattice_up_to_numbering(lats[1], crfrnn.Lattice(feats, backend="reference"))


@needs_native
@pytest.mark.parametrize("c", [1, 3])
def test_native_filter_gives_the_same_bits_on_1_and_4_threads(c):
    """With fewer channels than threads the C++ splat gathers through the vertex -> entries
    table instead of splitting the channels: the same sums in the same order."""
    lat = crfrnn.Lattice(random_points(2, 2000, 5, dtype=torch.float32), backend="native")
    vals = randn(2, 2000, c)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 4):
            torch.set_num_threads(n)
            outs.append(lat.filter(vals))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_values_are_accepted_and_accumulated_in_float32(device, backend):
    feats = random_points(1, 300, 5, dtype=torch.float32, device=device)
    vals = rand(1, 300, 4, device=device)
    lat = crfrnn.Lattice(feats, backend=backend)
    out = lat.filter(vals.half(), "after")
    assert out.dtype == torch.float16 and out.device == vals.device
    torch.testing.assert_close(out.float(), lat.filter(vals, "after"), rtol=2e-3, atol=2e-3)
    half_lat = crfrnn.Lattice(feats.half(), backend=backend)
    assert half_lat.weights.dtype == torch.float32


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_give_the_contiguous_result(device, backend):
    img = rand(2, 3, 10, 8, dtype=torch.float64, device=device) * 255
    feats = crfrnn.bilateral_features(img, 3.0, 20.0)
    strided_feats = feats.transpose(2, 3).contiguous().transpose(2, 3)
    vals = rand(2, 8, 10, 4, dtype=torch.float64, seed=1, device=device).permute(0, 3, 2, 1)  # [2, 4, 10, 8]
    assert not vals.is_contiguous() and not strided_feats.is_contiguous()
    lat = crfrnn.Lattice(strided_feats, backend=backend)
    expected = crfrnn.Lattice(feats.contiguous(), backend=backend).filter(vals.contiguous(), "after")
    torch.testing.assert_close(lat.filter(vals, "after"), expected, rtol=0, atol=0)
    # The op itself, on column-major values.
    flat = vals.permute(0, 2, 3, 1).reshape(-1, 4).contiguous()
    strided = flat.T.contiguous().T  # same values, column-major
    assert not strided.is_contiguous()
    assert torch.equal(raw_filter(lat, strided), raw_filter(lat, flat))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 5, 4, 4), (2, 5, 0, 3)])  # no image; images of no pixel
def test_empty_input(device, backend, shape):
    lat = crfrnn.Lattice(torch.zeros(shape, device=device), backend=backend)
    d = shape[1]
    assert lat.num_vertices == 0
    assert lat.vertex_index.shape == (0, d + 1) and lat.neighbors.shape == (d + 1, 0, 2)
    assert lat.splat_offsets.tolist() == [0] and lat.splat_entries.numel() == 0
    vals = torch.zeros(shape[0], 3, *shape[2:], device=device)
    assert lat.filter(vals, "symmetric").shape == vals.shape
    out = raw_filter(lat, torch.zeros(0, 3, device=device))
    assert out.shape == (0, 3) and out.device == vals.device


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
def test_single_pixel_image_is_its_own_mean(device, backend):
    feats = torch.zeros(1, 5, 1, 1, device=device)
    lat = crfrnn.Lattice(feats, backend=backend)
    vals = torch.tensor([[[[3.0]], [[-2.0]]]], device=device)
    torch.testing.assert_close(lat.filter(vals, "after"), vals)
    # The raw filter (a gain below 1 on the lone point), against the CPU reference.
    expected = crfrnn.Lattice(feats.cpu(), backend="reference").filter(vals.cpu())
    torch.testing.assert_close(lat.filter(vals).cpu(), expected)


# ------------------------------------------------------------------------------------------
# Gradients, opcheck, torch.compile

@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", crfrnn.NORMALIZATIONS)
def test_gradcheck_values(device, backend, normalize):
    lat = crfrnn.Lattice(random_points(2, 12, 3, spread=0.7, device=device), backend=backend)
    vals = randn(2, 12, 3, dtype=torch.float64, seed=11, device=device).requires_grad_()
    assert torch.autograd.gradcheck(lambda v: lat.filter(v, normalize), (vals,))
    assert torch.autograd.gradgradcheck(lambda v: lat.filter(v, normalize), (vals,))


def test_forward_order_blur_is_not_the_adjoint():
    """The pitfall the adjoint avoids: with the forward blur order the transpose is wrong."""
    lat = crfrnn.Lattice(random_points(1, 300, 5, spread=0.5), backend="reference")
    eye = torch.eye(300, dtype=torch.float64)
    k = raw_filter(lat, eye, False)
    assert torch.allclose(raw_filter(lat, eye, True), k.T, atol=1e-12)
    assert not torch.allclose(raw_filter(lat, eye, False), k.T, atol=1e-6)


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_filter_is_n_times_raw_filter_of_n_times_values(device, backend, dtype):
    """"symmetric" folds n = 1/sqrt(K 1) into the weights: check it against n K(n v) literally,
    values and gradients."""
    lat = crfrnn.Lattice(random_points(2, 60, 3, dtype=dtype, device=device), backend=backend)
    v = rand(2, 60, 4, dtype=dtype, device=device).requires_grad_()
    n = torch.rsqrt(lat.filter(torch.ones(2, 60, 1, dtype=dtype, device=device)) + 1e-20)
    literal = n * lat.filter(n * v)
    folded = lat.filter(v, "symmetric")
    torch.testing.assert_close(folded, literal)
    g = rand(*literal.shape, dtype=dtype, seed=1, device=device)
    torch.testing.assert_close(torch.autograd.grad(folded, v, g)[0], torch.autograd.grad(literal, v, g)[0])


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(device, backend):
    suffix = "_ref" if backend == "reference" else ""
    filter_op = getattr(torch.ops.crfrnn, "lattice_filter" + suffix).default
    build_op = getattr(torch.ops.crfrnn, "build_lattice" + suffix).default
    feats = random_points(2, 20, 3, device=device)
    lat = crfrnn.Lattice(feats, backend=backend)
    assert lat._filter_op is filter_op
    tables = (lat.vertex_index, lat.weights, lat.neighbors, lat.splat_offsets, lat.splat_entries)
    vals = randn(40, 3, dtype=torch.float64, seed=12, device=device).requires_grad_()
    torch.library.opcheck(filter_op, (vals, *tables, False))
    tables32 = (lat.vertex_index, lat.weights.float()) + tables[2:]
    torch.library.opcheck(filter_op, (vals.detach().float(), *tables32, True))
    # The build's output sizes depend on the data (M vertices): no aot_dispatch_dynamic test.
    torch.library.opcheck(build_op, (feats,),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(device, backend):
    def smooth(feats, vals):
        return crfrnn.Lattice(feats, backend=backend).filter(vals, "symmetric")

    feats = random_points(2, 64, 5, dtype=torch.float32, device=device)
    vals = rand(2, 64, 4, device=device)
    torch._dynamo.reset()
    compiled = torch.compile(smooth, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(feats, vals), smooth(feats, vals))


# ------------------------------------------------------------------------------------------
# Bad input

@pytest.mark.parametrize("device", cpu_and_cuda())
def test_bad_inputs_raise_clear_errors(device):
    def rnd(*shape):
        return torch.rand(*shape, device=device)

    lat = crfrnn.Lattice(rnd(2, 5, 6, 4))
    with pytest.raises(ValueError, match=r"\(N, H, W\) = \(2, 6, 4\).*got shape \(2, 3, 6, 5\)"):
        lat.filter(rnd(2, 3, 6, 5))
    with pytest.raises(ValueError, match="got shape"):
        lat.filter(rnd(1, 3, 6, 4))
    with pytest.raises(ValueError, match="got shape"):
        lat.filter(rnd(2, 6, 4))
    with pytest.raises(TypeError, match="floating-point"):
        lat.filter(torch.ones(2, 3, 6, 4, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="normalize must be one of"):
        lat.filter(rnd(2, 3, 6, 4), normalize="sym")
    elsewhere = "meta" if device == "cpu" else "cpu"
    with pytest.raises(ValueError, match=f"on {elsewhere} but the lattice is on {device}"):
        lat.filter(torch.rand(2, 3, 6, 4, device=elsewhere))
    with pytest.raises(ValueError, match=r"Tensor\[N, d, H, W\].*got shape \(5, 4\)"):
        crfrnn.Lattice(rnd(5, 4))
    with pytest.raises(ValueError, match="d must be in 1..31, got 32"):
        crfrnn.Lattice(rnd(1, 10, 32))
    with pytest.raises(ValueError, match="d must be in 1..31, got 0"):
        crfrnn.Lattice(rnd(1, 10, 0))
    with pytest.raises(TypeError, match="floating-point"):
        crfrnn.Lattice(torch.ones(1, 10, 2, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="torch.Tensor"):
        crfrnn.Lattice(np.zeros((1, 10, 2)))
    bad = rnd(1, 10, 2)
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        crfrnn.Lattice(bad)
    bad[0, 3, 1] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        crfrnn.Lattice(bad)
    with pytest.raises(ValueError, match="magnitude"):
        crfrnn.Lattice(torch.full((1, 10, 2), 1e9, device=device))
    with pytest.raises(ValueError, match="backend must be"):
        crfrnn.Lattice(rnd(1, 10, 2), backend="gpu")
    with pytest.raises(ValueError, match="sigma_xy must be a positive"):
        crfrnn.spatial_features(rnd(1, 3, 4, 4), 0.0)
    with pytest.raises(ValueError, match=r"Tensor\[N, 3, H, W\]"):
        crfrnn.bilateral_features(rnd(1, 4, 4, 4), 3.0, 10.0)


@needs_native
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_native_op_checks_direct_calls(device):
    """The C++ TORCH_CHECKs guard direct op calls with the same kind of message."""
    with pytest.raises(RuntimeError, match="features must be \\[N, P, d\\]"):
        torch.ops.crfrnn.build_lattice(torch.rand(4, 3, device=device))
    lat = crfrnn.Lattice(random_points(1, 10, 2, device=device), backend="native")
    tables = (lat.vertex_index, lat.weights, lat.neighbors, lat.splat_offsets, lat.splat_entries)
    with pytest.raises(RuntimeError, match="values must be \\[N\\*P, C\\]"):
        torch.ops.crfrnn.lattice_filter(torch.rand(10, device=device), *tables, False)
    with pytest.raises(RuntimeError, match="weights dtype"):
        torch.ops.crfrnn.lattice_filter(torch.rand(10, 2, device=device), *tables, False)


def test_missing_extension_falls_back_to_reference_with_one_warning():
    """A failed or missing build: `import crfrnn` works, warns once, and uses the reference."""
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


# ------------------------------------------------------------------------------------------
# Real images

@pytest.mark.data
@pytest.mark.parametrize("device", cpu_and_cuda())
@pytest.mark.parametrize("image_id", VOC_IDS)
def test_backends_agree_on_voc_images(shared_data, device, image_id):
    rgb = voc_rgb(shared_data, image_id, shrink=3).to(device)  # shrunk: keeps the reference quick
    vals = torch.softmax(randn(1, 21, *rgb.shape[2:], seed=4, device=device), 1)
    for feats in (crfrnn.bilateral_features(rgb, 80 / 3, 13), crfrnn.spatial_features(rgb, 3)):
        ref = crfrnn.Lattice(feats, backend="reference")
        assert 0 < ref.num_vertices < rgb.shape[2] * rgb.shape[3]
        if NATIVE:
            nat = crfrnn.Lattice(feats, backend="native")
            assert nat.num_vertices == ref.num_vertices
            torch.testing.assert_close(nat.filter(vals, "symmetric"), ref.filter(vals, "symmetric"),
                                       rtol=1e-4, atol=1e-5)


@needs_native
@pytest.mark.data
@pytest.mark.parametrize("device", cpu_and_cuda())
def test_voc_batch_equals_images_alone(shared_data, device):
    """A batch of 3 real images (cropped to one size) is one lattice whose images never mix."""
    batch = torch.cat([voc_rgb(shared_data, i)[:, :, :300, :300] for i in VOC_IDS]).to(device)
    vals = torch.softmax(randn(3, 21, 300, 300, seed=23, device=device), 1)
    feats = crfrnn.bilateral_features(batch, 80.0, 13.0)
    out = crfrnn.Lattice(feats, backend="native").filter(vals, "symmetric")
    for i in range(3):
        alone = crfrnn.Lattice(feats[i:i + 1], backend="native").filter(vals[i:i + 1], "symmetric")
        assert_close_scaled(out[i:i + 1], alone, 1e-6)


# ------------------------------------------------------------------------------------------
# CUDA only: the same lattice and filter as the C++ CPU backend

def assert_cuda_filter_equals_cpu_and_reference(feats, vals, upstream, normalizations, cpu_rtol, ref_rtol):
    """Builds the lattice of the CPU tensor `feats` with the CUDA backend, the C++ CPU backend
    and the reference (on the GPU); for each normalisation the CUDA filter of `vals` and its
    gradient (of <output, upstream>) equal the CPU backend's to cpu_rtol and the reference's to
    ref_rtol (absolute tolerances scaled to the magnitude). Returns (CUDA lattice, CPU lattice)."""
    gpu = crfrnn.Lattice(feats.cuda(), backend="native")
    cpu = crfrnn.Lattice(feats, backend="native")
    ref = crfrnn.Lattice(feats.cuda(), backend="reference")
    for normalize in normalizations:
        out_g, grad_g = forward_backward(gpu, vals.cuda(), upstream.cuda(), normalize)
        assert out_g.device.type == "cuda" and out_g.dtype == vals.dtype
        for lat, rtol in ((cpu, cpu_rtol), (ref, ref_rtol)):
            out, grad = forward_backward(lat, vals.to(lat.device), upstream.to(lat.device), normalize)
            assert_close_scaled(out_g, out, rtol)
            assert_close_scaled(grad_g, grad, rtol)
    return gpu, cpu


@pytest.mark.cuda
@pytest.mark.parametrize("d", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("kind", sorted(POINTS))
@pytest.mark.parametrize("n,p", [(1, 1), (1, 7), (3, 157), (1, 2048), (2, 5000)])
def test_cuda_build_equals_cpu_build(d, kind, n, p):
    feats = POINTS[kind](n, p, d, seed=d * 31 + p)
    assert_same_lattice(crfrnn.Lattice(feats.cuda(), backend="native"),
                        crfrnn.Lattice(feats, backend="native"))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("d", [2, 5])
def test_cuda_build_equals_cpu_build_for_every_feature_dtype(dtype, d):
    feats = clustered_points(2, 700, d, dtype=dtype, seed=d)
    gpu = crfrnn.Lattice(feats.cuda(), backend="native")
    expected = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert gpu.weights.dtype == expected
    assert_same_lattice(gpu, crfrnn.Lattice(feats, backend="native"))


@pytest.mark.cuda
def test_cuda_single_pixel_lattice_equals_cpu():
    """A lone point exactly on a lattice vertex (all-zero features): barycentric (1, 0, ...)."""
    feats = torch.zeros(1, 5, 1, 1)
    gpu = crfrnn.Lattice(feats.cuda(), backend="native")
    cpu = crfrnn.Lattice(feats, backend="native")
    assert_same_lattice(gpu, cpu)
    vals = torch.tensor([[[[3.0]], [[-2.0]]]])
    torch.testing.assert_close(gpu.filter(vals.cuda()).cpu(), cpu.filter(vals))


@pytest.mark.cuda
@pytest.mark.parametrize("d", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("c", [1, 21, 59, 150])
@pytest.mark.parametrize("n,p", [(1, 600), (3, 157)])
def test_cuda_filter_equals_cpu_filter_and_reference(d, c, n, p):
    feats = clustered_points(n, p, d, dtype=torch.float32, seed=d + c)
    vals, upstream = randn(n, p, c, seed=1), randn(n, p, c, seed=2)
    assert_cuda_filter_equals_cpu_and_reference(feats, vals, upstream, ("none", "symmetric"), 1e-5, 1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("d", [2, 5, 16])
@pytest.mark.parametrize("normalize", crfrnn.NORMALIZATIONS)
def test_cuda_float64_filter_equals_cpu_filter_and_reference(d, normalize):
    feats = clustered_points(2, 300, d, seed=d)
    vals, upstream = randn(2, 300, 21, dtype=torch.float64, seed=3), randn(2, 300, 21, dtype=torch.float64, seed=4)
    assert_cuda_filter_equals_cpu_and_reference(feats, vals, upstream, (normalize,), 1e-12, 1e-10)


def synthetic_photo(h, w, seed=0):
    """Tensor[1, 3, h, w] RGB 0..255: smooth colour waves plus pixel noise, rounded like a photo."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    base = torch.stack([128 + 100 * torch.sin(xx / 97 + c) * torch.cos(yy / 61 - c) for c in range(3)])
    return (base + randn(3, h, w, seed=seed) * 8).round().clamp(0, 255)[None]


@pytest.mark.cuda
@pytest.mark.parametrize("h,w", [(750, 1000), pytest.param(3000, 4000, marks=pytest.mark.slow)])
def test_cuda_large_image_equals_cpu(h, w):
    """A photo-sized image (12 M pixels for 4000x3000): the CUDA build and filter complete and give
    the CPU backend's lattice and output (spatial d=2 and bilateral d=5, C=2)."""
    rgb = synthetic_photo(h, w)
    vals = torch.softmax(randn(1, 2, h, w, seed=20), 1)
    for feats in (crfrnn.spatial_features(rgb, 3.0), crfrnn.bilateral_features(rgb, 80.0, 13.0)):
        gpu = crfrnn.Lattice(feats.cuda(), backend="native")
        cpu = crfrnn.Lattice(feats, backend="native")
        assert_same_lattice(gpu, cpu)
        out = gpu.filter(vals.cuda(), "symmetric")
        assert torch.isfinite(out).all()
        assert_close_scaled(out, cpu.filter(vals, "symmetric"), 1e-5)
        del gpu, cpu, out
        torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.data
@pytest.mark.parametrize("image_id", VOC_IDS)
def test_cuda_voc_image_equals_cpu_and_reference(shared_data, image_id):
    """Full-resolution VOC image, DeepLab's CRF bandwidths: integer colours and pixel positions
    put many points exactly on ties of the rank decisions."""
    rgb = voc_rgb(shared_data, image_id)
    vals = torch.softmax(randn(1, 21, *rgb.shape[2:], seed=21), 1)
    upstream = randn(1, 21, *rgb.shape[2:], seed=22)
    for feats in (crfrnn.bilateral_features(rgb, 80.0, 13.0), crfrnn.spatial_features(rgb, 3.0)):
        gpu, cpu = assert_cuda_filter_equals_cpu_and_reference(feats, vals, upstream, ("symmetric",), 1e-5, 1e-4)
        assert_same_lattice(gpu, cpu)


@pytest.mark.cuda
@pytest.mark.data
def test_cuda_voc_batch_lattice_equals_cpu(shared_data):
    """The lattice of a batch of 3 real images (one lattice for all) equals the CPU's."""
    feats = crfrnn.bilateral_features(torch.cat([voc_rgb(shared_data, i)[:, :, :300, :300] for i in VOC_IDS]),
                                      80.0, 13.0)
    assert_same_lattice(crfrnn.Lattice(feats.cuda(), backend="native"), crfrnn.Lattice(feats, backend="native"))


# ------------------------------------------------------------------------------------------
# CUDA only: streams, devices

@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream():
    """On a side stream whose inputs are written only after a long sleep on that stream, the
    kernels see them only if they run on it (torch's side streams do not wait for the default
    stream, so a kernel launched on any other stream would read the buffers before they are
    written)."""
    feats = clustered_points(1, 4000, 5, dtype=torch.float32, seed=16).cuda()
    vals = randn(1, 4000, 8, seed=17).cuda()
    expected = crfrnn.Lattice(feats, backend="native").filter(vals, "symmetric")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        lat = crfrnn.Lattice(feats, backend="native")
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time, on the side stream only
        late = vals * 1  # written on the side stream, after the sleep
        out = lat.filter(late, "symmetric")  # its all-ones norm is also written after the sleep
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(out, expected)


@pytest.mark.cuda
def test_cuda_op_checks_the_devices_of_direct_calls():
    """Values and lattice tables on different devices: the C++ check names both devices."""
    lat = crfrnn.Lattice(torch.rand(2, 5, 6, 4, device="cuda"), backend="native")
    flat = torch.rand(48, 3, device="cuda")
    tables = (lat.vertex_index, lat.weights, lat.neighbors, lat.splat_offsets, lat.splat_entries)
    with pytest.raises(RuntimeError, match="lattice tensor on cuda:0 but values on cpu"):
        torch.ops.crfrnn.lattice_filter(flat.cpu(), *tables, False)
    with pytest.raises(RuntimeError, match="lattice tensor on cpu but values on cuda:0"):
        torch.ops.crfrnn.lattice_filter(flat, *(t.cpu() for t in tables), False)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cuda_second_gpu():
    """Kernels run on the inputs' device (cuda:1), not on the current device (cuda:0)."""
    feats = clustered_points(2, 500, 5, dtype=torch.float32, seed=18)
    vals = randn(2, 500, 21, seed=19)
    assert torch.cuda.current_device() == 0
    lat1 = crfrnn.Lattice(feats.to("cuda:1"), backend="native")
    lat0 = crfrnn.Lattice(feats.to("cuda:0"), backend="native")
    for name in LATTICE_TABLES + ("weights",):
        t = getattr(lat1, name)
        assert t.device == torch.device("cuda:1"), name
        assert torch.equal(t.cpu(), getattr(lat0, name).cpu()), name
    out1 = lat1.filter(vals.to("cuda:1"), "symmetric")
    assert out1.device == torch.device("cuda:1")
    assert torch.equal(out1.cpu(), lat0.filter(vals.to("cuda:0"), "symmetric").cpu())
    with pytest.raises(ValueError, match="cuda:0 but the lattice is on cuda:1"):
        lat1.filter(vals.to("cuda:0"))
    with pytest.raises(RuntimeError, match="lattice tensor on cuda:1 but values on cuda:0"):
        torch.ops.crfrnn.lattice_filter(vals.reshape(-1, 21).to("cuda:0"), lat1.vertex_index, lat1.weights,
                                        lat1.neighbors, lat1.splat_offsets, lat1.splat_entries, False)


def test_arguments_of_the_wrong_kind_or_shape_are_named():
    """The exact filter (an oracle) and Lattice.filter check what they take; mean_field wants
    per-point lattices and at least one."""
    features = torch.rand(1, 20, 3)
    with pytest.raises(ValueError, match="same N and P"):
        crfrnn.exact_gaussian_filter(features, torch.rand(2, 20, 2))   # one image's kernel on two
    with pytest.raises(ValueError, match="same N and P"):
        crfrnn.exact_gaussian_filter(features, torch.rand(1, 21, 2))
    with pytest.raises(ValueError, match="same N, H, W"):
        crfrnn.exact_gaussian_filter(torch.rand(1, 3, 4, 5), torch.rand(1, 2, 5, 4))
    with pytest.raises(ValueError, match=r"features \[N, P, d\]"):
        crfrnn.exact_gaussian_filter(torch.rand(20, 3), torch.rand(20, 2))
    lat = crfrnn.Lattice(features)
    for bad in (None, [[1.0]], np.ones((1, 20, 2), np.float32)):
        with pytest.raises(TypeError, match="values must be a torch.Tensor"):
            lat.filter(bad)
    unary = torch.randn(1, 64, 3)
    per_point = crfrnn.Lattice(torch.rand(1, 64, 2))
    per_pixel = crfrnn.Lattice(torch.rand(1, 2, 8, 8))
    mats = crfrnn.potts_matrices(3, [1.0, 1.0])
    for fused in (True, False):
        with pytest.raises(ValueError, match="lattice 1 was built on per-pixel features"):
            crfrnn.mean_field(unary, [per_point, per_pixel], mats, 2, fused=fused)
        with pytest.raises(ValueError, match="at least one lattice"):
            crfrnn.mean_field(unary, [], [], 2, fused=fused)
        with pytest.raises(TypeError, match="lattice 1 must be a crfrnn.Lattice"):
            crfrnn.mean_field(unary, [per_point, "x"], mats, 2, fused=fused)
    out = crfrnn.mean_field(unary, [per_point], mats[:1], 2, prune=torch.tensor(0.01))  # a 0-d tensor: a number
    torch.testing.assert_close(out, crfrnn.mean_field(unary, [per_point], mats[:1], 2, prune=0.01), rtol=0, atol=0)
