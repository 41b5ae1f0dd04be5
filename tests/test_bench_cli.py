"""The benchmarks' --json: a file that exists is replaced only with --overwrite, refused before
anything is measured; bad input ends in one line."""
import argparse
import json
import platform
import subprocess
import sys

import pytest

from script_helpers import REPO, assert_one_line_error, script_env

sys.path.insert(0, str(REPO / "bench"))
from common import VOC_ROOT, check_json_target  # noqa: E402

VOC_AT_HAND = VOC_ROOT.is_dir()

TINY = ["--sizes", "32", "--batch", "1", "--modes", "infer", "--crf-iterations", "--repeats", "1",
        "--warmup", "0", "--width", "0.03125", "--num-classes", "3"]


def bench(*argv):
    return subprocess.run([sys.executable, "bench/model.py", *map(str, argv)], cwd=REPO, env=script_env(),
                          capture_output=True, text=True, timeout=300)


def test_json_is_never_written_over_a_file_without_overwrite(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("an earlier measurement")
    r = bench(*TINY, "--json", target)
    assert_one_line_error(r, "results.json exists", "--overwrite")
    assert target.read_text() == "an earlier measurement" and "images/s" not in r.stdout
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_json_target(argparse.Namespace(json=str(tmp_path / "missing" / "r.json"), overwrite=True))
    r = bench(*TINY, "--json", target, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads(target.read_text())["benchmark"] == "model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]     # no temporary file left


def test_crf_training_bench_times_every_job_and_reports_the_ratios(tmp_path):
    """bench/crf_training.py at one iteration and one round: every job timed, the ratios those
    times give, the JSON written; a bad option ends in one line."""
    target = tmp_path / "training.json"
    glibc = platform.libc_ver()[0] == "glibc"
    r = subprocess.run([sys.executable, "bench/crf_training.py", "--iterations", "1", "--rounds", "1",
                        "--threads", "1", "--json", target] + ["--keep-large-blocks"] * glibc, cwd=REPO,
                       env=script_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(target.read_text())
    assert out["keep_large_blocks"] == glibc
    wall = {name: m["wall_ms"] for name, m in out["medians"].items()}
    assert out["ratios_wall_time"]["fused forward+backward / fused forward"] == pytest.approx(
        wall["fused forward+backward"] / wall["fused forward (no grad)"])
    cpu = {name: m["cpu_ms"] for name, m in out["medians"].items()}
    assert sorted(cpu) == ["fused forward (no grad)", "fused forward+backward", "fused forward+backward, recomputing Q",
                           "step-by-step forward+backward"]
    assert all(len(t["wall_ms"]) == 1 and t["wall_ms"][0] > 0 for t in out["times"].values())
    assert out["ratios_cpu_time"]["step-by-step / fused forward+backward"] == pytest.approx(
        cpu["step-by-step forward+backward"] / cpu["fused forward+backward"])
    r = subprocess.run([sys.executable, "bench/crf_training.py", "--rounds", "0"], cwd=REPO, env=script_env(),
                       capture_output=True, text=True, timeout=300)
    assert_one_line_error(r, "--rounds")


def test_crf_bench_sums_up_each_ratio_over_the_images(tmp_path):
    """bench/crf.py on two small images: the summary's median, range and count of images meeting
    each target are those of the per-image ratios; --images beyond the data at hand is refused."""
    target = tmp_path / "crf.json"
    r = subprocess.run([sys.executable, "bench/crf.py", "--size", "64", "48", "--images", "2", "--batch", "1",
                        "--iterations", "1", "--repeats", "1", "--skip-step", "--json", target],
                       cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(target.read_text())
    assert "Over the images" in r.stdout
    summary = {row["ratio"]: row for row in out["summary"]}
    assert "fwd+bwd / fwd" in summary
    for name, row in summary.items():
        values = [ratio[name] for ratio in out["ratios"]]
        assert len(values) == 2 and row["median"] == pytest.approx(sum(values) / 2)
        assert (row["min"], row["max"]) == (min(values), max(values))
    fwd_bwd = [ratio["fwd+bwd / fwd"] for ratio in out["ratios"]]
    assert summary["fwd+bwd / fwd"]["images meeting it"] == f"{sum(v <= 1.6 for v in fwd_bwd)}/2"
    for images, message in [(0, "--images must be >= 1")] + [(1000, "--images must be <=")] * VOC_AT_HAND:
        r = subprocess.run([sys.executable, "bench/crf.py", "--images", str(images)], cwd=REPO, env=script_env(),
                           capture_output=True, text=True, timeout=300)
        assert_one_line_error(r, message)


def test_dense_nd_bench_compares_every_case_with_densecrf(tmp_path):
    """bench/dense_nd.py on a tiny volume and point cloud: every case timed beside densecrf, the
    ratio those times give, labels compared and accuracies against the truth reported; a bad size
    ends in one line."""
    pytest.importorskip("pydensecrf.densecrf")
    target = tmp_path / "nd.json"
    r = subprocess.run([sys.executable, "bench/dense_nd.py", "--volume", "6", "12", "14", "--modalities", "1", "2",
                        "--classes", "2", "3", "--points", "600", "--repeats", "1", "--threads", "1", "--json", target],
                       cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(target.read_text())["rows"]
    assert [row["case"].split(",")[0] for row in rows] == ["volume 6x12x14"] * 4 + ["point cloud 600"] * 2
    for row in rows:
        assert row["densecrf / ours"] == pytest.approx(row["densecrf ms"] / row["ours ms"])
        assert row["labels = densecrf %"] >= 99.0 and 0 <= row["acc unary %"] <= 100
    r = subprocess.run([sys.executable, "bench/dense_nd.py", "--volume", "0", "4", "4"], cwd=REPO, env=script_env(),
                       capture_output=True, text=True, timeout=300)
    assert_one_line_error(r, "--volume")


@pytest.mark.data
@pytest.mark.skipif(not VOC_AT_HAND, reason="bench/classes.py pads the real VOC images' scores (../shared/data)")
def test_classes_bench_times_every_case_and_sweeps(tmp_path):
    """bench/classes.py on two shrunken VOC images: every case and class count timed (ours exact,
    pruned, densecrf) with its ratios, agreement and senders; --sweep reports per prune value; a
    bad option ends in one line."""
    pytest.importorskip("pydensecrf.densecrf")
    target = tmp_path / "classes.json"
    common = ["--images", "2", "--downscale", "4", "--iterations", "2", "--repeats", "1", "--threads", "1"]
    r = subprocess.run([sys.executable, "bench/classes.py", *common, "--classes", "2,30", "--json", target],
                       cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    results = json.loads(target.read_text())["results"]
    assert [(r["case"], r["C"]) for r in results] == [("padded", 2), ("padded", 30), ("random", 2), ("random", 30)]
    for result in results:
        row = result["summary"]
        assert row["densecrf/pruned"] == pytest.approx(row["densecrf ms"] / row["pruned ms"])
        assert row["pruned agree %"] == min(image["pruned agree %"] for image in result["per_image"])
        assert len(row["senders"].split("/")) == 2
        assert row["exact agree %"] > 99.0
    r = subprocess.run([sys.executable, "bench/classes.py", *common, "--classes", "30", "--cases", "padded",
                        "--sweep", "7e-4,0.07", "--learned", "--json", target, "--overwrite"],
                       cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(target.read_text())["sweep"]
    assert [(row["matrices"], row["prune"]) for row in rows] == [("potts", 7e-4), ("potts", 0.07), ("learned", 7e-4),
                                                                 ("learned", 0.07)]
    assert all(row["worst agree %"] > 99.0 for row in rows)
    r = subprocess.run([sys.executable, "bench/classes.py", "--cases", "odd"], cwd=REPO, env=script_env(),
                       capture_output=True, text=True, timeout=300)
    assert_one_line_error(r, "--cases")


#: The benchmarks that ../shared/gpu-check.sh runs with --device cuda on a GPU machine.
GPU_CHECK_BENCHES = ["lattice", "crf", "model", "crf_accuracy", "crf_training", "classes", "dense_nd"]


@pytest.mark.parametrize("name", GPU_CHECK_BENCHES)
def test_the_gpu_checks_benches_take_device(name):
    """Each takes --device (a missing option would end the GPU check's one call with a usage
    error) and, without a GPU, says so in one line before measuring anything."""
    r = subprocess.run([sys.executable, f"bench/{name}.py", "--device", "cuda"], cwd=REPO,
                       env=dict(script_env(), CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=300)
    assert_one_line_error(r, "--device cuda asked for, but no CUDA GPU is visible")
