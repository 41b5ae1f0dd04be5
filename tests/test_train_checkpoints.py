"""The scripts and their checkpoints: broken files and broken parameters end in a one-line error
(not in plausible metrics or all-background maps), a failed save keeps the old checkpoint, a
resume with other training options is refused, and a checkpoint says what it was trained on."""
import csv
import json
import os
import resource
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import models
from script_helpers import (SYNTHETIC_NAMES, assert_one_line_error, run_script, save_tiny_checkpoint,
                            tiny_model)
from train import crf as crf_script
from train import dcnn as dcnn_script
from train import joint as joint_script
from train import segment as segment_script
from train.checkpoint import load_model
from train.options import RESUME_FREE, RESUME_WARN
from train.data import SyntheticShapes

EVAL = ["--image-size", "32", "--val-samples", "2", "--crf-eval-iters", "2"]
DCNN_RUN = ["--image-size", "32", "--width", "0.03125", "--num-classes", "4", "--train-samples", "8",
            "--val-samples", "2", "--batch-size", "2", "--eval-batch-size", "2", "--bands", "1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("keep_thread_count")   # the scripts set the thread count


def _run(module, argv):
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


def _picture(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3)).astype(np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------- broken parameters
@pytest.mark.parametrize("value", [float("nan"), 3e38])
def test_broken_crf_parameters_end_in_an_error_not_in_results(tmp_path, value):
    """NaN is refused when the checkpoint is read (naming the parameter); 3e38 is finite, so the
    file loads, but the CRF computes infinities: refused before a metric or a map is written."""
    model = tiny_model()
    with torch.no_grad():
        model.crf.compatibility[1, 2] = value
    models.save_checkpoint(tmp_path / "bad.pt", model)
    expected = "parameter crf.compatibility holds 1 non-finite" if value != value else "crf.compatibility 3e+38"
    r = run_script("evaluate", "--checkpoint", tmp_path / "bad.pt", *EVAL, "--out-dir", tmp_path / "eval")
    assert_one_line_error(r, "bad.pt", expected)
    assert not (tmp_path / "eval" / "metrics.json").exists() and "mIoU" not in r.stdout
    r = run_script("segment", _picture(tmp_path / "in" / "x.png"), "--checkpoint", tmp_path / "bad.pt",
                   "--out-dir", tmp_path / "seg", "--crf-eval-iters", "2")
    assert_one_line_error(r, "bad.pt", expected)
    assert not (tmp_path / "seg" / "labels").exists()


# ----------------------------------------------------------------------------- unreadable files
def test_unreadable_checkpoints_end_in_one_line_naming_the_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    picture = _picture(tmp_path / "in" / "x.png")
    r = run_script("evaluate", "--checkpoint", tmp_path / "empty.pt", *EVAL, "--out-dir", tmp_path / "e")
    assert_one_line_error(r, "empty.pt", "empty (0 bytes)")
    r = run_script("segment", picture, "--checkpoint", tmp_path / "random.pt", "--out-dir", tmp_path / "s")
    line = assert_one_line_error(r, "random.pt", "not a torch.save file")
    assert "weights_only" not in line


def test_a_full_disk_while_saving_ends_in_one_line_and_keeps_no_partial_file(tmp_path):
    """RLIMIT_FSIZE (a file may not grow past 20 kB) stands in for a full disk: the checkpoint
    (90 kB) cannot be written."""
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))

    r = run_script("dcnn", *DCNN_RUN, "--iters", "2", "--out-dir", tmp_path, preexec_fn=small_files)
    assert_one_line_error(r, "could not write", "checkpoint.pt", "File too large", "disk full")
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv"]


# ----------------------------------------------------------------------------- --resume
@pytest.fixture(scope="module")
def stopped_joint_run(tmp_path_factory):
    """A joint.py run stopped after its first joint iteration, and its options."""
    out = tmp_path_factory.mktemp("stopped")
    argv = DCNN_RUN + ["--crf-iters", "2", "--crf-eval-iters", "2", "--pretrain-iters", "2", "--iters", "3",
                       "--out-dir", str(out)]
    assert _run(joint_script, argv + ["--stop-at", "1"]) is None
    return out, argv + ["--resume", str(out / "checkpoint.pt")]


