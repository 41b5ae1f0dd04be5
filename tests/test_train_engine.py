"""train.engine / train.checkpoint: schedules, parameter groups, NaN guard, exact resume, the
metrics log, evaluation."""
import functools
import random
import sys

import numpy as np
import pytest
import torch

import models
from train import dcnn as dcnn_script
from train import engine, options
from train import joint as joint_script
from train.checkpoint import capture_rng, load_training_state, restore_rng, save_training_checkpoint
from train.data import SegmentationSet, SyntheticShapes, eval_transform
from train.process import DistInfo

pytestmark = pytest.mark.usefixtures("keep_thread_count")   # a training run sets the thread count


def test_lr_factor_step_and_poly():
    step = functools.partial(engine.lr_factor, policy="step", max_iter=6000, step_size=2000, gamma=0.1, power=0.9)
    assert [step(i) for i in (0, 1999, 2000, 4001)] == pytest.approx([1, 1, 0.1, 0.01])
    poly = functools.partial(engine.lr_factor, policy="poly", max_iter=100, step_size=2000, gamma=0.1, power=0.9)
    assert poly(0) == 1
    assert poly(50) == pytest.approx(0.5 ** 0.9)
    assert poly(100) == 0
    with pytest.raises(ValueError, match="unknown lr policy 'cosine'"):
        engine.lr_factor(0, "cosine", 100, 2000, 0.1, 0.9)


def _args(script, out, *more):
    """The finished options of ``script`` for a tiny run on 24-px synthetic images in ``out``."""
    argv = ["--image-size", "24", "--num-classes", "4", "--train-samples", "12", "--val-samples", "2",
            "--data-seed", "1", "--crop-size", "20", "--min-scale", "0.8", "--max-scale", "1.2", "--width", "0.03125",
            "--dropout", "0.5", "--batch-size", "2", "--eval-batch-size", "2", "--lr", "0.01", "--optimizer", "sgd",
            "--lr-policy", "poly", "--ckpt-every", "1", "--no-progress", "--out-dir", str(out), *map(str, more)]
    if script is joint_script:
        argv += ["--crf-iters", "2", "--crf-eval-iters", "3"]
    return options.finalize(script.get_args_parser().parse_args(argv))


def _tiny_net(classes=4):
    return models.deeplab("largefov", num_classes=classes, width=1 / 32, dropout=0.5)


def _tiny_crf(classes=4):
    p = options.CRF_PRESETS["synthetic"]
    return engine.crf_layer(classes, p["bilateral"], p["spatial"], 2, 3)


def test_parameter_groups_and_the_learning_rate_schedule(tmp_path):
    """Each group starts at --lr × its multiplier (classifier ×--classifier-lr-mult, CRF
    ×--crf-lr-mult); one LambdaLR multiplies all of them by the schedule's factor."""
    joint = models.DeepLabCRF(_tiny_net(), _tiny_crf())
    args = _args(joint_script, tmp_path, "--classifier-lr-mult", "10", "--crf-lr-mult", "2", "--weight-decay", "5e-4",
                 "--lr-policy", "step", "--lr-step", "2")
    opt = engine.make_optimizer(joint, args, 1e-3)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"backbone", "classifier", "crf"}
    assert {id(p) for p in groups["classifier"]["params"]} == {id(p) for p in joint.net.fc8.parameters()}
    assert {id(p) for p in groups["crf"]["params"]} == {id(p) for p in joint.crf.parameters()}
    assert groups["crf"]["weight_decay"] == 0 and groups["backbone"]["weight_decay"] == 5e-4
    schedule = engine.lr_schedule(opt, args, 10, 0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-2, 2e-3])
    for _ in range(2):
        opt.step()
        schedule.step()
    assert groups["backbone"]["lr"] == pytest.approx(1e-4)            # ×0.1 from iteration 2 on
    assert groups["classifier"]["lr"] == pytest.approx(1e-3)
    assert groups["crf"]["lr"] == pytest.approx(2e-4)
    resumed = engine.make_optimizer(joint, args, 1e-3)                  # a schedule resumed at iteration 2
    engine.lr_schedule(resumed, args, 10, 2)
    assert [g["lr"] for g in resumed.param_groups] == [g["lr"] for g in opt.param_groups]
    joint.net.requires_grad_(False)                      # frozen DCNN: only the CRF is optimised
    assert [g["name"] for g in engine.make_optimizer(joint, args, 1e-3).param_groups] == ["crf"]


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


def _train(out, max_iter, stop_at=None, resume=None, crf=False, seed=0, loss_fn=None):
    """Train a tiny (optionally joint) model on tiny synthetic data in a run of its own (``out``);
    returns (model, summary)."""
    script = joint_script if crf else dcnn_script
    more = ["--iters", max_iter, "--seed", seed] + (["--resume", resume] if resume else [])
    args = _args(script, out, *more)
    run = engine.TrainingRun(args, [])
    model = models.DeepLabCRF(engine.build_net(args), engine.build_crf(args)) if crf else engine.build_net(args)
    loss = loss_fn or (functools.partial(engine.joint_loss, unary_weight=0.0, loss="ce") if crf
                       else functools.partial(engine.dcnn_loss, full_resolution=False))
    summary = run.train(model, loss, "test", max_iter, args.lr, resume=resume is not None, stop_at=stop_at)
    return model, summary


