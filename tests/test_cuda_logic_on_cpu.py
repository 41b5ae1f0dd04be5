"""The CUDA backend's logic, checked on the CPU: no GPU needed.

tests/cuda_emulation/harness.cpp compiles the per-thread bodies of the CUDA kernels
(crfrnn/csrc/cuda/lattice_device.cuh, with lattice_math.h and lattice_filter_steps.h) with the
host C++ compiler and replays the CUDA launcher's sequence, running each kernel's indices one at
a time in a random order (the stand-in for the GPU's unordered threads and racing hash inserts). Its lattice tables, weights
and float filter outputs (forward and adjoint) must equal the C++ CPU backend's bit for bit, as
the real GPU's must (tests/test_lattice.py, marked `cuda`). See the harness's header for
what this cannot check (real atomics and memory ordering, the GPU's own float code generation).

The harness is compiled once per session (a few seconds), with AddressSanitizer and UBSan when
the compiler supports them, so an out-of-bounds index in a kernel body fails here too.
"""
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import crfrnn
from crfrnn import ops
from helpers import LATTICE_TABLES, POINTS, clustered_points, integer_points, randn, voc_rgb

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "tests" / "cuda_emulation" / "harness.cpp"
CSRC = REPO / "crfrnn" / "csrc"
DTYPE_CODE = {torch.float64: 0, torch.float32: 1}
EXIT_OVERFLOW = 3

pytestmark = pytest.mark.skipif(not ops.has_native_kernel("cpu"),
                                reason="the compiled C++ extension (crfrnn._C) is not built: nothing to compare with")


def find_compiler():
    """The C++ compiler: $CXX, else g++, else c++; None when there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    """Path of the compiled harness (sanitized build if the toolchain links one, plain otherwise)."""
    compiler = find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler found ($CXX, g++ or c++) to build the CUDA-logic harness")
    out = tmp_path_factory.mktemp("cuda_emulation") / "harness"
    # -ffp-contract=off: no fused multiply-add, as the extension's builds (nvcc --fmad=false).
    base = [compiler, "-std=c++17", "-O1", "-ffp-contract=off", "-Wall", "-Wextra",
            f"-I{CSRC}", str(HARNESS), "-o", str(out)]
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    errors = []
    for flags in (sanitize, []):
        result = subprocess.run(base[:1] + flags + base[1:], capture_output=True, text=True, timeout=300)
        if result.returncode == 0:
            return out
        errors.append(result.stderr[-3000:])
    raise AssertionError("the CUDA-logic harness does not compile:\n" + errors[-1])


def run_harness(binary, workdir, features, values, seed, capacity=0):
    """Run the harness on features Tensor[N, P, d] (float32/float64) and values Tensor[N, P, C]
    (float32/float64). Returns (returncode, stderr, dict of tensors or None): m, capacity,
    vertex_index [N*P, d+1] int32, bary [N*P, d+1] float64, neighbors [d+1, M, 2] int32,
    splat_offsets [M+1] int32, splat_entries [N*P*(d+1)] int32, forward/reverse [N*P, C]."""
    n, p, d = features.shape
    c = values.shape[-1]
    src, dst = Path(workdir) / "in.bin", Path(workdir) / "out.bin"
    with open(src, "wb") as f:
        np.array([n, p, d, c, DTYPE_CODE[features.dtype], DTYPE_CODE[values.dtype], capacity],
                 np.int64).tofile(f)
        features.contiguous().numpy().tofile(f)
        values.contiguous().numpy().tofile(f)
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1")
    result = subprocess.run([str(binary), str(src), str(dst), str(seed)], capture_output=True,
                            text=True, timeout=120, env=env)
    if result.returncode != 0:
        return result.returncode, result.stderr, None
    raw, pos = dst.read_bytes(), 0

    def take(dtype, count, shape):
        nonlocal pos
        a = np.frombuffer(raw, dtype, count, pos)
        pos += a.nbytes
        return torch.from_numpy(a.copy()).reshape(shape)

    k = n * p * (d + 1)
    m, cap = (int(x) for x in take(np.int64, 2, (2,)))
    value_np = np.float64 if values.dtype == torch.float64 else np.float32
    out = dict(m=m, capacity=cap, vertex_index=take(np.int32, k, (n * p, d + 1)),
               bary=take(np.float64, k, (n * p, d + 1)), neighbors=take(np.int32, (d + 1) * m * 2, (d + 1, m, 2)),
               splat_offsets=take(np.int32, m + 1, (m + 1,)), splat_entries=take(np.int32, k, (k,)),
               forward=take(value_np, n * p * c, (n * p, c)), reverse=take(value_np, n * p * c, (n * p, c)))
    assert pos == len(raw), f"harness wrote {len(raw)} bytes, expected {pos}"
    return 0, result.stderr, out


def assert_matches_cpu(binary, workdir, features, values, seed, capacity=0):
    """The emulated CUDA build and filter equal crfrnn.Lattice(features, backend="native") on
    the CPU bit for bit: tables, weights (in the lattice's dtype), forward and adjoint filter."""
    lat = crfrnn.Lattice(features, backend="native")
    harness_features = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
    code, stderr, got = run_harness(binary, workdir, harness_features, values, seed, capacity)
    assert code == 0, f"harness failed (exit {code}):\n{stderr[-4000:]}"
    assert got["m"] == lat.num_vertices
    for name in LATTICE_TABLES:
        expected = getattr(lat, name)
        assert torch.equal(got[name], expected), (
            f"{name} differs from the CPU build at {(got[name] != expected).nonzero()[:5].tolist()}")
    assert torch.equal(got["bary"].to(lat.weights.dtype), lat.weights)
    flat = values.reshape(-1, values.shape[-1])
    weights = lat.weights.to(flat.dtype)
    tables = (lat.vertex_index, weights, lat.neighbors, lat.splat_offsets, lat.splat_entries)
    for name, reverse in (("forward", False), ("reverse", True)):
        expected = torch.ops.crfrnn.lattice_filter(flat, *tables, reverse)
        assert torch.equal(got[name], expected), (
            f"{name} filter differs from the CPU's: max |diff| {(got[name] - expected).abs().max().item()}")
    return lat, got


def next_power_of_two(x):
    return 1 << max(0, int(x - 1).bit_length())


# ---- tests ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,p", [(1, 1), (1, 50), (3, 100)])
@pytest.mark.parametrize("kind", sorted(POINTS))
@pytest.mark.parametrize("d", [1, 2, 5, 16])
def test_float64_equals_cpu(harness, tmp_path, d, kind, n, p):
    features = POINTS[kind](n, p, d, seed=31 * d + p)
    lat, _ = assert_matches_cpu(harness, tmp_path, features, randn(n, p, 3, dtype=torch.float64), seed=d + p)
    if kind == "integer" and p > 1:
        assert lat.num_vertices < n * p * (d + 1)  # the case does share vertices between points


@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [2, 5])
def test_low_precision_features_float32_filter_equal_cpu(harness, tmp_path, d, feature_dtype):
    """float32 (and half, converted to float32 as the launcher does) features: float32 weights;
    the float32 filter's bits equal the CPU's too (the same adds in the same order, no FMA)."""
    features = clustered_points(3, 120, d, seed=d).to(feature_dtype)
    assert_matches_cpu(harness, tmp_path, features, randn(3, 120, 4), seed=d)


