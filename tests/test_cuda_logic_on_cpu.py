"""The CUDA backend's logic, checked on the CPU: no GPU needed.

tests/cuda_emulation/harness.cpp compiles the per-thread bodies of the CUDA kernels
(crfrnn/csrc/cuda/lattice_device.cuh, with lattice_math.h and lattice_filter_steps.h) with the
host C++ compiler and replays the CUDA launcher's sequence, running each kernel's indices one at
a time in a random order (every order the GPU's unordered threads could take), or on several
std::threads at once with real atomics (the racing hash inserts and owner election truly
interleaved). Its lattice tables, weights, float filter outputs (forward and adjoint) and
feature gradients (the weights' and the features', from weight_grad_one and feature_grad_one)
must equal the C++ CPU backend's bit for bit, as the real GPU's lattice and filter must
(tests/test_lattice.py, marked `cuda`). See the harness's header for what this cannot check (the
GPU's scale and memory model, its own float code generation).

In its mean_field mode the harness runs the fused mean-field ops' CUDA schedules themselves
(crfrnn/csrc/cuda/mean_field_device.cuh, the code the CUDA launcher runs, each launch's indices in
a random order): forward and backward must equal the C++ ops to rounding (the GPU gathers its
splat by vertex, the CPU scatters by point into partial grids) and give the same bits in any order.

The harness is compiled once per session (a few seconds), with AddressSanitizer and UBSan when
the compiler supports them, so an out-of-bounds index in a kernel body fails here too; and once
with ThreadSanitizer for the concurrent runs, which fail on any report it makes (after checking,
on a deliberately racy toy, that it does report).
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
EXIT_UNWRITTEN = 4
EXIT_REPEATS_DIFFER = 5
EXIT_TSAN = 66  # the harness's exit status after a ThreadSanitizer report (TSAN_OPTIONS exitcode)
TSAN_REPORT = "WARNING: ThreadSanitizer"

pytestmark = pytest.mark.skipif(not ops.has_native_kernel("cpu"),
                                reason="the compiled C++ extension (crfrnn._C) is not built: nothing to compare with")


def find_compiler():
    """The C++ compiler: $CXX, else g++, else c++; None when there is none."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_harness(out, flag_sets):
    """Compiles the harness to `out` with the first of `flag_sets` (lists of compiler flags) that
    builds. Returns None when one builds, else the compiler's last error; skips the test when
    there is no compiler."""
    compiler = find_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler found ($CXX, g++ or c++) to build the CUDA-logic harness")
    # -ffp-contract=off: no fused multiply-add, as the extension's builds (nvcc --fmad=false).
    common = ["-std=c++17", "-O1", "-g", "-ffp-contract=off", "-Wall", "-Wextra", "-pthread",
              f"-I{CSRC}", str(HARNESS), "-o", str(out)]
    error = "no flags to try"
    for flags in flag_sets:
        result = subprocess.run([compiler, *flags, *common], capture_output=True, text=True, timeout=300)
        if result.returncode == 0:
            return None
        error = result.stderr[-3000:]
    return error


ASAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
TSAN = ["-fsanitize=thread", "-fno-omit-frame-pointer"]


@pytest.fixture(scope="session")
def harness(tmp_path_factory):
    """Path of the compiled harness (AddressSanitizer and UBSan build if the toolchain links one,
    plain otherwise)."""
    out = tmp_path_factory.mktemp("cuda_emulation") / "harness"
    error = compile_harness(out, [ASAN, []])
    assert error is None, f"the CUDA-logic harness does not compile:\n{error}"
    return out


@pytest.fixture(scope="session")
def tsan_harness(tmp_path_factory):
    """Path of the harness built with ThreadSanitizer, checked to be alive: the harness's racy
    toy (two threads incrementing a plain int) must be reported, so that a silent
    ThreadSanitizer is never taken for a clean run. Skips without TSan support."""
    out = tmp_path_factory.mktemp("cuda_emulation_tsan") / "harness"
    error = compile_harness(out, [TSAN])
    if error is not None:
        pytest.skip(f"the compiler cannot build with -fsanitize=thread:\n{error}")
    toy = subprocess.run([str(out), "--racy-toy"], capture_output=True, text=True, timeout=60, env=sanitizer_env())
    assert toy.returncode == EXIT_TSAN and TSAN_REPORT in toy.stderr, (
        f"ThreadSanitizer did not report the racy toy (exit {toy.returncode}):\n{toy.stderr[-2000:]}")
    return out


