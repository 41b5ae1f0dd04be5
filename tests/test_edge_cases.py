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
    from crfrnn.crf import build_crf_lattices
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

    def mean_field_cases(lattices):
        scales = [l.normalization_scales("symmetric", torch.float32) for l in lattices]
        unary = torch.randn(1, 42, 3, generator=g)

        def call(kernel, **bad):
            tables = {name: [bad[name] if i == kernel and name in bad else getattr(l, name)
                             for i, l in enumerate(lattices)] for name in ("vertex_index", "neighbors")}
            return torch.ops.crfrnn.mean_field_inference(
                unary, tables["vertex_index"], [l.weights for l in lattices], [s[0] for s in scales],
                [s[1] for s in scales], tables["neighbors"], [torch.ones(3, 3)] * 2, 2)

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
        op_cases = mean_field_cases(lattices) if op_name == "mean_field_inference" else filter_cases(op_name, lattices[0])
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

_TABLE_OPS = ["lattice_filter", "lattice_filter_ref", "mean_field_inference"]


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
    assert len(cases) >= (12 if op == "mean_field_inference" else 16) and set(results) == set(cases)
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
    feats = torch.rand(1, 3, 6, 5) * 3
    vals = torch.rand(1, 2, 6, 5, dtype=torch.float64)
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
