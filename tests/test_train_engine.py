"""train.engine / train.checkpoint: schedules, parameter groups, NaN guard, exact resume."""
import random

import numpy as np
import pytest
import torch

import models
from train import engine
from train.checkpoint import capture_rng, load_training_state, restore_rng, save_training_checkpoint
from train.data import SegmentationSet, SyntheticShapes, train_transform
from train.distributed import DistInfo
from train.options import CRF_PRESETS, crf_layer


def test_lr_factor_step_and_poly():
    assert [engine.lr_factor(i, "step", step_size=2000) for i in (0, 1999, 2000, 4001)] == \
        pytest.approx([1, 1, 0.1, 0.01])
    assert engine.lr_factor(0, "poly", max_iter=100) == 1
    assert engine.lr_factor(50, "poly", max_iter=100, power=0.9) == pytest.approx(0.5 ** 0.9)
    assert engine.lr_factor(100, "poly", max_iter=100) == 0
    with pytest.raises(ValueError):
        engine.lr_factor(0, "cosine")


def _tiny_net(classes=4):
    return models.deeplab("largefov", num_classes=classes, width=1 / 32, dropout=0.5)


def _tiny_crf(classes=4):
    p = CRF_PRESETS["synthetic"]
    return crf_layer(classes, p["bilateral"], p["spatial"], num_iterations=2, num_eval_iterations=3)


def test_parameter_groups_and_lr_multipliers():
    joint = models.DeepLabCRF(_tiny_net(), _tiny_crf())
    opt = engine.build_optimizer(joint, lr=1e-3, classifier_lr_mult=10, crf_lr_mult=2, weight_decay=5e-4)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"backbone", "classifier", "crf"}
    assert {id(p) for p in groups["classifier"]["params"]} == {id(p) for p in joint.net.fc8.parameters()}
    assert {id(p) for p in groups["crf"]["params"]} == {id(p) for p in joint.crf.parameters()}
    assert groups["crf"]["weight_decay"] == 0 and groups["backbone"]["weight_decay"] == 5e-4
    engine.set_lr(opt, 1e-3, 0.1)
    assert groups["backbone"]["lr"] == pytest.approx(1e-4)
    assert groups["classifier"]["lr"] == pytest.approx(1e-3)
    assert groups["crf"]["lr"] == pytest.approx(2e-4)
    joint.net.requires_grad_(False)                      # frozen DCNN: only the CRF is optimised
    opt = engine.build_optimizer(joint, lr=1e-3)
    assert [g["name"] for g in opt.param_groups] == ["crf"]


def test_downsample_labels_is_nearest():
    lab = torch.arange(64).view(1, 8, 8)
    assert engine.downsample_labels(lab, (4, 4))[0].tolist() == lab[0, ::2, ::2].tolist()