def sanitizer_env():
    """The environment of a harness run: sanitizer options under which every report fails it."""
    return dict(os.environ, ASAN_OPTIONS="detect_leaks=0", UBSAN_OPTIONS="print_stacktrace=1",
                TSAN_OPTIONS=f"exitcode={EXIT_TSAN}")


def run_harness(binary, workdir, features, values, seed, capacity=0, threads=0, repeats=1, schedule="mixed",
                cas="atomic"):
    """Run the harness on features Tensor[N, P, d] (float32/float64) and values Tensor[N, P, C]
    (float32/float64): serially in random orders (threads = 0), or on `threads` threads per
    launch with the given schedule (interleaved, blocked, shuffled, or mixed: drawn per launch),
    `repeats` times (each repetition must equal the first), the hash table's compare-and-swap
    `cas` (atomic; yielding: atomic after a yield, the race windows wide open; nonatomic: a
    plain read then write, a bug to catch). Returns (returncode, stderr, dict of tensors or
    None; None also after a ThreadSanitizer report): m, capacity, vertex_index [N*P, d+1] int32,
    bary [N*P, d+1] float64, neighbors [d+1, M, 2] int32, splat_offsets [M+1] int32,
    splat_entries [N*P*(d+1)] int32, forward/reverse [N*P, C], and the feature gradient of
    <grad, filter(values)> with grad = the values' rows in reverse order: weights_grad_forward/
    reverse [N*P, d+1] in the values' dtype (the weights', both blur orders) and features_grad
    [N, P, d] float64 (the features', from the forward one)."""
    n, p, d = features.shape
    c = values.shape[-1]
    src, dst = Path(workdir) / "in.bin", Path(workdir) / "out.bin"
    with open(src, "wb") as f:
        np.array([n, p, d, c, DTYPE_CODE[features.dtype], DTYPE_CODE[values.dtype], capacity],
                 np.int64).tofile(f)
        features.contiguous().numpy().tofile(f)
        values.contiguous().numpy().tofile(f)
    command = [str(binary), str(src), str(dst), str(seed), "--threads", str(threads),
               "--repeats", str(repeats), "--schedule", schedule, "--cas", cas]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=sanitizer_env())
    if result.returncode != 0 or TSAN_REPORT in result.stderr:
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
               forward=take(value_np, n * p * c, (n * p, c)), reverse=take(value_np, n * p * c, (n * p, c)),
               weights_grad_forward=take(value_np, k, (n * p, d + 1)),
               weights_grad_reverse=take(value_np, k, (n * p, d + 1)),
               features_grad=take(np.float64, n * p * d, (n, p, d)))
    assert pos == len(raw), f"harness wrote {len(raw)} bytes, expected {pos}"
    return 0, result.stderr, out


def assert_matches_cpu(binary, workdir, features, values, seed, capacity=0, **launches):
    """The emulated CUDA build and filter (run as `launches` says: threads, repeats, schedule)
    equal crfrnn.Lattice(features, backend="native") on the CPU bit for bit: tables, weights (in
    the lattice's dtype), forward and adjoint filter, the feature gradient's two ops
    (crfrnn::lattice_filter_weights_backward both ways, crfrnn::barycentric_weights_backward);
    and no sanitizer reported anything."""
    lat = crfrnn.Lattice(features, backend="native")
    harness_features = features.float() if features.dtype in (torch.float16, torch.bfloat16) else features
    code, stderr, got = run_harness(binary, workdir, harness_features, values, seed, capacity, **launches)
    assert got is not None, f"harness failed (exit {code}):\n{stderr[-6000:]}"
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
    assert_feature_grad_matches_cpu(got, features, flat, tables)
    return lat, got


