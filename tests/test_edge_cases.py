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