@pytest.mark.parametrize("crf", [False, True])
def test_resume_reproduces_an_uninterrupted_run(tmp_path, crf):
    straight, s = _train(tmp_path / "a", 6, crf=crf)
    assert not s["stopped"] and s["iterations"] == 6
    _, s1 = _train(tmp_path / "b", 6, stop_at=3, crf=crf)
    assert s1["stopped"] and s1["iterations"] == 3
    torch.manual_seed(123)                               # a different RNG state before resuming
    resumed, s2 = _train(tmp_path / "b", 6, resume=tmp_path / "b" / "checkpoint.pt", crf=crf, seed=0)
    assert s2["iterations"] == 3
    for (n, p), q in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    # and the weights did change during training (the comparison is not vacuous)
    torch.manual_seed(0)
    fresh = models.deeplab("largefov", num_classes=4, width=1 / 32, dropout=0.5)
    assert not torch.allclose(fresh.fc8.weight, (straight.net if crf else straight).fc8.weight)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def loss_fn(m, x, y):
        calls["n"] += 1
        loss = engine.dcnn_loss(m, x, y, full_resolution=False)
        return loss * float("nan") if calls["n"] == 4 else loss

    with pytest.raises(engine.NonFiniteLossError, match=r"nan at iteration 3.*checkpoint.pt \(iteration 3\)"):
        _train(tmp_path, 6, loss_fn=loss_fn)
    _, extra = models.load_checkpoint(tmp_path / "checkpoint.pt")
    assert extra["train"]["iteration"] == 3
    for p in models.load_checkpoint(tmp_path / "checkpoint.pt")[0].parameters():
        assert torch.isfinite(p).all()


def test_a_crf_refusing_broken_scores_is_a_non_finite_loss_and_other_errors_pass(tmp_path):
    """The CRF refuses NaN scores with a ValueError before any loss exists: with NaN in the
    DCNN's parameters, that is the run's non-finite loss; a ValueError of another cause is not."""
    calls = {"n": 0}

    def loss_fn(m, x, y):
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                models.unwrap(m).net.fc8.bias[0] = float("nan")
        return engine.joint_loss(m, x, y, unary_weight=0.0, loss="ce")

    with pytest.raises(engine.NonFiniteLossError, match=r"nan at iteration 2.*checkpoint.pt \(iteration 2\)"):
        _train(tmp_path / "a", 6, crf=True, loss_fn=loss_fn)

    def bad_input(m, x, y):
        raise ValueError("labels of another shape")

    with pytest.raises(ValueError, match="labels of another shape"):
        _train(tmp_path / "b", 6, crf=True, loss_fn=bad_input)


def test_checkpoint_is_loadable_by_models_and_atomic(tmp_path):
    args = _args(dcnn_script, tmp_path / "run")
    net = _tiny_net()
    opt = engine.make_optimizer(net, args, 0.1)
    path = tmp_path / "c.pt"
    save_training_checkpoint(path, net, optimizer=opt, iteration=7, scaler=None, rngs=[capture_rng()],
                             args={"x": tmp_path}, stage="s")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]     # no temporary left behind
    model, extra = models.load_checkpoint(path)                  # weights_only loading works
    assert extra["train"]["iteration"] == 7 and extra["train"]["args"]["x"] == str(tmp_path)
    other = _tiny_net()
    state = load_training_state(path, other, engine.make_optimizer(other, args, 0.1), None, rank=0, world_size=1)
    assert state["stage"] == "s"
    for p, q in zip(net.parameters(), other.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="do not fit"):
        load_training_state(path, models.deeplab("largefov", num_classes=5, width=1 / 32), None, None,
                            rank=0, world_size=1)


def test_metric_logger_truncates_on_resume(tmp_path):
    log = engine.MetricLogger(tmp_path / "metrics.csv", tensorboard=False, enabled=True, resume=False)
    for it in (10, 20, 30):
        log.log("joint", it, loss=1.0 / it)
    log.log("dcnn", 50, loss=0.5)
    log.truncate("joint", 20)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 3
    assert not any(",joint,30," in r for r in rows)


def test_metric_logger_without_tensorboard_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # as if not installed
    with pytest.raises(ImportError, match="--log tensorboard needs the tensorboard package"):
        engine.MetricLogger(tmp_path / "metrics.csv", tensorboard=True, enabled=True, resume=False)


def test_metric_logger_writes_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = engine.MetricLogger(tmp_path / "metrics.csv", tensorboard=True, enabled=True, resume=False)
    for it in (1, 2):
        log.log("joint", it, loss=1.0 / it)
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("joint/loss")] == [(1, 1.0), (2, 0.5)]
    assert "joint,2,loss,0.5" in (tmp_path / "metrics.csv").read_text()


def test_evaluate_matches_a_direct_confusion_matrix():
    torch.manual_seed(0)
    joint = models.DeepLabCRF(_tiny_net(), _tiny_crf())
    ds = SegmentationSet(SyntheticShapes(5, size=24, num_classes=4, seed=0, split="val"), eval_transform(), 4, seed=0)
    loader = engine.eval_loader(ds, DistInfo(), 2, 0)
    res, ex = engine.evaluate(joint, loader, torch.device("cpu"), 4, (1, 3), amp=False, progress=False,
                              num_examples=2)
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