def assert_feature_grad_matches_cpu(got, features, flat, tables):
    """The harness's weights' gradients (both blur orders) and features' gradient equal the C++
    ops' on the same tables, with the same upstream gradient (the values' rows reversed)."""
    grad = flat.flip(0)
    for name, reverse in (("weights_grad_forward", False), ("weights_grad_reverse", True)):
        expected = torch.ops.crfrnn.lattice_filter_weights_backward(flat, grad, *tables, reverse)
        assert torch.equal(got[name], expected), (
            f"{name} differs from the CPU's: max |diff| {(got[name] - expected).abs().max().item()}")
    expected = torch.ops.crfrnn.barycentric_weights_backward(features, got["weights_grad_forward"])
    assert torch.equal(got["features_grad"].to(expected.dtype), expected), (
        f"features_grad differs from the CPU's: max |diff| {(got['features_grad'] - expected).abs().max().item()}")


# ---- inputs -----------------------------------------------------------------------------------

def few_distinct_points(n, p, d, seed, distinct=3):
    """Every image's p points copies of `distinct` integer points: about distinct * (d + 1) keys
    per image, each inserted by some p / distinct entries at once (heavy key collisions)."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.randint(-2, 3, (n, distinct, d), generator=g).double()
    which = torch.randint(0, distinct, (n, p), generator=g)
    return torch.gather(pool, 1, which[:, :, None].expand(n, p, d))


def random_values(n, p, c):
    """Tensor[n, p, c] float64: the values the concurrent tests filter."""
    return randn(n, p, c, dtype=torch.float64, seed=5)


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
@pytest.mark.parametrize("d", [1, 2, 5, 16])
def test_low_precision_features_float32_filter_equal_cpu(harness, tmp_path, d, feature_dtype):
    """float32 (and half, converted to float32 as the launcher does) features: float32 weights;
    the float32 filter's and gradients' bits equal the CPU's too (the same adds in the same order,
    no FMA)."""
    features = clustered_points(3, 120, d, seed=d).to(feature_dtype)
    assert_matches_cpu(harness, tmp_path, features, randn(3, 120, 4), seed=d)


@pytest.mark.parametrize("d", [3, 5, 8])
def test_float32_ties_and_far_points_decide_as_cpu(harness, tmp_path, d):
    """float32 half-integers (exact ties, decided in float32 as densecrf decides them) and points
    beyond the float32 decision limit (decided in float64): the per-thread embedding decides as the
    C++ build, bit for bit."""
    ties = integer_points(2, 150, d, seed=d) / 2
    far = clustered_points(2, 50, d, seed=d) * 2e4
    features = torch.cat([ties, far], 1).float()
    assert_matches_cpu(harness, tmp_path, features, randn(2, 200, 3), seed=d)


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


# ---- on real threads ----------------------------------------------------------------------------

#: Inputs with heavy key collisions: many entries inserting the same key at once.
COLLIDING = {"few_distinct": few_distinct_points, "integer": integer_points, "clustered": clustered_points}


def tight_capacity(features):
    """The smallest power of two that holds the lattice's vertices: a table loaded far above
    the launcher's 1/2, often completely full (long probe chains, wrap-around at its end)."""
    return next_power_of_two(crfrnn.Lattice(features, backend="native").num_vertices)


@pytest.mark.parametrize("cas", ["atomic", "yielding"])
@pytest.mark.parametrize("schedule", ["interleaved", "blocked", "shuffled"])
@pytest.mark.parametrize("d", [1, 2, 5, 16])
def test_concurrent_build_equals_cpu(harness, tmp_path, d, schedule, cas):
    """Heavy key collisions (4 images of 60 copies of 3 points: each key inserted by 20 entries
    or more) into a tight table, every kernel on 4 threads at once with real atomics, 5 times:
    every repetition's tables and filter bits equal the CPU backend's."""
    features = few_distinct_points(4, 60, d, seed=d)
    assert_matches_cpu(harness, tmp_path, features, random_values(4, 60, 2), seed=d,
                       capacity=tight_capacity(features), threads=4, repeats=5, schedule=schedule, cas=cas)


