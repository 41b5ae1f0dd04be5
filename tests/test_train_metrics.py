"""train.metrics against hand-computed confusion matrices and an independent trimap oracle."""
import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from train.metrics import BandAccuracy, ConfusionMatrix, boundary_distance


def test_confusion_matrix_by_hand():
    # truth        prediction
    # 0 0 1        0 1 1
    # 1 2 255      2 2 0      (the void pixel is ignored)
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [2, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    assert cm.mat.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    # IoU: class 0 TP 1 FN 1 FP 0 -> 1/2; class 1 TP 1 FN 1 FP 1 -> 1/3; class 2 TP 1 FP 1 -> 1/2
    np.testing.assert_allclose(cm.iou().numpy(), [1 / 2, 1 / 3, 1 / 2])
    assert cm.miou() == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)
    assert cm.mean_class_accuracy() == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    s = cm.summary(["bg", "a", "b"])
    assert s["per_class_iou"] == {"bg": pytest.approx(0.5), "a": pytest.approx(1 / 3), "b": pytest.approx(0.5)}


def test_confusion_matrix_accumulates_and_skips_absent_classes():
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(5)
    ref = np.zeros((5, 5), np.int64)
    for _ in range(3):
        t = rng.integers(0, 4, (2, 7, 9))             # class 4 never appears nor is predicted
        t[rng.random(t.shape) < 0.1] = 255
        p = rng.integers(0, 4, t.shape)
        cm.update(torch.from_numpy(p), torch.from_numpy(t))
        for tt, pp in zip(t.ravel(), p.ravel()):         # a loop oracle
            if tt != 255:
                ref[tt, pp] += 1
    assert cm.mat.numpy().tolist() == ref.tolist()
    iou = cm.iou()
    assert math.isnan(iou[4])
    expect = [ref[c, c] / (ref[c].sum() + ref[:, c].sum() - ref[c, c]) for c in range(4)]
    assert cm.miou() == pytest.approx(np.mean(expect))
    assert cm.summary()["per_class_iou"]["4"] is None


def test_confusion_matrix_rejects_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="target values"):
        cm.update(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 3, 255]))
    with pytest.raises(ValueError, match="pred values"):
        cm.update(torch.tensor([0, 5]), torch.tensor([0, 1]))


def test_band_accuracy_by_hand():
    # one row: boundary between columns 2 and 3 -> distances 2 1 0 0 1 2
    target = np.array([[0, 0, 0, 1, 1, 1]])
    pred = np.array([[0, 1, 0, 1, 1, 0]])
    np.testing.assert_allclose(boundary_distance(target), [[2, 1, 0, 0, 1, 2]])
    ba = BandAccuracy(bands=(0, 1, 2))
    ba.update(pred, target)
    assert ba.total.tolist() == [2, 4, 6]
    np.testing.assert_allclose(ba.accuracy(), [2 / 2, 3 / 4, 4 / 6])


def test_band_accuracy_ignores_void_but_treats_it_as_boundary():
    target = np.array([[0, 0, 255, 1, 1]])
    pred = np.array([[0, 1, 1, 1, 0]])
    ba = BandAccuracy(bands=(0, 1))
    ba.update(pred, target)
    # distances 1 0 0 0 1; void excluded -> band 0: cols 1, 3 (1 right of 2); band 1: cols 0, 1, 3, 4
    assert ba.total.tolist() == [2, 4]
    np.testing.assert_allclose(ba.accuracy(), [1 / 2, 2 / 4])


@pytest.fixture(scope="module")
def trimap_mask():
    """The trimap of ../shared/tools/coarse_unaries.py (an independent implementation); skips the
    test when the shared folder is absent."""
    shared = Path(os.environ.get("CRFRNN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    path = shared.parent / "tools" / "coarse_unaries.py"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    spec = importlib.util.spec_from_file_location("coarse_unaries", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.trimap_mask


@pytest.mark.data
def test_band_accuracy_matches_shared_trimap_oracle(trimap_mask):
    rng = np.random.default_rng(1)
    lab = np.zeros((40, 50), np.int64)
    lab[5:25, 8:30] = 3
    lab[20:38, 25:45] = 7
    lab[10:14, 35:48] = 255
    pred = lab.copy()
    flip = rng.random(lab.shape) < 0.2
    pred[flip] = rng.integers(0, 9, int(flip.sum()))
    pred[pred == 255] = 0
    bands = (1, 2, 4, 8)
    ba = BandAccuracy(bands)
    ba.update(pred, lab)
    for b, acc in zip(bands, ba.accuracy()):
        m = trimap_mask(lab, b) & (lab != 255)
        assert acc == pytest.approx(float((pred[m] == lab[m]).mean()))


def test_band_accuracy_without_boundary_counts_nothing():
    ba = BandAccuracy((1, 2))
    ba.update(np.zeros((4, 4), int), np.zeros((4, 4), int))
    assert ba.total.tolist() == [0, 0] and all(math.isnan(a) for a in ba.accuracy())
