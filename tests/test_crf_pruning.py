"""Sender pruning (crfrnn.mean_field(..., prune=...), issue 24): in each iteration a class whose Q
stays below its threshold at every point of an image sends no message there; every class still
receives. The fused ops must compute what the step-by-step loop computes with the same pruning
(values, senders and gradients), prune=0 must be the exact iterations, and the layer and dense_crf
must take the argument."""

import numpy as np
import pytest
import torch

import crfrnn
from crfrnn import CRFRNNLayer, build_crf_lattices, mean_field, potts_matrices
from crfrnn import inference, ops
from helpers import outputs_per_threads_and_isa

pytestmark = pytest.mark.skipif("cpu" not in ops.FUSED_MEAN_FIELD_DEVICE_TYPES,
                                reason="the C++ extension (fused op) is not built")

KERNELS = dict(bilateral=(6.0, 30.0, 3.0), spatial=(2.0, 2.0))


def problem(n=2, c=12, h=23, w=19, dtype=torch.float64, absent=8, shift=9.0, seed=1):
    """(unary [N, P, C], lattices): random logits with `absent` classes `shift` below the others,
    on images with a flat block (shared bilateral vertices) and noise."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 3, h, w, generator=g, dtype=torch.float64) * 255
    image[:, :, : h // 2] = image[:, :, :1, :1]
    lattices = build_crf_lattices(image.to(dtype), KERNELS["bilateral"], KERNELS["spatial"], "native")
    unary = torch.randn(n, h * w, c, generator=g, dtype=torch.float64) * 2
    unary[:, :, c - absent:] -= shift
    return unary.to(dtype), list(lattices)


def matrices(c, kind, dtype=torch.float64, seed=0):
    """Pairwise matrices: "potts" (w (1 - I)), "diagonal" (Potts times diagonal weights), "repulsive"
    (negative Potts weights: absent classes can rise back), "learned" (random: not Potts-like)."""
    if kind == "potts":
        return potts_matrices(c, [3.0, 2.0], dtype=dtype)
    if kind == "repulsive":
        return potts_matrices(c, [-6.0, 1.0], dtype=dtype)
    potts = 1.0 - torch.eye(c, dtype=dtype)
    if kind == "diagonal":
        return [potts * torch.linspace(1.0, 4.0, c, dtype=dtype), 2.0 * potts]
    g = torch.Generator().manual_seed(seed)
    return [potts * 3.0 + 0.3 * torch.randn(c, c, generator=g, dtype=dtype) for _ in range(2)]


def op_args(unary, lattices, pairwise, iterations, normalize="symmetric"):
    splat_scales, slice_scales = zip(*(lat.normalization_scales(normalize, unary.dtype) for lat in lattices))
    return (unary, [lat.vertex_index for lat in lattices], [lat.weights_as(unary.dtype) for lat in lattices],
            list(splat_scales), list(slice_scales), [lat.neighbors for lat in lattices], pairwise, iterations)


def senders_of(unary, lattices, pairwise, iterations, prune, normalize="symmetric"):
    return torch.ops.crfrnn.mean_field_forward(*op_args(unary, lattices, pairwise, iterations, normalize), False,
                                               prune)[3]


def tolerance(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-5


@pytest.mark.parametrize("kind", ["potts", "diagonal", "repulsive", "learned"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 3])
def test_fused_equals_the_loop_with_the_same_pruning(kind, dtype, n):
    """Every row layout of the C++ op (all classes, shared rows for Potts-like matrices, gathered
    rows for learned ones) against the loop, which filters Q D with D decided the same way; the
    cases prune, and the repulsive one brings classes back."""
    rises = pruned = 0
    for shift, prune in ((4.0, 1e-3), (9.0, 1e-2), (9.0, 0.2)):
        unary, lattices = problem(n=n, dtype=dtype, shift=shift)
        pairwise = matrices(unary.shape[-1], kind, dtype)
        for normalize in ("symmetric", "after"):
            got = mean_field(unary, lattices, pairwise, 6, normalize, prune=prune)
            expected = mean_field(unary, lattices, pairwise, 6, normalize, prune=prune, fused=False)
            torch.testing.assert_close(got, expected, atol=tolerance(dtype), rtol=tolerance(dtype))
            senders = senders_of(unary, lattices, pairwise, 6, prune, normalize).bool()
            pruned += int((~senders).sum())
            rises += int((senders[1:] & ~senders[:-1]).sum())
    assert pruned > 0, "nothing was pruned"
    if kind == "repulsive":
        assert rises > 0, "no class came back"


@pytest.mark.parametrize("c", [2, 7, 21, 33, 60])
def test_any_number_of_classes(c):
    """Row widths of every kind (compiled 8..32, generic beyond; the first pass's maxima taken
    apart from it beyond 32 classes), a channels-first unary too (read a lane per point)."""
    unary, lattices = problem(n=2, c=c, h=11, w=9, absent=c // 2)
    for kind in ("potts", "learned"):
        pairwise = matrices(c, kind)
        expected = mean_field(unary, lattices, pairwise, 4, prune=1e-2, fused=False)
        for u in (unary, unary.transpose(1, 2).contiguous().transpose(1, 2)):
            got = mean_field(u, lattices, pairwise, 4, prune=1e-2)
            torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_layouts_give_the_same_bits():
    """Contiguous, channels-first and strided unaries: the same logits, bit for bit (the
    channels-first reads sum in the row's order)."""
    unary, lattices = problem(n=2, c=40, dtype=torch.float32, absent=30)
    pairwise = matrices(40, "potts", torch.float32)
    expected = mean_field(unary, lattices, pairwise, 5, prune=1e-2)
    channels_first = unary.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(unary.shape[0], unary.shape[1], 2 * unary.shape[2])
    wide[..., ::2] = unary
    for u in (channels_first, wide[..., ::2]):
        got = mean_field(u, lattices, pairwise, 5, prune=1e-2)
        assert got.stride() == u.stride() or u is not channels_first
        assert torch.equal(got, expected)


def test_prune_zero_is_exact_and_nothing_pruned_changes_nothing():
    """prune = 0 runs the unpruned loops (no senders returned); a threshold no class falls below
    gives their values too."""
    unary, lattices = problem(n=2, c=9, dtype=torch.float32, absent=0)
    pairwise = matrices(9, "potts", torch.float32)
    args = op_args(unary, lattices, pairwise, 4)
    exact = torch.ops.crfrnn.mean_field_inference(*args)
    assert torch.equal(torch.ops.crfrnn.mean_field_inference(*args, 0.0), exact)
    out, _, _, senders = torch.ops.crfrnn.mean_field_forward(*args, False, 0.0)
    assert torch.equal(out, exact) and senders.numel() == 0
    _, _, _, senders = torch.ops.crfrnn.mean_field_forward(*args, False, 1e-12)
    assert bool(senders.all())
    torch.testing.assert_close(torch.ops.crfrnn.mean_field_inference(*args, 1e-12), exact, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("kind", ["potts", "repulsive", "learned"])
def test_gradients_equal_the_loops_with_the_same_pruning(kind, checkpoint):
    """The fused backward (dQ masked by the senders the forward returned; the checkpointed op
    runs the forward again, with the same senders) against autograd through the loop."""
    unary, lattices = problem(n=2, dtype=torch.float64)
    pairwise = matrices(unary.shape[-1], kind)
    grad_out = torch.randn(unary.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    for fused in (True, False):
        u = unary.clone().requires_grad_()
        mats = [m.clone().requires_grad_() for m in pairwise]
        out = mean_field(u, lattices, mats, 6, prune=1e-2, fused=fused, checkpoint=checkpoint)
        grads = torch.autograd.grad(out, [u, *mats], grad_out)
        results.append([out.detach(), *grads])
    for got, expected in zip(*results):
        scale = expected.abs().max().item() + 1e-30
        torch.testing.assert_close(got, expected, atol=1e-11 * scale, rtol=1e-10)


def test_gradcheck_float64():
    """Small inputs that prune (checked): gradients and second derivatives of the computed
    function, its senders held fixed (the thresholds sit far from every largest Q, so the finite
    differences do not move them)."""
    unary, lattices = problem(n=2, c=5, h=6, w=5, absent=3, shift=8.0)
    pairwise = matrices(5, "potts")
    senders = senders_of(unary, lattices, pairwise, 4, 1e-2)
    assert 0 < senders.sum() < senders.numel()
    u = unary.clone().requires_grad_()
    mats = [m.clone().requires_grad_() for m in pairwise]

    def f(u, a, b):
        return mean_field(u, lattices, [a, b], 4, prune=1e-2)

    assert torch.autograd.gradcheck(f, (u, *mats), eps=1e-7, atol=1e-6)
    assert torch.autograd.gradgradcheck(f, (u, *mats), eps=1e-7, atol=1e-5)


def test_a_ground_truth_class_absent_from_the_unary_still_gets_its_gradient():
    """Training with pruning: a class the unary all but rules out (it sends nothing: checked)
    that the ground truth has in places still gets a gradient, through its own logits (the unary)
    and as a receiver (its row of the compatibility matrix)."""
    torch.manual_seed(0)
    c, h, w = 6, 16, 20
    crf = CRFRNNLayer(c, num_iterations=4, prune=0.05, **KERNELS).train()
    unary = torch.randn(1, c, h, w) * 2
    unary[:, 4] = -12.0  # class 4: absent from the unary
    image = torch.rand(1, 3, h, w) * 255
    target = torch.randint(0, c, (1, h, w))
    target[:, : h // 2, : w // 2] = 4  # but present in the ground truth
    lattices = crf._lattices(image, None, (1, h, w))
    u = unary.flatten(2).transpose(1, 2)
    senders = senders_of(u, lattices, crf.pairwise_matrices(), 4, 0.05)
    assert not bool(senders[:, 0, 4].any()), "class 4 sent: the case does not test pruning"
    u = unary.clone().requires_grad_()
    loss = torch.nn.functional.cross_entropy(crf(u, image), target)
    loss.backward()
    assert u.grad[:, 4].abs().sum() > 0
    assert (u.grad[0, 4][target[0] == 4] < 0).all()  # raise its logits where it is the truth
    assert crf.compatibility.grad[4].abs().sum() > 0
    # Against the loop with the same pruning.
    crf.zero_grad()
    u2 = unary.clone().requires_grad_()
    crf.fused = False
    torch.nn.functional.cross_entropy(crf(u2, image), target).backward()
    torch.testing.assert_close(u.grad, u2.grad, atol=1e-6, rtol=1e-4)


def test_layer_and_dense_crf_arguments():
    crf = CRFRNNLayer(4, **KERNELS)
    assert crf.prune == 0.0 and crf.eval_prune == crfrnn.DEFAULT_PRUNE
    assert CRFRNNLayer(**crf.config()).config() == crf.config()
    custom = CRFRNNLayer(4, prune=0.01, eval_prune=0.0, **KERNELS)
    assert "prune=0.01" in repr(custom)
    for bad in (-0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="prune must be a number in"):
            CRFRNNLayer(4, prune=bad)
        with pytest.raises(ValueError, match="prune must be a number in"):
            crfrnn.dense_crf(np.zeros((5, 6, 3), np.uint8), np.full((4, 5, 6), 0.25, np.float32), prune=bad)
    with pytest.raises(RuntimeError, match="prune must be in"):
        unary, lattices = problem(n=1, c=3)
        torch.ops.crfrnn.mean_field_inference(*op_args(unary, lattices, matrices(3, "potts"), 2), 2.0)
    # The mode picks the value: eval_prune in eval mode, prune in training.
    unary = torch.randn(1, 4, 12, 10) * 3
    unary[:, 3] -= 20
    image = torch.rand(1, 3, 12, 10) * 255
    exact = CRFRNNLayer(4, eval_prune=0.0, **KERNELS).eval()
    pruned = CRFRNNLayer(4, eval_prune=0.3, **KERNELS).eval()
    with torch.no_grad():
        a, b = exact(unary, image), pruned(unary, image)
        assert not torch.equal(a, b)
        assert torch.equal(pruned.train()(unary, image), exact.train()(unary, image))
    rgb = (torch.rand(12, 10, 3) * 255).to(torch.uint8).numpy()
    probs = torch.softmax(unary[0], 0).numpy()
    q0 = crfrnn.dense_crf(rgb, probs, prune=0.0)
    q = crfrnn.dense_crf(rgb, probs)
    np.testing.assert_allclose(q, q0, atol=1e-3)


def test_sender_thresholds():
    """sqrt(prune / sum of weights) for Potts matrices, about prune / spread for learned ones, 0
    for prune = 0, inf for a column the same for every class."""
    c = 5
    theta = inference.sender_thresholds(potts_matrices(c, [4.0, 3.0]), 7e-4)
    torch.testing.assert_close(theta, torch.full((c,), 1e-2, dtype=torch.float64))
    assert (inference.sender_thresholds(potts_matrices(c, [4.0, 3.0]), 0.0) == 0).all()
    mat = torch.ones(c, c)
    mat[:, 1] = torch.arange(c, dtype=torch.float32)  # column 1: 0, 2, .., c - 1 for the others
    theta = inference.sender_thresholds([mat], 1e-4)
    assert theta[0] == float("inf")
    assert 0.99e-4 / (c - 1) < theta[1] < 1e-4 / (c - 1)


_BITS_SCRIPT = """
import sys, torch, crfrnn
torch.set_num_threads(int(sys.argv[1]))
g = torch.Generator().manual_seed(0)
image = torch.nn.functional.interpolate(torch.rand(2, 3, 6, 8, generator=g) * 255, size=(120, 160))
results = []
for c, kernel_weights in ((21, "full"), (40, "full"), (40, "diagonal")):
    crf = crfrnn.CRFRNNLayer(c, num_iterations=3, num_eval_iterations=3, bilateral=(10.0, 30.0, 3.0),
                             spatial=(5.0, 2.0), prune=1e-2, eval_prune=1e-2, kernel_weights=kernel_weights)
    with torch.no_grad():
        crf.compatibility[0, 1] += 0.5 if kernel_weights == "diagonal" else 0.0  # learned: gather rows
    unary = torch.randn(2, c, 120, 160, generator=g) * 3
    unary[:, c // 2:] -= 8
    grad_out = torch.randn(unary.shape, generator=g)
    with torch.no_grad():
        results.append(crf.eval()(unary, image))
    u = unary.clone().requires_grad_()
    out = crf.train()(u, image)
    (out * grad_out).sum().backward()
    results += [out.detach(), u.grad] + [p.grad.clone() for p in crf.parameters()]
torch.save(results, sys.argv[2])
"""


def test_same_bits_whatever_the_thread_count_and_simd_width(tmp_path):
    """1 or 2 threads, AVX2 or the generic 4-lane code: the same bits with pruning, for the
    inference op and the training ops (shared and gathered rows)."""
    outputs = outputs_per_threads_and_isa(_BITS_SCRIPT, tmp_path)
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["contiguous", "channels_first"])
def test_opcheck_with_pruning(layout):
    unary, lattices = problem(n=2, c=6, h=9, w=7, absent=3)
    if layout == "channels_first":
        unary = unary.transpose(1, 2).contiguous().transpose(1, 2)
    pairwise = [m.requires_grad_() for m in matrices(6, "potts")]
    args = op_args(unary.requires_grad_(), lattices, pairwise, 3)
    torch.library.opcheck(torch.ops.crfrnn.mean_field_forward.default, (*args, False, 1e-2))
    torch.library.opcheck(torch.ops.crfrnn.mean_field_inference.default, (*args, 1e-2))
    _, blurred, marginals, senders = torch.ops.crfrnn.mean_field_forward(*args, False, 1e-2)
    grad = torch.randn(unary.shape, dtype=torch.float64)
    detached = [a.detach() if isinstance(a, torch.Tensor) else a for a in args[:6]]
    backward_args = (grad, *detached, [m.detach() for m in pairwise], blurred, marginals, 3, senders)
    torch.library.opcheck(torch.ops.crfrnn.mean_field_backward.default, backward_args)
    with pytest.raises(RuntimeError, match="senders must be empty"):
        torch.ops.crfrnn.mean_field_backward(*backward_args[:-1], senders[:, :, :-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_image_whose_every_class_sends_beside_one_whose_classes_leave(dtype):
    """Shared rows when one image of the batch drops a class after the first iteration while
    another keeps every class sending: the latter's pseudo class is empty (its log-sum-exp -inf)
    and must stay so; it became NaN (-inf - -inf), and with it every logit of that image. The
    fused op must give finite logits equal to the loop's with the same senders. A sweep over how
    present the fading class starts: at least one case must drop it after the first iteration."""
    c, h, w = 4, 16, 16
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, h, w, generator=g, dtype=torch.float64) * 255
    lattices = build_crf_lattices(image.to(dtype), KERNELS["bilateral"], KERNELS["spatial"], "native")
    pairwise = matrices(c, "potts", dtype)
    thresholds = inference.sender_thresholds(pairwise, 1e-3)
    quarters = torch.arange(h * w) % 4
    exercised = 0
    for fading in (2.0, 3.0, 4.0, 5.0, 6.0):
        unary = torch.zeros(2, h * w, c, dtype=torch.float64)
        unary[0, torch.arange(h * w), quarters] = 8.0     # image 0: every class wins a quarter
        unary[1, :, 1] = 4.0                              # image 1: class 1 everywhere,
        unary[1, :, 0] = -30.0                            # class 0 absent from the start,
        unary[1, :8, 2] = 4.0 - fading                    # class 2 faint in a few points
        unary = unary.to(dtype)
        senders = senders_of(unary, lattices, pairwise, 5, 1e-3)
        if bool(senders[:, 0].all()) and senders[0, 1, 2] and not senders[1:, 1, 2].any():
            exercised += 1
        args = op_args(unary, lattices, pairwise, 5)
        fused = torch.ops.crfrnn.mean_field_inference(*args, 1e-3)
        assert torch.isfinite(fused).all(), f"fading {fading}: NaN/Inf logits"
        loop = mean_field(unary, lattices, pairwise, 5, fused=False, prune=1e-3)
        torch.testing.assert_close(fused, loop, atol=tolerance(dtype) * 10, rtol=tolerance(dtype) * 10)
    assert exercised, f"no case dropped class 2 of image 1 after the first iteration (thresholds {thresholds})"


def test_random_batches_equal_the_loop_with_the_same_pruning():
    """Batches whose images prune differently (classes absent from the start, fading, or present;
    Potts, diagonal and learned matrices; C below and above 32, where the first senders come from
    a pass of their own): the fused forward and backward give finite values equal to the loop's
    with the same senders. (Such a batch found the empty-pseudo-class NaN above.)"""
    g = torch.Generator().manual_seed(11)
    for trial in range(18):
        c = (2, 3, 5, 9, 21, 40)[trial % 6]
        n = 1 + trial % 4
        h, w = 7 + trial % 5, 9 + trial % 3
        image = torch.rand(n, 3, h, w, generator=g, dtype=torch.float64) * 255
        lattices = build_crf_lattices(image.float(), KERNELS["bilateral"], KERNELS["spatial"], "native")
        pairwise = matrices(c, ("potts", "diagonal", "learned")[trial % 3], torch.float32, seed=trial)
        unary = torch.randn(n, h * w, c, generator=g) * (1 + trial % 7)
        fate = torch.rand(n, c, generator=g)
        unary = unary - 30 * (fate < 0.3)[:, None, :] - 6 * ((fate >= 0.3) & (fate < 0.5))[:, None, :]
        prune, iterations = (1e-4, 7e-4, 1e-2)[trial % 3], 1 + trial % 6
        grad = torch.randn(n, h * w, c, generator=g)
        results = []
        for fused in (True, False):
            u = unary.clone().requires_grad_()
            logits = mean_field(u, lattices, pairwise, iterations, fused=fused, prune=prune,
                                keep_marginals=bool(trial % 2))
            (logits * grad).sum().backward()
            results.append((logits.detach(), u.grad))
        (logits, du), (loop_logits, loop_du) = results
        assert torch.isfinite(logits).all() and torch.isfinite(du).all(), f"trial {trial}"
        torch.testing.assert_close(logits, loop_logits, atol=1e-4, rtol=1e-4, msg=f"trial {trial}")
        torch.testing.assert_close(du, loop_du, atol=1e-4, rtol=1e-4, msg=f"trial {trial}")


@pytest.mark.parametrize("c", [21, 60])
@pytest.mark.parametrize("kind", ["potts", "learned"])
def test_an_image_where_every_class_sends_beside_one_that_prunes(c, kind):
    """Where every class of an image reaches its threshold the op stops tracking that image's
    maxima (they only decide who sends) and, beyond 32 classes, skips the rest of its points in
    the pass that finds the first senders (their per-point totals are then not written: an image
    whose every class sends has no pseudo class to build from them). Image 0 (random logits on 1600 points: every class sends from
    the start) beside image 1 (half its classes absent, and class 1 only in its last 100 points,
    which an image's maxima must not stop before): the same senders and values as the loop with
    the same pruning, for a contiguous and a channels-first unary."""
    g = torch.Generator().manual_seed(c)
    h = w = 40
    image = torch.rand(2, 3, h, w, generator=g, dtype=torch.float64) * 255
    lattices = build_crf_lattices(image.float(), KERNELS["bilateral"], KERNELS["spatial"], "native")
    pairwise = matrices(c, kind, torch.float32)
    unary = torch.randn(2, h * w, c, generator=g) * 2
    unary[1, :, c // 2:] -= 30.0
    unary[1, :-100, 1] -= 30.0
    senders = senders_of(unary, lattices, pairwise, 5, 7e-4).bool()
    assert bool(senders[0, 0].all()) and not bool(senders[0, 1].all()) and bool(senders[0, 1, 1])
    expected = mean_field(unary, lattices, pairwise, 5, prune=7e-4, fused=False)
    for u in (unary, unary.transpose(1, 2).contiguous().transpose(1, 2)):
        got = mean_field(u, lattices, pairwise, 5, prune=7e-4)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_matrices_that_could_overflow_are_refused_rather_than_pruned_away(fused):
    """An overflowing iteration turns Q to NaN, which reaches no threshold: pruning would silence
    the classes it hit and return the unary's softmax as if refined. Matrices that large are a
    ValueError whenever pruning is on (the exact iterations return the NaN, which is reported),
    in the fused op and the loop, for the layer and dense_crf."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 20, 24, generator=g) * 255
    unary = torch.randn(1, 4, 20, 24, generator=g)
    for prune in (7e-4, 1e-2):
        crf = CRFRNNLayer(4, bilateral=(80.0, 13.0, 3e38), fused=fused, prune=prune, eval_prune=prune)
        for mode in (crf.eval(), crf.train()):
            with pytest.raises(ValueError, match="too large for sender pruning.*float32"):
                mode(unary, image)
    crf = CRFRNNLayer(4, bilateral=(80.0, 13.0, 3e38), fused=fused, eval_prune=0.0).eval()
    with pytest.raises(ValueError, match="NaN/Inf"):
        crf(unary, image)
    probs = torch.softmax(unary[0], 0).numpy()
    rgb = image[0].permute(1, 2, 0).round().to(torch.uint8).numpy()
    with pytest.raises(ValueError, match="too large for sender pruning"):
        crfrnn.dense_crf(rgb, probs, bilateral=(80, 13, 3e38))
    with pytest.raises(ValueError, match="NaN/Inf"):
        crfrnn.dense_crf(rgb, probs, bilateral=(80, 13, 3e38), prune=0)
    # The bound is far from any CRF's weights: 1e15 still prunes (no overflow can happen).
    unary64 = unary.double()
    out = CRFRNNLayer(4, bilateral=(80.0, 13.0, 1e15), fused=fused).double().eval()(unary64, image.double())
    assert torch.isfinite(out).all()


def test_sender_thresholds_refuse_matrices_that_could_overflow():
    """Rows of |entries| summing above the dtype's largest value / 2^64 (float32: 1.8e19), or
    NaN/Inf entries."""
    c = 3
    for dtype, fits, too_big in ((torch.float32, 1.8e19 / 4, 1.9e19 / 2), (torch.float64, 1e288, 1e289)):
        inference.sender_thresholds(potts_matrices(c, [fits, 1.0], dtype=dtype), 1e-3)
        with pytest.raises(ValueError, match="too large for sender pruning"):
            inference.sender_thresholds(potts_matrices(c, [too_big, 1.0], dtype=dtype), 1e-3)
        inference.sender_thresholds(potts_matrices(c, [too_big, 1.0], dtype=dtype), 0.0)  # no pruning: no check
    with pytest.raises(ValueError, match="hold NaN/Inf values"):
        inference.sender_thresholds(potts_matrices(c, [float("nan"), 1.0]), 1e-3)


@pytest.mark.parametrize("fused", [True, False])
def test_non_finite_matrices_are_refused_when_pruning(fused):
    """A NaN matrix gives NaN Q, which reaches no threshold: pruning would drop the matrix and
    return finite logits (the fused op did; the loop computed 0 * NaN). Refused, as overflow is; the
    layer names the parameter behind it."""
    unary, lattices = problem(n=1, c=3, dtype=torch.float32)
    for bad in (float("nan"), float("inf")):
        mats = [torch.full((3, 3), bad), torch.eye(3)]
        with pytest.raises(ValueError, match="pairwise matrices hold NaN/Inf values"):
            mean_field(unary, lattices, mats, 2, prune=0.01, fused=fused)
        assert not torch.isfinite(mean_field(unary, lattices, mats, 2, prune=0.0, fused=fused)).all()
    crf = CRFRNNLayer(3, fused=fused).eval()
    with torch.no_grad():
        crf.compatibility[1, 2] = float("nan")
    with pytest.raises(ValueError, match="CRFRNNLayer.compatibility has 1 NaN/Inf values"):
        crf(torch.randn(1, 3, 9, 8), torch.rand(1, 3, 9, 8) * 255)