@pytest.mark.parametrize("cas", ["atomic", "yielding"])
def test_concurrent_build_is_race_free_under_thread_sanitizer(tsan_harness, tmp_path, cas):
    """The same on 8 threads under ThreadSanitizer: no report (insert_one touches the table only
    through atomics, and every kernel writes elements of its own) and the CPU backend's bits."""
    features = few_distinct_points(4, 60, 5, seed=5)
    assert_matches_cpu(tsan_harness, tmp_path, features, random_values(4, 60, 2), seed=5,
                       capacity=tight_capacity(features), threads=8, repeats=3, cas=cas)


def test_thread_sanitizer_reports_a_nonatomic_cas(tsan_harness, tmp_path):
    """With a plain read-then-write for insert_one's CAS, the serial mode still equals the CPU
    (one body at a time: nothing to race with), and the concurrent mode under ThreadSanitizer
    reports a data race in that CAS."""
    features = few_distinct_points(4, 60, 5, seed=5)
    values = random_values(4, 60, 2)
    assert_matches_cpu(tsan_harness, tmp_path, features, values, seed=5, threads=0, repeats=3, cas="nonatomic")
    code, stderr, _ = run_harness(tsan_harness, tmp_path, features, values, seed=5, threads=8, repeats=3,
                                  cas="nonatomic")
    assert code == EXIT_TSAN and "data race" in stderr and "harness_cas::cas" in stderr, (
        f"exit {code}:\n{stderr[-3000:]}")


@pytest.mark.parametrize("d", [1, 2, 5, 16])
def test_a_nonatomic_cas_changes_the_tables(harness, tmp_path, d):
    """Without ThreadSanitizer the same broken CAS on 8 threads loses slot claims (two entries
    both take one empty slot): within 100 repetitions a table differs from the CPU backend's or
    from another repetition's, or the tight table overflows."""
    features = few_distinct_points(4, 60, d, seed=d)
    lat = crfrnn.Lattice(features, backend="native")
    code, stderr, got = run_harness(harness, tmp_path, features, random_values(4, 60, 2), seed=d,
                                    capacity=tight_capacity(features), threads=8, repeats=100, cas="nonatomic")
    assert code in (0, EXIT_OVERFLOW, EXIT_UNWRITTEN, EXIT_REPEATS_DIFFER), f"exit {code}:\n{stderr[-3000:]}"
    if code == 0:
        assert got["m"] != lat.num_vertices or any(
            not torch.equal(got[name], getattr(lat, name)) for name in LATTICE_TABLES), "the non-atomic CAS went unnoticed"


# Tight tables only where the lattice is small: each neighbour lookup in an almost full table
# probes O(capacity) slots, a minute under ThreadSanitizer at d = 16 and ~2000 vertices.
MANY_REPETITION_CASES = [(d, kind, table) for d in (1, 2, 5, 16) for kind in COLLIDING
                         for table in ("tight", "launcher's")
                         if table == "launcher's" or d < 16 or kind == "few_distinct"]


@pytest.mark.slow
@pytest.mark.parametrize("d,kind,table", MANY_REPETITION_CASES)
def test_many_concurrent_repetitions_under_thread_sanitizer_equal_cpu(tsan_harness, tmp_path, d, kind, table):
    """A batch of 4 images with key collisions on 8 threads, each launch with a schedule drawn
    at random, 20 repetitions with the atomic CAS and 20 with a yield before each CAS, under
    ThreadSanitizer: no report, and every repetition equals the CPU backend bit for bit."""
    features = COLLIDING[kind](4, 60, d, seed=3 * d)
    capacity = tight_capacity(features) if table == "tight" else 0
    for cas in ("atomic", "yielding"):
        assert_matches_cpu(tsan_harness, tmp_path, features, random_values(4, 60, 2), seed=d,
                           capacity=capacity, threads=8, repeats=20, cas=cas)


