"""The fused mean-field inference op (crfrnn::mean_field_inference, C++): it must give the
step-by-step loop's logits, be chosen exactly when no gradient is wanted, give the same bits
whatever the thread count and SIMD width, and reject bad arguments clearly."""
import os
import subprocess
import sys

import pytest
import torch

import crfrnn.crf as crf_module
from crfrnn import ops
from crfrnn.crf import CRFRNNLayer, build_crf_lattices, mean_field

pytestmark = pytest.mark.skipif("cpu" not in ops.FUSED_MEAN_FIELD_DEVICE_TYPES,
                                reason="the C++ extension (fused op) is not built")

KERNELS = dict(bilateral=(6.0, 30.0, 3.0), spatial=(2.0, 2.0))


def inputs(n=2, c=5, h=17, w=13, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    unary = (torch.randn(n, h * w, c, generator=g, dtype=torch.float64) * scale).to(dtype)
    image = torch.rand(n, 3, h, w, generator=g, dtype=torch.float64) * 255
    # Blocks of flat colour, so that the bilateral kernel has structure.
    image[:, :, : h // 2] = image[:, :, :1, :1]
    lattices = build_crf_lattices(image.to(dtype), KERNELS["bilateral"], KERNELS["spatial"], "native")
    pairwise = [torch.randn(c, c, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]
    return unary, lattices, pairwise


def loop(unary, lattices, pairwise, iterations, normalize):
    """The step-by-step loop (the autograd path), forced."""
    with torch.enable_grad():
        u = unary.clone().requires_grad_()
        return mean_field(u, lattices, pairwise, iterations, normalize).detach()


def fused(unary, lattices, pairwise, iterations, normalize):
    assert crf_module._can_fuse(unary, lattices, pairwise)
    return crf_module._fused_mean_field(unary, lattices, pairwise, iterations, normalize)


@pytest.mark.parametrize("normalize", ["symmetric", "after", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_the_step_by_step_loop(normalize, dtype):
    unary, lattices, pairwise = inputs(dtype=dtype)
    for iterations in (1, 4):
        expected = loop(unary, lattices, pairwise, iterations, normalize)
        got = fused(unary, lattices, pairwise, iterations, normalize)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert not torch.allclose(expected, unary, atol=1e-2), "the CRF had no effect"


# Row widths: compiled ones (C padded to 8, 16, 24, 32 lanes) and the generic fallback (> 32),
# with padded lanes in every case but C = 8, 16, 32.
@pytest.mark.parametrize("c", [1, 2, 7, 8, 13, 21, 32, 33, 50])
def test_fused_any_number_of_classes(c):
    unary, lattices, pairwise = inputs(n=1, c=c, h=9, w=11, dtype=torch.float64, seed=c)
    expected = loop(unary, lattices, pairwise, 3, "symmetric")
    torch.testing.assert_close(fused(unary, lattices, pairwise, 3, "symmetric"), expected,
                               atol=1e-10, rtol=1e-10)


def test_fused_softmax_survives_extreme_logits():
    """Logit spreads far beyond exp's range: the fast exp clamps, nothing becomes NaN."""
    unary, lattices, pairwise = inputs(n=1, c=6, scale=1e4)
    got = fused(unary, lattices, pairwise, 3, "symmetric")
    assert torch.isfinite(got).all()
    expected = loop(unary, lattices, pairwise, 3, "symmetric")
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-4)


def test_layer_uses_the_fused_op_exactly_when_no_gradient_is_wanted(monkeypatch):
    calls = []
    real = crf_module._fused_mean_field

    def counting(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(crf_module, "_fused_mean_field", counting)
    crf = CRFRNNLayer(4, num_iterations=2, **KERNELS)
    unary = torch.randn(1, 4, 10, 12)
    image = torch.rand(1, 3, 10, 12) * 255
    crf(unary, image).sum().backward()            # parameters want gradients: the loop
    assert calls == []
    with torch.no_grad():
        a = crf(unary, image)                     # no gradient: fused
    assert calls == [1]
    crf.requires_grad_(False)
    b = crf(unary, image)                         # nothing requires grad: fused
    assert calls == [1, 1]
    torch.testing.assert_close(a, b)
    ref_crf = CRFRNNLayer(4, num_iterations=2, backend="reference", **KERNELS)
    with torch.no_grad():
        ref = ref_crf(unary, image)               # reference lattices: never fused
    assert calls == [1, 1]
    torch.testing.assert_close(a, ref, atol=1e-4, rtol=1e-4)


def test_fused_layer_matches_the_loop_on_a_batch_of_real_size():
    crf = CRFRNNLayer.deeplab_largefov(21).eval()
    g = torch.Generator().manual_seed(3)
    unary = torch.randn(2, 21, 120, 160, generator=g) * 3
    # Flat colour blocks, so that the splat cuts the points into several ranges.
    image = torch.nn.functional.interpolate(torch.rand(2, 3, 6, 8, generator=g) * 255, size=(120, 160))
    image = (image + torch.rand(2, 3, 120, 160, generator=g) * 4).clamp(max=255)  # and some noise
    with torch.no_grad():
        got = crf(unary, image)
    expected = crf(unary, image)  # parameters require grad: the loop
    torch.testing.assert_close(got, expected.detach(), atol=1e-3, rtol=1e-4)  # float32, 10 iterations
    assert (got.argmax(1) == expected.argmax(1)).float().mean() > 0.999


_BITS_SCRIPT = """
import sys, torch, crfrnn
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
# Sizes where the splat cuts the points into several ranges (see mean_field_kernels.inc).
crf = crfrnn.CRFRNNLayer(21, num_eval_iterations=3, bilateral=(10.0, 30.0, 3.0), spatial=(5.0, 2.0)).eval()
with torch.no_grad():
    # Flat colour blocks: few bilateral vertices, so about 7 point ranges.
    image = torch.nn.functional.interpolate(torch.rand(2, 3, 6, 8, generator=g) * 255, size=(120, 160))
    out = crf(torch.randn(2, 21, 120, 160, generator=g) * 3, image)
torch.save(out, sys.argv[2])
"""


def test_same_bits_whatever_the_thread_count_and_simd_width(tmp_path):
    """1 or 2 threads, AVX2 or the generic 4-lane code: the same bits (summation orders that
    depend on the problem only, no fused multiply-add)."""
    outputs = []
    for threads, isa in ((1, ""), (2, ""), (2, "generic")):
        path = tmp_path / f"out_{threads}_{isa}.pt"
        env = dict(os.environ, CRFRNN_CPU_ISA=isa)
        subprocess.run([sys.executable, "-c", _BITS_SCRIPT, str(threads), str(path)], env=env,
                       check=True, timeout=300)
        outputs.append(torch.load(path))
    for other in outputs[1:]:
        assert torch.equal(outputs[0], other)


def test_fused_keeps_the_unary_layout_and_reads_any_strides():
    """A channels-first unary (the layer's [N, C, H, W] memory) comes back channels first, with
    the values of a contiguous call; a strided view works too."""
    unary, lattices, pairwise = inputs(n=2, c=6)
    expected = fused(unary, lattices, pairwise, 3, "symmetric")
    channels_first = unary.transpose(1, 2).contiguous().transpose(1, 2)  # [N, P, C] view of [N, C, P]
    got = fused(channels_first, lattices, pairwise, 3, "symmetric")
    assert got.stride() == channels_first.stride()
    assert got.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    wide = torch.zeros(unary.shape[0], unary.shape[1], 2 * unary.shape[2])
    wide[..., ::2] = unary
    torch.testing.assert_close(fused(wide[..., ::2], lattices, pairwise, 3, "symmetric"), expected,
                               atol=0, rtol=0)
    crf = CRFRNNLayer(6, **KERNELS).eval()
    with torch.no_grad():
        out = crf(torch.randn(2, 6, 17, 13), torch.rand(2, 3, 17, 13) * 255)
    assert out.is_contiguous()  # the layer's [N, C, H, W] output, with no copy on the way out


def test_direct_op_calls_with_bad_arguments_raise():
    unary, lattices, pairwise = inputs(n=1, c=3)
    lat = lattices[0]
    splat_scale, slice_scale = lat.normalization_scales("symmetric", unary.dtype)
    op = torch.ops.crfrnn.mean_field_inference
    good = dict(vi=[lat.vertex_index], w=[lat.weights], ss=[splat_scale], ls=[slice_scale],
                nb=[lat.neighbors], pw=[pairwise[0]])

    def call(unary=unary, iterations=2, **kw):
        a = dict(good, **kw)
        return op(unary, a["vi"], a["w"], a["ss"], a["ls"], a["nb"], a["pw"], iterations)

    call()  # the good call works
    with pytest.raises(RuntimeError, match=r"unary must be \[N, P, C\]"):
        call(unary=unary.reshape(-1, 3))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        call(unary=unary.half())
    with pytest.raises(RuntimeError, match="iterations must be >= 1"):
        call(iterations=0)
    with pytest.raises(RuntimeError, match="one vertex_index"):
        call(pw=[])
    with pytest.raises(RuntimeError, match="pairwise must be"):
        call(pw=[torch.zeros(4, 4)])
    with pytest.raises(RuntimeError, match="weights must be"):
        call(w=[lat.weights.double()])
    with pytest.raises(RuntimeError, match="splat_scale and slice_scale must be"):
        call(ss=[splat_scale[:-1]])
    with pytest.raises(RuntimeError, match="splat_scale and slice_scale must be"):
        call(ls=[slice_scale[:, None]])
    with pytest.raises(RuntimeError, match="vertex_index must be"):
        call(vi=[lat.vertex_index[:-1]])
    with pytest.raises(RuntimeError, match="neighbors must be"):
        call(nb=[lat.neighbors[:2]])
    bad_index = lat.vertex_index.clone()
    bad_index[5, 1] = lat.num_vertices  # one past the last vertex
    with pytest.raises(ValueError, match=rf"vertex_index holds values in \[0, {lat.num_vertices}\], expected "
                                         rf"\[0, {lat.num_vertices - 1}\]"):
        call(vi=[bad_index])
    bad_index[5, 1] = -1
    with pytest.raises(ValueError, match=r"vertex_index holds values in \[-1, "):
        call(vi=[bad_index])


def op_args(unary, lattices, pairwise, iterations, normalize="symmetric"):
    """The arguments of crfrnn::mean_field_inference, as crfrnn.crf._fused_mean_field gives them."""
    splat_scales, slice_scales = zip(*(lat.normalization_scales(normalize, unary.dtype) for lat in lattices))
    return (unary, [lat.vertex_index for lat in lattices], [lat.weights_as(unary.dtype) for lat in lattices],
            list(splat_scales), list(slice_scales), [lat.neighbors for lat in lattices], pairwise, iterations)


@pytest.mark.parametrize("layout", ["contiguous", "channels_first"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype, layout):
    """Schema, fake kernel (shape, dtype and strides of the real output) and torch.compile's
    tracing (aot_dispatch_dynamic), on the no-grad inputs the layer gives the op."""
    unary, lattices, pairwise = inputs(n=2, c=5, dtype=dtype)
    if layout == "channels_first":  # the layer's [N, C, H, W] memory, seen as [N, P, C]
        unary = unary.transpose(1, 2).contiguous().transpose(1, 2)
    op = torch.ops.crfrnn.mean_field_inference.default
    torch.library.opcheck(op, op_args(unary, lattices, pairwise, 3))
    # With a unary that requires grad, test_autograd_registration checks that no autograd formula
    # hides at the CPU key. aot_dispatch_dynamic is left out here: it backpropagates through the
    # op, which has no autograd (the layer calls it only when no gradient is wanted).
    torch.library.opcheck(op, op_args(unary.clone().requires_grad_(), lattices, pairwise, 3),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
