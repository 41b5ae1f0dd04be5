"""Tiny end-to-end runs of every train/ script on generated data (seconds each), exact resume,
DDP with two gloo processes, and the written files."""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import models
from train import crf as crf_script
from train import dcnn as dcnn_script
from train import evaluate as evaluate_script
from train import joint as joint_script
from train import segment as segment_script

REPO = Path(__file__).resolve().parents[1]
BASE = ["--image-size", "32", "--width", "0.03125", "--num-classes", "4", "--train-samples", "16",
        "--val-samples", "4", "--batch-size", "2", "--eval-batch-size", "4", "--bands", "1", "3",
        "--no-progress", "--log-every", "1"]
TINY = BASE + ["--crf-iters", "2", "--crf-eval-iters", "2"]


pytestmark = pytest.mark.usefixtures("keep_thread_count")   # the scripts set the thread count


def run(module, argv):
    args = module.get_args_parser().parse_args(argv)
    return module.main(args)


def _state(path):
    model, _ = models.load_checkpoint(path)
    return model.state_dict()


def _assert_same_weights(a, b, atol=1e-6):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=atol, msg=k)


@pytest.fixture(scope="module")
def joint_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("joint")
    res = run(joint_script, TINY + ["--pretrain-iters", "3", "--iters", "3", "--out-dir", str(out)])
    return out, res


