"""The scripts' command lines: every script's --help (train/ and bench/) shows a real default or
none, never "(default: None)"; every option says what it does; evaluate.py and segment.py take no
training option; the per-dataset defaults --help shows are the values the scripts use."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from train import crf as crf_script
from train import dcnn as dcnn_script
from train import engine, options
from train import joint as joint_script
from train import segment as segment_script

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(str(p.relative_to(REPO)) for folder in ("train", "bench") for p in (REPO / folder).glob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text())

# Load each script as `python SCRIPT` would (its folder first on sys.path, not as __main__) and
# report its parser: the --help text and, per option, its flags and help string.
_DUMP = r"""
import importlib.util, json, sys
out = {}
for path in sys.argv[1:]:
    folder = path.rsplit("/", 1)[0]
    sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location("script_" + path.replace("/", "_")[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.get_args_parser()
    out[path] = {"help": parser.format_help(),
                 "options": [[a.option_strings or [a.dest], a.help] for a in parser._actions]}
print(json.dumps(out))
"""

# Options that only a training run uses.
TRAINING_ONLY = {
    "--sbd-root", "--train-split", "--train-samples", "--crop-size", "--min-scale", "--max-scale",
    "--no-flip", "--variant", "--width", "--msc", "--dropout", "--vgg-weights", "--iters", "--batch-size",
    "--lr", "--optimizer", "--momentum", "--weight-decay", "--classifier-lr-mult", "--lr-policy",
    "--lr-step", "--lr-gamma", "--poly-power", "--dcnn-loss", "--crf-iters", "--crf-lr-mult",
    "--crf-weight-decay", "--seed", "--resume", "--ckpt-every", "--eval-every", "--log", "--log-every",
    "--stop-at", "--init", "--pretrain-iters", "--pretrain-lr", "--unary-loss-weight", "--freeze-crf",
}


@pytest.fixture(scope="module")
def parsers():
    """{script path: {"help", "options"}} for every script in train/ and bench/, from one process."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)      # the scripts must find the repository by themselves
    r = subprocess.run([sys.executable, "-c", _DUMP] + SCRIPTS, cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_script_is_covered(parsers):
    assert {"train/joint.py", "train/dcnn.py", "train/crf.py", "train/evaluate.py", "train/segment.py",
            "bench/crf.py", "bench/lattice.py", "bench/model.py", "bench/crf_accuracy.py"} <= set(parsers)


def test_no_help_prints_default_none(parsers):
    for path, p in parsers.items():
        text = " ".join(p["help"].split())
        assert "default: None" not in text and "default: none" not in text, path


def test_every_option_has_a_help_text(parsers):
    for path, p in parsers.items():
        bare = [flags for flags, text in p["options"] if not (text or "").strip()]
        assert not bare, f"{path}: options without help: {bare}"


@pytest.mark.parametrize("script", ["train/evaluate.py", "train/segment.py"])
def test_evaluation_scripts_take_no_training_option(parsers, script):
    flags = {f for flags, _ in parsers[script]["options"] for f in flags}
    assert not flags & TRAINING_ONLY, sorted(flags & TRAINING_ONLY)
    assert TRAINING_ONLY <= {f for flags, _ in parsers["train/joint.py"]["options"] for f in flags}


def _finalized(module, dataset):
    argv = ["--dataset", dataset] + (["--data-root", "VOC"] if dataset == "voc" else [])
    return vars(options.finalize(module.get_args_parser().parse_args(argv)))


@pytest.mark.parametrize("module", [joint_script, crf_script, dcnn_script], ids=lambda m: m.__name__)
def test_help_shows_the_value_each_dataset_runs_with(module):
    """Where the two datasets' defaults differ, --help names both, as finalize resolves them."""
    text = " ".join(module.get_args_parser().format_help().split())
    syn, voc = _finalized(module, "synthetic"), _finalized(module, "voc")
    differing = [k for k in syn if k not in ("dataset", "data_root", "bilateral", "spatial") and syn[k] != voc[k]]
    assert {"iters", "batch_size", "width", "optimizer"} <= set(differing)
    for k in differing:
        shown = options.PerDataset(synthetic=syn[k], voc=voc[k])
        assert f"(default: {' '.join(str(shown).split())})" in text, k


def test_a_preset_may_depend_on_the_script():
    syn, voc = _finalized(joint_script, "synthetic"), _finalized(joint_script, "voc")
    assert (syn["iters"], syn["lr"], voc["iters"]) == (300, 1e-4, options.PRESETS["voc"]["iters"]["joint"])
    assert _finalized(dcnn_script, "synthetic")["iters"] == 1500
    syn = _finalized(crf_script, "synthetic")
    assert syn["iters"] == 60 and syn["search_w1"] == [3, 5, 10]
    assert (syn["bilateral"], syn["spatial"]) == ([40.0, 24.0, 10.0], [3.0, 3.0])   # the synthetic preset
    assert _finalized(crf_script, "voc")["bilateral"] == [121.0, 5.0, 4.0]           # DeepLab's


def test_a_preset_row_must_cover_every_dataset_and_script():
    p = options.parser("test")
    p.add_argument("--only-here", type=int, help="an option the presets know for one dataset only")
    with pytest.raises(KeyError, match="--only-here"):
        options.set_presets(p, "joint", {"synthetic": {"only_here": 1}, "voc": {}})
    with pytest.raises(KeyError, match="--only-here has no value for joint"):
        options.set_presets(p, "joint", {"synthetic": {"only_here": {"dcnn": 1}}, "voc": {"only_here": 2}})


def test_an_option_has_one_default():
    """An option with a row in PRESETS has none in its declaration: two would disagree some day."""
    p = options.parser("test")
    p.add_argument("--iters", type=int, default=10, help="a second default")
    with pytest.raises(ValueError, match="--iters has a default in its declaration and in PRESETS"):
        options.set_presets(p, "joint")


def test_choices_match_what_the_engine_does():
    help_text = " ".join(joint_script.get_args_parser().format_help().split())
    assert "--crf-loss {" + ",".join(engine.CRF_LOSSES) + "}" in help_text


def test_choices_come_from_the_library():
    import models

    help_text = joint_script.get_args_parser().format_help()
    assert "{" + ",".join(models.VARIANTS) + "}" in help_text
    assert "--vgg-weights" in help_text           # the flag models' download hint names


def test_scripts_run_as_modules_from_the_repo_root():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    r = subprocess.run([sys.executable, "-m", "train.joint", "--help"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and re.search(r"--iters ITERS", r.stdout), r.stderr


@pytest.mark.parametrize("bad, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--crf-lr-mult", "-1"], "--crf-lr-mult must be a finite number >= 0"),
    (["--crop-size", "-1"], "--crop-size must be a finite number >= 0"),
    (["--threads", "-2"], "--threads must be a finite number >= 0"),
    (["--stop-at", "-1"], "--stop-at must be >= 1"),
    (["--bands", "-1", "0"], "--bands widths must be finite and >= 0, got -1.0"),
    (["--dropout", "1.5"], "--dropout must be < 1, got 1.5"),
    (["--width", "0"], "--width must be a finite number > 0"),
    (["--seed", "-1"], "--seed must be a finite number >= 0"),
    (["--seed", str(2 ** 64)], "--seed must be < 9.22337e\\+18"),
    (["--max-scale", "inf"], "--max-scale must be a finite number > 0, got inf"),
    (["--poly-power", "-1"], "--poly-power must be a finite number >= 0"),
    (["--lr-gamma", "-1"], "--lr-gamma must be a finite number > 0"),
    (["--unary-loss-weight", "nan"], "--unary-loss-weight must be a finite number >= 0"),
])
def test_bad_numbers_are_refused_when_the_options_are_read(bad, message):
    """Before any work: such values used to surface after the DCNN stage (or as torch's
    'Invalid learning rate'), or were taken silently (a negative crop size, thread count)."""
    with pytest.raises(ValueError, match=message):
        options.finalize(joint_script.get_args_parser().parse_args(bad))


@pytest.mark.parametrize("bad, message", [
    (["--crf-iters", "-1"], "bad CRF options .*num_iterations must be an int in 0..1000, got -1"),
    (["--bilateral", "nan", "3", "5"], "bad CRF options .*bilateral sigma_xy must be a positive finite number"),
])
def test_bad_crf_options_are_refused_when_the_crf_is_built_before_any_work(bad, message, tmp_path):
    """The layer checks its own arguments; crf.py and joint.py build it first thing."""
    with pytest.raises(ValueError, match=message):
        engine.build_crf(options.finalize(joint_script.get_args_parser().parse_args(bad)))
    with pytest.raises(ValueError, match=message):
        joint_script.main(joint_script.get_args_parser().parse_args(bad + ["--out-dir", str(tmp_path / "j")]))
    assert not (tmp_path / "j").exists()


def test_bad_values_and_missing_inputs_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    """A bad option, a missing input file, a missing package: refused before the output folder
    is made (it used to hold metrics.csv, which then refused the corrected run)."""
    out = tmp_path / "j"
    for bad, error, message in ((["--dropout", "1.5"], ValueError, "--dropout must be < 1"),
                                (["--vgg-weights", str(tmp_path / "missing.pth")], FileNotFoundError, "no such file"),
                                (["--init", str(tmp_path / "none.pt")], FileNotFoundError, "--init .* no such file")):
        with pytest.raises(error, match=message):
            joint_script.main(joint_script.get_args_parser().parse_args(bad + ["--out-dir", str(out)]))
        assert not out.exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # as if not installed
    with pytest.raises(ValueError, match="--log tensorboard needs the tensorboard package"):
        joint_script.main(joint_script.get_args_parser().parse_args(["--log", "tensorboard", "--out-dir", str(out)]))
    assert not out.exists()
    for script, bad, message in ((crf_script, ["--search-samples", "0"], "--search-samples must be >= 1"),
                                 (segment_script, ["--alpha", "nan"], "--alpha must be a finite number >= 0, got nan"),
                                 (segment_script, ["--alpha", "2"], "--alpha must be <= 1, got 2"),
                                 (segment_script, ["--alpha", "-1"], "--alpha must be a finite number >= 0")):
        with pytest.raises(ValueError, match=message):
            options.finalize(script.get_args_parser().parse_args(bad))
