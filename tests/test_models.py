"""models/: DeepLab variants (shapes, strides, parameter counts, receptive field), compile, errors.

Most tests use width-reduced nets (same topology, channels / 16); the full-width nets are built on
the meta device where only shapes matter, and one full LargeFOV forward checks the paper's
306 -> 39 claim.
"""
import copy

import pytest
import torch
from torch import nn

import models
from models.vgg_deeplab import DeepLab

TINY = 1 / 16          # channels 4, 8, 16, 32, 32; fc6/fc7 64 (LargeFOV) or 256; MSc heads 8
ALL_VARIANTS = ("largefov", "7x7", "4x4", "4x4-d8")


def tiny(variant="largefov", msc=False, num_classes=5, **kw):
    torch.manual_seed(0)
    return models.deeplab(variant, num_classes=num_classes, msc=msc, width=TINY, **kw).eval()


def pooled(n):
    """PyTorch's MaxPool2d output size (floor mode), kernel 3, stride 2, pad 1: an oracle for the
    stride-8 size that does not use the ceil(n / 8) formula under test."""
    return (n + 2 * 1 - 3) // 2 + 1


# ----------------------------------------------------------------------------- shapes and strides
@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("msc", [False, True])
def test_output_shape_all_variants_odd_sizes(variant, msc):
    net = tiny(variant, msc)
    for h, w in [(33, 47), (1, 9), (8, 17), (65, 2), (129, 101)]:
        with torch.no_grad():
            out = net(torch.randn(2, 3, h, w))
        expect = (pooled(pooled(pooled(h))), pooled(pooled(pooled(w))))
        assert tuple(out.shape[1:]) == (5, *expect), (h, w)
        assert models.output_size(h, w) == expect


def test_output_size_formula_many_sizes():
    # ceil(n / 8) equals three floor-mode 3x3/s2/p1 pools for every n, odd or even
    for n in range(1, 700):
        assert models.output_size(n, n)[0] == pooled(pooled(pooled(n))) == -(-n // 8)
    assert models.output_size(306, 306) == (39, 39)      # the paper's 306 -> 39
    assert models.output_size(321, 321) == (41, 41)      # DeepLab's 321 crops -> 41


def test_full_largefov_306_gives_39x39():
    """The paper's claim on the real (width 1) network: a 306x306 input gives 39x39 scores."""
    torch.manual_seed(0)
    net = models.deeplab("largefov", num_classes=21).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 306, 306))
    assert out.shape == (1, 21, 39, 39)
    assert torch.isfinite(out).all()


def test_upsample_bilinear_aligned_on_stride_8_grid():
    net = tiny()
    x = torch.randn(1, 3, 321, 321)           # 321 = 8 * (41 - 1) + 1: the grids' corners coincide
    coarse = net(x)
    full = net(x, upsample=True)
    assert full.shape == (1, 5, 321, 321)
    # score (i, j) is centred on pixel (8 i, 8 j): the upsampled map passes through it there
    torch.testing.assert_close(full[..., ::8, ::8], coarse, rtol=0, atol=1e-5)
    # between grid points: the bilinear mean of the two neighbours
    torch.testing.assert_close(full[..., 4, ::8], (coarse[..., 0, :] + coarse[..., 1, :]) / 2,
                               rtol=0, atol=1e-5)
    odd = net(torch.randn(2, 3, 37, 50), upsample=True)
    assert odd.shape == (2, 5, 37, 50)


def test_dropout_only_in_train_mode():
    net = tiny()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x))
        net.train()
        assert not torch.allclose(net(x), net(x))


# ----------------------------------------------------------------------------- parameter counts
def _conv(k, cin, cout):
    return k * k * cin * cout + cout


