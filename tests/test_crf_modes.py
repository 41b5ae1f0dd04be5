"""The layer and the lattice across modes: grad, no-grad and inference mode in any order,
pickling and deep copies, and torch.compile: the same results, and no cache made in one mode that
breaks a call in another."""
import copy
import io
import pickle
from functools import partial

import pytest
import torch

import crfrnn
from crfrnn import CRFRNNLayer
from helpers import crf_inputs

SMALL = dict(bilateral=(5.0, 20.0, 3.0), spatial=(2.0, 1.0))
#: A batch of two 9 x 7 images, float32, unit-variance logits.
make_inputs = partial(crf_inputs, n=2, h=9, w=7, dtype=torch.float32, scale=1.0)


# ------------------------------------------------------------------------------------------
# Grad modes: a cache made under one must not break a call under another.

def _grads(crf, unary, image):
    crf.zero_grad()
    u = unary.clone().requires_grad_(True)
    out = crf(u, image)
    out.square().sum().backward()
    return out.detach(), u.grad, crf.compatibility.grad.clone()


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("first_mode", ["inference_mode", "no_grad"])
def test_a_call_under_inference_mode_or_no_grad_does_not_break_the_next_autograd_call(backend, first_mode):
    unary, image = make_inputs()
    crf = CRFRNNLayer(3, num_iterations=2, backend=backend, **SMALL)
    with getattr(torch, first_mode)():
        first = crf(unary, image)
    out, grad_u, grad_mu = _grads(crf, unary, image)  # reuses the spatial lattice of the first call
    fresh = CRFRNNLayer(3, num_iterations=2, backend=backend, **SMALL)
    expected = _grads(fresh, unary, image)
    torch.testing.assert_close(first, out)
    for got, want in zip((out, grad_u, grad_mu), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_an_autograd_call_then_inference_mode_then_autograd_again(backend):
    """The spatial lattice made with autograd on, whose normalisation caches are then filled
    under inference mode (another normalisation), still serves a later autograd call."""
    unary, image = make_inputs()
    crf = CRFRNNLayer(3, num_iterations=2, backend=backend, **SMALL)
    before = _grads(crf, unary, image)
    crf.normalize = "after"  # new per-lattice constants, made under inference mode
    with torch.inference_mode():
        crf(unary, image)
    after = _grads(crf, unary, image)
    crf.normalize = "symmetric"
    again = _grads(crf, unary, image)
    for got, want in zip(again, before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.isfinite(after[1]).all()


def test_a_lattice_built_under_inference_mode_serves_autograd():
    feats = torch.rand(1, 3, 4, 3) * 3
    vals = torch.rand(1, 1, 4, 3, dtype=torch.float64)
    with torch.inference_mode():
        lat = crfrnn.Lattice(feats.double())
        lat.filter(vals, "symmetric")  # fills the caches under inference mode
    assert not lat.vertex_index.is_inference() and not lat.weights.is_inference()
    v = vals.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: lat.filter(x, "symmetric"), (v,))


# ------------------------------------------------------------------------------------------
# Pickling

class _Net(torch.nn.Module):
    """A model holding a CRF layer, as a user's would."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 3, 1)
        self.crf = CRFRNNLayer(3, num_iterations=2, **SMALL)

    def forward(self, image):
        return self.crf(self.head(image / 255), image)


def test_torch_save_of_a_whole_model_after_a_forward_round_trips():
    torch.manual_seed(0)
    net = _Net().eval()
    _, image = make_inputs()
    with torch.no_grad():
        expected = net(image)
    assert net.crf.kept_lattices()  # the kept lattice that used to break pickling
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not loaded.crf.kept_lattices()  # the cache is not saved
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), expected, rtol=0, atol=0)
    assert net.crf.kept_lattices()  # saving left the original's cache alone
    twin = copy.deepcopy(net)
    with torch.no_grad():
        torch.testing.assert_close(twin(image), expected, rtol=0, atol=0)
    # During training too (a cached lattice made with autograd on).
    net.train()
    net(image).sum().backward()
    restored = pickle.loads(pickle.dumps(net))
    torch.testing.assert_close(restored(image), net(image), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_a_lattice_pickles(backend):
    lat = crfrnn.Lattice(torch.rand(2, 3, 5, 4) * 3, backend=backend)
    vals = torch.rand(2, 2, 5, 4)
    expected = lat.filter(vals, "symmetric")
    again = pickle.loads(pickle.dumps(lat))
    assert again.backend == lat.backend
    torch.testing.assert_close(again.filter(vals, "symmetric"), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# torch.compile

@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_layer_compiles_with_fullgraph(grad):
    """No graph break in the forward (its value checks become asynchronous asserts), the same
    result as eager, and the checks still fire."""
    unary, image = make_inputs(n=1, h=6, w=5)
    crf = CRFRNNLayer(3, num_iterations=2, **SMALL)
    crf(unary, image)  # a kept spatial lattice from an eager call must not leak into the graph
    torch._dynamo.reset()
    compiled = torch.compile(crf, fullgraph=True, backend="aot_eager")
    u = unary.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(compiled(u, image), crf(u, image))
    with pytest.raises(RuntimeError, match="unary contains NaN/Inf"):
        compiled(torch.full_like(unary, float("nan")), image)
    with pytest.raises(RuntimeError, match="image is outside 0..255"):
        compiled(unary, image + 300)


@pytest.mark.slow
def test_layer_compiles_with_inductor():
    unary, image = make_inputs(n=1, h=6, w=5)
    crf = CRFRNNLayer(3, num_iterations=2, **SMALL).eval()
    torch._dynamo.reset()
    compiled = torch.compile(crf, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(unary, image), crf(unary, image))
        with pytest.raises(RuntimeError, match="unary contains NaN/Inf"):
            compiled(torch.full_like(unary, float("nan")), image)
