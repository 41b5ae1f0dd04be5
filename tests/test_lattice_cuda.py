"""CUDA backend of the lattice: the same lattice and the same filter as the C++ CPU backend, and
the reference's filter; gradients, opcheck, determinism, devices and streams, errors, edge sizes.

Every test here is marked `cuda` (skipped, with a reason, on a machine without a GPU). The CUDA
build numbers vertices in order of first appearance, as the serial CPU build does, so the two
backends must give identical lattice tables, not merely equivalent ones. Run them all, the
4000x3000 image included, with `pytest -m cuda tests/test_lattice_cuda.py`.
"""
import numpy as np
import pytest
import torch

import crfrnn

pytestmark = pytest.mark.cuda

TABLES = ("vertex_index", "neighbors", "splat_offsets", "splat_entries")


def random_points(n, p, d, spread=2.0, dtype=torch.float64, seed=0):
    """Tensor[n, p, d] uniform in [0, 4 spread), made on the CPU (the same points on every device)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, p, d, generator=g, dtype=torch.float64) * spread * 4).to(dtype)


def clustered_points(n, p, d, dtype=torch.float64, seed=0):
    """Tensor[n, p, d]: points around 4 centres per image, so vertices are shared by many points
    and most have blur neighbours, in any dimension d."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n, 4, d, generator=g, dtype=torch.float64) * 6
    which = torch.randint(0, 4, (n, p), generator=g)
    noise = torch.randn(n, p, d, generator=g, dtype=torch.float64) * 0.4
    return (torch.gather(centres, 1, which[:, :, None].expand(n, p, d)) + noise).to(dtype)


