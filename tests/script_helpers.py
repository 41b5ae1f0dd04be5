"""Running the train/ scripts as a user does (a separate process, from the repository root) and
checking how they end; tiny checkpoints to run them with."""
import os
import subprocess
import sys
from pathlib import Path

import torch

import models
from train import engine, options

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_NAMES = ["background", "ellipse", "rectangle", "triangle"]


def script_env(**extra):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)      # the scripts must find the repository by themselves
    env.pop("CRFRNN_TRACEBACK", None)
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def run_script(script, *argv, timeout=300, **kwargs):
    """``python train/SCRIPT.py ARGV...`` from the repository root, output captured."""
    return subprocess.run([sys.executable, f"train/{script}.py", *map(str, argv)], cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def assert_one_line_error(result, *fragments):
    """The script ended with exit status 2 and one line on stderr, ``error: ...``, holding every
    one of ``fragments`` (and no traceback)."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def tiny_model(num_classes=4, crf=True):
    """A width-1/32 DeepLab (+ a CRF with the synthetic preset, 2 iterations)."""
    torch.manual_seed(0)
    net = models.deeplab("largefov", num_classes=num_classes, width=1 / 32)
    if not crf:
        return net
    preset = options.CRF_PRESETS["synthetic"]
    return models.DeepLabCRF(net, engine.crf_layer(num_classes, preset["bilateral"], preset["spatial"], 2, 2))


def save_tiny_checkpoint(path, num_classes=4, crf=True, data="synthetic", image_size=32):
    """A checkpoint of :func:`tiny_model`, recording its training data (``data``: "synthetic",
    "voc", or None for a checkpoint from before the data was recorded)."""
    extra = {}
    if data == "synthetic":
        extra["data"] = {"dataset": "synthetic", "class_names": SYNTHETIC_NAMES[:num_classes],
                         "image_size": image_size, "data_seed": 0}
    elif data == "voc":
        from train.data import VOC_CLASSES
        extra["data"] = {"dataset": "voc", "class_names": list(VOC_CLASSES)}
    models.save_checkpoint(path, tiny_model(num_classes, crf), **extra)
    return Path(path)
