"""CRFRNNLayer: the mean-field algebra against densecrf's loop, gradients, batching, training,
checkpointing, precision and input errors. (Against pydensecrf itself: test_crf_densecrf.py.)"""
import numpy as np
import pytest
import torch

import crfrnn
from crfrnn import CRFRNNLayer, build_crf_lattices, mean_field, potts_matrices
from helpers import BACKENDS, ExactLattice
from helpers import crf_inputs as make_inputs

# Small kernels so that a 6x5 image has real structure in both of them.
SMALL = dict(bilateral=(2.0, 40.0, 3.0), spatial=(1.5, 2.0))


def densecrf_loop_numpy(unary, feats, weights, iterations, normalize):
    """Krähenbühl's DenseCRF::inference transcribed in NumPy (float64), with dense kernels.

    unary: [P, C] logits (= -energy); feats: list of [P, d] scaled features; weights: Potts w_m.
    Q = softmax(-E); repeat: tmp = -E; tmp -= Potts(w).apply(K_m Q) = -w K_m Q; Q = softmax(tmp).
    """
    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    kernels = []
    for f in feats:
        k = np.exp(-0.5 * ((f[:, None, :] - f[None, :, :]) ** 2).sum(-1))
        norm = k.sum(1)
        if normalize == "symmetric":
            n = 1 / np.sqrt(norm + 1e-20)
            kernels.append(n[:, None] * k * n[None, :])
        else:
            kernels.append(k / (norm[:, None] + 1e-20))
    energy = -unary
    q = softmax(-energy)
    tmp = -energy
    for _ in range(iterations):
        tmp = -energy.copy()
        for k, w in zip(kernels, weights):
            tmp -= -w * (k @ q)
        q = softmax(tmp)
    return q


def densecrf_features(image, sigma_xy, sigma_rgb=None):
    """densecrf's features of image [3, H, W] (NumPy, float64), written out from its
    addPairwiseBilateral / addPairwiseGaussian: per pixel (x / sxy, y / sxy) with x the column
    and y the row, then (r, g, b) / srgb for the bilateral kernel. Tensor[P, d] row by row."""
    _, h, w = image.shape
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    columns = [x / sigma_xy, y / sigma_xy]
    if sigma_rgb is not None:
        columns += [channel / sigma_rgb for channel in image.astype(np.float64)]
    return np.stack([c.ravel() for c in columns], 1)


# ------------------------------------------------------------------------------------------
# The mean-field algebra

@pytest.mark.parametrize("normalize", ["symmetric", "after"])
def test_mean_field_equals_densecrf_loop_with_exact_kernels(normalize):
    """With exact kernels, our Potts (1 - I) start and feature builders give densecrf's marginals
    to float64 precision (the loop's features written out independently of ours)."""
    unary, image = make_inputs(c=4, h=7, w=6)
    (sb, sr, wb), (ss, ws) = SMALL["bilateral"], SMALL["spatial"]
    f_bil = crfrnn.bilateral_features(image, sb, sr).flatten(2).transpose(1, 2)
    f_spa = crfrnn.spatial_features(image, ss).flatten(2).transpose(1, 2)
    u = unary.flatten(2).transpose(1, 2).contiguous()
    logits = mean_field(u, [ExactLattice(f_bil), ExactLattice(f_spa)],
                        potts_matrices(4, (wb, ws), dtype=torch.float64), 5, normalize)
    ours = torch.softmax(logits, -1)[0].numpy()
    ref = densecrf_loop_numpy(u[0].numpy(), [densecrf_features(image[0].numpy(), sb, sr),
                                             densecrf_features(image[0].numpy(), ss)], (wb, ws), 5, normalize)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert not np.allclose(ref, torch.softmax(u, -1)[0].numpy(), atol=1e-3), "CRF had no effect"


def test_layer_default_start_is_the_potts_mean_field():
    """The module (params at their start) equals mean_field with Potts matrices on its lattices."""
    unary, image = make_inputs(n=2, c=5, h=9, w=8)
    crf = CRFRNNLayer(5, num_iterations=3, **SMALL).double()
    lats = build_crf_lattices(image, crf.bilateral, crf.spatial)
    u = unary.flatten(2).transpose(1, 2).contiguous()
    ref = mean_field(u, lats, potts_matrices(5, (3.0, 2.0), dtype=torch.float64), 3)
    torch.testing.assert_close(crf(unary, image), ref.transpose(1, 2).reshape(unary.shape))


