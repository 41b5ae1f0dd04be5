"""The library at its edges: corrupted lattice tables, grad/inference modes, pickling, non-finite
parameters, meta tensors, empty channels, integer images, torch.compile and odd layouts.

Each case either gives a clear error (naming what was expected and what came) or a correct result:
never a crash, a hang or silent garbage.
"""
import copy
import io
import os
import pickle
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import crfrnn
from crfrnn import CRFRNNLayer

REPO = Path(__file__).resolve().parents[1]
NATIVE = crfrnn.has_native_kernel("cpu")
needs_native = pytest.mark.skipif(not NATIVE, reason="C++ extension not built")
SMALL = dict(bilateral=(5.0, 20.0, 3.0), spatial=(2.0, 1.0))
PARAMETERS = ("bilateral_weight", "spatial_weight", "compatibility")


def make_inputs(n=2, c=3, h=9, w=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, c, h, w, generator=g, dtype=dtype),
            torch.rand(n, 3, h, w, generator=g, dtype=dtype) * 255)


# ------------------------------------------------------------------------------------------
# Corrupted index tables, passed straight to the ops: each run in a child process, so that a
# segfault fails the test instead of killing pytest.

# One child process runs every case of every op: it prints "case OP NAME" before a case (so that
# a crash shows where) and "rejected OP NAME: TYPE: MESSAGE" or "accepted OP NAME" after it, then
# runs the first case again without catching its error, so that it ends with a clean non-zero exit.
_TABLE_CASES = textwrap.dedent("""
    import sys, torch, crfrnn
    from crfrnn import build_crf_lattices
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 7, 6, generator=g) * 255
    TABLES = ("vertex_index", "neighbors", "splat_offsets", "splat_entries")
    BIG = 2 ** 31 - 1

    def changed(table, position, value):
        table = table.clone()
        table.view(-1)[position] = value
        return table

    def swapped_offsets(table):  # two increasing offsets in the wrong order
        table = table.clone()
        i = int(((table[1:] - table[:-1]) > 0).nonzero()[0, 0]) + 1  # table[i] > table[i-1]
        table[i - 1], table[i] = int(table[i]), int(table[i - 1])
        return table

    def filter_cases(op_name, lat):
        op = getattr(torch.ops.crfrnn, op_name)
        values = torch.rand(lat.vertex_index.shape[0], 4, generator=g)

        def call(**bad):
            tables = {name: bad.get(name, getattr(lat, name)) for name in TABLES}
            return op(values, tables["vertex_index"], lat.weights, tables["neighbors"],
                      tables["splat_offsets"], tables["splat_entries"], False)

        m, k = lat.num_vertices, lat.vertex_index.numel()
        bad = [("vertex_index", changed(lat.vertex_index, 5, v), v) for v in (-1, m, BIG)]
        bad += [("neighbors", changed(lat.neighbors, 7, v), v) for v in (-1, m + 1, BIG)]
        bad += [("splat_offsets", changed(lat.splat_offsets, 3, v), v) for v in (-5, k + 1, BIG)]
        bad += [("splat_offsets", changed(lat.splat_offsets, 0, 1), "first=1"),
                ("splat_offsets", changed(lat.splat_offsets, m, k - 1), "last=K-1"),
                ("splat_offsets", swapped_offsets(lat.splat_offsets), "decreasing")]
        bad += [("splat_entries", changed(lat.splat_entries, 9, v), v) for v in (-1, k, BIG)]
        cases = [(f"{name}={value}", lambda name=name, table=table: call(**{name: table}))
                 for name, table, value in bad]

        def corrupted_lattice():  # the public API: a Lattice whose attribute was overwritten
            lat.neighbors[0, 0, 0] = m + 1
            try:
                return lat.filter(torch.rand(1, 42, 4))
            finally:
                lat.neighbors[0, 0, 0] = m
        return cases + [("Lattice.filter/neighbors", corrupted_lattice)]

    def mean_field_cases(lattices, op_name):
        scales = [l.normalization_scales("symmetric", torch.float32) for l in lattices]
        unary = torch.randn(1, 42, 3, generator=g)

        def call(kernel, **bad):
            tables = {name: [bad[name] if i == kernel and name in bad else getattr(l, name)
                             for i, l in enumerate(lattices)] for name in ("vertex_index", "neighbors")}
            args = (unary, tables["vertex_index"], [l.weights for l in lattices], [s[0] for s in scales],
                    [s[1] for s in scales], tables["neighbors"], [torch.ones(3, 3)] * 2)
            if op_name == "mean_field_inference":
                return torch.ops.crfrnn.mean_field_inference(*args, 2)
            if op_name == "mean_field_forward":
                return torch.ops.crfrnn.mean_field_forward(*args, 2, False)
            blurred = [torch.zeros(2, l.num_vertices, 3) for l in lattices]  # the saves' shapes
            return torch.ops.crfrnn.mean_field_backward(torch.ones_like(unary), *args, blurred, torch.empty(0), 2)

        cases = []
        for kernel, l in enumerate(lattices):
            m = l.num_vertices
            cases += [(f"kernel{kernel}/vertex_index={v}",
                       lambda k=kernel, t=changed(l.vertex_index, 5, v): call(k, vertex_index=t)) for v in (-1, m, BIG)]
            cases += [(f"kernel{kernel}/neighbors={v}",
                       lambda k=kernel, t=changed(l.neighbors, 7, v): call(k, neighbors=t)) for v in (-1, m + 1, BIG)]
        return cases

    cases = []
    for op_name in sys.argv[1:]:
        backend = "reference" if op_name == "lattice_filter_ref" else "native"
        lattices = build_crf_lattices(image, (5.0, 20.0, 3.0), (2.0, 1.0), backend)
        op_cases = (mean_field_cases(lattices, op_name) if op_name.startswith("mean_field_")
                    else filter_cases(op_name, lattices[0]))
        cases += [(f"{op_name} {name}", call) for name, call in op_cases]
    for name, call in cases:
        print("case", name, flush=True)
        try:
            call()
            print("accepted", name, flush=True)
        except Exception as exc:
            print(f"rejected {name}: {type(exc).__name__}: {str(exc).splitlines()[0]}", flush=True)
    cases[0][1]()
""")

