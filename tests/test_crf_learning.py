"""CRFRNNLayer learning all of itself: learned bandwidths (against the exact Gaussian mean field),
parameter sharing, what the state dict carries and how it fails, and resolution rescaling."""
import math

import pytest
import torch

import crfrnn
from crfrnn import inference
from crfrnn import sharing
from crfrnn import CRFRNNLayer, mean_field
from helpers import NATIVE, ExactLattice

KERNELS = dict(bilateral=(4.0, 30.0, 3.0), spatial=(2.0, 1.0))


def two_region_problem(h=14, w=16, seed=0):
    """A left/right two-colour image with noise, its labels, and a unary that knows the labels
    only roughly: its boundary is 3 px off and blurred. The colour edge is the label edge, so a
    smaller colour bandwidth helps the CRF put the boundary back."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(1, h, w, dtype=torch.long)
    labels[..., w // 2:] = 1
    image = torch.empty(1, 3, h, w, dtype=torch.float64)
    image[:, :, :, : w // 2] = torch.tensor([200.0, 40.0, 40.0])[:, None, None]
    image[:, :, :, w // 2:] = torch.tensor([40.0, 40.0, 200.0])[:, None, None]
    image = (image + 10 * torch.randn(image.shape, generator=g, dtype=torch.float64)).clamp(0, 255)
    cols = torch.arange(w, dtype=torch.float64)
    towards_1 = torch.sigmoid((cols - (w // 2 + 3)) / 2.0)  # boundary 3 px to the right
    unary = torch.stack([-towards_1, towards_1]).expand(h, 2, w).permute(1, 0, 2)[None] * 2
    unary = unary + 0.3 * torch.randn(unary.shape, generator=g, dtype=torch.float64)
    return unary.contiguous(), image, labels


def layer_loss(crf, unary, image, labels):
    return torch.nn.functional.cross_entropy(crf(unary, image), labels)


def exact_layer_loss(crf, log_sigmas, unary, image, labels):
    """The loss of `crf`'s mean field with exact Gaussian kernels, as a function of
    (bilateral log sigmas Tensor[2], spatial log sigma Tensor[1])."""
    bil, spa = log_sigmas[0].exp(), log_sigmas[1].exp()
    feats = [crfrnn.bilateral_features(image, bil[0], bil[1]), crfrnn.spatial_features(image, spa[0])]
    lattices = [ExactLattice(f.flatten(2).transpose(1, 2)) for f in feats]
    u = unary.flatten(2).transpose(1, 2)
    logits = mean_field(u, lattices, crf.pairwise_matrices(torch.float64), crf.num_iterations, crf.normalize)
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2).reshape(unary.shape), labels)


# ------------------------------------------------------------------------------------------
# Learned bandwidths

def test_default_layer_has_fixed_bandwidths_in_buffers():
    crf = CRFRNNLayer(3, **KERNELS)
    assert {n for n, _ in crf.named_parameters()} == {"bilateral_weight", "spatial_weight", "compatibility"}
    assert {"bilateral_log_sigma", "spatial_log_sigma", "iterations", "normalization"} <= set(crf.state_dict())
    assert crf.bilateral == (4.0, 30.0, 3.0) and crf.spatial == (2.0, 1.0)


def test_learned_bandwidths_are_parameters_with_gradients():
    unary, image, labels = two_region_problem()
    crf = CRFRNNLayer(2, num_iterations=3, learn_bandwidths=True, **KERNELS).double()
    params = dict(crf.named_parameters())
    torch.testing.assert_close(params["bilateral_log_sigma"].exp(), torch.tensor([4.0, 30.0], dtype=torch.float64))
    layer_loss(crf, unary, image, labels).backward()
    for name in ("bilateral_log_sigma", "spatial_log_sigma"):
        assert params[name].grad is not None and params[name].grad.abs().min() > 0


@pytest.mark.skipif(not NATIVE, reason="the fused op and the C++ backend are needed")
def test_learned_bandwidths_at_inference_use_the_fused_op_and_the_kept_lattice(monkeypatch):
    calls = []
    real = inference.fused_mean_field
    monkeypatch.setattr(inference, "fused_mean_field", lambda *a: calls.append(1) or real(*a))
    unary, image, labels = two_region_problem()
    crf = CRFRNNLayer(2, num_iterations=2, learn_bandwidths=True, **KERNELS)
    layer_loss(crf, unary.float(), image, labels).backward()  # training: step by step
    assert calls == [] and not crf.kept_lattices(), "a lattice differentiable in sigma is never kept"
    with torch.no_grad():
        a = crf(unary.float(), image)
        kept = crf.kept_lattices()["spatial"]
        b = crf(unary.float(), image)
    assert calls == [1, 1] and crf.kept_lattices()["spatial"] is kept
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The same computation as a fixed layer with the bandwidths it holds. (Not bit for bit the
    # one built with 4.0, 30.0 and 2.0: their float32 logarithms round them by an ulp, enough to
    # break exact ties between lattice coordinates the other way.)
    (bxy, brgb), (sxy,) = crf.sigmas()
    fixed = CRFRNNLayer(2, num_iterations=2, bilateral=(bxy, brgb, 3.0), spatial=(sxy, 1.0))
    with torch.no_grad():
        torch.testing.assert_close(fixed(unary.float(), image), a, rtol=0, atol=0)


def test_lattice_bandwidth_gradient_is_the_derivative_of_the_layer():
    """bandwidth_grad="lattice" through the whole layer (features, both normalisers, mean field)
    against central differences of the layer's own output, with a step that leaves every simplex
    unchanged (checked)."""
    unary, image, labels = two_region_problem(h=6, w=7)
    # Bandwidths that do not divide the pixel grid: with sigma_xy = 2 some elevated coordinates
    # tie exactly, and a tie is broken one way or the other by the rounding of x / sigma.
    crf = CRFRNNLayer(2, num_iterations=2, learn_bandwidths=True, bandwidth_grad="lattice",
                      backend="reference", bilateral=(4.37, 29.3, 3.0), spatial=(2.13, 1.0)).double()
    step = 1e-7
    for sign in (1, -1):  # the simplices at +-step are those at the start
        lattices = []
        for shift in (0.0, sign * step):
            with torch.no_grad():
                crf.bilateral_log_sigma.add_(shift)
                crf.spatial_log_sigma.add_(shift)
                lattices.append(crf._lattices(image))
                crf.bilateral_log_sigma.sub_(shift)
                crf.spatial_log_sigma.sub_(shift)
        for a, b in zip(*lattices):
            assert torch.equal(a.vertex_index, b.vertex_index) and torch.equal(a.neighbors, b.neighbors)

    def fn(bil, spa):
        with torch.no_grad():
            crf.bilateral_log_sigma.copy_(bil.detach())
            crf.spatial_log_sigma.copy_(spa.detach())
        bil_t, spa_t = bil.exp(), spa.exp()
        lattices = inference.build_crf_lattices(image, (bil_t[0], bil_t[1]), (spa_t[0],), "reference")
        u = unary.flatten(2).transpose(1, 2)
        return mean_field(u, lattices, crf.pairwise_matrices(torch.float64), 2, crf.normalize)

    start = (crf.bilateral_log_sigma.detach().clone().requires_grad_(),
             crf.spatial_log_sigma.detach().clone().requires_grad_())
    assert torch.autograd.gradcheck(fn, start, eps=step, atol=1e-5, rtol=1e-3)
    # The layer itself computes the same gradient.
    crf.bilateral_log_sigma.data.copy_(start[0].detach())
    crf.spatial_log_sigma.data.copy_(start[1].detach())
    out = crf(unary, image)
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, [crf.bilateral_log_sigma, crf.spatial_log_sigma], g)
    expected = torch.autograd.grad(fn(*start), start, g.flatten(2).transpose(1, 2))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sigma_rgb", [30.0, 150.0])
def test_bandwidth_gradient_agrees_in_sign_with_the_exact_mean_field(sigma_rgb):
    """On the two-region problem, the layer's derivative of the loss in each log-bandwidth
    (bandwidth_grad "gaussian", the default) has the sign of the exact (O(P^2) Gaussian) mean
    field's, even where it is small (sigma_rgb 30), and its size: where the exact derivative is
    not tiny, got / exact was measured at 0.50-0.95 (the lattice kernel's lighter tails make the
    estimate low), so within 0.35-1.25. (The lattice's own gradient gets sigma_rgb's sign wrong
    at 30 and sigma_xy's at 150 here.)"""
    unary, image, labels = two_region_problem()
    crf = CRFRNNLayer(2, num_iterations=3, learn_bandwidths=True, bilateral=(4.0, sigma_rgb, 3.0),
                      spatial=(2.0, 1.0)).double()
    layer_loss(crf, unary, image, labels).backward()
    got = torch.cat([crf.bilateral_log_sigma.grad, crf.spatial_log_sigma.grad])
    logs = [crf.bilateral_log_sigma.detach().clone().requires_grad_(),
            crf.spatial_log_sigma.detach().clone().requires_grad_()]
    exact = torch.cat(torch.autograd.grad(exact_layer_loss(crf, logs, unary, image, labels), logs))
    assert (exact.abs() > 1e-3).all()
    assert torch.equal(torch.sign(got), torch.sign(exact)), (got, exact)
    sizable = exact.abs() > 1e-2
    ratio = got[sizable] / exact[sizable]
    assert sizable.sum() >= 2 and ((ratio > 0.35) & (ratio < 1.25)).all(), (got, exact)


def test_learning_moves_the_bandwidths_the_right_way():
    """Adam on the bandwidths alone: the colour bandwidth shrinks (the colour edge is the label
    edge) and the exact mean field's loss at the learned bandwidths is lower than at the start."""
    unary, image, labels = two_region_problem()
    crf = CRFRNNLayer(2, num_iterations=3, learn_bandwidths=True, bilateral=(4.0, 150.0, 3.0),
                      spatial=(2.0, 1.0)).double()
    crf.requires_grad_(False)
    bandwidths = [crf.bilateral_log_sigma, crf.spatial_log_sigma]
    for p in bandwidths:
        p.requires_grad_(True)
    def exact_now():
        with torch.no_grad():
            return exact_layer_loss(crf, [p.detach() for p in bandwidths], unary, image, labels).item()
    start_sigma, start_loss = crf.bilateral[1], exact_now()
    opt = torch.optim.Adam(bandwidths, lr=0.1)
    for _ in range(15):
        opt.zero_grad()
        layer_loss(crf, unary, image, labels).backward()
        opt.step()
    assert crf.bilateral[1] < 0.5 * start_sigma
    assert exact_now() < 0.9 * start_loss


# ------------------------------------------------------------------------------------------
# Parameter sharing

@pytest.mark.parametrize("compatibility", crfrnn.COMPATIBILITY_SHARING)
@pytest.mark.parametrize("kernel_weights", crfrnn.KERNEL_WEIGHT_SHARING)
def test_sharing_modes_are_their_full_matrices(compatibility, kernel_weights):
    """Every sharing computes what the full layer computes with its effective matrices; the
    parameter shapes are the documented ones; symmetric stays symmetric."""
    c = 4
    shared = CRFRNNLayer(c, num_iterations=2, compatibility=compatibility, kernel_weights=kernel_weights,
                         **KERNELS).double()
    with torch.no_grad():
        for p in shared.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(p.numel())))
    shapes = {n: tuple(p.shape) for n, p in shared.named_parameters()}
    weight_shape = {"scalar": (), "diagonal": (c,), "full": (c, c)}[kernel_weights]
    assert shapes.pop("bilateral_weight") == shapes.pop("spatial_weight") == weight_shape
    assert shapes == ({} if compatibility == "potts" else
                      {"compatibility": (c * (c + 1) // 2,) if compatibility == "symmetric" else (c, c)})
    mu = shared.compatibility_matrix(torch.float64)
    if compatibility != "full":
        torch.testing.assert_close(mu, mu.t())
    full = CRFRNNLayer(c, num_iterations=2, **KERNELS).double()
    with torch.no_grad():
        w_bil, w_spa = shared.kernel_weight_matrices(torch.float64)
        full.bilateral_weight.copy_(w_bil)
        full.spatial_weight.copy_(w_spa)
        full.compatibility.copy_(mu)
    unary, image, _ = two_region_problem()
    unary = torch.cat([unary, -unary], 1)
    torch.testing.assert_close(shared(unary, image), full(unary, image))


def test_potts_compatibility_learns_the_weights_only():
    unary, image, labels = two_region_problem()
    crf = CRFRNNLayer(2, num_iterations=2, compatibility="potts", kernel_weights="scalar", **KERNELS).double()
    assert crf.compatibility is None
    layer_loss(crf, unary, image, labels).backward()
    assert crf.bilateral_weight.grad.abs() > 0 and crf.spatial_weight.grad.abs() > 0


@pytest.mark.parametrize("compatibility,kernel_weights", [("symmetric", "scalar"), ("full", "full"),
                                                        ("symmetric", "diagonal")])
def test_frozen_classes_keep_their_entries_while_the_rest_learns(compatibility, kernel_weights):
    import copy
    unary, image, labels = two_region_problem()
    unary = torch.cat([unary, -unary, 0.5 * unary], 1)  # 6 classes, labels use 0 and 1 only
    crf = CRFRNNLayer(6, num_iterations=2, compatibility=compatibility, kernel_weights=kernel_weights,
                      learn_bandwidths=True, **KERNELS).double().freeze_classes([4, 5])
    before = {name: p.detach().clone() for name, p in crf.named_parameters()}
    opt = torch.optim.Adam(crf.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        layer_loss(crf, unary, image, labels).backward()
        opt.step()
    mu, before_mu = crf.compatibility_matrix(torch.float64), sharing.compatibility_matrix(
        before["compatibility"], compatibility, 6, torch.float64, None)
    frozen = torch.zeros(6, 6, dtype=torch.bool)
    frozen[4:, :] = frozen[:, 4:] = True
    assert torch.equal(mu[frozen], before_mu[frozen])
    assert not torch.equal(mu[~frozen], before_mu[~frozen])
    for name in ("bilateral_weight", "spatial_weight"):  # scalar weights belong to every class
        w, w0 = getattr(crf, name).detach(), before[name]
        if kernel_weights == "scalar":
            assert not torch.equal(w, w0)
        else:
            kept = frozen.diagonal() if kernel_weights == "diagonal" else frozen
            assert torch.equal(w[kept], w0[kept]) and not torch.equal(w[~kept], w0[~kept])
    assert not torch.equal(crf.bilateral_log_sigma.detach(), before["bilateral_log_sigma"])
    copy.deepcopy(crf)  # the hooks do not stop copies
    crf.freeze_classes([])
    opt.zero_grad()
    layer_loss(crf, unary, image, labels).backward()
    assert crf.compatibility.grad.ne(0).all() if compatibility == "full" else crf.compatibility.grad.ne(0).any()


def test_freeze_classes_rejects_bad_indices():
    crf = CRFRNNLayer(3, compatibility="symmetric")
    for bad in (3, -1, 1.0, True):
        with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
            crf.freeze_classes([bad])
    import numpy as np
    crf.freeze_classes(np.array([0, 2]))          # numpy and tensor integers are indices too
    crf.freeze_classes(torch.tensor([1]))


# ------------------------------------------------------------------------------------------
# The state dict

def test_state_dict_carries_bandwidths_iterations_and_normalisation():
    learned = CRFRNNLayer(3, num_iterations=4, num_eval_iterations=7, normalize="after", learn_bandwidths=True,
                          **KERNELS)
    with torch.no_grad():
        learned.bilateral_log_sigma.add_(torch.tensor([0.3, -0.2]))
        learned.spatial_log_sigma.add_(0.1)
    other = CRFRNNLayer(3, bilateral=(80.0, 13.0, 3.0), spatial=(3.0, 1.0))  # fixed, other sigma
    other.load_state_dict(learned.state_dict())
    assert (other.num_iterations, other.num_eval_iterations, other.normalize) == (4, 7, "after")
    for a, b in zip(other.bilateral[:2] + other.spatial[:1], learned.bilateral[:2] + learned.spatial[:1]):
        assert a == pytest.approx(b, rel=1e-6)
    unary, image, _ = two_region_problem()
    unary = torch.cat([unary, -unary[:, :1]], 1).float()
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(unary, image), learned.eval()(unary, image), atol=1e-5, rtol=1e-5)
    # And back: a learning layer takes fixed bandwidths as its starting point.
    again = CRFRNNLayer(3, learn_bandwidths=True, **KERNELS)
    again.load_state_dict(other.state_dict())
    torch.testing.assert_close(again.bilateral_log_sigma, learned.bilateral_log_sigma)
    assert again.config() == {**other.config(), "learn_bandwidths": True}


def test_same_bandwidths_round_trip_exactly():
    crf = CRFRNNLayer(3, bilateral=(121.0, 5.0, 4.0), spatial=(3.0, 3.0))
    again = CRFRNNLayer(**crf.config())
    again.load_state_dict(crf.state_dict())
    assert again.bilateral == (121.0, 5.0, 4.0) and again.spatial == (3.0, 3.0)


def test_fixed_bandwidths_follow_their_buffers():
    """The fixed bandwidths are used as exact floats and stored as logs in buffers: an in-place
    edit of a buffer (or a load into it) changes what the layer computes, and a move to another
    dtype keeps the exact floats."""
    unary, image = torch.randn(1, 3, 9, 11), torch.rand(1, 3, 9, 11) * 255
    crf = CRFRNNLayer(3, num_iterations=2, bilateral=(30.0, 7.0, 4.0), spatial=(2.0, 1.5))
    crf(unary, image)  # keeps a spatial lattice of sigma 2
    with torch.no_grad():
        crf.bilateral_log_sigma[1] = math.log(20.0)
        crf.spatial_log_sigma.fill_(math.log(3.0))
    assert crf.bilateral[:2] == pytest.approx((30.0, 20.0)) and crf.spatial[0] == pytest.approx(3.0)
    fresh = CRFRNNLayer(3, num_iterations=2, bilateral=(30.0, 20.0, 4.0), spatial=(3.0, 1.5))
    torch.testing.assert_close(crf(unary, image), fresh(unary, image))
    assert fresh.double().bilateral == (30.0, 20.0, 4.0) and fresh.spatial == (3.0, 1.5)
    with torch.no_grad():  # a float64 layer's buffers too; only the edited entry moves
        fresh.bilateral_log_sigma[0] = math.log(50.0)
    assert fresh.bilateral == (pytest.approx(50.0), 20.0, 4.0)


def test_fixed_bandwidths_follow_loads_in_every_state():
    """A load of other bandwidths reaches the floats the layer uses whatever happened before: a
    float64 layer, an old pickle (without the bookkeeping attribute), a layer built on the meta
    device, and a scale right after the load."""
    source = CRFRNNLayer(3, bilateral=(50.0, 7.0, 4.0), spatial=(5.0, 3.0))
    double = CRFRNNLayer(3, bilateral=(80.0, 13.0, 4.0)).double()
    double.load_state_dict(source.double().state_dict())
    assert double.bilateral[:2] == pytest.approx((50.0, 7.0)) and double.spatial[0] == pytest.approx(5.0)
    # An old pickle: the (bilateral, spatial) pair's fixed floats in `_fixed_sigmas` and its
    # weights in `_initial_weights`, before kernels and their bookkeeping object existed.
    state = CRFRNNLayer(3, bilateral=(80.0, 13.0, 4.0)).__getstate__()
    for name in ("_bandwidths", "kernels", "_kept", "fused", "keep_marginals", "prune", "eval_prune"):
        del state[name]
    state.update(_fixed_sigmas=((80.0, 13.0), (3.0,)), _initial_weights=(4.0, 3.0), _last_spatial=None)
    old = CRFRNNLayer.__new__(CRFRNNLayer)
    old.__setstate__(state)
    assert old.bilateral[:2] == (80.0, 13.0)
    assert (old.fused, old.keep_marginals, old.prune, old.eval_prune) == (True, True, 0.0, crfrnn.DEFAULT_PRUNE)
    old.load_state_dict(source.float().state_dict())
    assert old.bilateral[:2] == pytest.approx((50.0, 7.0))
    with torch.device("meta"):
        meta = CRFRNNLayer(3, bilateral=(80.0, 13.0, 4.0))
    meta = meta.to_empty(device="cpu")
    meta.load_state_dict(source.state_dict())
    assert meta.bilateral[:2] == pytest.approx((50.0, 7.0))
    scaled = CRFRNNLayer(3, bilateral=(80.0, 13.0, 4.0))
    scaled.load_state_dict(source.state_dict())
    scaled.scale_spatial_bandwidths(2.0)
    assert scaled.bilateral[:2] == pytest.approx((100.0, 7.0)) and scaled.spatial[0] == pytest.approx(10.0)


def test_layers_made_and_moved_under_inference_mode_work():
    """Inference tensors have no version counter: the bandwidth bookkeeping leaves them alone."""
    unary, image = torch.randn(1, 3, 9, 11), torch.rand(1, 3, 9, 11) * 255
    with torch.inference_mode():
        made = CRFRNNLayer(3, num_iterations=2).double()
        inside = made(unary, image)
    torch.testing.assert_close(made(unary, image), inside)
    assert made.bilateral == CRFRNNLayer(3).bilateral


def test_state_dict_without_the_new_entries_still_loads():
    """Checkpoints written before the bandwidths were in the state dict: the layer keeps its own."""
    crf = CRFRNNLayer(3, num_iterations=2, **KERNELS)
    old = {k: v for k, v in crf.state_dict().items() if k in ("bilateral_weight", "spatial_weight", "compatibility")}
    again = CRFRNNLayer(3, num_iterations=2, **KERNELS)
    again.load_state_dict(old)
    assert again.bilateral == crf.bilateral and again.num_iterations == 2


@pytest.mark.parametrize("saved,loading,match", [
    (dict(compatibility="full"), dict(compatibility="potts"),
     r"compatibility: the state dict has shape \[3, 3\] \(compatibility='full'\).*compatibility='potts'.*no entry"),
    (dict(compatibility="potts"), dict(compatibility="symmetric"), r'Missing key\(s\) in state_dict: "compatibility"'),
    (dict(kernel_weights="full"), dict(kernel_weights="scalar"),
     r"bilateral_weight: the state dict has shape \[3, 3\] \(kernel_weights='full'\).*needs shape \[\]"),
    (dict(kernel_weights="diagonal", num_classes=4), dict(kernel_weights="diagonal"),
     r"shape \[4\] \(another number of classes\?\).*for 3 classes"),
])
def test_loading_another_sharing_fails_clearly(saved, loading, match):
    saved = {"num_classes": 3, **saved}
    source = CRFRNNLayer(saved.pop("num_classes"), **saved, **KERNELS)
    target = CRFRNNLayer(3, **loading, **KERNELS)
    with pytest.raises(RuntimeError, match=match):
        target.load_state_dict(source.state_dict())


def test_non_strict_loading_keeps_the_layers_own_values_for_missing_entries():
    """load_state_dict(strict=False): missing matrices keep their values (PyTorch's meaning of
    it: e.g. a DCNN-only checkpoint into DCNN + CRF); strict loading names them."""
    source = CRFRNNLayer(3, compatibility="symmetric", **KERNELS)
    target = CRFRNNLayer(3, compatibility="symmetric", **KERNELS)
    with torch.no_grad():
        source.bilateral_weight.fill_(7.0)
        target.compatibility.fill_(0.25)
    partial = {k: v for k, v in source.state_dict().items() if k != "compatibility"}
    result = target.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["compatibility"]
    assert torch.equal(target.bilateral_weight, source.bilateral_weight)
    assert bool((target.compatibility == 0.25).all())
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "compatibility"'):
        target.load_state_dict(partial)


def test_iteration_and_normalisation_attributes_write_the_buffers():
    crf = CRFRNNLayer(3)
    crf.num_iterations, crf.num_eval_iterations, crf.normalize = 2, 3, "after"
    state = crf.state_dict()
    assert state["iterations"].tolist() == [2, 3]
    assert crfrnn.NORMALIZATIONS[int(state["normalization"])] == "after"
    with pytest.raises(ValueError, match=r"num_iterations must be an int in 0\.\.1000, got -1"):
        crf.num_iterations = -1
    with pytest.raises(ValueError, match="num_eval_iterations must be an int in 0..1000, got 1000000000000"):
        CRFRNNLayer(3, num_eval_iterations=10**12)
    # A damaged state dict: absurd or fractional counts are refused, not run (or truncated).
    for counts in (torch.tensor([5, 10**12]), torch.tensor([5.7, 2.2])):
        with pytest.raises(RuntimeError, match="iterations"):
            CRFRNNLayer(3).load_state_dict({**state, "iterations": counts})
    with pytest.raises(ValueError, match="normalize must be one of"):
        crf.normalize = "sideways"
    state["normalization"] = torch.tensor(7)
    with pytest.raises(RuntimeError, match="normalization 7"):
        CRFRNNLayer(3).load_state_dict(state)


@pytest.mark.parametrize("learn", [False, True])
def test_scale_spatial_bandwidths(learn):
    crf = CRFRNNLayer(3, learn_bandwidths=learn, bilateral=(121.0, 5.0, 4.0), spatial=(3.0, 3.0))
    crf._kept = {"spatial": ("stale", None)}
    assert crf.scale_spatial_bandwidths(0.5) is crf
    assert not crf.kept_lattices()
    expect = ((60.5, 5.0), (1.5,))
    got = crf.sigmas()
    if learn:
        assert got[0] == pytest.approx(expect[0]) and got[1] == pytest.approx(expect[1])
    else:
        assert got == expect
    torch.testing.assert_close(crf.state_dict()["bilateral_log_sigma"], torch.tensor([60.5, 5.0]).log())
    with pytest.raises(ValueError, match="factor must be a positive finite number"):
        crf.scale_spatial_bandwidths(0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(compatibility="diag"), "compatibility must be one of"),
    (dict(kernel_weights="potts"), "kernel_weights must be one of"),
    (dict(bandwidth_grad="exact"), "bandwidth_grad must be one of"),
])
def test_bad_sharing_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CRFRNNLayer(3, **kwargs)