def test_learned_matrices_act_in_crf_rnn_order():
    """With full (non-commuting) kernel weights W_m and compatibility mu, each iteration is
    CRF-RNN's: weight the filter outputs (sum_m W_m Q~_m), then the compatibility transform (mu
    of that), then U minus it: the pairwise matrix of kernel m is mu W_m, not W_m mu."""
    unary, image = make_inputs(c=4, h=7, w=6)
    crf = CRFRNNLayer(4, num_iterations=3, **SMALL).double()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        crf.compatibility.copy_(torch.rand(4, 4, generator=g, dtype=torch.float64) * 2)
        crf.bilateral_weight.copy_(torch.rand(4, 4, generator=g, dtype=torch.float64) * 3)
        crf.spatial_weight.copy_(torch.rand(4, 4, generator=g, dtype=torch.float64) * 2)
    lattices = build_crf_lattices(image, crf.bilateral, crf.spatial)
    u = unary.flatten(2).transpose(1, 2)
    q = torch.softmax(u, -1)
    for _ in range(3):
        messages = [lat.filter(q, normalize="symmetric") for lat in lattices]            # Q~_m
        weighted = messages[0] @ crf.bilateral_weight.t() + messages[1] @ crf.spatial_weight.t()
        logits = u - weighted @ crf.compatibility.t()
        q = torch.softmax(logits, -1)
    torch.testing.assert_close(crf(unary, image), logits.transpose(1, 2).reshape(unary.shape))


def test_potts_and_negative_identity_compatibility_give_the_same_marginals():
    """mu = 1 - I (Potts) and mu = -I (CRF-RNN's Caffe start) differ by a per-pixel constant."""
    unary, image = make_inputs(c=4, h=8, w=7)
    crf = CRFRNNLayer(4, **SMALL).double()
    q_potts = torch.softmax(crf(unary, image), 1)
    with torch.no_grad():
        crf.compatibility.copy_(-torch.eye(4))
    q_neg = torch.softmax(crf(unary, image), 1)
    torch.testing.assert_close(q_potts, q_neg)


def test_zero_iterations_return_the_unary():
    unary, image = make_inputs()
    crf = CRFRNNLayer(3, num_iterations=0, num_eval_iterations=0)
    torch.testing.assert_close(crf(unary, image), unary)
    torch.testing.assert_close(crf(unary.float(), image), unary.float())


def test_train_and_eval_iteration_counts():
    unary, image = make_inputs(c=3, h=8, w=8, dtype=torch.float32)
    crf = CRFRNNLayer(3, num_iterations=2, num_eval_iterations=7, **SMALL)
    train_out = crf.train()(unary, image)
    eval_out = crf.eval()(unary, image)
    torch.testing.assert_close(train_out, crf(unary, image, num_iterations=2))
    torch.testing.assert_close(eval_out, crf(unary, image, num_iterations=7))
    assert not torch.allclose(train_out, eval_out)


def test_presets():
    d = CRFRNNLayer.deeplab_largefov(21)
    assert d.bilateral == (121.0, 5.0, 4.0) and d.spatial == (3.0, 3.0)
    assert d.num_eval_iterations == 10
    r = CRFRNNLayer.crfasrnn(21)
    assert r.bilateral == (160.0, 3.0, 5.0) and r.spatial == (3.0, 3.0)
    assert (r.num_iterations, r.num_eval_iterations) == (5, 10)
    torch.testing.assert_close(r.bilateral_weight, 5.0 * torch.eye(21))
    torch.testing.assert_close(r.spatial_weight, 3.0 * torch.eye(21))
    torch.testing.assert_close(r.compatibility, 1.0 - torch.eye(21))
    assert "num_classes=21" in repr(r)


