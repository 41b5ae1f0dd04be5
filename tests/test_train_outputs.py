"""Where the scripts write: inside --out-dir only, never over a file they did not create in the
run (an earlier run's without --overwrite, an input never), every input of segment.py with its
own outputs; what they say about it (the "wrote" line, progress on a terminal only)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from script_helpers import assert_one_line_error, run_script, save_tiny_checkpoint
from train import segment as segment_script
from train.process import OutputDir

TINY_RUN = ["--image-size", "32", "--width", "0.03125", "--num-classes", "4", "--train-samples", "8",
            "--val-samples", "2", "--batch-size", "2", "--eval-batch-size", "2", "--bands", "1", "3",
            "--crf-iters", "2", "--crf-eval-iters", "2", "--examples", "2"]


pytestmark = pytest.mark.usefixtures("keep_thread_count")   # the scripts set the thread count


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


def _tree(folder: Path) -> dict:
    """{relative path: bytes} of every file under ``folder``."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _picture(path, seed, size=(20, 24)):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = {".jpg": "JPEG", ".bmp": "BMP"}.get(path.suffix.lower(), "PNG")
    Image.fromarray(rng.integers(0, 255, size + (3,)).astype(np.uint8)).save(path, format=fmt)


# ----------------------------------------------------------------------------- OutputDir
def test_output_dir_keeps_inside_its_folder(tmp_path):
    out = OutputDir(tmp_path / "out", overwrite=False)
    for bad in ("../x.png", "/etc/x.png", "a/../../x.png", "", ".", "a/.."):
        with pytest.raises(ValueError, match="inside"):
            out.claim(bad)
    assert out.claim("..png") == tmp_path / "out" / "..png"          # a name, not a way out
    assert out.claim("a/b.png") == tmp_path / "out" / "a" / "b.png"
    assert not (tmp_path / "x.png").exists()


def test_output_dir_replaces_only_its_own_files(tmp_path):
    (tmp_path / "old.json").write_text("earlier run")
    (tmp_path / "input.png").write_text("input")
    out = OutputDir(tmp_path, overwrite=False, protect=[tmp_path / "input.png"])
    with pytest.raises(FileExistsError, match="old.json exists.*--overwrite"):
        out.check_free(["new.json", "old.json"])
    new = out.claim("new.json")
    new.write_text("1")
    assert out.claim("new.json") == new                            # its own: again and again
    assert out.claimed == [new]
    again = OutputDir(tmp_path, overwrite=True, protect=[str(tmp_path / "." / "input.png")])
    assert again.claim("old.json") == tmp_path / "old.json"
    with pytest.raises(FileExistsError, match="input.png is an input of this run.*never replaced"):
        again.claim("input.png")
    with pytest.raises(FileExistsError, match="is a folder"):
        (tmp_path / "d").mkdir()
        again.claim("d")
    kept = OutputDir(tmp_path, overwrite=False, keep=["old.json"])                   # a resumed run's own file
    assert kept.claim("old.json") == tmp_path / "old.json"


# ----------------------------------------------------------------------------- segment.py
def test_segment_gives_every_input_its_own_outputs_inside_out_dir(checkpoint, tmp_path):
    """The cases that lost files: cat.jpg and cat.png collided, the overlay of dog.jpg replaced
    the input dog_overlay.png (--out-dir = the input folder), ``..png`` wrote <out-dir>.png."""
    src = tmp_path / "photos"
    names = ["cat.jpg", "cat.png", "CAT.bmp", "dog.jpg", "dog_overlay.png", "..png", "a.b.png"]
    for k, name in enumerate(names):
        _picture(src / name, k)
    _picture(tmp_path / "x" / "cat.jpg", 10)                         # same file name, other folder
    inputs = _tree(src)
    outside = sorted(p.name for p in tmp_path.iterdir())
    written = segment_script.main(segment_script.get_args_parser().parse_args(
        [str(src), str(tmp_path / "x" / "cat.jpg"), str(src / "dog.jpg"),   # dog.jpg twice: once
         "--checkpoint", str(checkpoint), "--out-dir", str(src), "--crf-eval-iters", "1", "--no-progress"]))
    assert {k: v for k, v in _tree(src).items() if k in inputs} == inputs     # no input touched
    assert sorted(p.name for p in tmp_path.iterdir()) == outside              # nothing beside it
    labels = sorted(str(p.relative_to(src / "labels")) for p in (src / "labels").rglob("*.png"))
    assert labels == sorted(["photos/cat.jpg.png", "x/cat.jpg.png", "cat.png.png", "CAT.bmp.png", "dog.png",
                             "dog_overlay.png", "..png", "a.b.png"])
    assert len(written) == 2 * len(labels) and len(set(written)) == len(written)
    assert all(str(p.resolve()).startswith(str(src.resolve()) + os.sep) for p in written)