@pytest.mark.parametrize("change", [["--crf-preset", "deeplab"], ["--crf-iters", "3"], ["--lr", "0.01"],
                                    ["--optimizer", "sgd"], ["--threads", "2"], ["--seed", "1"], ["--amp"],
                                    ["--batch-size", "1"], ["--iters", "4"], ["--width", "0.0625"]])
def test_resume_refuses_options_that_change_the_training(stopped_joint_run, change):
    out, argv = stopped_joint_run
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=f"--resume .*{change[0]} .* -> .*--resume-anyway"):
        _run(joint_script, argv + change)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_resume_refusal_is_one_line_and_exit_status_2(stopped_joint_run):
    _, argv = stopped_joint_run
    r = run_script("joint", *argv, "--crf-preset", "deeplab", "--lr", "0.01")
    assert_one_line_error(r, "--crf-preset synthetic -> deeplab", "--lr 0.0001 -> 0.01", "--resume-anyway")


def test_resume_takes_free_options_silently_and_warns_for_the_others(stopped_joint_run, tmp_path, capsys):
    out, argv = stopped_joint_run
    for option in ("out_dir", "no_progress", "workers", "eval_every", "log_every", "ckpt_every", "stop_at"):
        assert option in RESUME_FREE
    assert {"crf_preset", "crf_iters", "lr", "optimizer", "threads"}.isdisjoint(RESUME_FREE + RESUME_WARN)
    other = str(tmp_path / "elsewhere")
    argv = [other if a == str(out) else a for a in argv]               # --out-dir is free
    capsys.readouterr()
    _run(joint_script, argv + ["--eval-batch-size", "1", "--ckpt-every", "7", "--stop-at", "2"])
    said = capsys.readouterr().out
    assert "warning" in said and "--eval-batch-size 2 -> 1" in said
    assert "--ckpt-every" not in said and "--out-dir" not in said
    _run(joint_script, argv[:-2] + ["--resume", other + "/checkpoint.pt", "--lr", "2e-4", "--resume-anyway"])
    said = capsys.readouterr().out
    assert "--lr 0.0001 -> 0.0002" in said and "not an exact continuation" in said
    assert json.loads((tmp_path / "elsewhere" / "metrics.json").read_text())["train"]["iterations"] == 1
    # the new --lr applies: iteration 2 of 3 ran at 2e-4 × the poly factor (the backbone's multiplier is 1)
    with open(tmp_path / "elsewhere" / "metrics.csv", newline="") as f:
        lrs = [float(r["value"]) for r in csv.DictReader(f)
               if (r["stage"], r["iteration"], r["name"]) == ("joint", "3", "lr")]
    assert lrs == [pytest.approx(2e-4 * (1 - 2 / 3) ** 0.9)]


# ----------------------------------------------------------------------------- what it was trained on
def test_every_checkpoint_of_a_run_says_what_it_was_trained_on(stopped_joint_run):
    out, _ = stopped_joint_run
    for name in ("dcnn.pt", "checkpoint.pt"):
        data = load_model(out / name, None).data
        assert data == {"dataset": "synthetic", "class_names": SYNTHETIC_NAMES, "image_size": 32, "data_seed": 0}


def test_a_checkpoint_without_its_data_still_loads(tmp_path):
    save_tiny_checkpoint(tmp_path / "old.pt", data=None)
    net, crf, data = load_model(tmp_path / "old.pt", None)
    assert data is None and net.config["num_classes"] == 4 and crf is not None


def test_the_demo_draws_the_synthetic_set_the_checkpoint_knows(tmp_path):
    """It drew 6-class, 64-px images for a 4-class model trained on 32 px."""
    save_tiny_checkpoint(tmp_path / "m.pt", image_size=32)
    _run(segment_script, ["--checkpoint", tmp_path / "m.pt", "--out-dir", tmp_path / "seg", "--demo", "2",
                          "--crf-eval-iters", "1", "--no-progress"])
    expected = SyntheticShapes(2, size=32, num_classes=4, split="test", seed=0)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "seg" / "inputs" / f"demo_{i}.png")),
                                      expected[i][0])
        assert np.asarray(Image.open(tmp_path / "seg" / "labels" / f"demo_{i}.png")).max() < 4
    save_tiny_checkpoint(tmp_path / "old.pt", data=None)                    # nothing recorded: its classes
    _run(segment_script, ["--checkpoint", tmp_path / "old.pt", "--out-dir", tmp_path / "old", "--demo", "1",
                          "--image-size", "40", "--crf-eval-iters", "1", "--no-progress"])
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "old" / "inputs" / "demo_0.png")),
                                  SyntheticShapes(1, size=40, num_classes=4, split="test", seed=0)[0][0])
    save_tiny_checkpoint(tmp_path / "voc.pt", num_classes=21, data="voc")
    with pytest.raises(ValueError, match="trained on voc .*give image files or folders"):
        _run(segment_script, ["--checkpoint", tmp_path / "voc.pt", "--out-dir", tmp_path / "v"])
    assert not (tmp_path / "v").exists()