def test_declared_normalisation_is_undone():
    unary, image = make_inputs(n=2, c=3, h=10, w=9, dtype=torch.float32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    normed = (image.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    plain = CRFRNNLayer(3, **SMALL)
    declared = CRFRNNLayer(3, image_mean=mean, image_std=std, **SMALL)
    torch.testing.assert_close(declared(unary, normed), plain(unary, image.float()), atol=1e-5, rtol=1e-5)


def test_uint8_image_is_accepted():
    unary, image = make_inputs(dtype=torch.float32)
    img8 = image.round().to(torch.uint8)
    crf = CRFRNNLayer(3, **SMALL)
    torch.testing.assert_close(crf(unary, img8), crf(unary, img8.float()))


# ------------------------------------------------------------------------------------------
# Gradients

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", ["symmetric", "after"])
def test_gradcheck_whole_layer(backend, normalize):
    """float64 gradcheck w.r.t. unary, both kernel weight matrices and the compatibility."""
    unary, image = make_inputs(c=3, h=6, w=5)
    crf = CRFRNNLayer(3, num_iterations=2, normalize=normalize, backend=backend, **SMALL).double()
    g = torch.Generator().manual_seed(1)
    # Start away from the symmetric init so every entry of the matrices matters.
    params = {name: (p.detach() + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)).requires_grad_()
              for name, p in crf.named_parameters()}
    names = list(params)

    def fn(u, *ps):
        return torch.func.functional_call(crf, dict(zip(names, ps)), (u, image))

    assert torch.autograd.gradcheck(fn, (unary.requires_grad_(), *params.values()), atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_checkpointing_gives_same_values_and_gradients_with_less_saved(backend):
    unary, image = make_inputs(n=2, c=4, h=12, w=10)
    outs, grads, saved = [], [], []
    for ckpt in (False, True):
        crf = CRFRNNLayer(4, num_iterations=5, checkpoint=ckpt, backend=backend, **SMALL).double()
        u = unary.clone().requires_grad_()
        total = [0]

        def pack(t, total=total):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = crf(u, image)
        loss = (out.log_softmax(1)[:, 0]).sum()
        loss.backward()
        outs.append(out.detach())
        grads.append([u.grad] + [p.grad for p in crf.parameters()])
        saved.append(total[0])
    torch.testing.assert_close(outs[0], outs[1])
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b)
    assert saved[1] < 0.6 * saved[0], f"checkpointing saved {saved[1]} B vs {saved[0]} B"


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_equals_separate_calls(backend):
    unary, image = make_inputs(n=3, c=4, h=11, w=13, dtype=torch.float32)
    crf = CRFRNNLayer(4, backend=backend, **SMALL)
    batched = crf(unary, image)
    for i in range(3):
        torch.testing.assert_close(batched[i:i + 1], crf(unary[i:i + 1], image[i:i + 1]),
                                   atol=1e-5, rtol=1e-5)


def test_training_lowers_the_loss_and_moves_the_parameters():
    torch.manual_seed(0)
    unary, image = make_inputs(n=2, c=3, h=16, w=12, dtype=torch.float32)
    target = torch.randint(0, 3, (2, 16, 12))
    crf = CRFRNNLayer(3, num_iterations=3, **SMALL)
    start = {k: v.detach().clone() for k, v in crf.named_parameters()}
    opt = torch.optim.Adam(crf.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(crf(unary, image), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    for k, v in crf.named_parameters():
        assert not torch.allclose(v, start[k]), f"{k} did not move"


def test_no_gradient_into_the_image():
    unary, image = make_inputs()
    image.requires_grad_()
    crf = CRFRNNLayer(3, **SMALL).double()
    crf(unary.requires_grad_(), image).sum().backward()
    assert image.grad is None and unary.grad is not None


# ------------------------------------------------------------------------------------------
# Precision

def test_cpu_autocast_bfloat16():
    unary, image = make_inputs(c=3, h=10, w=8, dtype=torch.float32)
    crf = CRFRNNLayer(3, **SMALL)
    u = unary.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crf(u.to(torch.bfloat16), image)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, crf(unary.to(torch.bfloat16).float(), image))
    out.sum().backward()
    assert torch.isfinite(u.grad).all()


def test_half_unary_is_computed_in_float32():
    unary, image = make_inputs(c=3, dtype=torch.float32)
    crf = CRFRNNLayer(3, **SMALL)
    out = crf(unary.half(), image)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, crf(unary.half().float(), image))


def test_extreme_logits_do_not_nan():
    unary, image = make_inputs(c=3, dtype=torch.float32)
    crf = CRFRNNLayer(3, **SMALL)
    out = crf(unary * 1e4, image)
    assert torch.isfinite(out).all()


def test_huge_finite_logits_whose_sum_overflows_are_accepted():
    """The NaN/Inf check sums the unary first; an overflowing sum of finite values is no error."""
    unary, image = make_inputs(c=3, dtype=torch.float32)
    unary[:, 0] = 3e38  # the sum is inf, every value is finite
    out = CRFRNNLayer(3, **SMALL)(unary, image)
    assert torch.isfinite(out).all()
    assert (out.argmax(1) == 0).all()


# ------------------------------------------------------------------------------------------
# Errors

def test_nan_or_inf_unary_raises():
    unary, image = make_inputs(dtype=torch.float32)
    crf = CRFRNNLayer(3)
    for bad in (float("nan"), float("inf")):
        u = unary.clone()
        u[0, 1, 2, 3] = bad
        with pytest.raises(ValueError, match="NaN/Inf"):
            crf(u, image)


@pytest.mark.parametrize("unary_shape,image_shape,match", [
    ((1, 4, 6, 5), (1, 3, 6, 5), "num_classes=3"),
    ((1, 3, 6, 5, 2, 2), (1, 3, 6, 5), r"unary must be Tensor\[N, C, \*S\] \(a grid: \[N, C, L\]"),
    ((1, 3, 6, 5), (1, 3, 6), r"image \(1, 3, 6\) and unary \(1, 3, 6, 5\) must share N, H"),
    ((1, 3, 6, 5), (1, 3, 6, 6), "share N, H"),
    ((2, 3, 6, 5), (1, 3, 6, 5), "share N, H"),
])
def test_bad_shapes_raise(unary_shape, image_shape, match):
    crf = CRFRNNLayer(3)
    with pytest.raises(ValueError, match=match):
        crf(torch.zeros(unary_shape), torch.zeros(image_shape))


def test_bad_types_raise():
    crf = CRFRNNLayer(3)
    with pytest.raises(TypeError, match="floating point"):
        crf(torch.zeros(1, 3, 4, 4, dtype=torch.long), torch.zeros(1, 3, 4, 4))
    with pytest.raises(TypeError, match="image must be a torch.Tensor"):
        crf(torch.zeros(1, 3, 4, 4), np.zeros((1, 3, 4, 4)))


def test_undeclared_normalised_image_raises():
    unary, image = make_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="image_mean"):
        CRFRNNLayer(3)(unary, image / 255 - 0.5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=0), "num_classes"),
    (dict(num_iterations=-1), "num_iterations"),
    (dict(bilateral=(80, 13)), "bilateral"),
    (dict(bilateral=(80, 0, 3)), "sigma_rgb"),
    (dict(spatial=(-3, 3)), "spatial sigma_xy"),
    (dict(normalize="sideways"), "normalize"),
    (dict(image_mean=(0.5, 0.5, 0.5)), "image_std"),
    (dict(image_mean=(0.5, 0.5), image_std=(1, 1)), "3 values"),
])
def test_bad_construction_raises(kwargs, match):
    kwargs = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        CRFRNNLayer(**kwargs)