def test_segment_output_names_follow_the_documented_rule():
    names = segment_script.output_names
    assert names([Path("/p/cat.jpg"), Path("/p/dog.png")]) == ["cat", "dog"]
    assert names([Path("/p/cat.jpg"), Path("/p/cat.png"), Path("/p/dog.png")]) == ["cat.jpg", "cat.png", "dog"]
    assert names([Path("/a/x/cat.jpg"), Path("/b/x/cat.jpg")]) == ["a/x/cat.jpg", "b/x/cat.jpg"]
    assert names([Path("/a/cat.jpg"), Path("/cat.jpg")]) == ["a/cat.jpg", "cat.jpg"]
    with pytest.raises(ValueError, match="letter case"):
        names([Path("/p/Cat.jpg"), Path("/p/cat.jpg")])


def test_segment_never_replaces_an_earlier_runs_files_nor_an_input(checkpoint, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    _picture(src / "a.png", 0)
    _picture(src / "b.jpg", 1)
    argv = [src, "--checkpoint", checkpoint, "--out-dir", out, "--crf-eval-iters", "1", "--no-progress"]
    run = lambda *more: segment_script.main(segment_script.get_args_parser().parse_args(  # noqa: E731
        [str(a) for a in argv + list(more)]))
    run()
    before = _tree(out)
    again = run_script("segment", *argv)                                 # the same command again
    assert_one_line_error(again, "labels/a.png exists", "--overwrite")
    assert _tree(out) == before
    # a file of someone else's in the way: refused before anything is written
    (out / "overlays" / "b.png").write_bytes(b"mine")
    (out / "labels" / "a.png").unlink()
    with pytest.raises(FileExistsError, match="overlays/b.png exists"):
        run()
    assert (out / "overlays" / "b.png").read_bytes() == b"mine" and not (out / "labels" / "a.png").exists()
    run("--overwrite")
    assert (out / "overlays" / "b.png").read_bytes() != b"mine"
    # an input where an output goes: never replaced, not even with --overwrite
    inside = out / "labels" / "a.png"
    data = inside.read_bytes()
    with pytest.raises(FileExistsError, match="is an input of this run.*never replaced"):
        segment_script.main(segment_script.get_args_parser().parse_args(
            [str(inside), "--checkpoint", str(checkpoint), "--out-dir", str(out), "--overwrite"]))
    assert inside.read_bytes() == data


def test_segment_adds_the_outputs_of_other_inputs_beside_an_earlier_runs(checkpoint, tmp_path):
    """One --out-dir may collect the segmentations of several runs: a run whose outputs have other
    names than the files there starts, writes its own, and leaves the earlier run's as they were."""
    out = tmp_path / "out"
    _picture(tmp_path / "first" / "a.png", 0)
    _picture(tmp_path / "second" / "b.png", 1)
    for folder in ("first", "second"):
        segment_script.main(segment_script.get_args_parser().parse_args(
            [str(tmp_path / folder), "--checkpoint", str(checkpoint), "--out-dir", str(out), "--crf-eval-iters", "1",
             "--no-progress"]))
        if folder == "first":
            first = _tree(out)
    after = _tree(out)
    assert sorted(after) == ["labels/a.png", "labels/b.png", "overlays/a.png", "overlays/b.png"]
    assert {k: after[k] for k in first} == first


# ----------------------------------------------------------------------------- the training scripts
def test_a_training_run_refuses_an_earlier_runs_folder_and_lists_what_it_wrote(tmp_path):
    """Logs go to a file: no progress-bar redraws there, a line now and then instead; the final
    line lists every file written; the same command again refuses before training."""
    argv = TINY_RUN + ["--pretrain-iters", "2", "--iters", "2", "--log-every", "1", "--out-dir", tmp_path]
    r = run_script("joint", *argv)                       # stdout and stderr are pipes, not a terminal
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "it/s" not in r.stderr             # no bar redraws in the log
    assert "[dcnn] iteration 2/2: loss" in r.stdout and "[joint] iteration 2/2: loss" in r.stdout
    wrote = [line for line in r.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(["bands.png", "checkpoint.pt", "dcnn.pt", "examples.png", "metrics.csv",
                            "metrics.json", "model.pt"])
    for name in files:
        assert name in wrote[0], name
    before = _tree(tmp_path)
    again = run_script("joint", *argv)
    assert_one_line_error(again, "exists", "--overwrite")
    assert _tree(tmp_path) == before
    assert "stage 1" not in again.stdout                              # refused before any work


def test_overwrite_replaces_an_earlier_run_and_starts_its_log_afresh(tmp_path):
    from train import dcnn as dcnn_script
    argv = ["--image-size", "32", "--width", "0.03125", "--num-classes", "4", "--train-samples", "8",
            "--val-samples", "2", "--batch-size", "2", "--eval-batch-size", "2", "--iters", "2", "--no-progress",
            "--log-every", "1", "--out-dir", str(tmp_path)]
    run = lambda extra: dcnn_script.main(dcnn_script.get_args_parser().parse_args(argv + extra))  # noqa: E731
    run([])
    with pytest.raises(FileExistsError):
        run([])
    run(["--overwrite"])
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert sum(",dcnn,2,loss," in r for r in rows) == 1               # one run's rows, not two
    assert json.loads((tmp_path / "metrics.json").read_text())["train"]["iterations"] == 2


def test_a_training_run_never_replaces_the_checkpoint_it_reads_even_with_overwrite(tmp_path, checkpoint):
    """--init (and --dcnn, --checkpoint, --vgg-weights) name inputs: an --out-dir that holds
    them is refused before any work, --overwrite or not."""
    from train import dcnn as dcnn_script
    tmp_path.joinpath("model.pt").write_bytes(checkpoint.read_bytes())
    before = _tree(tmp_path)
    argv = TINY_RUN[:4] + ["--iters", "2", "--no-progress", "--overwrite", "--out-dir", str(tmp_path),
                           "--init", str(tmp_path / "model.pt")]
    with pytest.raises(FileExistsError, match="is an input of this run"):
        dcnn_script.main(dcnn_script.get_args_parser().parse_args(argv))
    assert _tree(tmp_path) == before


def test_an_empty_out_dir_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch):
    from train import dcnn as dcnn_script
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--out-dir is empty"):
        dcnn_script.main(dcnn_script.get_args_parser().parse_args(TINY_RUN[:4] + ["--iters", "2", "--out-dir", ""]))
    assert list(tmp_path.iterdir()) == []


def test_two_runs_into_one_folder_at_once_refuse_rather_than_interleave(checkpoint, tmp_path):
    """Both could find the folder free when they start: the first to open it holds a lock on it
    while it runs (here another process stands in for it), and the second says so in one line,
    writing nothing."""
    busy = tmp_path / "busy"
    busy.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); "
                               "time.sleep(120)", str(busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = run_script("segment", "--checkpoint", checkpoint, "--demo", "1", "--out-dir", busy, "--no-progress")
        assert_one_line_error(r, "another run is writing to", "busy")
        assert list(busy.iterdir()) == []
    finally:
        holder.kill()
        holder.wait()


def test_segment_reads_every_input_before_writing_anything(checkpoint, tmp_path):
    """An unreadable input among good ones ends the run before its first output (the good ones'
    outputs would then refuse the corrected run)."""
    good = tmp_path / "in" / "good.png"
    _picture(good, 0)
    bad = tmp_path / "in" / "bad.png"
    bad.write_text("not an image")
    r = run_script("segment", good, bad, "--checkpoint", checkpoint, "--out-dir", tmp_path / "out", "--no-progress",
                   "--crf-eval-iters", "2")
    assert_one_line_error(r, "bad.png")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_an_out_dir_below_a_file_is_refused_in_one_line(checkpoint, tmp_path):
    (tmp_path / "afile").write_text("mine")
    r = run_script("segment", "--checkpoint", checkpoint, "--demo", "1", "--out-dir", tmp_path / "afile" / "sub",
                   "--no-progress")
    assert_one_line_error(r, "afile is a file, not a folder")
    assert (tmp_path / "afile").read_text() == "mine"


def test_crf_options_for_a_checkpoint_with_its_own_crf_are_not_taken_silently(checkpoint, tmp_path):
    r = run_script("segment", "--checkpoint", checkpoint, "--demo", "1", "--out-dir", tmp_path / "s",
                   "--no-progress", "--bilateral", "3", "5", "1")
    assert r.returncode == 0 and "the checkpoint has its own CRF, which runs as trained" in r.stdout, r.stderr