def test_lovasz_softmax_is_one_minus_iou_at_hard_predictions():
    """At 0/1 probabilities the Lovász extension is the set function it extends: per image, the
    mean over the classes present in the labels of 1 - IoU (void ignored); in between it is
    differentiable and smaller for better predictions."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (2, 9, 8), generator=g)
    labels[0, :2] = 255
    pred = torch.where(torch.rand(labels.shape, generator=g) < 0.7, labels.clamp(max=3),
                       torch.randint(0, 4, labels.shape, generator=g))
    pred[labels == 255] = 0
    logits = torch.nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).double() * 100
    expected = []
    for k in range(2):
        keep = labels[k] != 255
        t, p = labels[k][keep], pred[k][keep]
        ious = [((t == c) & (p == c)).sum().item() / ((t == c) | (p == c)).sum().item() for c in t.unique().tolist()]
        expected.append(1 - np.mean(ious))
    assert engine.lovasz_softmax(logits, labels).item() == pytest.approx(np.mean(expected), abs=1e-6)
    soft = (logits / 50).requires_grad_()
    loss = engine.lovasz_softmax(soft, labels)
    loss.backward()
    assert torch.isfinite(soft.grad).all() and soft.grad.abs().sum() > 0
    perfect = torch.nn.functional.one_hot(labels.clamp(max=3), 4).permute(0, 3, 1, 2).double() * 100
    assert engine.lovasz_softmax(perfect, labels).item() == pytest.approx(0, abs=1e-6)
    assert engine.lovasz_softmax(perfect, torch.full_like(labels, 255)).item() == 0


def test_rng_capture_restore_roundtrip():
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    state = capture_rng()
    a = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]


def _train(tmp_path, max_iter, start_iter=0, stop_at=None, resume=None, crf=False, seed=0, loss_fn=None):
    """Train a tiny (optionally joint) model on tiny synthetic data; returns (model, summary)."""
    torch.manual_seed(seed)
    net = _tiny_net()
    model = models.DeepLabCRF(net, _tiny_crf()) if crf else net
    opt = engine.build_optimizer(model, name="sgd", lr=0.01)
    start = 0
    if resume is not None:
        state = load_training_state(resume, model, optimizer=opt)
        start = state["iteration"]
    ds = SegmentationSet(SyntheticShapes(12, size=24, num_classes=4, seed=1),
                         train_transform(crop_size=20, min_scale=0.8, max_scale=1.2), 4, seed=seed)
    cfg = engine.LoopConfig(max_iter=max_iter, batch_size=2, lr=0.01, lr_policy="poly", seed=seed,
                            ckpt_path=str(tmp_path / "ckpt.pt"), ckpt_every=1, progress=False,
                            stop_at=stop_at, stage="test")
    loss = loss_fn or (engine.joint_loss if crf else engine.dcnn_loss)
    summary = engine.train_loop(model, ds, loss, opt, cfg, DistInfo(), start_iter=start)
    return model, summary


@pytest.mark.parametrize("crf", [False, True])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, crf):
    straight, s = _train(tmp_path / "a", 6, crf=crf)
    assert not s["stopped"] and s["iterations"] == 6
    _, s1 = _train(tmp_path / "b", 6, stop_at=3, crf=crf)
    assert s1["stopped"] and s1["iterations"] == 3
    torch.manual_seed(123)                               # a different RNG state before resuming
    resumed, s2 = _train(tmp_path / "b", 6, resume=tmp_path / "b" / "ckpt.pt", crf=crf, seed=0)
    assert s2["iterations"] == 3
    for (n, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    # and the weights did change during training (the comparison is not vacuous)
    torch.manual_seed(0)
    fresh = _tiny_net()
    assert not torch.allclose(fresh.fc8.weight, (straight.net if crf else straight).fc8.weight)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss_fn(m, x, y):
        calls["n"] += 1
        loss = engine.dcnn_loss(m, x, y)
        return loss * float("nan") if calls["n"] == 4 else loss

    with pytest.raises(engine.NonFiniteLossError, match=r"nan at iteration 3.*ckpt.pt \(iteration 3\)"):
        _train(tmp_path, 6, loss_fn=loss_fn)
    _, extra = models.load_checkpoint(tmp_path / "ckpt.pt")
    assert extra["train"]["iteration"] == 3
    for p in models.load_checkpoint(tmp_path / "ckpt.pt")[0].parameters():
        assert torch.isfinite(p).all()


def test_checkpoint_is_loadable_by_models_and_atomic(tmp_path):
    net = _tiny_net()
    opt = engine.build_optimizer(net, lr=0.1)
    path = tmp_path / "c.pt"
    save_training_checkpoint(path, net, optimizer=opt, iteration=7, args={"x": tmp_path}, stage="s")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]     # no temporary left behind
    model, extra = models.load_checkpoint(path)                  # weights_only loading works
    assert extra["train"]["iteration"] == 7 and extra["train"]["args"]["x"] == str(tmp_path)
    other = _tiny_net()
    state = load_training_state(path, other, optimizer=engine.build_optimizer(other, lr=0.1))
    assert state["stage"] == "s"
    for p, q in zip(net.parameters(), other.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="do not fit"):
        load_training_state(path, models.deeplab("largefov", num_classes=5, width=1 / 32))


def test_metric_logger_truncates_on_resume(tmp_path):
    log = engine.MetricLogger(tmp_path / "metrics.csv")
    for it in (10, 20, 30):
        log.log("joint", it, loss=1.0 / it)
    log.log("dcnn", 50, loss=0.5)
    log.truncate("joint", 20)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3
    assert not any(",joint,30," in r for r in rows)
    with pytest.raises(ImportError, match="tensorboard"):
        try:
            import tensorboard  # noqa: F401
            pytest.skip("tensorboard is installed")
        except ImportError:
            engine.MetricLogger(tmp_path / "metrics.csv", tensorboard=True)


def test_evaluate_matches_a_direct_confusion_matrix():
    torch.manual_seed(0)
    joint = models.DeepLabCRF(_tiny_net(), _tiny_crf())
    ds = SegmentationSet(SyntheticShapes(5, size=24, num_classes=4, split="val"), None, 4)
    from train.data import eval_transform
    ds.transform = eval_transform()
    loader = engine.make_eval_loader(ds, DistInfo(), batch_size=2)
    res, ex = engine.evaluate(joint, loader, 4, torch.device("cpu"), bands=(1, 3), num_examples=2)
    assert set(res) == {"dcnn", "crf"} and len(ex) == 2 and joint.training
    conf = np.zeros((4, 4), np.int64)
    joint.eval()
    with torch.no_grad():
        for i in range(5):
            x, y, _ = ds[i]
            p = joint(x[None])["crf"].argmax(1)[0]
            for t, q in zip(y.flatten().tolist(), p.flatten().tolist()):
                conf[t, q] += 1
    assert res["crf"]["confusion"] == conf.tolist()
    inter = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - inter
    assert res["crf"]["miou"] == pytest.approx(float(np.mean(inter[union > 0] / union[union > 0])))
    assert res["crf"]["pixel_accuracy"] == pytest.approx(inter.sum() / conf.sum())