def test_empty_batch():
    crf = CRFRNNLayer(3)
    out = crf(torch.zeros(0, 3, 6, 5), torch.zeros(0, 3, 6, 5))
    assert out.shape == (0, 3, 6, 5)


# ------------------------------------------------------------------------------------------
# CUDA

@pytest.mark.cuda
@pytest.mark.parametrize("normalize", ["symmetric", "after"])
def test_cuda_matches_cpu_and_gradchecks(normalize):
    unary, image = make_inputs(n=2, c=3, h=6, w=5)
    crf = CRFRNNLayer(3, num_iterations=3, normalize=normalize, **SMALL).double()
    cpu = crf(unary, image)
    crf_gpu = crf.to("cuda")
    gpu = crf_gpu(unary.cuda(), image.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu)
    names = [n for n, _ in crf_gpu.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in crf_gpu.parameters()]

    def fn(u, *ps):
        return torch.func.functional_call(crf_gpu, dict(zip(names, ps)), (u, image.cuda()))

    assert torch.autograd.gradcheck(fn, (unary.cuda().requires_grad_(), *params), atol=1e-6)


@pytest.mark.cuda
def test_cuda_autocast_float16():
    unary, image = make_inputs(n=2, c=5, h=20, w=17, dtype=torch.float32, device="cuda")
    crf = CRFRNNLayer(5, **SMALL).cuda()
    u = unary.clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16):
        out = crf(u.half(), image)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(out, crf(unary.half().float(), image))
    out.sum().backward()
    assert torch.isfinite(u.grad).all()


def test_lattices_are_built_once_per_forward_and_reused_in_backward(monkeypatch):
    """Two lattices per forward, none rebuilt by the iterations, backward or checkpoint recompute."""
    built = []
    real = crfrnn.inference.Lattice

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(crfrnn.inference, "Lattice", counting)
    unary, image = make_inputs(n=2, c=3, h=8, w=7)
    for ckpt in (False, True):
        built.clear()
        crf = CRFRNNLayer(3, num_iterations=4, checkpoint=ckpt, **SMALL).double()
        crf(unary.clone().requires_grad_(), image).sum().backward()
        assert len(built) == 2, f"checkpoint={ckpt}: {len(built)} lattices built"