_TABLE_OPS = ["lattice_filter", "lattice_filter_ref", "mean_field_inference", "mean_field_forward",
              "mean_field_backward"]


@pytest.fixture(scope="module")
def table_run():
    """The child process of _TABLE_CASES, for every op this build has."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ops = [op for op in _TABLE_OPS if NATIVE or op == "lattice_filter_ref"]
    return subprocess.run([sys.executable, "-c", _TABLE_CASES, *ops], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


@pytest.mark.parametrize("op", _TABLE_OPS)
def test_bad_index_tables_raise_a_clear_error_not_a_crash(table_run, op):
    if op != "lattice_filter_ref" and not NATIVE:
        pytest.skip("C++ extension not built")
    run = table_run
    started = [line.split(" ", 1)[1] for line in run.stdout.splitlines() if line.startswith("case ")]
    assert run.returncode == 1, (f"crashed (exit {run.returncode}) in case {started[-1] if started else None}\n"
                                 f"{run.stdout}\n{run.stderr[-3000:]}")
    assert run.stderr.rstrip().splitlines()[-1].startswith("ValueError: crfrnn::")  # the uncaught case
    cases = [case.split(" ", 1)[1] for case in started if case.startswith(op + " ")]
    results = {line.split(" ", 2)[2].split(":", 1)[0]: line for line in run.stdout.splitlines()
               if line.startswith((f"rejected {op} ", f"accepted {op} "))}
    assert len(cases) >= (12 if op.startswith("mean_field_") else 16) and set(results) == set(cases)
    for case, line in results.items():
        assert line.startswith(f"rejected {op} {case}: ValueError: crfrnn::{op}: "), line
        table = re.fullmatch(r"(?:[\w.]+/)?(\w+)(=.*)?", case).group(1)
        if table in ("vertex_index", "neighbors", "splat_entries") or case == "splat_offsets=-5":
            assert f"{table} holds values in [" in line and "], expected [0, " in line, line
        else:
            assert "splat_offsets" in line, line
    # The range found and the range expected, e.g. for a negative vertex index:
    line = next(line for case, line in results.items() if case.endswith("vertex_index=-1"))
    m = int(re.search(r"below M = neighbors.size\(1\) = (\d+)", line).group(1))
    assert f"vertex_index holds values in [-1, {m - 1}], expected [0, {m - 1}]" in line


_CUDA_BAD_TABLE = textwrap.dedent("""
    import torch, crfrnn
    lat = crfrnn.Lattice(torch.rand(1, 50, 3, device="cuda") * 3)
    assert lat.backend == "native"
    values = torch.rand(50, 4, device="cuda")
    good = torch.ops.crfrnn.lattice_filter(values, lat.vertex_index, lat.weights, lat.neighbors,
                                           lat.splat_offsets, lat.splat_entries, False)
    torch.cuda.synchronize()
    print("good call done", flush=True)
    bad = lat.neighbors.clone()
    bad[0, 0, 0] = -7
    out = torch.ops.crfrnn.lattice_filter(values, lat.vertex_index, lat.weights, bad,
                                          lat.splat_offsets, lat.splat_entries, False)
    torch.cuda.synchronize()
    print("bad call accepted", flush=True)
