"""models.save_checkpoint / load_checkpoint: the model is rebuilt from the file alone."""
import os

import pytest
import torch

import crfrnn
import models

CRFRNNLayer = getattr(crfrnn, "CRFRNNLayer", None)
if CRFRNNLayer is None:
    from crfrnn.crf import CRFRNNLayer


def _perturb(model):
    """Move every weight away from its initial value, so a load that silently re-initialises fails."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


def test_deeplab_round_trip(tmp_path):
    torch.manual_seed(0)
    net = models.deeplab("4x4-d8", num_classes=7, msc=True, width=1 / 16, dropout=0.3)
    _perturb(net)
    path = tmp_path / "sub" / "net.pt"
    models.save_checkpoint(path, net, epoch=3, best_miou=61.5, args={"lr": 0.001})
    assert sorted(os.listdir(path.parent)) == ["net.pt"]          # no temporary file left behind
    loaded, extra = models.load_checkpoint(path)
    assert isinstance(loaded, models.DeepLab) and loaded.config == net.config
    assert extra == {"epoch": 3, "best_miou": 61.5, "args": {"lr": 0.001}}
    for (k, a), (k2, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(1, 3, 33, 41)
    torch.testing.assert_close(loaded.eval()(x), net.eval()(x), rtol=0, atol=0)


def test_deeplab_crf_round_trip(tmp_path):
    torch.manual_seed(0)
    net = models.deeplab("largefov", num_classes=3, width=1 / 16)
    crf = CRFRNNLayer(3, num_iterations=2, num_eval_iterations=4, bilateral=(30.0, 7.0, 4.0),
                      spatial=(2.0, 1.5), image_mean=models.IMAGENET_MEAN,
                      image_std=models.IMAGENET_STD, normalize="after")
    joint = models.DeepLabCRF(net, crf, use_crf=True)
    _perturb(joint)
    path = tmp_path / "joint.pt"
    models.save_checkpoint(path, joint)
    loaded, extra = models.load_checkpoint(path)
    assert extra == {}
    assert isinstance(loaded, models.DeepLabCRF) and isinstance(loaded.crf, CRFRNNLayer)
    c = loaded.crf
    assert (c.num_iterations, c.num_eval_iterations, c.bilateral, c.spatial, c.normalize) == \
        (2, 4, (30.0, 7.0, 4.0), (2.0, 1.5), "after")
    torch.testing.assert_close(c.image_mean.flatten(), torch.tensor(models.IMAGENET_MEAN))
    torch.testing.assert_close(c.compatibility, crf.compatibility)
    x = torch.randn(1, 3, 20, 28)
    a, b = joint.eval()(x), loaded.eval()(x)
    for key in ("coarse", "unary", "crf"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_crf_off_and_absent_round_trip(tmp_path):
    joint = models.DeepLabCRF(models.deeplab("7x7", num_classes=2, width=1 / 32), None)
    models.save_checkpoint(tmp_path / "a.pt", joint)
    loaded, _ = models.load_checkpoint(tmp_path / "a.pt")
    assert loaded.crf is None
    joint = models.DeepLabCRF(models.deeplab("7x7", num_classes=2, width=1 / 32), CRFRNNLayer(2),
                              use_crf=False)
    models.save_checkpoint(tmp_path / "b.pt", joint)
    loaded, _ = models.load_checkpoint(tmp_path / "b.pt")
    assert loaded.use_crf is False and loaded.crf is not None


def test_wrapped_models_are_unwrapped(tmp_path):
    net = models.deeplab("largefov", num_classes=2, width=1 / 32)
    compiled = torch.compile(net, backend="eager")
    models.save_checkpoint(tmp_path / "c.pt", compiled)
    loaded, _ = models.load_checkpoint(tmp_path / "c.pt")
    assert set(loaded.state_dict()) == set(net.state_dict())     # no "_orig_mod." prefix


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    net = models.deeplab("largefov", num_classes=2, width=1 / 32)
    path = tmp_path / "n.pt"
    models.save_checkpoint(path, net, step=1)

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        models.save_checkpoint(path, net, step=2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["n.pt"]
    assert models.load_checkpoint(path)[1] == {"step": 1}


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        models.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"conv1_1.weight": torch.zeros(1)}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="not a models checkpoint"):
        models.load_checkpoint(tmp_path / "sd.pt")
    with pytest.raises(TypeError, match="DeepLab"):
        models.save_checkpoint(tmp_path / "x.pt", torch.nn.Linear(2, 2))