def test_joint_end_to_end_writes_report(joint_run):
    out, res = joint_run
    for name in ("metrics.json", "examples.png", "bands.png", "model.pt", "dcnn.pt", "checkpoint.pt",
                 "metrics.csv"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        for mode in ("dcnn", "crf"):
            r = m[when][mode]
            assert 0 <= r["miou"] <= 1 and 0 <= r["pixel_accuracy"] <= 1
            assert r["band_accuracy"]["bands"] == [1, 3]
    assert m["after"]["crf"]["miou"] == pytest.approx(res["after"]["crf"]["miou"])
    model, _ = models.load_checkpoint(out / "model.pt")
    assert isinstance(model, models.DeepLabCRF) and model.crf is not None
    with Image.open(out / "examples.png") as im:
        assert im.mode == "RGB" and im.width > 6 * 32
    csv = (out / "metrics.csv").read_text()
    assert "dcnn,3,loss" in csv and "joint,3,loss" in csv


def test_joint_resume_matches_uninterrupted_run(joint_run, tmp_path):
    straight, _ = joint_run
    argv = TINY + ["--pretrain-iters", "3", "--iters", "3", "--out-dir", str(tmp_path)]
    assert run(joint_script, argv + ["--stop-at", "1"]) is None      # "killed" after joint iteration 1
    _, extra = models.load_checkpoint(tmp_path / "checkpoint.pt")
    assert extra["train"]["stage"] == "joint" and extra["train"]["iteration"] == 1
    torch.manual_seed(999)
    run(joint_script, argv + ["--resume", str(tmp_path / "checkpoint.pt")])
    _assert_same_weights(straight / "model.pt", tmp_path / "model.pt")
    a = json.loads((straight / "metrics.json").read_text())
    b = json.loads((tmp_path / "metrics.json").read_text())
    assert a["before"]["crf"]["confusion"] == b["before"]["crf"]["confusion"]   # kept in the checkpoint
    assert a["after"]["crf"]["confusion"] == b["after"]["crf"]["confusion"]


def test_dcnn_script_and_resume(tmp_path):
    argv = BASE + ["--iters", "4"]
    run(dcnn_script, argv + ["--out-dir", str(tmp_path / "a")])
    assert run(dcnn_script, argv + ["--out-dir", str(tmp_path / "b"), "--stop-at", "2"]) is None
    run(dcnn_script, argv + ["--out-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b" / "checkpoint.pt")])
    _assert_same_weights(tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt")
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert "dcnn" in m and isinstance(models.load_checkpoint(tmp_path / "a" / "model.pt")[0], models.DeepLab)


def test_crf_script_gradient_and_search(joint_run, tmp_path):
    dcnn = str(joint_run[0] / "dcnn.pt")
    rep = run(crf_script, TINY + ["--dcnn", dcnn, "--iters", "2", "--out-dir", str(tmp_path / "g")])
    assert {"dcnn", "crf_initial", "crf_final", "train"} <= set(rep)
    model, _ = models.load_checkpoint(tmp_path / "g" / "model.pt")
    net0, _ = models.load_checkpoint(dcnn)
    for p, q in zip(model.net.parameters(), net0.parameters()):      # the DCNN stayed frozen
        assert torch.equal(p, q)
    rep = run(crf_script, TINY + ["--dcnn", dcnn, "--search", "--search-w1", "2", "6", "--search-sxy", "8",
                                  "--search-srgb", "10", "20", "--search-samples", "3",
                                  "--out-dir", str(tmp_path / "s")])
    pts = rep["search"]["points"]
    assert len(pts) == 4 and rep["search"]["samples"] == 3
    best = max(pts, key=lambda p: p["miou"])
    assert rep["crf_final_params"]["bilateral"] == [best["sxy"], best["srgb"], best["w1"]]
    model, _ = models.load_checkpoint(tmp_path / "s" / "model.pt")
    assert tuple(model.crf.bilateral) == (best["sxy"], best["srgb"], best["w1"])


def test_crf_script_refines_the_searched_best_by_gradient(joint_run, tmp_path):
    dcnn = str(joint_run[0] / "dcnn.pt")
    search = ["--dcnn", dcnn, "--search", "--search-w1", "2", "6", "--search-sxy", "8", "--search-srgb", "10",
              "--search-samples", "3"]
    refine = TINY + search + ["--refine", "--iters", "2", "--learn-bandwidths"]
    rep = run(crf_script, refine + ["--out-dir", str(tmp_path / "r")])
    # interrupted and resumed: the same CRF (the resumed run searches again, from the same options)
    assert run(crf_script, refine + ["--out-dir", str(tmp_path / "b"), "--stop-at", "1"]) is None
    run(crf_script, refine + ["--out-dir", str(tmp_path / "b"), "--resume", str(tmp_path / "b" / "checkpoint.pt")])
    _assert_same_weights(tmp_path / "r" / "model.pt", tmp_path / "b" / "model.pt")
    best = max(rep["search"]["points"], key=lambda p: p["miou"])
    assert {"crf_searched", "train", "crf_final"} <= set(rep) and rep["train"]["iterations"] == 2
    crf = models.load_checkpoint(tmp_path / "r" / "model.pt")[0].crf
    # learning started at the searched point and moved it
    assert crf.learn_bandwidths and tuple(crf.bilateral) != (best["sxy"], best["srgb"], best["w1"])
    assert crf.bilateral[0] == pytest.approx(best["sxy"], rel=0.2) and crf.bilateral[2] == best["w1"]
    with pytest.raises(ValueError, match="--refine refines the best point of a grid search: give --search too"):
        run(crf_script, TINY + ["--dcnn", dcnn, "--refine", "--out-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("script", [crf_script, joint_script])
def test_scripts_learn_the_bandwidths_with_the_chosen_sharing(joint_run, tmp_path, script):
    dcnn = str(joint_run[0] / "dcnn.pt")
    start = ["--dcnn" if script is crf_script else "--init", dcnn]
    rep = run(script, TINY + start + ["--iters", "2", "--learn-bandwidths", "--compatibility", "symmetric",
                                      "--kernel-weights", "diagonal", "--crf-loss", "lovasz",
                                      "--out-dir", str(tmp_path)])
    assert rep is not None
    crf = models.load_checkpoint(tmp_path / "model.pt")[0].crf
    assert crf.learn_bandwidths and (crf.compatibility_sharing, crf.kernel_weight_sharing) == ("symmetric", "diagonal")
    initial = crf_script.options.CRF_PRESETS["synthetic"]
    assert crf.bilateral[:2] != tuple(initial["bilateral"][:2]) and crf.spatial[0] != initial["spatial"][0]
    assert tuple(crf.bilateral_weight.shape) == (4,) and tuple(crf.compatibility.shape) == (10,)


def test_crf_script_resume_refuses_changed_training_options(joint_run, tmp_path, capsys):
    argv = TINY + ["--dcnn", str(joint_run[0] / "dcnn.pt"), "--iters", "3", "--out-dir", str(tmp_path)]
    assert run(crf_script, argv + ["--stop-at", "1"]) is None
    capsys.readouterr()
    changed = list(argv)
    changed[changed.index("--batch-size") + 1] = "4"
    with pytest.raises(ValueError, match="--batch-size 2 -> 4.*--resume-anyway"):
        run(crf_script, changed + ["--resume", str(tmp_path / "checkpoint.pt")])
    run(crf_script, changed + ["--resume", str(tmp_path / "checkpoint.pt"), "--resume-anyway"])
    out = capsys.readouterr().out
    assert "resuming" in out and "warning" in out and "--batch-size 2 -> 4" in out


def test_crf_script_resumed_without_dcnn_keeps_the_dcnn_it_trained(tmp_path):
    """Without --dcnn, crf.py trains a DCNN first; resumed in its CRF stage, it takes that DCNN
    back from the checkpoint (not a fresh one) and ends as an uninterrupted run does."""
    argv = TINY + ["--pretrain-iters", "2", "--iters", "2"]
    straight = run(crf_script, argv + ["--out-dir", str(tmp_path / "a")])
    assert run(crf_script, argv + ["--out-dir", str(tmp_path / "b"), "--stop-at", "1"]) is None
    resumed = run(crf_script, argv + ["--out-dir", str(tmp_path / "b"),
                                      "--resume", str(tmp_path / "b" / "checkpoint.pt")])
    assert resumed["dcnn"]["confusion"] == straight["dcnn"]["confusion"]
    _assert_same_weights(tmp_path / "a" / "model.pt", tmp_path / "b" / "model.pt")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_cpu_runs_keep_large_blocks_in_the_heap():
    """mallopt accepts the setting (in a subprocess: it changes the process's malloc)."""
    code = ("import sys; sys.path.insert(0, '.'); "
            "from train.process import keep_large_blocks_in_the_heap as k; print(k())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr


def test_evaluate_script_outputs(joint_run, tmp_path):
    out = tmp_path / "e"
    res = run(evaluate_script, ["--checkpoint", str(joint_run[0] / "model.pt"), "--image-size", "32",
                                "--val-samples", "4", "--bands", "1", "2", "4", "--crf-eval-iters", "2",
                                "--no-progress", "--out-dir", str(out)])
    m = json.loads((out / "metrics.json").read_text())
    for mode in ("dcnn", "crf"):
        conf = np.array(m[mode]["confusion"])
        assert conf.sum() == 4 * 32 * 32                     # every pixel of the 4 images, once
        inter = np.diag(conf)
        union = conf.sum(0) + conf.sum(1) - inter
        assert m[mode]["miou"] == pytest.approx(float(np.mean(inter[union > 0] / union[union > 0])))
        assert m[mode]["band_accuracy"]["bands"] == [1, 2, 4]
    assert res["crf"]["miou"] == pytest.approx(m["crf"]["miou"])
    with Image.open(out / "bands.png") as im:
        assert im.size == (640, 420)
    # a DCNN-only checkpoint gets a CRF built from the options; --no-crf gives the DCNN alone
    res = run(evaluate_script, ["--checkpoint", str(joint_run[0] / "dcnn.pt"), "--image-size", "32",
                                "--val-samples", "2", "--no-crf", "--no-progress", "--out-dir", str(out),
                                "--overwrite"])
    assert set(res) == {"dcnn"}
    with pytest.raises(ValueError, match="num-classes"):
        run(evaluate_script, ["--checkpoint", str(joint_run[0] / "model.pt"), "--num-classes", "7",
                              "--out-dir", str(out)])


def test_segment_script_writes_valid_pngs(joint_run, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3)).astype(np.uint8)).save(src / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (24, 30, 3)).astype(np.uint8)).save(src / "b.png")
    out = tmp_path / "out"
    written = run(segment_script, [str(src), "--checkpoint", str(joint_run[0] / "model.pt"), "--out-dir",
                                   str(out), "--both", "--crf-eval-iters", "2", "--no-progress"])
    assert sorted(str(p.relative_to(out)) for p in written) == [
        "labels/a.png", "labels/b.png", "labels_dcnn/a.png", "labels_dcnn/b.png", "overlays/a.png", "overlays/b.png"]
    for name, size in (("a", (56, 40)), ("b", (30, 24))):
        for kind in ("labels", "labels_dcnn"):
            with Image.open(out / kind / f"{name}.png") as im:
                assert im.mode == "P" and im.size == size
                assert np.asarray(im).max() < 4
                assert im.getpalette()[3:6] == [128, 0, 0]       # VOC palette: class 1 is maroon
        with Image.open(out / "overlays" / f"{name}.png") as im:
            assert im.mode == "RGB" and im.size == size
    with pytest.raises(FileNotFoundError, match="nope.jpg does not exist"):
        run(segment_script, [str(tmp_path / "nope.jpg"), "--checkpoint", str(joint_run[0] / "model.pt"),
                             "--out-dir", str(tmp_path / "nope")])


def _env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)      # the scripts must find the repository by themselves
    env.update(OMP_NUM_THREADS="1", CRFRNN_TRACEBACK="")
    return env