def paper_parameter_count(variant, msc=False, num_classes=21):
    """Layer-by-layer count of the paper's architecture (PAPER.md section 1), independent of the
    module code: the 13 VGG-16 3x3 convolutions, fc6 (k x k, 512 -> F), fc7 (1x1, F -> F),
    fc8 (1x1, F [+ 640 with MSc] -> classes) and, with MSc, five heads of 3x3 -> 128 and 1x1 128."""
    vgg = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
           (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
    k, f = {"largefov": (3, 1024), "7x7": (7, 4096), "4x4": (4, 4096), "4x4-d8": (4, 4096)}[variant]
    total = sum(_conv(3, a, b) for a, b in vgg) + _conv(k, 512, f) + _conv(1, f, f)
    classifier_in = f
    if msc:
        for cin in (3, 64, 128, 256, 512):           # input, pool1, pool2, pool3, pool4
            total += _conv(3, cin, 128) + _conv(1, 128, 128)
        classifier_in += 5 * 128
    return total + _conv(1, classifier_in, num_classes)


def _count(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("msc", [False, True])
def test_parameter_counts_match_paper_architecture(variant, msc):
    with torch.device("meta"):
        net = models.deeplab(variant, num_classes=21, msc=msc)
    assert _count(net) == paper_parameter_count(variant, msc)


def test_parameter_counts_match_paper_table2():
    """Chen et al. 2015, Table 2 (the field-of-view study), '# params' column in millions:
    DeepLab-CRF-7x7 134.3M, DeepLab-CRF (4x4, input stride 4) 65.1M, DeepLab-CRF-4x4 (input
    stride 8) 65.1M, DeepLab-CRF-LargeFOV 20.5M (21 classes, no MSc)."""
    table2 = {"7x7": 134.3, "4x4": 65.1, "4x4-d8": 65.1, "largefov": 20.5}
    for variant, millions in table2.items():
        with torch.device("meta"):
            net = models.deeplab(variant, num_classes=21)
        assert round(_count(net) / 1e6, 1) == millions, variant


def test_width_scales_every_layer():
    net = tiny("largefov", msc=True)
    assert [m.out_channels for _, m in net.conv_layers()] == [4, 4, 8, 8, 16, 16, 16, 32, 32, 32,
                                                             32, 32, 32]
    assert net.fc6.out_channels == 64 and net.fc7.out_channels == 64
    assert all(h.conv1.out_channels == 8 and h.conv2.out_channels == 8 for h in net.msc.values())
    assert net.fc8.in_channels == 64 + 5 * 8


# ----------------------------------------------------------------------------- receptive field
def _measured_receptive_field(net, size=512):
    """Oracle: the extent of input pixels that reach the centre score, measured with autograd on a
    linearised copy (max pools -> average pools of the same geometry, positive weights and input so
    every ReLU passes, dropout off). Max pools would route the gradient to one pixel only."""
    lin = copy.deepcopy(net).eval().double()
    for b in range(1, 6):
        pool = getattr(lin, f"pool{b}")
        setattr(lin, f"pool{b}", nn.AvgPool2d(pool.kernel_size, pool.stride, pool.padding))
    with torch.no_grad():
        for m in lin.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0 / m.weight[0].numel())
                m.bias.fill_(0.1)
    x = torch.ones(1, 3, size, size, dtype=torch.float64, requires_grad=True)
    out = lin(x)
    c = out.shape[-1] // 2
    out[0, 0, c, c].backward()
    rows = (x.grad[0].abs().sum(0).sum(1) > 0).nonzero().flatten()
    assert rows.min() > 0 and rows.max() < size - 1, "input too small to hold the whole field"
    return int(rows.max() - rows.min() + 1), 8 * c


@pytest.mark.parametrize("variant", ["largefov", "7x7", "4x4"])
def test_receptive_field_analytic_matches_measured(variant):
    net = tiny(variant)
    rf, jump = models.receptive_field(net)
    assert jump == 8
    measured, _ = _measured_receptive_field(net)
    assert rf == measured
    if variant == "largefov":
        # stated: DeepLab-LargeFOV sees 435 x 435 input pixels per score (conv1-pool5a: 243,
        # fc6 3x3 dilation 12 at stride 8 adds 2 * 12 * 8 = 192)
        assert rf == 435


# ----------------------------------------------------------------------------- misc API
def test_parameter_groups_split_new_layers():
    net = tiny(msc=True)
    g = net.parameter_groups()
    new = {id(p) for p in net.fc8.parameters()} | {id(p) for p in net.msc.parameters()}
    assert {id(p) for p in g["classifier"]} == new
    assert len(g["backbone"]) + len(g["classifier"]) == len(list(net.parameters()))
    backbone = {id(p) for p in g["backbone"]}
    assert id(net.conv1_1.weight) in backbone and id(net.fc7.bias) in backbone


def test_fc8_gaussian_init():
    torch.manual_seed(0)
    net = models.deeplab("largefov", num_classes=21, width=1.0)
    w = net.fc8.weight
    assert abs(w.std().item() - 0.01) < 0.001 and abs(w.mean().item()) < 0.001
    assert (net.fc8.bias == 0).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        models.deeplab("resnet")
    with pytest.raises(ValueError, match="num_classes"):
        models.deeplab("largefov", num_classes=0)
    with pytest.raises(ValueError, match="width"):
        models.deeplab("largefov", width=0)
    with pytest.raises(ValueError, match="dropout"):
        models.deeplab("largefov", dropout=1.0)
    net = tiny()
    with pytest.raises(ValueError, match=r"Tensor\[N, 3, H, W\]"):
        net(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"Tensor\[N, 3, H, W\]"):
        net(torch.randn(3, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        net(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        net([[1.0]])


def test_config_rebuilds_same_architecture():
    net = tiny("4x4-d8", msc=True, dropout=0.3)
    again = DeepLab(**net.config)
    assert net.config == again.config
    assert {k: v.shape for k, v in net.state_dict().items()} == \
        {k: v.shape for k, v in again.state_dict().items()}


# ----------------------------------------------------------------------------- torch.compile
def test_torch_compile_matches_eager():
    """Dynamo captures the whole net in one graph (fullgraph) and its AOT autograd trace gives the
    eager output and gradients (the inductor code generation is the slow test below)."""
    net = tiny(msc=True)
    x = torch.randn(2, 3, 45, 61)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    out = compiled(x, upsample=True)
    torch.testing.assert_close(out, net(x, upsample=True))
    out.square().sum().backward()
    g = net.conv1_1.weight.grad.clone()
    net.zero_grad()
    net(x, upsample=True).square().sum().backward()
    torch.testing.assert_close(g, net.conv1_1.weight.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_inductor():
    net = tiny()
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(net, fullgraph=True)
    torch.testing.assert_close(compiled(x), net(x), rtol=1e-4, atol=1e-4)


def test_deeplab_names_an_input_of_another_dtype_or_an_empty_image():
    net = models.deeplab("largefov", num_classes=4, width=0.03125)
    with pytest.raises(TypeError, match="x is torch.float16 but the model's weights are torch.float32"):
        net(torch.randn(1, 3, 16, 16).half())
    with pytest.raises(ValueError, match=r"H, W >= 1, got shape \(1, 3, 0, 8\)"):
        net(torch.randn(1, 3, 0, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: float32 input, bf16 compute
        assert net(torch.randn(1, 3, 16, 16)).dtype == torch.bfloat16