def integer_points(n, p, d, dtype=torch.float64, seed=0):
    """Tensor[n, p, d] of small integers: duplicate points and exact ties in the rank decisions."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-3, 4, (n, p, d), generator=g).to(dtype)


POINTS = {"random": random_points, "clustered": clustered_points, "integer": integer_points}


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def assert_close_scaled(actual, expected, rtol):
    """allclose on the CPU, with the absolute tolerance scaled to the expected magnitude (the raw
    filter's outputs grow with the blur gain)."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    scale = max(float(expected.abs().max()), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def assert_same_lattice(gpu, cpu):
    """The CUDA lattice equals the CPU one: identical integer tables and weights."""
    assert gpu.num_vertices == cpu.num_vertices
    for name in TABLES:
        a, b = getattr(gpu, name), getattr(cpu, name)
        assert a.device.type == "cuda" and a.dtype == b.dtype == torch.int32, name
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.equal(a.cpu(), b), f"{name} differs between the CUDA and the CPU build"
    assert gpu.weights.dtype == cpu.weights.dtype
    # Same double-precision arithmetic on both sides (nvcc --fmad=false): equal to rounding.
    atol = 1e-12 if cpu.weights.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(gpu.weights.cpu(), cpu.weights, rtol=0, atol=atol)


def forward_backward(lat, values, upstream, normalize):
    """(filter output, gradient of <output, upstream> w.r.t. values)."""
    values = values.detach().clone().requires_grad_()
    out = lat.filter(values, normalize)
    (grad,) = torch.autograd.grad(out, values, upstream)
    return out.detach(), grad


def raw_op(lat, values, reverse=False):
    """The lattice's filter op on flat values [N*P, C]."""
    return lat._filter_op(values, lat.vertex_index, lat.weights.to(values.dtype), lat.neighbors,
                          lat.splat_offsets, lat.splat_entries, reverse)


def test_cuda_kernels_are_built():
    """On a GPU machine the extension must carry CUDA kernels: no silent fallback to the reference."""
    assert crfrnn.has_native_kernel("cuda"), (
        f"crfrnn was built without CUDA kernels (extension error: {crfrnn.EXTENSION_ERROR}); "
        "rebuild with a CUDA toolkit (FORCE_CUDA=1 when no GPU is visible at build time)")


# ------------------------------------------------------------------------------------------
# Build: the same lattice as the CPU backend

@pytest.mark.parametrize("d", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("kind", sorted(POINTS))
@pytest.mark.parametrize("n,p", [(1, 1), (1, 7), (3, 157), (1, 2048), (2, 5000)])
def test_build_equals_cpu_build(d, kind, n, p):
    feats = POINTS[kind](n, p, d, seed=d * 31 + p)
    assert_same_lattice(crfrnn.Lattice(feats.cuda(), backend="native"),
                        crfrnn.Lattice(feats, backend="native"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("d", [2, 5])
def test_build_equals_cpu_build_for_every_feature_dtype(dtype, d):
    feats = clustered_points(2, 700, d, dtype=dtype, seed=d)
    gpu = crfrnn.Lattice(feats.cuda(), backend="native")
    expected = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert gpu.weights.dtype == expected
    assert_same_lattice(gpu, crfrnn.Lattice(feats, backend="native"))


def test_build_agrees_with_reference_up_to_numbering():
    """Against the independent oracle: same vertex count and, under the one bijection between
    the numberings, the same neighbours."""
    feats = clustered_points(3, 400, 5, seed=3).cuda()
    ref = crfrnn.Lattice(feats, backend="reference")
    gpu = crfrnn.Lattice(feats, backend="native")
    assert gpu.num_vertices == ref.num_vertices
    torch.testing.assert_close(gpu.weights, ref.weights, rtol=0, atol=1e-12)
    perm = torch.full((ref.num_vertices + 1,), -1, dtype=torch.long, device="cuda")
    perm[ref.vertex_index.long().flatten()] = gpu.vertex_index.long().flatten()
    assert (perm[ref.vertex_index.long()] == gpu.vertex_index.long()).all()
    assert perm[:-1].unique().numel() == ref.num_vertices
    perm[-1] = gpu.num_vertices
    assert (perm[ref.neighbors.long()] == gpu.neighbors.long()[:, perm[:-1]]).all()


# ------------------------------------------------------------------------------------------
# Filter: CUDA <-> C++ <-> reference, forward and backward

@pytest.mark.parametrize("d", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("c", [1, 21, 59, 150])
@pytest.mark.parametrize("n,p", [(1, 600), (3, 157)])
def test_filter_matches_cpu_and_reference(d, c, n, p):
    feats = clustered_points(n, p, d, dtype=torch.float32, seed=d + c)
    vals, upstream = randn(n, p, c, seed=1), randn(n, p, c, seed=2)
    gpu = crfrnn.Lattice(feats.cuda(), backend="native")
    cpu = crfrnn.Lattice(feats, backend="native")
    ref = crfrnn.Lattice(feats.cuda(), backend="reference")
    for normalize in ("none", "symmetric"):
        out_g, grad_g = forward_backward(gpu, vals.cuda(), upstream.cuda(), normalize)
        assert out_g.device.type == "cuda" and out_g.dtype == torch.float32
        out_c, grad_c = forward_backward(cpu, vals, upstream, normalize)
        out_r, grad_r = forward_backward(ref, vals.cuda(), upstream.cuda(), normalize)
        assert_close_scaled(out_g, out_c, 1e-5)
        assert_close_scaled(grad_g, grad_c, 1e-5)
        assert_close_scaled(out_g, out_r, 1e-4)
        assert_close_scaled(grad_g, grad_r, 1e-4)


@pytest.mark.parametrize("d", [2, 5, 16])
@pytest.mark.parametrize("normalize", crfrnn.NORMALIZATIONS)
def test_filter_float64_matches_cpu_and_reference(d, normalize):
    feats = clustered_points(2, 300, d, seed=d)
    vals, upstream = randn(2, 300, 21, dtype=torch.float64, seed=3), randn(2, 300, 21, dtype=torch.float64, seed=4)
    gpu = crfrnn.Lattice(feats.cuda(), backend="native")
    out_g, grad_g = forward_backward(gpu, vals.cuda(), upstream.cuda(), normalize)
    out_c, grad_c = forward_backward(crfrnn.Lattice(feats, backend="native"), vals, upstream, normalize)
    out_r, grad_r = forward_backward(crfrnn.Lattice(feats.cuda(), backend="reference"), vals.cuda(),
                                     upstream.cuda(), normalize)
    assert_close_scaled(out_g, out_c, 1e-12)
    assert_close_scaled(grad_g, grad_c, 1e-12)
    assert_close_scaled(out_g, out_r, 1e-10)
    assert_close_scaled(grad_g, grad_r, 1e-10)


@pytest.mark.parametrize("d", [2, 5, 16])
def test_reverse_filter_is_the_exact_adjoint(d):
    lat = crfrnn.Lattice(clustered_points(2, 200, d, seed=5).cuda(), backend="native")
    a, b = randn(400, 3, dtype=torch.float64, seed=6).cuda(), randn(400, 3, dtype=torch.float64, seed=7).cuda()
    lhs, rhs = (raw_op(lat, a) * b).sum(), (a * raw_op(lat, b, reverse=True)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_half_values_are_filtered_in_float32():
    feats = clustered_points(1, 500, 5, dtype=torch.float32, seed=8).cuda()
    vals = torch.rand(1, 500, 4, generator=torch.Generator().manual_seed(9)).cuda()
    lat = crfrnn.Lattice(feats, backend="native")
    out = lat.filter(vals.half(), "after")
    assert out.dtype == torch.float16 and out.device.type == "cuda"
    torch.testing.assert_close(out.float(), lat.filter(vals, "after"), rtol=2e-3, atol=2e-3)


def test_non_contiguous_values_and_features():
    img = torch.rand(2, 3, 10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(10)).cuda() * 255
    feats = crfrnn.bilateral_features(img, 3.0, 20.0)
    strided_feats = feats.transpose(2, 3).contiguous().transpose(2, 3)
    vals = torch.rand(2, 8, 10, 4, dtype=torch.float64, device="cuda").permute(0, 3, 2, 1)
    assert not vals.is_contiguous() and not strided_feats.is_contiguous()
    lat = crfrnn.Lattice(strided_feats, backend="native")
    expected = crfrnn.Lattice(feats.contiguous(), backend="native").filter(vals.contiguous(), "after")
    torch.testing.assert_close(lat.filter(vals, "after"), expected, rtol=0, atol=0)
    flat = vals.permute(0, 2, 3, 1).reshape(-1, 4)
    strided = flat.T.contiguous().T  # same values, column-major
    assert not strided.is_contiguous()
    assert torch.equal(raw_op(lat, strided), raw_op(lat, flat.contiguous()))


# ------------------------------------------------------------------------------------------
# Gradients, opcheck, torch.compile

@pytest.mark.parametrize("normalize", crfrnn.NORMALIZATIONS)
def test_gradcheck_on_gpu(normalize):
    lat = crfrnn.Lattice(random_points(2, 12, 3, spread=0.7).cuda(), backend="native")
    vals = randn(2, 12, 3, dtype=torch.float64, seed=11).cuda().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: lat.filter(v, normalize), (vals,))
    assert torch.autograd.gradgradcheck(lambda v: lat.filter(v, normalize), (vals,))


def test_opcheck_on_cuda_inputs():
    feats = random_points(2, 20, 3).cuda()
    lat = crfrnn.Lattice(feats, backend="native")
    vals = randn(40, 3, dtype=torch.float64, seed=12).cuda().requires_grad_()
    torch.library.opcheck(torch.ops.crfrnn.lattice_filter.default,
                          (vals, lat.vertex_index, lat.weights, lat.neighbors, lat.splat_offsets,
                           lat.splat_entries, False))
    torch.library.opcheck(torch.ops.crfrnn.lattice_filter.default,
                          (vals.float().detach(), lat.vertex_index, lat.weights.float(), lat.neighbors,
                           lat.splat_offsets, lat.splat_entries, True))
    # The build's output sizes depend on the data (M vertices): no aot_dispatch_dynamic test.
    torch.library.opcheck(torch.ops.crfrnn.build_lattice.default, (feats,),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph_matches_eager():
    def smooth(feats, vals):
        return crfrnn.Lattice(feats, backend="native").filter(vals, "symmetric")

    feats = random_points(2, 64, 5, dtype=torch.float32).cuda()
    vals = torch.rand(2, 64, 4, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(smooth, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(feats, vals), smooth(feats, vals))


# ------------------------------------------------------------------------------------------
# Determinism, streams, devices

def test_build_and_filter_are_deterministic():
    """Heavy sharing of vertices makes the hash inserts race; the results must not depend on it."""
    feats = clustered_points(2, 30000, 5, dtype=torch.float32, seed=13).cuda()
    vals, upstream = randn(2, 30000, 21, seed=14).cuda(), randn(2, 30000, 21, seed=15).cuda()
    lats = [crfrnn.Lattice(feats, backend="native") for _ in range(3)]
    for lat in lats[1:]:
        for name in TABLES + ("weights",):
            assert torch.equal(getattr(lat, name), getattr(lats[0], name)), name
    runs = [forward_backward(lat, vals, upstream, "symmetric") for lat in lats]
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


def test_runs_on_the_current_stream():
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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_second_gpu():
    """Kernels run on the inputs' device (cuda:1), not on the current device (cuda:0)."""
    feats = clustered_points(2, 500, 5, dtype=torch.float32, seed=18)
    vals = randn(2, 500, 21, seed=19)
    assert torch.cuda.current_device() == 0
    lat1 = crfrnn.Lattice(feats.to("cuda:1"), backend="native")
    lat0 = crfrnn.Lattice(feats.to("cuda:0"), backend="native")
    for name in TABLES + ("weights",):
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


# ------------------------------------------------------------------------------------------
# Bad input, edge sizes

def test_bad_inputs_raise_as_on_the_cpu():
    feats = torch.rand(2, 5, 6, 4, device="cuda")
    lat = crfrnn.Lattice(feats, backend="native")
    with pytest.raises(ValueError, match="on cpu but the lattice is on cuda"):
        lat.filter(torch.rand(2, 3, 6, 4))
    with pytest.raises(ValueError, match="got shape"):
        lat.filter(torch.rand(2, 3, 6, 5, device="cuda"))
    with pytest.raises(TypeError, match="floating-point"):
        lat.filter(torch.ones(2, 3, 6, 4, dtype=torch.int64, device="cuda"))
    bad = torch.rand(1, 10, 2, device="cuda")
    bad[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf"):
        crfrnn.Lattice(bad, backend="native")
    with pytest.raises(ValueError, match="magnitude"):
        crfrnn.Lattice(torch.full((1, 10, 2), 1e9, device="cuda"), backend="native")
    # Direct op calls: the C++ checks, with the offending device or dtype in the message.
    flat = torch.rand(48, 3, device="cuda")
    tables = (lat.vertex_index, lat.weights, lat.neighbors, lat.splat_offsets, lat.splat_entries)
    with pytest.raises(RuntimeError, match="lattice tensor on cuda:0 but values on cpu"):
        torch.ops.crfrnn.lattice_filter(flat.cpu(), *tables, False)
    with pytest.raises(RuntimeError, match="lattice tensor on cpu but values on cuda:0"):
        torch.ops.crfrnn.lattice_filter(flat, *(t.cpu() for t in tables), False)
    with pytest.raises(RuntimeError, match="weights dtype"):
        torch.ops.crfrnn.lattice_filter(flat.double(), *tables, False)
    with pytest.raises(RuntimeError, match="values must be \\[N\\*P, C\\]"):
        torch.ops.crfrnn.lattice_filter(flat[:, 0], *tables, False)
    with pytest.raises(RuntimeError, match="features must be \\[N, P, d\\]"):
        torch.ops.crfrnn.build_lattice(torch.rand(4, 3, device="cuda"))


@pytest.mark.parametrize("shape", [(0, 5, 4, 4), (2, 5, 0, 3)])
def test_empty_input(shape):
    lat = crfrnn.Lattice(torch.zeros(shape, device="cuda"), backend="native")
    d = shape[1]
    assert lat.num_vertices == 0
    assert lat.vertex_index.shape == (0, d + 1) and lat.neighbors.shape == (d + 1, 0, 2)
    assert lat.splat_offsets.tolist() == [0] and lat.splat_entries.numel() == 0
    vals = torch.zeros(shape[0], 3, *shape[2:], device="cuda")
    assert lat.filter(vals, "symmetric").shape == vals.shape
    out = torch.ops.crfrnn.lattice_filter(torch.zeros(0, 3, device="cuda"), lat.vertex_index, lat.weights,
                                          lat.neighbors, lat.splat_offsets, lat.splat_entries, False)
    assert out.shape == (0, 3) and out.device.type == "cuda"


def test_single_pixel_image_is_its_own_mean():
    feats = torch.zeros(1, 5, 1, 1, device="cuda")
    lat = crfrnn.Lattice(feats, backend="native")
    assert_same_lattice(lat, crfrnn.Lattice(feats.cpu(), backend="native"))
    vals = torch.tensor([[[[3.0]], [[-2.0]]]], device="cuda")
    torch.testing.assert_close(lat.filter(vals, "after"), vals)
    torch.testing.assert_close(lat.filter(vals), crfrnn.Lattice(feats.cpu(), backend="native").filter(vals.cpu()).cuda())


def synthetic_photo(h, w, seed=0):
    """Tensor[1, 3, h, w] RGB 0..255: smooth colour waves plus pixel noise, rounded like a photo."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    base = torch.stack([128 + 100 * torch.sin(xx / 97 + c) * torch.cos(yy / 61 - c) for c in range(3)])
    return (base + torch.randn(3, h, w, generator=g) * 8).round().clamp(0, 255)[None]


@pytest.mark.parametrize("h,w", [(750, 1000), pytest.param(3000, 4000, marks=pytest.mark.slow)])
def test_large_image_matches_cpu(h, w):
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


# ------------------------------------------------------------------------------------------
# Real images

VOC_IDS = ["2007_000123", "2007_001311", "2009_000032"]


def voc_rgb(shared_data, image_id):
    """Tensor[1, 3, H, W] float RGB 0..255 of a shared VOC image."""
    from PIL import Image
    path = shared_data / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{image_id}.jpg"
    rgb = np.asarray(Image.open(path).convert("RGB")).copy()
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float()


@pytest.mark.data
@pytest.mark.parametrize("image_id", VOC_IDS)
def test_voc_image_matches_cpu_and_reference(shared_data, image_id):
    """Full-resolution VOC image, DeepLab's CRF bandwidths: integer colours and pixel positions
    put many points exactly on ties of the rank decisions."""
    rgb = voc_rgb(shared_data, image_id)
    vals = torch.softmax(randn(1, 21, *rgb.shape[2:], seed=21), 1)
    upstream = randn(1, 21, *rgb.shape[2:], seed=22)
    for feats in (crfrnn.bilateral_features(rgb, 80.0, 13.0), crfrnn.spatial_features(rgb, 3.0)):
        gpu = crfrnn.Lattice(feats.cuda(), backend="native")
        cpu = crfrnn.Lattice(feats, backend="native")
        ref = crfrnn.Lattice(feats.cuda(), backend="reference")
        assert_same_lattice(gpu, cpu)
        out_g, grad_g = forward_backward(gpu, vals.cuda(), upstream.cuda(), "symmetric")
        out_c, grad_c = forward_backward(cpu, vals, upstream, "symmetric")
        out_r, grad_r = forward_backward(ref, vals.cuda(), upstream.cuda(), "symmetric")
        assert_close_scaled(out_g, out_c, 1e-5)
        assert_close_scaled(grad_g, grad_c, 1e-5)
        assert_close_scaled(out_g, out_r, 1e-4)
        assert_close_scaled(grad_g, grad_r, 1e-4)


@pytest.mark.data
def test_voc_batch_equals_images_alone(shared_data):
    """A batch of 3 real images (cropped to one size) is one lattice whose images never mix."""
    rgbs = [voc_rgb(shared_data, i)[:, :, :300, :300] for i in VOC_IDS]
    batch = torch.cat(rgbs).cuda()
    vals = torch.softmax(randn(3, 21, 300, 300, seed=23), 1).cuda()
    feats = crfrnn.bilateral_features(batch, 80.0, 13.0)
    lat = crfrnn.Lattice(feats, backend="native")
    assert_same_lattice(lat, crfrnn.Lattice(feats.cpu(), backend="native"))
    out = lat.filter(vals, "symmetric")
    for i in range(3):
        alone = crfrnn.Lattice(feats[i:i + 1], backend="native").filter(vals[i:i + 1], "symmetric")
        assert_close_scaled(out[i:i + 1], alone, 1e-6)