# ------------------------------------------------------------------------------------------
# Functional API

def test_dense_crf_equals_the_layer_on_log_probabilities():
    unary, image = make_inputs(c=4, h=9, w=11, dtype=torch.float32)
    probs = torch.softmax(unary, 1)[0]
    img = image[0].permute(1, 2, 0).round().to(torch.uint8)
    crf = CRFRNNLayer(4, num_eval_iterations=6, **SMALL).eval()
    expected = torch.softmax(crf(torch.log(probs)[None], img.permute(2, 0, 1)[None]), 1)[0]
    got = crfrnn.dense_crf(img.numpy(), probs.numpy(), num_iterations=6, **SMALL)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected.detach().numpy(), atol=1e-6)
    got_t = crfrnn.dense_crf(img, probs, num_iterations=6, **SMALL)
    assert isinstance(got_t, torch.Tensor)
    torch.testing.assert_close(got_t, expected.detach())


@pytest.mark.parametrize("image_shape,probs_shape,match", [
    ((6, 5, 3), (3, 6, 6), "sizes differ"),
    ((3, 6, 5), (3, 6, 5), r"\[H, W, 3\]"),
    ((6, 5, 3), (6, 5), r"for probs \[C, L\] = \(5,\) give image \[L, G\]"),
])
def test_dense_crf_bad_shapes(image_shape, probs_shape, match):
    with pytest.raises(ValueError, match=match):
        crfrnn.dense_crf(np.zeros(image_shape, np.uint8), np.full(probs_shape, 0.3, np.float32))


def test_dense_crf_bad_values():
    img = np.zeros((6, 5, 3), np.uint8)
    with pytest.raises(ValueError, match="non-negative"):
        crfrnn.dense_crf(img, np.full((3, 6, 5), -0.1, np.float32))
    with pytest.raises(TypeError, match="numpy array or a torch.Tensor"):
        crfrnn.dense_crf(img, [[0.5]])
    with pytest.raises(ValueError, match="0..255"):
        crfrnn.dense_crf(np.full((6, 5, 3), 300.0), np.full((3, 6, 5), 0.3, np.float32))


def test_config_rebuilds_the_layer():
    unary, image = make_inputs(c=3, h=8, w=7, dtype=torch.float32)
    crf = CRFRNNLayer(3, num_iterations=2, num_eval_iterations=4, image_mean=(0.4, 0.5, 0.6),
                      image_std=(0.2, 0.25, 0.3), checkpoint=True, **SMALL)
    with torch.no_grad():
        crf.compatibility.add_(0.1 * torch.randn(3, 3))
    again = CRFRNNLayer(**crf.config())
    again.load_state_dict(crf.state_dict())
    assert again.config() == crf.config()
    x = (image / 255 - 0.5) / 0.25
    torch.testing.assert_close(again.eval()(unary, x), crf.eval()(unary, x))




def test_layer_reuses_the_spatial_lattice_for_the_same_shape():
    """The spatial lattice depends on the shape only: kept between calls of the same N, H, W and
    rebuilt when they change; the output is the same as with a fresh build."""
    crf = CRFRNNLayer(3, num_iterations=2, bilateral=(5.0, 20.0, 3.0), spatial=(2.0, 1.0))
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 3, 12, 9, generator=g) * 255
    unary = torch.randn(2, 3, 12, 9, generator=g)
    with torch.no_grad():
        first = crf(unary, image)
        kept = crf.kept_lattices()["spatial"]
        again = crf(unary, image.flip(-1))  # other colours, same shape: reused
        assert crf.kept_lattices()["spatial"] is kept
        crf.clear_lattice_cache()
        fresh = crf(unary, image.flip(-1))
        assert crf.kept_lattices()["spatial"] is not kept
        torch.testing.assert_close(again, fresh, rtol=0, atol=0)
        assert not torch.equal(first, again)
        for shape in ((1, 3, 12, 9), (2, 3, 9, 12)):  # another N, another H x W: rebuilt
            kept = crf.kept_lattices()["spatial"]
            crf(torch.randn(shape[0], 3, *shape[2:]), torch.rand(shape) * 255)
            assert crf.kept_lattices()["spatial"] is not kept and crf.kept_lattices()["spatial"].batch_size == shape[0]
    # Training steps reuse it too, with the same gradients as a fresh build.
    crf(unary, image)
    kept = crf.kept_lattices()["spatial"]
    loss = crf(unary, image).square().sum()
    assert crf.kept_lattices()["spatial"] is kept
    grad = torch.autograd.grad(loss, crf.compatibility)[0]
    crf.clear_lattice_cache()
    loss = crf(unary, image).square().sum()
    torch.testing.assert_close(torch.autograd.grad(loss, crf.compatibility)[0], grad, rtol=0, atol=0)