""")


@pytest.mark.cuda
def test_cuda_filter_stops_at_a_bad_table_with_a_device_side_assert():
    """The CUDA op checks on the device, without a host sync: a bad value fails a device-side
    assert before the filter's kernels run (a clean Python exception at the next sync; the
    process' CUDA context is then unusable, hence the child process)."""
    if not crfrnn.has_native_kernel("cuda"):
        pytest.skip("CUDA kernels not built")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", _CUDA_BAD_TABLE], capture_output=True, text=True, cwd=REPO,
                         env=env, timeout=300)
    output = run.stdout + run.stderr
    assert "good call done" in run.stdout and "bad call accepted" not in run.stdout, output
    assert run.returncode == 1, output  # a Python exception, not a crash
    assert "neighbors[0] = -7, expected a value in [0, " in output, output
    assert "device-side assert" in output, output


@needs_native
def test_valid_tables_still_filter_after_the_checks():
    """The checks reject nothing a build makes: the filter still equals the reference."""
    feats = torch.rand(2, 30, 3, generator=torch.Generator().manual_seed(1)) * 4
    vals = torch.rand(2, 30, 5)
    for normalize in ("none", "symmetric"):
        torch.testing.assert_close(crfrnn.Lattice(feats, backend="native").filter(vals, normalize),
                                   crfrnn.Lattice(feats, backend="reference").filter(vals, normalize))


# ------------------------------------------------------------------------------------------
# Grad modes: a cache made under one must not break a call under another.