def test_scripts_run_as_files_from_the_repo_root(joint_run, tmp_path):
    for module in (joint_script, dcnn_script, crf_script, evaluate_script, segment_script):
        assert "usage:" in module.get_args_parser().format_help()
    r = subprocess.run([sys.executable, "train/joint.py", "--help"], cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--pretrain-iters" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "train/segment.py", "--checkpoint", str(joint_run[0] / "model.pt"),
                        "--demo", "2", "--image-size", "32", "--out-dir", str(tmp_path), "--no-progress"],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "overlays" / "demo_1.png").is_file()
    # (its output folder in tmp_path: the default, runs/joint in the repository, may hold a user's run)
    r = subprocess.run([sys.executable, "train/joint.py", "--dataset", "voc", "--data-root", str(tmp_path),
                        "--out-dir", str(tmp_path / "joint")], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "no VOCdevkit/VOC2012 folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # three training processes (one, then two under torchrun): 20 s on 2 loaded cores
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    """torchrun with 2 CPU processes (gloo): each takes half of every batch; with dropout off the
    averaged gradients equal the single-process ones, so the weights agree."""
    argv = ["train/joint.py"] + TINY + ["--pretrain-iters", "2", "--iters", "2", "--dropout", "0",
                                        "--device", "cpu"]
    one = subprocess.run([sys.executable] + argv + ["--out-dir", str(tmp_path / "one")], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    # each process's own output goes to a log of its own, so that a failure shows what it said
    logs = tmp_path / "logs"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--log-dir", str(logs), "--redirects", "3"]
    two = subprocess.run(torchrun + argv + ["--out-dir", str(tmp_path / "two")], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
    ranks = "".join(f"\n--- {log.relative_to(logs)}:\n{log.read_text()[-2000:]}"
                    for log in sorted(logs.rglob("std*.log")))
    assert two.returncode == 0, two.stderr[-1500:] + ranks
    _assert_same_weights(tmp_path / "one" / "model.pt", tmp_path / "two" / "model.pt", atol=1e-5)
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    # evaluation is split over the two processes and summed: every pixel counted once
    assert np.sum(b["after"]["crf"]["confusion"]) == np.sum(a["after"]["crf"]["confusion"]) == 4 * 32 * 32
    assert b["after"]["crf"]["miou"] == pytest.approx(a["after"]["crf"]["miou"], abs=0.02)


def test_amp_run_on_cpu_uses_bfloat16_and_finishes(tmp_path, monkeypatch):
    """--amp on the CPU: the DCNN and the CRF run under autocast to bfloat16 (the DCNN's scores
    come out in bfloat16), and the run ends with a finite loss."""
    import crfrnn
    from train import engine

    seen = {"dcnn": set(), "crf": set()}
    dcnn_loss, crf_forward = engine.dcnn_loss, crfrnn.CRFRNNLayer.forward

    def watched_dcnn_loss(model, images, labels, **kw):
        seen["dcnn"].add(model(images).dtype)
        return dcnn_loss(model, images, labels, **kw)

    def watched_crf_forward(self, *args, **kw):
        seen["crf"].add(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return crf_forward(self, *args, **kw)

    monkeypatch.setattr(engine, "dcnn_loss", watched_dcnn_loss)
    monkeypatch.setattr(crfrnn.CRFRNNLayer, "forward", watched_crf_forward)
    res = run(crf_script, TINY + ["--pretrain-iters", "2", "--iters", "2", "--amp", "--out-dir", str(tmp_path)])
    assert seen == {"dcnn": {torch.bfloat16}, "crf": {torch.bfloat16}}, seen
    assert 0 <= res["crf_final"]["miou"] <= 1
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert np.isfinite(m["train"]["loss"])


def test_voc_training_on_a_written_folder(tmp_path):
    """The VOC path end to end on a VOCdevkit folder the test writes (paper's transforms: random
    scale, crop with 255 fill, flip)."""
    from test_train_data import make_voc

    make_voc(tmp_path / "voc", ids_train=("t1", "t2", "t3", "t4"), ids_val=("v1", "v2"), size=(50, 70))
    res = run(dcnn_script, ["--dataset", "voc", "--data-root", str(tmp_path / "voc"), "--width", "0.03125",
                            "--iters", "2", "--batch-size", "2", "--crop-size", "41", "--workers", "0",
                            "--eval-batch-size", "2", "--no-progress", "--bands", "2",
                            "--out-dir", str(tmp_path / "run")])
    conf = np.array(res["dcnn"]["confusion"])
    assert conf.shape == (21, 21)
    assert conf.sum() == 2 * 49 * 70          # the val images' non-void pixels (row 0 is void)
    assert models.load_checkpoint(tmp_path / "run" / "model.pt")[1]["data"]["dataset"] == "voc"


@pytest.mark.data
def test_evaluation_on_the_shared_voc_images(tmp_path, shared_data):
    """A VOC DCNN checkpoint (without a CRF: --crf-preset deeplab adds one) on two real VOC images."""
    from script_helpers import save_tiny_checkpoint

    checkpoint = save_tiny_checkpoint(tmp_path / "voc.pt", num_classes=21, crf=False, data="voc")
    res = run(evaluate_script, ["--checkpoint", str(checkpoint), "--dataset", "voc", "--data-root", str(shared_data),
                                "--val-samples", "2", "--crf-preset", "deeplab", "--crf-eval-iters", "2", "--bands",
                                "4", "--workers", "0", "--no-progress", "--out-dir", str(tmp_path / "eval")])
    assert set(res) == {"dcnn", "crf"}
    assert len(res["crf"]["per_class_iou"]) == 21 and "aeroplane" in res["crf"]["per_class_iou"]