@pytest.mark.parametrize("seed", range(4))
def test_any_thread_order_gives_the_same_lattice(harness, tmp_path, seed):
    """Duplicates and ties (integer points) in a batch: every random order of the racing
    inserts elects the same owners and numbers the vertices the same (as the CPU)."""
    features = integer_points(3, 80, 5, seed=11)
    assert_matches_cpu(harness, tmp_path, features, randn(3, 80, 2, dtype=torch.float64), seed=seed)


@pytest.mark.parametrize("kind", ["integer", "clustered"])
@pytest.mark.parametrize("d", [2, 5, 16])
def test_full_hash_table_equals_cpu(harness, tmp_path, d, kind):
    """A table with just enough slots (the smallest power of two >= M, often completely full):
    long probe chains, wrap-around at the end of the table, lookups of missing neighbours that
    scan it all; the result must not change."""
    features = POINTS[kind](2, 24, d, seed=7 * d)
    m = crfrnn.Lattice(features, backend="native").num_vertices
    capacity = next_power_of_two(m)
    values = randn(2, 24, 2, dtype=torch.float64)
    _, got = assert_matches_cpu(harness, tmp_path, features, values, seed=d, capacity=capacity)
    assert got["capacity"] == capacity < 2 * features[..., 0].numel() * (d + 1)  # fuller than the launcher's


def test_hash_table_overflow_is_reported(harness, tmp_path):
    """Fewer slots than vertices: insert_one raises the overflow flag (the launcher's error)
    instead of looping forever or writing out of bounds."""
    features = clustered_points(1, 40, 3, seed=3)
    m = crfrnn.Lattice(features, backend="native").num_vertices
    capacity = next_power_of_two(m) // 2
    assert 1 <= capacity < m
    values = randn(1, 40, 1, dtype=torch.float64)
    code, stderr, _ = run_harness(harness, tmp_path, features, values, seed=0, capacity=capacity)
    assert code == EXIT_OVERFLOW, stderr


@pytest.mark.data
def test_voc_crop_equals_cpu(harness, tmp_path, shared_data):
    """A real image crop: bilateral (d = 5) and spatial (d = 2) float32 features, as the CRF uses."""
    rgb = voc_rgb(shared_data, "2007_000123")[:, :, :64, :96]
    for features in (crfrnn.bilateral_features(rgb, 80.0, 13.0), crfrnn.spatial_features(rgb, 3.0)):
        points = features.flatten(2).transpose(1, 2).contiguous()
        n, p, _ = points.shape
        assert_matches_cpu(harness, tmp_path, points, randn(n, p, 3), seed=1)