@pytest.mark.data
def test_voc_crop_equals_cpu(harness, tmp_path, shared_data):
    """A real image crop: bilateral (d = 5) and spatial (d = 2) float32 features, as the CRF uses."""
    rgb = voc_rgb(shared_data, "2007_000123")[:, :, :64, :96]
    for features in (crfrnn.bilateral_features(rgb, 80.0, 13.0), crfrnn.spatial_features(rgb, 3.0)):
        points = features.flatten(2).transpose(1, 2).contiguous()
        n, p, _ = points.shape
        assert_matches_cpu(harness, tmp_path, points, randn(n, p, 3), seed=1)


# ---- the fused mean-field ops ---------------------------------------------------------------------

def mean_field_inputs(n, c, h, w, dtype, seed):
    """(unary [N, P, C], lattices, pairwise, grad [N, P, C]) of a small CRF on an image with flat
    colour blocks (shared bilateral vertices) and noise."""
    from crfrnn import build_crf_lattices
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.interpolate(torch.rand(n, 3, 3, 3, generator=g, dtype=torch.float64) * 255,
                                            size=(h, w))
    image = (image + torch.rand(n, 3, h, w, generator=g, dtype=torch.float64) * 8).clamp(max=255)
    lattices = build_crf_lattices(image.to(dtype), (6.0, 30.0, 3.0), (2.0, 2.0), "native")
    unary = (torch.randn(n, h * w, c, generator=g, dtype=torch.float64) * 3).to(dtype)
    pairwise = [torch.randn(c, c, generator=g, dtype=torch.float64).to(dtype) for _ in lattices]
    grad = torch.randn(n, h * w, c, generator=g, dtype=torch.float64).to(dtype)
    return unary, lattices, pairwise, grad


