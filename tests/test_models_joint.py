"""models.DeepLabCRF: wiring of DCNN + crfrnn.CRFRNNLayer, switches, and joint gradients."""
import pytest
import torch
from torch import nn

import crfrnn
import models
from helpers import normalised_image

CRFRNNLayer = getattr(crfrnn, "CRFRNNLayer", None)
if CRFRNNLayer is None:                       # exported from crfrnn/__init__ by the lead
    from crfrnn import CRFRNNLayer

C = 4


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return models.deeplab("largefov", num_classes=C, width=1 / 16)


def real_crf(**kw):
    kw.setdefault("num_iterations", 3)
    kw.setdefault("num_eval_iterations", 5)
    return CRFRNNLayer(C, bilateral=(20.0, 0.5, 4.0), spatial=(3.0, 3.0),
                       image_mean=models.IMAGENET_MEAN, image_std=models.IMAGENET_STD, **kw)


class ScaleCRF(nn.Module):
    """Stub with the CRF layer's call signature: unary * a + mean colour, one parameter."""

    num_classes = C

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(2.0))

    def forward(self, unary, image):
        return unary * self.a + image.mean(1, keepdim=True)


def test_output_dict_and_wiring_with_real_crf():
    net, crf = tiny_net(), real_crf()
    joint = models.DeepLabCRF(net, crf).eval()
    x = normalised_image(2, 3, 37, 29)  # odd size: coarse 5 x 4
    with torch.no_grad():
        out = joint(x)
        coarse = net(x)
        unary = models.upsample_scores(coarse, (37, 29))
        refined = crf(unary, x)                      # the layer called by hand on the same input
    assert set(out) == {"coarse", "unary", "crf"}
    assert out["coarse"].shape == (2, C, 5, 4)
    assert out["unary"].shape == out["crf"].shape == (2, C, 37, 29)
    torch.testing.assert_close(out["coarse"], coarse)
    torch.testing.assert_close(out["unary"], unary)
    torch.testing.assert_close(out["crf"], refined)
    assert not torch.allclose(out["crf"], out["unary"])     # the CRF did something


def test_use_crf_switch_and_no_crf():
    joint = models.DeepLabCRF(tiny_net(), real_crf()).eval()
    x = normalised_image(1, 3, 24, 24)
    joint.use_crf = False
    out = joint(x)
    assert out["crf"] is None and out["unary"].shape == (1, C, 24, 24)
    joint.use_crf = True
    assert joint(x)["crf"] is not None
    bare = models.DeepLabCRF(tiny_net(), None).eval()
    out = bare(x)
    assert out["crf"] is None
    torch.testing.assert_close(out["unary"], joint(x)["unary"])   # same seed, same net


def test_explicit_image_goes_to_the_crf():
    joint = models.DeepLabCRF(tiny_net(), ScaleCRF()).eval()
    x = normalised_image(1, 3, 16, 16)
    image = torch.rand(1, 3, 16, 16) * 255
    out = joint(x, image=image)
    torch.testing.assert_close(out["crf"], out["unary"] * 2 + image.mean(1, keepdim=True))
    with pytest.raises(ValueError, match="image"):
        joint(x, image=torch.rand(1, 3, 8, 16))


def test_freeze_crf_keeps_gradient_to_the_net():
    joint = models.DeepLabCRF(tiny_net(), real_crf()).train()
    joint.freeze_crf()
    assert joint.crf_frozen and all(not p.requires_grad for p in joint.crf.parameters())
    out = joint(normalised_image(1, 3, 24, 24))
    out["crf"].logsumexp(1).sum().backward()
    assert all(p.grad is None for p in joint.crf.parameters())
    assert joint.net.conv1_1.weight.grad is not None and joint.net.conv1_1.weight.grad.abs().sum() > 0
    joint.unfreeze_crf()
    assert not joint.crf_frozen and all(p.requires_grad for p in joint.crf.parameters())


def test_crf_gradient_reaches_vgg_weights_exactly():
    """d loss(crf output) / d VGG weights: autograd against a central finite difference along a
    random direction of all DCNN weights, in float64 (dropout off, lattices fixed by the image)."""
    torch.manual_seed(1)
    joint = models.DeepLabCRF(tiny_net(), real_crf(num_eval_iterations=3)).double().eval()
    x = normalised_image(1, 3, 24, 32, dtype=torch.float64)
    r = torch.randn(1, C, 24, 32, dtype=torch.float64)

    def loss():
        return (joint(x)["crf"] * r).sum()

    params = list(joint.net.parameters())
    joint.zero_grad()
    loss().backward()
    direction = [torch.randn_like(p) * p.detach().abs().mean() for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    assert joint.net.conv1_1.weight.grad.abs().sum() > 0
    eps = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(d, alpha=eps)
        up = loss().item()
        for p, d in zip(params, direction):
            p.add_(d, alpha=-2 * eps)
        down = loss().item()
        for p, d in zip(params, direction):
            p.add_(d, alpha=eps)
    numeric = (up - down) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_bad_construction():
    with pytest.raises(ValueError, match="num_classes"):
        models.DeepLabCRF(tiny_net(), CRFRNNLayer(C + 1))
    with pytest.raises(TypeError, match="crf"):
        models.DeepLabCRF(tiny_net(), lambda u, i: u)
    with pytest.raises(TypeError, match="net"):
        models.DeepLabCRF("vgg", None)


@pytest.mark.slow
def test_torch_compile_joint_matches_eager():
    """DeepLabCRF under torch.compile (the CRF's data-dependent lattice build and finite check
    break the graph there; the DCNN compiles whole): same output and DCNN gradient as eager."""
    joint = models.DeepLabCRF(tiny_net(), real_crf()).eval()
    x = normalised_image(1, 3, 24, 32)
    compiled = torch.compile(joint, backend="aot_eager")
    a, b = compiled(x), joint(x)
    torch.testing.assert_close(a["crf"], b["crf"], rtol=1e-4, atol=1e-5)
    a["crf"].square().sum().backward()
    g = joint.net.conv1_1.weight.grad.clone()
    joint.zero_grad()
    b["crf"].square().sum().backward()
    eager = joint.net.conv1_1.weight.grad
    # float32 rounding relative to the gradient's scale (entries up to ~100 here)
    torch.testing.assert_close(g, eager, rtol=1e-4, atol=1e-6 * float(eager.abs().max()))
