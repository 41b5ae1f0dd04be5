"""models.save_checkpoint / load_checkpoint: the model is rebuilt from the file alone."""
import collections
import errno
import os
import re
import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

import crfrnn
import models
import models.files
from helpers import normalised_image

REPO = Path(__file__).resolve().parents[1]

CRFRNNLayer = getattr(crfrnn, "CRFRNNLayer", None)
if CRFRNNLayer is None:
    from crfrnn import CRFRNNLayer


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
    x = normalised_image(1, 3, 33, 41)
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
    x = normalised_image(1, 3, 20, 28)
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
    assert models.unwrap(torch.nn.DataParallel(compiled)) is net and models.unwrap(net) is net


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    """A write that fails part-way (here: the disk is full when the data is flushed) raises an
    OSError naming the file and leaves the old checkpoint and no temporary file behind."""
    net = models.deeplab("largefov", num_classes=2, width=1 / 32)
    path = tmp_path / "n.pt"
    models.save_checkpoint(path, net, step=1)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models.files.os, "fsync", disk_full)
    with pytest.raises(OSError, match=r"could not write .*n\.pt: No space left on device \(is the disk full\?\)"):
        models.save_checkpoint(path, net, step=2)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["n.pt"]
    assert models.load_checkpoint(path)[1] == {"step": 1}


def _dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_runs_temporary_file_is_removed_and_no_other(tmp_path):
    net = models.deeplab("largefov", num_classes=2, width=1 / 32)
    stale = tmp_path / f".n.pt.tmp{_dead_pid()}"           # left by a run killed while saving n.pt
    alive = tmp_path / f".n.pt.tmp{os.getppid()}"          # a running process's: not ours to remove
    others = [tmp_path / ".n.pt.tmp", tmp_path / ".n.pt.tmpx1", tmp_path / ".m.pt.tmp1",
              tmp_path / "n.pt.tmp1", tmp_path / "notes.txt"]
    for f in [stale, alive] + others:
        f.write_bytes(b"partial")
    models.save_checkpoint(tmp_path / "n.pt", net)
    assert not stale.exists()
    assert alive.exists() and all(f.read_bytes() == b"partial" for f in others)


def test_a_write_over_the_file_size_limit_fails_cleanly(tmp_path):
    """A real failed write (RLIMIT_FSIZE stands in for a full disk): a one-line OSError naming the
    file, the old file kept, no temporary file."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import models
        net = models.deeplab("largefov", num_classes=2, width=1 / 32)
        models.save_checkpoint({str(tmp_path / "n.pt")!r}, net)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            models.save_checkpoint({str(tmp_path / "n.pt")!r}, net, step=2)
        except OSError as e:
            print("OSError:", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"OSError: could not write \S*n\.pt: File too large \(is the disk full\?\)\n", r.stdout)
    assert sorted(os.listdir(tmp_path)) == ["n.pt"]
    assert models.load_checkpoint(tmp_path / "n.pt")[1] == {}


def test_unreadable_files_give_one_line_errors_naming_them(tmp_path):
    net = models.deeplab("largefov", num_classes=2, width=1 / 32)
    models.save_checkpoint(tmp_path / "good.pt", net)
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(5000))
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.pt").write_text("hello")
    with open(tmp_path / "pickle.pt", "wb") as f:
        torch.save({"format": models.checkpoint.FORMAT, "x": collections.OrderedDict(a=Fraction(1, 3))}, f)
    expected = {"empty.pt": "is empty \\(0 bytes\\)", "random.pt": "not a torch.save file",
                "truncated.pt": "not a torch.save file|corrupt or truncated", "text.pt": "not a torch.save file",
                "pickle.pt": "objects other than tensors"}
    for name, what in expected.items():
        with pytest.raises(ValueError, match=f"{name}.*({what})") as info:
            models.load_checkpoint(tmp_path / name)
        assert "\n" not in str(info.value) and "weights_only=False`" not in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_naming_the_parameter(tmp_path, bad):
    crf = CRFRNNLayer(3, bilateral=(10.0, 10.0, 3.0), spatial=(3.0, 3.0))
    model = models.DeepLabCRF(models.deeplab("largefov", num_classes=3, width=1 / 32), crf)
    with torch.no_grad():
        model.crf.compatibility[1, 2] = bad
    models.save_checkpoint(tmp_path / "m.pt", model)
    with pytest.raises(ValueError, match=r"m\.pt.*parameter crf\.compatibility holds 1 non-finite"):
        models.load_checkpoint(tmp_path / "m.pt")


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        models.load_checkpoint(tmp_path / "missing.pt")
    torch.save({"conv1_1.weight": torch.zeros(1)}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="not a checkpoint of models.save_checkpoint"):
        models.load_checkpoint(tmp_path / "sd.pt")
    with pytest.raises(TypeError, match="DeepLab"):
        models.save_checkpoint(tmp_path / "x.pt", torch.nn.Linear(2, 2))


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.pop("state_dict"), "without a state_dict of weights"),
    (lambda p: p.update(state_dict=[1, 2]), "without a state_dict of weights"),
    (lambda p: p.update(crf={**p["crf"], "class": "crfrnn.Nope"}), "cannot be rebuilt .*Nope"),
    (lambda p: p.update(crf={**p["crf"], "class": "crfrnn.gone.X"}), "cannot be rebuilt .*crfrnn.gone"),
])
def test_a_checkpoint_with_a_damaged_payload_is_named_in_one_message(tmp_path, damage, message):
    path = tmp_path / "model.pt"
    models.save_checkpoint(path, models.DeepLabCRF(models.deeplab("largefov", num_classes=4, width=0.03125),
                                                    crfrnn.CRFRNNLayer(4)))
    payload = torch.load(path, weights_only=True)
    damage(payload)
    torch.save(payload, path)
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + ".*" + message):
        models.load_checkpoint(path)