def _grads(crf, unary, image):
    crf.zero_grad()
    u = unary.clone().requires_grad_(True)
    out = crf(u, image)
    out.square().sum().backward()
    return out.detach(), u.grad, crf.compatibility.grad.clone()


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("first_mode", ["inference_mode", "no_grad"])
def test_a_call_under_inference_mode_or_no_grad_does_not_break_the_next_autograd_call(backend, first_mode):
    unary, image = make_inputs()
    crf = CRFRNNLayer(3, num_iterations=2, backend=backend, **SMALL)
    with getattr(torch, first_mode)():
        first = crf(unary, image)
    out, grad_u, grad_mu = _grads(crf, unary, image)  # reuses the spatial lattice of the first call
    fresh = CRFRNNLayer(3, num_iterations=2, backend=backend, **SMALL)
    expected = _grads(fresh, unary, image)
    torch.testing.assert_close(first, out)
    for got, want in zip((out, grad_u, grad_mu), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_an_autograd_call_then_inference_mode_then_autograd_again(backend):
    """The spatial lattice made with autograd on, whose normalisation caches are then filled
    under inference mode (another normalisation), still serves a later autograd call."""
    unary, image = make_inputs()
    crf = CRFRNNLayer(3, num_iterations=2, backend=backend, **SMALL)
    before = _grads(crf, unary, image)
    crf.normalize = "after"  # new per-lattice constants, made under inference mode
    with torch.inference_mode():
        crf(unary, image)
    after = _grads(crf, unary, image)
    crf.normalize = "symmetric"
    again = _grads(crf, unary, image)
    for got, want in zip(again, before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.isfinite(after[1]).all()


def test_a_lattice_built_under_inference_mode_serves_autograd():
    feats = torch.rand(1, 3, 4, 3) * 3
    vals = torch.rand(1, 1, 4, 3, dtype=torch.float64)
    with torch.inference_mode():
        lat = crfrnn.Lattice(feats.double())
        lat.filter(vals, "symmetric")  # fills the caches under inference mode
    assert not lat.vertex_index.is_inference() and not lat.weights.is_inference()
    v = vals.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: lat.filter(x, "symmetric"), (v,))


# ------------------------------------------------------------------------------------------
# Pickling

class _Net(torch.nn.Module):
    """A model holding a CRF layer, as a user's would."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Conv2d(3, 3, 1)
        self.crf = CRFRNNLayer(3, num_iterations=2, **SMALL)

    def forward(self, image):
        return self.crf(self.head(image / 255), image)


def test_torch_save_of_a_whole_model_after_a_forward_round_trips():
    torch.manual_seed(0)
    net = _Net().eval()
    _, image = make_inputs()
    with torch.no_grad():
        expected = net(image)
    assert net.crf._last_spatial is not None  # the kept lattice that used to break pickling
    buffer = io.BytesIO()
    torch.save(net, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.crf._last_spatial is None  # the cache is not saved
    with torch.no_grad():
        torch.testing.assert_close(loaded(image), expected, rtol=0, atol=0)
    assert net.crf._last_spatial is not None  # saving left the original's cache alone
    twin = copy.deepcopy(net)
    with torch.no_grad():
        torch.testing.assert_close(twin(image), expected, rtol=0, atol=0)
    # During training too (a cached lattice made with autograd on).
    net.train()
    net(image).sum().backward()
    restored = pickle.loads(pickle.dumps(net))
    torch.testing.assert_close(restored(image), net(image), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_a_lattice_pickles(backend):
    lat = crfrnn.Lattice(torch.rand(2, 3, 5, 4) * 3, backend=backend)
    vals = torch.rand(2, 2, 5, 4)
    expected = lat.filter(vals, "symmetric")
    again = pickle.loads(pickle.dumps(lat))
    assert again.backend == lat.backend
    torch.testing.assert_close(again.filter(vals, "symmetric"), expected, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Non-finite and huge parameters

@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", PARAMETERS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_parameters_raise(name, value, grad):
    unary, image = make_inputs()
    crf = CRFRNNLayer(3, num_iterations=2, **SMALL)
    with torch.no_grad():
        getattr(crf, name)[1, 2] = value
    with torch.set_grad_enabled(grad), pytest.raises(ValueError, match=rf"CRFRNNLayer.{name} has 1 NaN/Inf"):
        crf(unary, image)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("name", PARAMETERS)
def test_huge_finite_parameters_raise_or_give_a_finite_output(name, grad):
    """3e38 fits float32, but products and sums of it overflow: wherever it sits, the layer
    either raises a clear error or returns finite logits, never NaN."""
    unary, image = make_inputs()
    raised = 0
    for i in range(3):
        for j in range(3):
            crf = CRFRNNLayer(3, num_iterations=2, **SMALL)
            with torch.no_grad():
                getattr(crf, name)[i, j] = 3e38
            try:
                with torch.set_grad_enabled(grad):
                    out = crf(unary, image)
            except ValueError as exc:
                assert "too large" in str(exc)
                raised += 1
            else:
                assert torch.isfinite(out).all()
    if not grad:  # the fused op applies the matrices to unnormalised vertex sums: it overflows first
        assert raised > 0


def test_the_reported_huge_parameters_raise():
    """The reported cases, in evaluation (no gradient): 3e38 on the diagonal of compatibility (its
    product with the weights overflows) or of spatial_weight (the output overflows) gave an
    all-NaN output."""
    unary, image = make_inputs()
    for name, match in (("compatibility", "pairwise matrices compatibility @ weight overflow"),
                        ("spatial_weight", "the CRF output has .* NaN/Inf values.*largest \\|value\\| 3e\\+38")):
        crf = CRFRNNLayer(3, num_iterations=2, **SMALL).eval()
        with torch.no_grad():
            getattr(crf, name)[0, 0] = 3e38
            with pytest.raises(ValueError, match=match):
                crf(unary, image)


def test_dense_crf_non_finite_weights_and_outputs_raise():
    img = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    probs = np.full((3, 6, 5), 1 / 3, np.float32)
    probs[0, :3] = 0.8
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number"):
            crfrnn.dense_crf(img, probs, bilateral=(80, 13, bad))
        with pytest.raises(ValueError, match="finite number"):
            crfrnn.dense_crf(img, probs, spatial=(3, bad))
    with pytest.raises(ValueError, match=r"output has \d+ NaN/Inf values.*spatial 3e\+38"):
        crfrnn.dense_crf(img, probs, spatial=(3, 3e38))
    try:
        q = crfrnn.dense_crf(img, probs, bilateral=(80, 13, 3e38))
    except ValueError as exc:
        assert "too large" in str(exc)
    else:
        assert np.isfinite(q).all()


# ------------------------------------------------------------------------------------------
# Meta tensors, zero channels, integer images

def test_meta_inputs_give_a_meta_result_or_a_clear_error():
    crf = CRFRNNLayer(3, num_iterations=2).to("meta")
    out = crf(torch.empty(2, 3, 9, 7, device="meta"), torch.empty(2, 3, 9, 7, device="meta"))
    assert out.device.type == "meta" and out.shape == (2, 3, 9, 7) and out.dtype == torch.float32
    out = crf(torch.empty(2, 3, 9, 7, device="meta", dtype=torch.float64), torch.empty(2, 3, 9, 7, device="meta"))
    assert out.dtype == torch.float64
    with pytest.raises(ValueError, match="image is on cpu but unary is on meta"):
        crf(torch.empty(1, 3, 4, 4, device="meta"), torch.rand(1, 3, 4, 4))
    with pytest.raises(ValueError, match="parameters are on cpu but unary is on meta"):
        CRFRNNLayer(3)(torch.empty(1, 3, 4, 4, device="meta"), torch.empty(1, 3, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="meta device.*depends on the feature values"):
        crfrnn.Lattice(torch.empty(1, 3, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="on meta but the lattice is on cpu"):
        crfrnn.Lattice(torch.rand(1, 3, 4, 4)).filter(torch.empty(1, 2, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="got meta tensors"):
        crfrnn.dense_crf(torch.empty(4, 4, 3, device="meta"), torch.empty(2, 4, 4, device="meta"))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("normalize", crfrnn.NORMALIZATIONS)
def test_filter_of_zero_channels_is_empty(backend, normalize):
    per_pixel = crfrnn.Lattice(torch.rand(2, 3, 5, 4) * 3, backend=backend)
    out = per_pixel.filter(torch.rand(2, 0, 5, 4, dtype=torch.float64), normalize)
    assert out.shape == (2, 0, 5, 4) and out.dtype == torch.float64
    per_point = crfrnn.Lattice(torch.rand(2, 7, 3) * 3, backend=backend)
    assert per_point.filter(torch.rand(2, 7, 0), normalize).shape == (2, 7, 0)
    filter_op = per_point._filter_op
    tables = (per_point.vertex_index, per_point.weights, per_point.neighbors, per_point.splat_offsets,
              per_point.splat_entries)
    assert filter_op(torch.rand(14, 0), *tables, False).shape == (14, 0)


@pytest.mark.parametrize("dtype,low,high", [(torch.int8, -3, 100), (torch.int16, 0, 1000),
                                            (torch.int32, 0, 256), (torch.int64, -1, 0),
                                            (torch.float32, 0, 255.5), (torch.float16, -0.5, 2)])
def test_images_outside_0_255_raise(dtype, low, high):
    unary, _ = make_inputs(n=1, h=4, w=5)
    image = torch.zeros(1, 3, 4, 5, dtype=dtype)
    image[0, 0, 0, 0], image[0, 1, 2, 3] = low, high
    crf = CRFRNNLayer(3, num_iterations=2)
    with pytest.raises(ValueError, match=rf"image has values in \[{low:g}, {high:g}\] but no normalisation"):
        crf(unary, image)
    with pytest.raises(ValueError, match=rf"image must be RGB in 0..255.*\[{low:g}, {high:g}\]"):
        crfrnn.dense_crf(image[0].permute(1, 2, 0), torch.full((3, 4, 5), 1 / 3))


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _warnings_of(crf, image):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        crf(torch.randn(1, 3, 10, 12), image)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_an_image_in_0_to_1_given_as_0_to_255_is_warned_about():
    """ToTensor()'s 0..1 image to a layer that takes 0..255 would make every colour alike (the
    bilateral kernel merely spatial): the layer says so instead of smoothing silently."""
    crf = CRFRNNLayer(3, num_iterations=1)
    rgb01 = torch.rand(1, 3, 10, 12)
    messages = _warnings_of(crf, rgb01)
    assert len(messages) == 1 and "colours all lie within 0..1" in messages[0] and "Multiply it by 255" in messages[0]
    assert _warnings_of(crf, rgb01 * 255) == []
    assert _warnings_of(crf, (rgb01 * 255).to(torch.uint8)) == []
    assert _warnings_of(crf, torch.zeros(1, 3, 10, 12)) == []  # black: nothing to tell
    with warnings.catch_warnings(record=True) as caught:  # Python's default filter: once per call site
        warnings.simplefilter("default")
        for _ in range(3):
            crf(torch.randn(1, 3, 10, 12), torch.rand(1, 3, 10, 12))
    assert len(caught) == 1 and caught[0].filename == __file__
    probs = torch.full((3, 10, 12), 1 / 3)
    with pytest.warns(UserWarning, match=r"colours all lie within 0\.\.1.*Multiply it by 255"):
        crfrnn.dense_crf(rgb01[0].permute(1, 2, 0), probs)


def test_an_image_not_normalised_as_declared_is_warned_about():
    crf = CRFRNNLayer(3, num_iterations=1, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    rgb01 = torch.rand(1, 3, 10, 12)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    assert _warnings_of(crf, (rgb01 - mean) / std) == []
    assert _warnings_of(crf, (torch.zeros(1, 3, 10, 12) - mean) / std) == []  # black: 0..7.6e-6 once undone
    messages = _warnings_of(crf, rgb01 * 255)  # not normalised at all
    assert len(messages) == 1 and "was it normalised as declared" in messages[0]


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.float16, torch.float64])
def test_images_of_any_real_dtype_in_0_255_equal_uint8(dtype):
    unary, image = make_inputs()
    rgb = image.round().to(torch.uint8)
    crf = CRFRNNLayer(3, num_iterations=2, **SMALL)
    with torch.no_grad():
        torch.testing.assert_close(crf(unary, rgb.to(dtype)), crf(unary, rgb))
    probs = torch.softmax(unary[0], 0)
    torch.testing.assert_close(crfrnn.dense_crf(rgb[0].permute(1, 2, 0).to(dtype), probs),
                               crfrnn.dense_crf(rgb[0].permute(1, 2, 0), probs))


def test_an_integer_image_with_declared_normalisation_raises():
    unary, image = make_inputs()
    crf = CRFRNNLayer(3, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    with pytest.raises(TypeError, match="must be a normalised float tensor, got torch.uint8"):
        crf(unary, image.to(torch.uint8))


# ------------------------------------------------------------------------------------------
# torch.compile

@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_layer_compiles_with_fullgraph(grad):
    """No graph break in the forward (its value checks become asynchronous asserts), the same
    result as eager, and the checks still fire."""
    unary, image = make_inputs(n=1, h=6, w=5)
    crf = CRFRNNLayer(3, num_iterations=2, **SMALL)
    crf(unary, image)  # a kept spatial lattice from an eager call must not leak into the graph
    torch._dynamo.reset()
    compiled = torch.compile(crf, fullgraph=True, backend="aot_eager")
    u = unary.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        torch.testing.assert_close(compiled(u, image), crf(u, image))
    with pytest.raises(RuntimeError, match="unary contains NaN/Inf"):
        compiled(torch.full_like(unary, float("nan")), image)
    with pytest.raises(RuntimeError, match="image is outside 0..255"):
        compiled(unary, image + 300)


@pytest.mark.slow
def test_layer_compiles_with_inductor():
    unary, image = make_inputs(n=1, h=6, w=5)
    crf = CRFRNNLayer(3, num_iterations=2, **SMALL).eval()
    torch._dynamo.reset()
    compiled = torch.compile(crf, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(unary, image), crf(unary, image))
        with pytest.raises(RuntimeError, match="unary contains NaN/Inf"):
            compiled(torch.full_like(unary, float("nan")), image)


# ------------------------------------------------------------------------------------------
# Layouts, dtypes, sizes

@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_channels_last_and_non_contiguous_inputs_equal_contiguous_ones(grad):
    unary, image = make_inputs(h=10, w=8)
    crf = CRFRNNLayer(3, num_iterations=2, **SMALL)
    with torch.set_grad_enabled(grad):
        expected = crf(unary, image)
        cases = {
            "channels_last": (unary.to(memory_format=torch.channels_last),
                              image.to(memory_format=torch.channels_last)),
            "transposed": (unary.transpose(2, 3).contiguous().transpose(2, 3),
                           image.transpose(2, 3).contiguous().transpose(2, 3)),
            "strided": (torch.stack([unary, unary], -1)[..., 0], torch.stack([image, image], -1)[..., 0]),
        }
        for name, (u, im) in cases.items():
            assert not u.is_contiguous()
            torch.testing.assert_close(crf(u, im), expected, msg=name)
    one = crf(unary[:1].expand(3, -1, -1, -1), image[:1].expand(3, -1, -1, -1))  # stride-0 batch
    torch.testing.assert_close(one, crf(unary[:1], image[:1]).expand(3, -1, -1, -1))


def test_mixed_real_dtypes_of_unary_and_image_work():
    unary, image = make_inputs()
    crf = CRFRNNLayer(3, num_iterations=2, **SMALL)
    with torch.no_grad():
        expected = crf(unary.double(), image.double())
        torch.testing.assert_close(crf(unary.double(), image.float()), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(crf(unary, image.double()).double(), expected, rtol=1e-4, atol=1e-4)


def test_empty_heights_and_widths_give_empty_results():
    crf = CRFRNNLayer(3)
    for shape in ((1, 3, 0, 5), (2, 3, 4, 0), (0, 3, 4, 5)):
        assert crf(torch.zeros(shape), torch.zeros(shape)).shape == shape
    assert crfrnn.dense_crf(np.zeros((0, 5, 3), np.uint8), np.zeros((3, 0, 5), np.float32)).shape == (3, 0, 5)


def test_huge_images_raise_before_allocating():
    """Expanded (stride-0) inputs cost no memory; a copy of them would cost gigabytes."""
    big = (1, 3, 9000, 9000)  # 81 million pixels: over the int32 limit of the bilateral lattice
    with pytest.raises(ValueError, match=r"81000000 points .* at most 71582788 for d = 5"):
        CRFRNNLayer(3)(torch.zeros(1, 3, 1, 1).expand(big), torch.zeros(1, 3, 1, 1).expand(big))
    with pytest.raises(ValueError, match="at most 71582788 for d = 5"):
        crfrnn.dense_crf(torch.zeros(1, 1, 3, dtype=torch.uint8).expand(9000, 9000, 3),
                         torch.zeros(2, 1, 1).expand(2, 9000, 9000))
    with pytest.raises(ValueError, match=f"at most {crfrnn.max_lattice_points(2)} for d = 2"):
        crfrnn.Lattice(torch.zeros(1, 1, 2).expand(1, crfrnn.max_lattice_points(2) + 1, 2))


def test_nan_in_the_image_raises_naming_the_image():
    unary, image = make_inputs()
    image[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="image gives bilateral features .* 1 NaN/Inf"):
        CRFRNNLayer(3)(unary, image)
    crf = CRFRNNLayer(3, image_mean=(0.5, 0.5, 0.5), image_std=(0.25, 0.25, 0.25))
    with pytest.raises(ValueError, match="image gives bilateral features .* NaN/Inf"):
        crf(unary, image / 255)


def test_bool_and_complex_tensors_raise_type_errors():
    unary, image = make_inputs()
    crf = CRFRNNLayer(3)
    for bad in (unary > 0, unary.to(torch.complex64)):
        with pytest.raises(TypeError, match="unary must be floating point"):
            crf(bad, image)
    for bad in (image > 100, image.to(torch.complex64), image.to(torch.uint16)):  # uint16: no reductions in torch
        with pytest.raises(TypeError, match=f"image .* must be real RGB .* a signed integer .* got {bad.dtype}"):
            crf(unary, bad)
    with pytest.raises(TypeError, match="image .* must be real RGB .* got torch.uint16"):
        crfrnn.dense_crf(np.zeros((4, 5, 3), np.uint16), np.full((2, 4, 5), 0.5, np.float32))
    for bad in (torch.ones(1, 5, 2, dtype=torch.bool), torch.ones(1, 5, 2, dtype=torch.complex64)):
        with pytest.raises(TypeError, match="features must be a floating-point"):
            crfrnn.Lattice(bad)
    lat = crfrnn.Lattice(torch.rand(1, 5, 2))
    for bad in (torch.ones(1, 5, 3, dtype=torch.bool), torch.ones(1, 5, 3, dtype=torch.complex128)):
        with pytest.raises(TypeError, match="values must be a floating-point"):
            lat.filter(bad)
    img = np.zeros((4, 5, 3), np.uint8)
    for bad in (np.ones((3, 4, 5), bool), np.ones((3, 4, 5), np.complex64)):
        with pytest.raises(TypeError, match="probs must be floating point"):
            crfrnn.dense_crf(img, bad)
    for bad in (img > 0, img.astype(np.complex64)):
        with pytest.raises(TypeError, match="image .* must be real RGB"):
            crfrnn.dense_crf(bad, np.full((3, 4, 5), 1 / 3, np.float32))


@pytest.mark.parametrize("op", ["build_lattice", "build_lattice_ref"])
def test_build_ops_check_their_features_on_direct_calls(op):
    """Both build ops refuse what the lattice cannot hold (the C++ op with RuntimeError, the
    reference with ValueError/TypeError), instead of building a lattice of garbage."""
    if op == "build_lattice" and not NATIVE:
        pytest.skip("C++ extension not built")
    build = getattr(torch.ops.crfrnn, op)
    cases = [(torch.rand(1, 4, 0), "d must be in 1..31, got 0"), (torch.rand(1, 4, 32), "d must be in 1..31, got 32"),
             (torch.rand(4, 3), r"features must be \[N, P, d\]"),
             (torch.ones(1, 4, 2, dtype=torch.int32), "features must be floating point"),
             (torch.ones(1, 4, 2, dtype=torch.complex64), "features must be floating point"),
             (torch.full((1, 4, 2), float("nan")), "features contain 8 NaN/Inf values")]
    for features, match in cases:
        with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
            build(features)
    with pytest.raises((RuntimeError, ValueError), match="too many points|more than a lattice can index"):
        build(torch.zeros(1, 1, 2).expand(1, 2 ** 30, 2))
    with pytest.raises(ValueError, match="d must be in 1..31, got 32"):
        crfrnn.Lattice(torch.rand(1, 4, 32), backend="reference")


def test_dense_crf_refuses_scores_passed_as_probabilities():
    """Values above 1 would be clipped to 1 before the log, flattening the unary silently."""
    image = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(ValueError, match="probabilities in 0..1 .* got values up to 50"):
        crfrnn.dense_crf(image, np.full((2, 4, 5), 50.0, np.float32))
    crfrnn.dense_crf(image, np.full((2, 4, 5), 0.5, np.float32))  # probabilities pass