def test_mean_field_refuses_a_unary_of_another_batch_layout_on_both_paths():
    """The fused ops see only N * P: a [2, 32, C] unary on a lattice of [1, 64] points would mix
    images silently. Both paths refuse it, and bad matrices or iteration counts, by name."""
    lat = crfrnn.Lattice(torch.rand(1, 64, 5) * 3)
    for fused in (True, False):
        with pytest.raises(ValueError, match=r"\(N, P\) = \(2, 32\), but lattice 0 was built on \(N, P\) = \(1, 64\)"):
            crfrnn.mean_field(torch.randn(2, 32, 4), [lat], [torch.eye(4)], 2, fused=fused)
        with pytest.raises(ValueError, match=r"pairwise matrix 0 must be \[C, C\] = \[4, 4\], got \(3, 3\)"):
            crfrnn.mean_field(torch.randn(1, 64, 4), [lat], [torch.eye(3)], 2, fused=fused)
        with pytest.raises(ValueError, match=r"num_iterations must be an int in 0\.\.1000, got 2.5"):
            crfrnn.mean_field(torch.randn(1, 64, 4), [lat], [torch.eye(4)], 2.5, fused=fused)
        with pytest.raises(TypeError, match="floating-point"):
            crfrnn.mean_field(torch.zeros(1, 64, 4, dtype=torch.long), [lat], [torch.eye(4)], 2, fused=fused)


def test_a_diverged_learned_bandwidth_is_named_not_blamed_on_the_image():
    crf = CRFRNNLayer(4, learn_bandwidths=True)
    unary, image = torch.randn(1, 4, 12, 16), torch.rand(1, 3, 12, 16) * 255
    with torch.no_grad():
        crf.spatial_log_sigma[0] = float("nan")
    with pytest.raises(ValueError, match="CRFRNNLayer.spatial_log_sigma has NaN/Inf values"):
        crf(unary, image)
    with torch.no_grad():
        crf.spatial_log_sigma[0] = 1.0
        crf.bilateral_log_sigma[1] = -100.0  # sigma_rgb ~ 4e-44: colours / sigma overflow the lattice
    with pytest.raises(ValueError, match=r"sigma_rgb = .*, 3.7\d*e-44"):
        crf(unary, image)


def test_numpy_numbers_are_taken_as_their_python_values():
    crf = CRFRNNLayer(np.int64(4), num_iterations=np.int64(2), bilateral=(np.float32(80), 13.0, 10.0))
    assert (crf.num_classes, crf.num_iterations) == (4, 2) and type(crf.num_classes) is int
    assert crf.bilateral[0] == 80.0
    with pytest.raises(ValueError, match="num_iterations must be an int"):
        CRFRNNLayer(4, num_iterations=np.float64(2))


@pytest.mark.parametrize("count", [-1, 1001, 2.0, True, "3"])
def test_every_iteration_count_follows_one_rule(count):
    """The layer's counts, forward's override, mean_field and dense_crf all take an integer
    (numpy ones too) in 0..MAX_ITERATIONS, and refuse anything else with the same message."""
    from crfrnn.functional import dense_crf
    message = r"num_iterations must be an int in 0\.\.1000, got "
    crf = CRFRNNLayer(3, num_iterations=1)
    unary, image = torch.randn(1, 3, 6, 5), torch.rand(1, 3, 6, 5) * 255
    lat = crfrnn.Lattice(torch.rand(1, 30, 5) * 3)
    calls = [lambda n: CRFRNNLayer(3, num_iterations=n), lambda n: crf(unary, image, num_iterations=n),
             lambda n: crfrnn.mean_field(torch.randn(1, 30, 3), [lat], [torch.eye(3)], n),
             lambda n: dense_crf(np.zeros((6, 5, 3), np.uint8), np.full((3, 6, 5), 1 / 3, np.float32), n)]
    for call in calls:
        with pytest.raises(ValueError, match=message):
            call(count)
        call(np.int32(2))  # numpy integers are counts too