def test_scripts_say_when_a_checkpoint_was_trained_on_other_data(tmp_path, capsys):
    save_tiny_checkpoint(tmp_path / "m.pt", image_size=32)
    _run(segment_script, [_picture(tmp_path / "photo.jpg"), "--checkpoint", tmp_path / "m.pt", "--out-dir",
                          tmp_path / "seg", "--crf-eval-iters", "1", "--no-progress"])
    said = capsys.readouterr().out
    assert "note:" in said and "synthetic shapes" in said and "background, ellipse, rectangle, triangle" in said
    from train import evaluate as evaluate_script
    _run(evaluate_script, ["--checkpoint", tmp_path / "m.pt", "--image-size", "48", "--val-samples", "1",
                           "--crf-eval-iters", "1", "--no-progress", "--out-dir", tmp_path / "e"])
    assert "note:" in capsys.readouterr().out


def test_crf_and_dcnn_scripts_record_their_data_too(tmp_path):
    _run(dcnn_script, DCNN_RUN + ["--iters", "1", "--out-dir", tmp_path / "d"])
    assert load_model(tmp_path / "d" / "model.pt", None).data["class_names"] == SYNTHETIC_NAMES
    _run(crf_script, DCNN_RUN + ["--dcnn", tmp_path / "d" / "model.pt", "--iters", "1", "--crf-iters", "1",
                                 "--crf-eval-iters", "1", "--out-dir", tmp_path / "c"])
    assert load_model(tmp_path / "c" / "model.pt", None).data["dataset"] == "synthetic"


def test_resume_refuses_another_scripts_checkpoint(stopped_joint_run, tmp_path):
    """A joint.py run continued by crf.py (or dcnn.py) would take its stages and schedule for its
    own: refused, naming the script that wrote it (crf.py's checkpoint in joint.py was a KeyError
    traceback)."""
    out, argv = stopped_joint_run
    resume = ["--resume", str(out / "checkpoint.pt"), "--out-dir", str(tmp_path / "other")]
    for script in (crf_script, dcnn_script):
        with pytest.raises(ValueError, match="continues a run of train/joint.py .*resume it with that script"):
            _run(script, DCNN_RUN + resume)
    assert not (tmp_path / "other").exists()
    r = run_script("crf", *DCNN_RUN, *resume)
    assert_one_line_error(r, "continues a run of train/joint.py", "not train/crf.py")


def test_a_resumed_run_logs_the_loss_an_uninterrupted_one_logs(tmp_path):
    """The mean loss of a log interval that a stop cut in two is the uninterrupted run's (the
    interval's sum and count travel in the checkpoint), in metrics.csv and metrics.json."""
    argv = DCNN_RUN + ["--crf-iters", "2", "--crf-eval-iters", "2", "--pretrain-iters", "2", "--iters", "4",
                       "--log-every", "3"]
    _run(joint_script, argv + ["--out-dir", tmp_path / "straight"])
    _run(joint_script, argv + ["--out-dir", tmp_path / "cut", "--stop-at", "2"])
    _run(joint_script, argv + ["--out-dir", tmp_path / "cut", "--resume", tmp_path / "cut" / "checkpoint.pt"])

    def logged(run):
        with open(tmp_path / run / "metrics.csv", newline="") as f:
            rows = [(r["stage"], r["iteration"], float(r["value"])) for r in csv.DictReader(f) if r["name"] == "loss"]
        return rows, json.loads((tmp_path / run / "metrics.json").read_text())["train"]["loss"]

    straight, cut = logged("straight"), logged("cut")
    assert [r[:2] for r in straight[0]] == [("dcnn", "2"), ("joint", "3"), ("joint", "4")]
    assert cut == straight
