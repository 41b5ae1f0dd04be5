"""models.load_vgg16_imagenet: torchvision VGG-16 weights -> DeepLab, checked tensor by tensor.

The weights file is a randomly initialised torchvision ``vgg16()`` saved by the test (no download:
the machines have no internet). One file (528 MB) is written per test session to a temp folder.
"""
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

import models

CONVS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
         "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16()            # random init; the same layout as the ImageNet file
    with torch.no_grad():                        # make biases non-zero so they are checked too
        for m in vgg.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.bias.normal_()
    path = tmp_path_factory.mktemp("vgg") / "vgg16-random.pth"
    torch.save(vgg.state_dict(), path)
    return path, vgg


@pytest.fixture(scope="module")
def vgg16_sd(vgg16_file):
    """The state dict read back from the file (memory-mapped: loaded once, cheaply)."""
    return torch.load(vgg16_file[0], mmap=True, weights_only=True)


def unfilled(variant, **kw):
    """A full-size DeepLab with uninitialised memory (skips the random init of up to 134M weights
    that the loader overwrites anyway; fc8 is re-drawn by the loader)."""
    with torch.device("meta"):
        net = models.deeplab(variant, **kw)
    return net.to_empty(device="cpu")


def _torchvision_convs(vgg):
    return [m for m in vgg.features if isinstance(m, torch.nn.Conv2d)]


@pytest.mark.parametrize("variant", ["largefov", "4x4", "4x4-d8"])
def test_copied_and_decimated_tensors(vgg16_file, vgg16_sd, variant):
    path, vgg = vgg16_file
    if variant == "largefov":       # through the file path, as --vgg-weights PATH does
        net = models.load_vgg16_imagenet(models.deeplab(variant, num_classes=21), str(path))
    else:
        net = models.load_vgg16_imagenet(unfilled(variant, num_classes=21), vgg16_sd)
    # the 13 convolutions, by position in torchvision's features (not through the key table)
    for name, conv in zip(CONVS, _torchvision_convs(vgg)):
        assert torch.equal(getattr(net, name).weight, conv.weight), name
        assert torch.equal(getattr(net, name).bias, conv.bias), name
    fc6 = vgg.classifier[0].weight.view(4096, 512, 7, 7)        # Linear over pool5 flattened C,H,W
    fc7 = vgg.classifier[3].weight
    if variant == "largefov":
        # every 4th filter, rows/columns 0, 3, 6
        assert torch.equal(net.fc6.weight, fc6[::4, :, ::3, ::3])
        assert torch.equal(net.fc6.bias, vgg.classifier[0].bias[::4])
        assert torch.equal(net.fc7.weight[:, :, 0, 0], fc7[::4, ::4])
        assert torch.equal(net.fc7.bias, vgg.classifier[3].bias[::4])
        assert net.fc6.weight.shape == (1024, 512, 3, 3) and net.fc7.weight.shape == (1024, 1024, 1, 1)
    else:
        # all 4096 filters, rows/columns 0, 2, 4, 6
        assert torch.equal(net.fc6.weight, fc6[:, :, ::2, ::2])
        assert torch.equal(net.fc6.bias, vgg.classifier[0].bias)
        assert torch.equal(net.fc7.weight[:, :, 0, 0], fc7)
        assert torch.equal(net.fc7.bias, vgg.classifier[3].bias)
    assert abs(net.fc8.weight.std().item() - 0.01) < 0.002 and torch.all(net.fc8.bias == 0)


def test_7x7_fc6_is_the_linear_layer_as_a_convolution(vgg16_file, vgg16_sd):
    """Oracle: torchvision's own fc6/fc7 (Linear on the flattened 7x7 pool5) equal our convs
    applied without dilation to a 7x7 map; this checks the reshape order, not just the values."""
    _, vgg = vgg16_file
    net = models.load_vgg16_imagenet(unfilled("7x7", num_classes=21), vgg16_sd)
    pool5 = torch.randn(2, 512, 7, 7)
    with torch.no_grad():
        ours = F.conv2d(pool5, net.fc6.weight, net.fc6.bias)
        theirs = vgg.classifier[0](pool5.flatten(1))
        torch.testing.assert_close(ours.flatten(1), theirs, rtol=1e-4, atol=1e-4)
        hidden = torch.randn(2, 4096)
        torch.testing.assert_close(F.conv2d(hidden[:, :, None, None], net.fc7.weight, net.fc7.bias)
                                   .flatten(1), vgg.classifier[3](hidden), rtol=1e-4, atol=1e-4)


def test_msc_heads_untouched_and_module_source(vgg16_file):
    _, vgg = vgg16_file
    torch.manual_seed(3)
    net = models.deeplab("largefov", msc=True)
    heads = {k: v.clone() for k, v in net.msc.state_dict().items()}
    models.load_vgg16_imagenet(net, vgg)               # a torchvision module also works
    assert all(torch.equal(v, net.msc.state_dict()[k]) for k, v in heads.items())
    assert torch.equal(net.conv5_3.weight, vgg.features[28].weight)


def test_prefixed_and_wrapped_state_dicts(vgg16_file):
    _, vgg = vgg16_file
    sd = {"module." + k: v for k, v in vgg.state_dict().items()}
    net = unfilled("largefov")
    models.load_vgg16_imagenet(net, {"state_dict": sd})
    assert torch.equal(net.conv1_1.weight, vgg.features[0].weight)


def test_not_vgg16_errors(vgg16_file, vgg16_sd, tmp_path):
    _, vgg = vgg16_file
    sd = vgg16_sd
    net = unfilled("largefov")
    missing = {k: v for k, v in sd.items() if not k.startswith("classifier.3")}
    with pytest.raises(ValueError, match=r"not a torchvision VGG-16.*missing keys.*classifier\.3"):
        models.load_vgg16_imagenet(net, missing)
    wrong = dict(sd)
    wrong["features.0.weight"] = torch.zeros(64, 1, 3, 3)         # a grey-scale VGG
    with pytest.raises(ValueError, match=r"wrong shapes.*features\.0\.weight.*\(64, 3, 3, 3\)"):
        models.load_vgg16_imagenet(net, wrong)
    vgg11 = torchvision.models.vgg11().state_dict()
    with pytest.raises(ValueError, match="not a torchvision VGG-16"):
        models.load_vgg16_imagenet(net, vgg11)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth.*state dict"):       # bad file content: a ValueError
        models.load_vgg16_imagenet(net, tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(ValueError, match="junk.pth.*not a VGG-16 weights file"):
        models.load_vgg16_imagenet(net, tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        models.load_vgg16_imagenet(net, tmp_path / "nowhere.pth")
    with pytest.raises(ValueError, match="width"):
        models.load_vgg16_imagenet(models.deeplab("largefov", width=0.25), sd)
    with pytest.raises(TypeError, match="DeepLab"):
        models.load_vgg16_imagenet(vgg, sd)


def test_torchvision_download_path(vgg16_file, monkeypatch):
    """The VGG16_Weights path: the real torchvision call, with its downloader replaced (no
    internet here): a failure names --vgg-weights; a success loads the weights."""
    import torchvision.models._api as api

    def offline(url, *a, **k):
        assert url == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match="--vgg-weights"):
        models.load_vgg16_imagenet(unfilled("largefov"))

    _, vgg = vgg16_file
    monkeypatch.setattr(api, "load_state_dict_from_url", lambda url, *a, **k: vgg.state_dict())
    net = models.load_vgg16_imagenet(unfilled("largefov"))
    assert torch.equal(net.conv4_2.weight, vgg.features[19].weight)
