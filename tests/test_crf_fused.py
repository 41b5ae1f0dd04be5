"""The fused mean-field ops (crfrnn::mean_field_inference, mean_field_forward and
mean_field_backward, C++): they must give the step-by-step loop's logits and gradients, be chosen
whenever they apply, give the same bits whatever the thread count and SIMD width, and reject bad
arguments clearly."""

import pytest
import torch

import crfrnn
import crfrnn.inference as inference
from crfrnn import ops
from crfrnn import CRFRNNLayer, build_crf_lattices, mean_field
from helpers import outputs_per_threads_and_isa

pytestmark = pytest.mark.skipif("cpu" not in ops.FUSED_MEAN_FIELD_DEVICE_TYPES,
                                reason="the C++ extension (fused op) is not built")

KERNELS = dict(bilateral=(6.0, 30.0, 3.0), spatial=(2.0, 2.0))


def inputs(n=2, c=5, h=17, w=13, dtype=torch.float32, seed=0, scale=3.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    unary = (torch.randn(n, h * w, c, generator=g, dtype=torch.float64) * scale).to(device, dtype)
    image = torch.rand(n, 3, h, w, generator=g, dtype=torch.float64) * 255
    # Blocks of flat colour, so that the bilateral kernel has structure.
    image[:, :, : h // 2] = image[:, :, :1, :1]
    lattices = build_crf_lattices(image.to(device, dtype), KERNELS["bilateral"], KERNELS["spatial"], "native")
    pairwise = [torch.randn(c, c, generator=g, dtype=torch.float64).to(device, dtype) for _ in range(2)]
    return unary, lattices, pairwise


def loop(unary, lattices, pairwise, iterations, normalize):
    """The step-by-step loop (the oracle), forced."""
    return mean_field(unary, lattices, pairwise, iterations, normalize, fused=False).detach()


def fused(unary, lattices, pairwise, iterations, normalize):
    assert inference.can_fuse(unary, lattices)
    return inference.fused_mean_field(unary, lattices, pairwise, iterations, normalize)


@pytest.mark.parametrize("normalize", crfrnn.NORMALIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_the_step_by_step_loop(normalize, dtype):
    unary, lattices, pairwise = inputs(dtype=dtype)
    for iterations in (1, 4):
        expected = loop(unary, lattices, pairwise, iterations, normalize)
        got = fused(unary, lattices, pairwise, iterations, normalize)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    assert not torch.allclose(expected, unary, atol=1e-2), "the CRF had no effect"


def test_calls_of_every_size_in_turn_give_the_same_bits():
    """The op keeps its buffers for the thread's next call: calls that grow, shrink and change
    the class count in turn each give the bits of the same call made first (its own memory)."""
    problems = [inputs(n=2, c=21, h=30, w=25, seed=1), inputs(n=1, c=3, h=9, w=7, seed=2),
                inputs(n=3, c=40, h=20, w=18, seed=3), inputs(n=1, c=21, h=5, w=4, seed=4)]

    def forward_and_backward(unary, lattices, pairwise):
        u = unary.clone().requires_grad_()
        out = inference.fused_mean_field(u, lattices, pairwise, 3, "symmetric")
        out.square().sum().backward()
        return out.detach(), u.grad

    first = [forward_and_backward(*p) for p in problems]
    for p, (out, grad) in reversed(list(zip(problems, first))):
        again_out, again_grad = forward_and_backward(*p)
        assert torch.equal(again_out, out) and torch.equal(again_grad, grad)
        torch.testing.assert_close(out, loop(p[0], p[1], p[2], 3, "symmetric"), atol=1e-4, rtol=1e-4)


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


def test_layer_picks_the_fused_op_for_the_job(monkeypatch):
    """mean_field_forward when a gradient is wanted, mean_field_inference when none is or with
    checkpoint=True; the reference backend and lattices differentiable in their features (learned
    bandwidths) run the step-by-step loop."""
    calls = []

    def counting(name):
        real = getattr(torch.ops.crfrnn, name)
        return lambda *args: calls.append(name) or real(*args)

    for name in ("mean_field_inference", "mean_field_forward"):
        monkeypatch.setattr(torch.ops.crfrnn, name, counting(name))
    crf = CRFRNNLayer(4, num_iterations=2, **KERNELS)
    unary = torch.randn(1, 4, 10, 12)
    image = torch.rand(1, 3, 10, 12) * 255
    crf(unary, image).sum().backward()            # parameters want gradients
    assert calls == ["mean_field_forward"]
    with torch.no_grad():
        a = crf(unary, image)                     # no gradient
    crf.requires_grad_(False)
    b = crf(unary, image)                         # nothing requires grad
    assert calls[1:] == ["mean_field_inference"] * 2
    torch.testing.assert_close(a, b)
    crf.requires_grad_(True)
    crf.checkpoint = True
    crf(unary, image).sum().backward()            # recompute in the backward: save nothing
    assert calls[3:] == ["mean_field_inference", "mean_field_forward"]  # the forward again in the backward
    del calls[:]
    ref_crf = CRFRNNLayer(4, num_iterations=2, backend="reference", **KERNELS)
    with torch.no_grad():
        ref = ref_crf(unary, image)               # reference lattices: never fused
    torch.testing.assert_close(a, ref, atol=1e-4, rtol=1e-4)
    unary, lattices, pairwise = inputs(n=1, c=3)
    lattices[0].differentiable = True             # what a lattice for learned bandwidths says
    assert not inference.can_fuse(unary, lattices)
    mean_field(unary, lattices, pairwise, 2)
    assert calls == []


def test_fused_layer_matches_the_loop_on_a_batch_of_real_size():
    crf = CRFRNNLayer.deeplab_largefov(21).eval()
    step_by_step = CRFRNNLayer.deeplab_largefov(21, fused=False).eval()
    g = torch.Generator().manual_seed(3)
    unary = torch.randn(2, 21, 120, 160, generator=g) * 3
    # Flat colour blocks, so that the splat cuts the points into several ranges.
    image = torch.nn.functional.interpolate(torch.rand(2, 3, 6, 8, generator=g) * 255, size=(120, 160))
    image = (image + torch.rand(2, 3, 120, 160, generator=g) * 4).clamp(max=255)  # and some noise
    with torch.no_grad():
        got = crf(unary, image)
        expected = step_by_step(unary, image)
    # float32, 10 iterations: measured max |difference| 3.8e-6 on logits of magnitude ~10.
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
    assert torch.equal(got.argmax(1), expected.argmax(1))


_BITS_SCRIPT = """
import sys, torch, crfrnn
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
# Sizes where the splat cuts the points into several ranges (see mean_field_kernels.inc).
crf = crfrnn.CRFRNNLayer(21, num_iterations=3, num_eval_iterations=3, bilateral=(10.0, 30.0, 3.0),
                         spatial=(5.0, 2.0))
# Flat colour blocks: few bilateral vertices, so about 7 point ranges.
image = torch.nn.functional.interpolate(torch.rand(2, 3, 6, 8, generator=g) * 255, size=(120, 160))
unary = torch.randn(2, 21, 120, 160, generator=g) * 3
grad_out = torch.randn(unary.shape, generator=g)
with torch.no_grad():
    results = [crf.eval()(unary, image)]
crf.train()
for _ in range(2):  # the training ops twice: the same bits
    u = unary.clone().requires_grad_()
    crf.zero_grad()
    out = crf(u, image)
    (out * grad_out).sum().backward()
    results += [out.detach(), u.grad] + [p.grad.clone() for p in crf.parameters()]
torch.save(results, sys.argv[2])
"""


def test_same_bits_whatever_the_thread_count_and_simd_width(tmp_path):
    """1 or 2 threads, AVX2 or the generic 4-lane code: the same bits for the inference op and
    for the training ops' values and gradients, each run twice (summation orders that depend on
    the problem only, no fused multiply-add)."""
    outputs = outputs_per_threads_and_isa(_BITS_SCRIPT, tmp_path)
    half = (len(outputs[0]) - 1) // 2
    for run in outputs:
        for first, second in zip(run[1:1 + half], run[1 + half:]):
            assert torch.equal(first, second)
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other):
            assert torch.equal(a, b)


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
    """The arguments of crfrnn::mean_field_inference, as crfrnn.inference.fused_mean_field gives them."""
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


# ---- gradients --------------------------------------------------------------------------------

def values_and_gradients(unary, lattices, pairwise, iterations, normalize, grad_out, **options):
    """(logits, dL/dunary, [dL/dA_m]) of mean_field for the loss <logits, grad_out>."""
    unary = unary.detach().requires_grad_()
    pairwise = [m.detach().requires_grad_() for m in pairwise]
    logits = mean_field(unary, lattices, pairwise, iterations, normalize, **options)
    grads = torch.autograd.grad(logits, [unary, *pairwise], grad_out)
    return logits.detach(), grads[0], list(grads[1:])


def assert_close_to_rounding(got, expected, dtype):
    """Equal up to the rounding of `dtype`, relative to the tensor's largest value (gradients of
    the un-normalised kernel reach hundreds; each has a few near-zero entries)."""
    tol = 2e-5 if dtype == torch.float32 else 1e-11
    scale = expected.abs().max().item() + 1e-30
    torch.testing.assert_close(got, expected, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("normalize", ["symmetric", "after"])
@pytest.mark.parametrize("iterations", [1, 5, 10])
@pytest.mark.parametrize("c", [1, 2, 21, 60])
@pytest.mark.parametrize("n", [1, 3])
def test_fused_gradients_equal_the_step_by_step_loop(n, c, iterations, normalize):
    """float32 values and gradients of the unary and both matrices: the fused forward+backward,
    on a channels-last and a channels-first unary, and with checkpoint=True (recomputed forward),
    all equal the loop's."""
    unary, lattices, pairwise = inputs(n=n, c=c, h=11, w=9, seed=100 * n + c)
    grad_out = torch.randn(unary.shape, generator=torch.Generator().manual_seed(iterations))
    expected = values_and_gradients(unary, lattices, pairwise, iterations, normalize, grad_out, fused=False)
    channels_first = unary.transpose(1, 2).contiguous().transpose(1, 2)  # the layer's memory
    for u, checkpoint in ((unary, False), (channels_first, False), (channels_first, True)):
        got = values_and_gradients(u, lattices, pairwise, iterations, normalize, grad_out, checkpoint=checkpoint)
        assert_close_to_rounding(got[0], expected[0], torch.float32)
        assert_close_to_rounding(got[1], expected[1], torch.float32)
        assert got[1].stride() == u.stride()  # the gradient in the unary's layout
        for g, e in zip(got[2], expected[2]):
            assert_close_to_rounding(g, e, torch.float32)
    assert expected[2][0].abs().max() > 0 and expected[1].abs().max() > 0


@pytest.mark.parametrize("normalize", ["symmetric", "after", "none"])
def test_fused_gradients_equal_the_loop_in_float64(normalize):
    unary, lattices, pairwise = inputs(n=2, c=7, dtype=torch.float64)
    grad_out = torch.randn(unary.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = values_and_gradients(unary, lattices, pairwise, 4, normalize, grad_out, fused=False)
    for checkpoint in (False, True):
        got = values_and_gradients(unary, lattices, pairwise, 4, normalize, grad_out, checkpoint=checkpoint)
        for g, e in zip([got[0], got[1], *got[2]], [expected[0], expected[1], *expected[2]]):
            assert_close_to_rounding(g, e, torch.float64)


def test_saved_marginals_give_the_recomputed_bits(monkeypatch):
    """mean_field(..., keep_marginals=True) (what the training scripts ask for): the forward keeps
    Q, the backward reads it instead of recomputing it, with the same arithmetic, so the same bits."""
    unary, lattices, pairwise = inputs(n=2, c=21, h=23, w=19)
    grad_out = torch.randn(unary.shape, generator=torch.Generator().manual_seed(2))
    flags, forward = [], torch.ops.crfrnn.mean_field_forward

    def spy(*args):
        flags.append(args[8])  # save_marginals
        return forward(*args)
    monkeypatch.setattr(torch.ops.crfrnn, "mean_field_forward", spy)
    results = []
    for save in (False, True):
        results.append(values_and_gradients(unary, lattices, pairwise, 5, "symmetric", grad_out,
                                            keep_marginals=save))
    assert flags == [False, True]
    recomputed, saved = results
    for a, b in zip([recomputed[0], recomputed[1], *recomputed[2]], [saved[0], saved[1], *saved[2]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("normalize", ["symmetric", "after"])
def test_fused_gradcheck_float64(normalize, checkpoint):
    """Numeric against analytic gradients of the fused ops, for the unary and both matrices."""
    unary, lattices, pairwise = inputs(n=2, c=3, h=5, w=4, dtype=torch.float64, scale=1.0)
    assert inference.can_fuse(unary, lattices)

    def run(u, a, b):
        return mean_field(u, lattices, [a, b], 3, normalize, checkpoint=checkpoint)

    args = [t.clone().requires_grad_() for t in (unary, *pairwise)]
    assert torch.autograd.gradcheck(run, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_fused_gradient_of_the_matrices_alone():
    """A unary that needs no gradient (a fixed coarse unary, learning the CRF only)."""
    unary, lattices, pairwise = inputs(n=1, c=4)
    grad_out = torch.randn(unary.shape)

    def matrix_gradients(fused):
        pw = [m.clone().requires_grad_() for m in pairwise]
        (mean_field(unary, lattices, pw, 3, "symmetric", fused=fused) * grad_out).sum().backward()
        return [m.grad for m in pw]
    for got, expected in zip(matrix_gradients(fused=True), matrix_gradients(fused=False)):
        assert_close_to_rounding(got, expected, torch.float32)


def test_layer_gradients_equal_the_loop_on_a_batch_of_real_size():
    """The layer (DeepLab's CRF parameters, 10 iterations) on an image of real structure: the
    gradients of its unary and parameters through the fused ops equal the loop's."""
    g = torch.Generator().manual_seed(4)
    unary = torch.randn(2, 21, 60, 80, generator=g) * 3
    image = torch.nn.functional.interpolate(torch.rand(2, 3, 6, 8, generator=g) * 255, size=(60, 80))
    image = (image + torch.rand(2, 3, 60, 80, generator=g) * 4).clamp(max=255)
    target = torch.randint(0, 21, (2, 60, 80), generator=g)
    results = []
    for fused_ops in (True, False):
        crf = CRFRNNLayer.deeplab_largefov(21, fused=fused_ops)
        u = unary.clone().requires_grad_()
        loss = torch.nn.functional.cross_entropy(crf(u, image), target)
        loss.backward()
        results.append([u.grad] + [p.grad for p in crf.parameters()])
    for got, expected in zip(*results):
        assert_close_to_rounding(got, expected, torch.float32)


@pytest.mark.parametrize("sharing", [dict(compatibility="symmetric", kernel_weights="scalar"),
                                     dict(compatibility="potts", kernel_weights="diagonal"),
                                     dict(learn_bandwidths=True)])
def test_learned_crf_options_fuse_or_fall_back(monkeypatch, sharing):
    """Parameter sharing builds the C x C matrices before the op: the fused ops run and their
    gradients reach every parameter as the loop's do. Learned bandwidths make the lattices
    differentiable in their features: the layer runs the step-by-step loop."""
    g = torch.Generator().manual_seed(6)
    unary = torch.randn(1, 5, 12, 10, generator=g) * 2
    image = torch.rand(1, 3, 12, 10, generator=g) * 255
    calls = []
    real = torch.ops.crfrnn.mean_field_forward
    monkeypatch.setattr(torch.ops.crfrnn, "mean_field_forward", lambda *a: calls.append(1) or real(*a))
    grads = []
    for fused_ops in (True, False):
        crf = CRFRNNLayer(5, num_iterations=3, **KERNELS, **sharing, fused=fused_ops)
        crf(unary, image).logsumexp(1).sum().backward()
        grads.append({name: p.grad for name, p in crf.named_parameters()})
        if fused_ops:
            assert calls == ([] if sharing.get("learn_bandwidths") else [1])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert grads[0][name] is not None, name
        assert_close_to_rounding(grads[0][name], grads[1][name], torch.float32)


def saved_bytes(fn):
    """Bytes of the tensors autograd saves while fn() runs (distinct storages counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_fused_forward_saves_a_fraction_of_the_loops_memory():
    """The fused forward keeps the inputs, the blurred grids (M x C per kernel and iteration) and
    by default the marginals (T - 1 Tensor[N, P, C]), the loop several Tensor[N, P, C] per
    iteration; keep_marginals=False drops the marginals, checkpoint=True keeps only the inputs."""
    g = torch.Generator().manual_seed(5)
    crf = CRFRNNLayer.deeplab_largefov(21)
    unary = (torch.randn(1, 21, 90, 120, generator=g) * 3).requires_grad_()
    image = torch.nn.functional.interpolate(torch.rand(1, 3, 6, 8, generator=g) * 255, size=(90, 120))
    unary_bytes = unary.numel() * 4
    loop_bytes = saved_bytes(lambda: mean_field(*crf_inputs(crf, unary, image), fused=False))
    fused_bytes = saved_bytes(lambda: mean_field(*crf_inputs(crf, unary, image)))
    lean_bytes = saved_bytes(lambda: mean_field(*crf_inputs(crf, unary, image), keep_marginals=False))
    checkpoint_bytes = saved_bytes(lambda: mean_field(*crf_inputs(crf, unary, image), checkpoint=True))
    assert loop_bytes > 3 * crf.num_iterations * unary_bytes
    assert lean_bytes < loop_bytes / 5 and fused_bytes < loop_bytes / 2
    assert fused_bytes - lean_bytes == (crf.num_iterations - 1) * unary_bytes
    # Checkpoint: the op's inputs (unary, lattice tables, scales, matrices); without, the blurred
    # grids besides.
    grids = sum(crf.num_iterations * lat.num_vertices * 21 * 4 for lat in crf_inputs(crf, unary, image)[1])
    assert lean_bytes - checkpoint_bytes == grids


def crf_inputs(crf, unary, image):
    """mean_field's first five arguments as the layer gives them (unary as [N, P, C])."""
    lattices = build_crf_lattices(image, crf.bilateral, crf.spatial, "native")
    u = unary.flatten(2).transpose(1, 2)
    return u, lattices, crf.pairwise_matrices(), crf.num_iterations, crf.normalize


@pytest.mark.parametrize("save_marginals", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_first"])
def test_opcheck_training_ops(layout, save_marginals):
    """Schema, fake kernels (shapes, dtypes and strides of the real outputs), autograd
    registration and torch.compile's tracing of mean_field_forward (with its backward) and
    mean_field_backward; the marginals are saved (CUDA's choice) or recomputed (the CPU's)."""
    unary, lattices, pairwise = inputs(n=2, c=5, dtype=torch.float64)
    if layout == "channels_first":
        unary = unary.transpose(1, 2).contiguous().transpose(1, 2)
    pairwise = [m.requires_grad_() for m in pairwise]
    args = op_args(unary.requires_grad_(), lattices, pairwise, 3)
    torch.library.opcheck(torch.ops.crfrnn.mean_field_forward.default, (*args, save_marginals))
    _, blurred, marginals, _ = torch.ops.crfrnn.mean_field_forward(*args, save_marginals)
    grad = torch.randn(unary.shape, dtype=torch.float64)
    backward_args = (grad, *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:6]],
                     [m.detach() for m in pairwise], blurred, marginals, 3)
    torch.library.opcheck(torch.ops.crfrnn.mean_field_backward.default, backward_args)


def test_opcheck_inference_op_with_its_recomputing_backward():
    unary, lattices, pairwise = inputs(n=2, c=4, dtype=torch.float64)
    pairwise = [m.requires_grad_() for m in pairwise]
    torch.library.opcheck(torch.ops.crfrnn.mean_field_inference.default,
                          op_args(unary.requires_grad_(), lattices, pairwise, 2))


def test_fused_ops_refuse_lattice_weights_that_want_a_gradient():
    """The fused ops give no gradient for the lattice's weights or the normalisation scales: one
    that requires grad is refused, never silently left without one."""
    unary, lattices, pairwise = inputs(n=1, c=3)
    args = list(op_args(unary.requires_grad_(), lattices, pairwise, 2))
    args[2] = [w.clone().requires_grad_() for w in args[2]]
    with pytest.raises(RuntimeError, match="step by step"):
        torch.ops.crfrnn.mean_field_forward(*args, False)
    with pytest.raises(RuntimeError, match="step by step"):
        torch.ops.crfrnn.mean_field_inference(*args)


def test_backward_op_with_bad_saved_tensors_raises():
    unary, lattices, pairwise = inputs(n=1, c=3)
    args = op_args(unary, lattices, pairwise, 2)
    _, blurred, marginals, _ = torch.ops.crfrnn.mean_field_forward(*args, True)
    grad = torch.randn(unary.shape)
    op = torch.ops.crfrnn.mean_field_backward

    def call(grad=grad, blurred=blurred, marginals=marginals):
        return op(grad, *args[:7], blurred, marginals, 2)

    call()
    with pytest.raises(RuntimeError, match="grad_logits must be"):
        call(grad=grad.double())
    with pytest.raises(RuntimeError, match="one blurred grid tensor per kernel"):
        call(blurred=blurred[:1])
    with pytest.raises(RuntimeError, match="blurred must be"):
        call(blurred=[blurred[0][:1], blurred[1]])
    with pytest.raises(RuntimeError, match="marginals must be empty"):
        call(marginals=marginals[:, :, :-1])


# ---- CUDA (run on a machine with a GPU; tests/test_cuda_logic_on_cpu.py runs the schedules here) -

@pytest.mark.cuda
@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_first"])
def test_cuda_fused_ops_equal_the_step_by_step_loop_and_the_cpu(layout, checkpoint):
    """On the GPU: the fused ops' values and gradients equal the CUDA step-by-step loop's and the
    CPU fused ops' to rounding, in the unary's layout; the same bits twice."""
    if "cuda" not in ops.FUSED_MEAN_FIELD_DEVICE_TYPES:
        pytest.skip("the extension was built without the CUDA fused ops")
    unary, lattices, pairwise = inputs(n=2, c=21, h=23, w=19)
    grad_out = torch.randn(unary.shape, generator=torch.Generator().manual_seed(2))
    cpu = values_and_gradients(unary, lattices, pairwise, 5, "symmetric", grad_out, checkpoint=checkpoint)
    cuda_unary, cuda_lattices, cuda_pairwise = inputs(n=2, c=21, h=23, w=19, device="cuda")
    if layout == "channels_first":
        cuda_unary = cuda_unary.transpose(1, 2).contiguous().transpose(1, 2)
    assert inference.can_fuse(cuda_unary, cuda_lattices)
    runs = [values_and_gradients(cuda_unary, cuda_lattices, cuda_pairwise, 5, "symmetric", grad_out.cuda(),
                                 checkpoint=checkpoint) for _ in range(2)]
    loop = values_and_gradients(cuda_unary, cuda_lattices, cuda_pairwise, 5, "symmetric", grad_out.cuda(),
                                fused=False)
    def flat(result):
        return [result[0], result[1], *result[2]]

    for got, again, expected, on_cpu in zip(flat(runs[0]), flat(runs[1]), flat(loop), flat(cpu)):
        assert torch.equal(got, again)
        assert_close_to_rounding(got, expected, torch.float32)
        assert_close_to_rounding(got.cpu(), on_cpu, torch.float32)
    assert runs[0][1].stride() == cuda_unary.stride()


@pytest.mark.cuda
def test_cuda_opcheck_training_ops():
    if "cuda" not in ops.FUSED_MEAN_FIELD_DEVICE_TYPES:
        pytest.skip("the extension was built without the CUDA fused ops")
    unary, lattices, pairwise = inputs(n=2, c=5, dtype=torch.float64, device="cuda")
    args = op_args(unary.requires_grad_(), lattices, [m.requires_grad_() for m in pairwise], 3)
    for save_marginals in (True, False):
        torch.library.opcheck(torch.ops.crfrnn.mean_field_forward.default, (*args, save_marginals))
    torch.library.opcheck(torch.ops.crfrnn.mean_field_inference.default, args)