def run_mean_field_harness(binary, workdir, unary, lattices, pairwise, grad, iterations, normalize, save_marginals,
                           seed, threads=0, schedule="mixed", prune=0.0):
    """The harness's mean_field mode (the CUDA schedules on the host; serial random order, or
    `threads` threads per launch): (logits, blurred per kernel, marginals or None, grad_unary,
    grad_pairwise per kernel, senders [T, N, C] uint8 or None), shaped as the ops return them;
    `prune`: sender pruning, its thresholds from crfrnn.inference.sender_thresholds as the launcher's."""
    n, p, c = unary.shape
    dtype = unary.dtype
    src, dst = Path(workdir) / "mf_in.bin", Path(workdir) / "mf_out.bin"
    with open(src, "wb") as f:
        np.array([n * p, c, iterations, len(lattices), DTYPE_CODE[dtype], int(save_marginals), n, int(prune > 0)],
                 np.int64).tofile(f)
        for lat, matrix in zip(lattices, pairwise):
            splat_scale, slice_scale = lat.normalization_scales(normalize, dtype)
            np.array([lat.vertex_index.shape[1], lat.num_vertices], np.int64).tofile(f)
            for t in (lat.vertex_index, lat.neighbors, lat.weights_as(dtype), splat_scale, slice_scale, matrix):
                t.contiguous().numpy().tofile(f)
        unary.contiguous().numpy().tofile(f)
        grad.contiguous().numpy().tofile(f)
        if prune > 0:
            crfrnn.inference.sender_thresholds(pairwise, prune).to(dtype).numpy().tofile(f)
    command = [str(binary), "mean_field", str(src), str(dst), str(seed), "--threads", str(threads),
               "--schedule", schedule]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=sanitizer_env())
    assert result.returncode == 0 and TSAN_REPORT not in result.stderr, (
        f"harness failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    raw = torch.from_numpy(np.frombuffer(dst.read_bytes(), np.float64 if dtype == torch.float64 else np.float32).copy())
    sizes = ([n * p * c] + [iterations * lat.num_vertices * c for lat in lattices]
             + [(iterations - 1) * n * p * c if save_marginals else 0, n * p * c] + [c * c] * len(lattices)
             + [iterations * n * c if prune > 0 else 0])
    assert raw.numel() == sum(sizes), f"harness wrote {raw.numel()} values, expected {sum(sizes)}"
    parts = list(raw.split(sizes))
    k = len(lattices)
    blurred = [b.reshape(iterations, lat.num_vertices, c) for b, lat in zip(parts[1:1 + k], lattices)]
    marginals = parts[1 + k].reshape(iterations - 1, n, p, c) if save_marginals else None
    senders = parts[-1].reshape(iterations, n, c).to(torch.uint8) if prune > 0 else None
    return (parts[0].reshape(n, p, c), blurred, marginals, parts[2 + k].reshape(n, p, c),
            [g.reshape(c, c) for g in parts[3 + k:3 + 2 * k]], senders)


@pytest.mark.parametrize("save_marginals", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize", ["symmetric", "after"])
def test_mean_field_schedules_equal_the_cpu_ops(harness, tmp_path, normalize, dtype, save_marginals):
    """The CUDA forward and backward schedules (run_mean_field_forward/backward of
    mean_field_device.cuh, every launch's indices in a random order) against the C++ ops: logits,
    blurred grids, marginals and both gradients equal to rounding (the CPU splats by point into
    partial grids, the GPU gathers by vertex: the same terms in another order)."""
    unary, lattices, pairwise, grad = mean_field_inputs(2, 5, 9, 11, dtype, seed=3)
    iterations = 4
    splat_scales, slice_scales = zip(*(lat.normalization_scales(normalize, dtype) for lat in lattices))
    args = (unary, [lat.vertex_index for lat in lattices], [lat.weights_as(dtype) for lat in lattices],
            list(splat_scales), list(slice_scales), [lat.neighbors for lat in lattices], pairwise, iterations)
    logits, blurred, marginals, _ = torch.ops.crfrnn.mean_field_forward(*args, True)
    grad_unary, grad_pairwise = torch.ops.crfrnn.mean_field_backward(grad, *args[:7], blurred, marginals, iterations)
    got = run_mean_field_harness(harness, tmp_path, unary, lattices, pairwise, grad, iterations, normalize,
                                 save_marginals, seed=7)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    expected = [logits, *blurred, grad_unary, *grad_pairwise] + ([marginals] if save_marginals else [])
    results = [got[0], *got[1], got[3], *got[4]] + ([got[2]] if save_marginals else [])
    for g, e in zip(results, expected):
        torch.testing.assert_close(g, e, atol=tol * (e.abs().max().item() + 1), rtol=tol)
    # Another random order of every launch: the same bits (gathers in a fixed order, no atomics).
    again = run_mean_field_harness(harness, tmp_path, unary, lattices, pairwise, grad, iterations, normalize,
                                   save_marginals, seed=8)
    for a, b in zip([got[0], *got[1], got[3], *got[4]], [again[0], *again[1], again[3], *again[4]]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("c,iterations", [(1, 1), (21, 3)])
def test_mean_field_schedules_any_classes_and_iterations(harness, tmp_path, c, iterations):
    unary, lattices, pairwise, grad = mean_field_inputs(1, c, 8, 7, torch.float64, seed=c)
    splat_scales, slice_scales = zip(*(lat.normalization_scales("symmetric", torch.float64) for lat in lattices))
    args = (unary, [lat.vertex_index for lat in lattices], [lat.weights for lat in lattices], list(splat_scales),
            list(slice_scales), [lat.neighbors for lat in lattices], pairwise, iterations)
    logits, blurred, marginals, _ = torch.ops.crfrnn.mean_field_forward(*args, False)
    grad_unary, grad_pairwise = torch.ops.crfrnn.mean_field_backward(grad, *args[:7], blurred, marginals, iterations)
    got = run_mean_field_harness(harness, tmp_path, unary, lattices, pairwise, grad, iterations, "symmetric",
                                 False, seed=c)
    for g, e in zip([got[0], got[3], *got[4]], [logits, grad_unary, *grad_pairwise]):
        torch.testing.assert_close(g, e, atol=1e-12 * (e.abs().max().item() + 1), rtol=1e-12)


@pytest.mark.parametrize("save_marginals", [True, False])
def test_mean_field_schedules_on_threads_are_race_free_and_equal_serial(tsan_harness, tmp_path, save_marginals):
    """Four threads per launch (schedules drawn per launch) under ThreadSanitizer: no data race
    (every body writes its own elements), and the same bits as a serial run."""
    unary, lattices, pairwise, grad = mean_field_inputs(2, 6, 9, 8, torch.float32, seed=5)
    runs = [run_mean_field_harness(tsan_harness, tmp_path, unary, lattices, pairwise, grad, 3, "symmetric",
                                   save_marginals, seed=1, threads=threads) for threads in (0, 4)]
    flat = [[r[0], *r[1], r[3], *r[4]] + ([r[2]] if save_marginals else []) for r in runs]
    for a, b in zip(*flat):
        assert torch.equal(a, b)


def absent_class_inputs(n, c, h, w, dtype, seed, absent=3):
    """mean_field_inputs with Potts-structured matrices (diagonal weights times Potts, one column
    made non-Potts when `full`) and `absent` classes far below the others: what pruning drops."""
    unary, lattices, _, grad = mean_field_inputs(n, c, h, w, dtype, seed)
    unary = unary.clone()
    unary[..., c - absent:] -= 7.0
    potts = 1.0 - torch.eye(c, dtype=dtype)
    weights = torch.linspace(1.0, 3.0, c, dtype=dtype)
    pairwise = [potts * weights, 0.5 * potts]
    return unary, lattices, pairwise, grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("full", [False, True])
def test_mean_field_schedules_with_pruning_equal_the_cpu_ops(harness, tmp_path, dtype, full):
    """Sender pruning in the CUDA schedules (the largest-Q reduction, the senders, Q D; the
    backward's masked dQ) against the C++ op, which prunes with fewer channels: the same senders,
    logits, B D grids and gradients to rounding; and nothing left unwritten in any order."""
    unary, lattices, pairwise, grad = absent_class_inputs(2, 6, 9, 8, dtype, seed=4)
    if full:  # learned (non-Potts) matrices: the C++ op's gather rows
        pairwise[0][1, 0] += 0.25
    iterations, prune = 4, 2e-2
    splat_scales, slice_scales = zip(*(lat.normalization_scales("symmetric", dtype) for lat in lattices))
    args = (unary, [lat.vertex_index for lat in lattices], [lat.weights_as(dtype) for lat in lattices],
            list(splat_scales), list(slice_scales), [lat.neighbors for lat in lattices], pairwise, iterations)
    logits, blurred, marginals, senders = torch.ops.crfrnn.mean_field_forward(*args, True, prune)
    assert marginals.numel() == 0  # a pruned forward never saves them
    assert 0 < senders.sum() < senders.numel(), "the case prunes nothing, or everything"
    grad_unary, grad_pairwise = torch.ops.crfrnn.mean_field_backward(grad, *args[:7], blurred, marginals, iterations,
                                                                     senders)
    for seed in (2, 3):
        got = run_mean_field_harness(harness, tmp_path, unary, lattices, pairwise, grad, iterations, "symmetric",
                                     False, seed=seed, prune=prune)
        assert torch.equal(got[5], senders)
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        for g, e in zip([got[0], *got[1], got[3], *got[4]], [logits, *blurred, grad_unary, *grad_pairwise]):
            torch.testing.assert_close(g, e, atol=tol * (e.abs().max().item() + 1), rtol=tol)


def test_mean_field_schedules_with_pruning_on_threads_are_race_free(tsan_harness, tmp_path):
    unary, lattices, pairwise, grad = absent_class_inputs(2, 6, 9, 8, torch.float32, seed=6)
    runs = [run_mean_field_harness(tsan_harness, tmp_path, unary, lattices, pairwise, grad, 3, "symmetric", False,
                                   seed=1, threads=threads, prune=2e-2) for threads in (0, 4)]
    for a, b in zip([runs[0][0], runs[0][3], runs[0][5]], [runs[1][0], runs[1][3], runs[1][5]]):
        assert torch.equal(a, b)
