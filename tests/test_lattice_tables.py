"""Corrupted lattice tables passed straight to the ops: each op checks every index table it
reads, and a bad one gives a clear error (naming the table, the range found and the range
expected), never a crash or an out-of-bounds read."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import crfrnn
from helpers import NATIVE, needs_native

REPO = Path(__file__).resolve().parents[1]


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
