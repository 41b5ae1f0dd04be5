"""Deliberate bugs that the default test suite must catch, without the data folder.

    python tools/mutation_check.py                 # every mutation (CI's slow stage)
    python tools/mutation_check.py --list          # what they are
    python tools/mutation_check.py --only clip_ignored adjoint_blur_forward_order

A test suite that passes whatever the CRF computes checks nothing. For each mutation below this
script copies the repository (the files git tracks or would track, and the built extension) into
a scratch folder, makes the one change (a text replacement that must apply exactly once, so a
mutation that no longer fits the code fails loudly), rebuilds the C++ extension when a C++ file
changed, and runs the default suite (`python -m pytest -x`, the library's tests first so that a
caught bug stops the run early) with `CRFRNN_SHARED_DATA` pointing nowhere, as on a machine without
../shared/data. The suite must fail (pytest's exit status 1) for every mutation; one that
survives is a bug the tests let through: write the test that catches it, and keep the mutation.
Add a mutation for every bug found in the wild.

Exit status: 0 when every mutation was caught, 1 when one survived or broke the run otherwise.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]


class Mutation(NamedTuple):
    name: str
    path: str       # relative to the repository root
    old: str        # text that must occur exactly once in `path`
    new: str
    what: str       # the bug, in words


MUTATIONS = [
    # Features: the lattice's inputs.
    Mutation("colour_features_x1.3", "crfrnn/features.py",
             "parts.append(_divided(guide.to(dtype), sigmas[num_positions:]",
             "parts.append(_divided(guide.to(dtype) * 1.3, sigmas[num_positions:]",
             "the guide (colour) features scaled by 1.3"),
    Mutation("row_position_div1.5", "crfrnn/features.py",
             "coordinate = torch.arange(spatial[axis], device=device, dtype=dtype) / sigma",
             "coordinate = torch.arange(spatial[axis], device=device, dtype=dtype) / sigma"
             " / (1.5 if axis == len(spatial) - 2 else 1.0)",
             "the row position divided by 1.5"),
    Mutation("x_and_y_swapped", "crfrnn/features.py",
             "for axis in reversed(range(len(spatial))):", "for axis in range(len(spatial)):",
             "the positions in tensor axis order (y, x) instead of densecrf's (x, y)"),
    Mutation("per_axis_bandwidths_reversed", "crfrnn/features.py",
             "position_sigmas[axis if num_positions > 1 else 0]",
             "position_sigmas[len(spatial) - 1 - axis if num_positions > 1 else 0]",
             "per-axis bandwidths applied in x, y, z order instead of the tensor's axis order"),
    # Normalisation.
    Mutation("symmetric_normalisation_power", "crfrnn/lattice.py",
             "n = torch.rsqrt(norm)", "n = 1.0 / norm",
             "symmetric normalisation with 1 / K1 instead of 1 / sqrt(K1)"),
    # Iteration counts.
    Mutation("loop_one_iteration_short", "crfrnn/inference.py",
             "for _ in range(num_iterations):", "for _ in range(num_iterations - 1):",
             "the step-by-step loop runs one iteration too few"),
    Mutation("fused_one_iteration_more", "crfrnn/inference.py",
             "[m.to(unary.dtype) for m in pairwise], num_iterations)",
             "[m.to(unary.dtype) for m in pairwise], num_iterations + 1)",
             "the fused ops run one iteration too many"),
    # The unary.
    Mutation("clip_ignored", "crfrnn/functional.py",
             "p.clamp(min=clip, max=1.0)", "p.clamp(min=1e-30, max=1.0)",
             "dense_crf ignores its clip"),
    # The C x C matrices.
    Mutation("matrices_in_the_wrong_order", "crfrnn/layer.py",
             "return [mu @ w for w in self.kernel_weight_matrices(dtype)]",
             "return [w @ mu for w in self.kernel_weight_matrices(dtype)]",
             "the pairwise matrices W mu instead of mu W"),
    Mutation("kernel_weight_halved", "crfrnn/sharing.py",
             "return sharing_entries(float(weight) * torch.eye(num_classes), sharing)",
             "return sharing_entries(0.5 * float(weight) * torch.eye(num_classes), sharing)",
             "the kernel weights start at w/2 I"),
    # Gradients.
    Mutation("gaussian_bandwidth_gradient_x3", "crfrnn/lattice.py",
             "grad_points = _gaussian_feature_grad(", "grad_points = 3 * _gaussian_feature_grad(",
             "the default (\"gaussian\") bandwidth gradient multiplied by 3"),
    Mutation("adjoint_blur_forward_order", "crfrnn/csrc/cpu/filter_loops.h",
             "const int j = reverse ? d1 - 1 - step : step;", "const int j = step;",
             "the C++ adjoint filter blurs in the forward order (a gradient 10-15% off)"),
    # The fused ops.
    Mutation("fused_softmax_gradient", "crfrnn/csrc/mean_field_steps.h",
             "for (int64_t b = 0; b < blocks; ++b) g[b] = q[b] * (g[b] - d);",
             "for (int64_t b = 0; b < blocks; ++b) g[b] = q[b] * g[b];",
             "the fused backward's softmax gradient without its <g, q> term"),
    Mutation("fused_exp_floor", "crfrnn/csrc/cpu/mean_field_kernels.inc",
             "return x < -87.0f ? 0.0f : e;", "return e;",
             "the fused CPU softmax floors tiny terms at e^-87 (a 3e38 weight turns them into messages)"),
    # Sender pruning.
    Mutation("prune_threshold_halved", "crfrnn/inference.py",
             "return 2 * prune / (spread + torch.sqrt(spread * spread + 4 * diagonal * prune))",
             "return prune / (spread + torch.sqrt(spread * spread + 4 * diagonal * prune))",
             "the step-by-step loop prunes at half the fused ops' per-class thresholds"),
    Mutation("empty_pseudo_class_nan", "crfrnn/csrc/cpu/mean_field_kernels.inc",
             "shift = empty ? zero : shift;", "shift = shift + zero;",
             "shared rows that shrink give an image with no silent class a NaN pseudo class"),
    Mutation("maxima_stop_early", "crfrnn/csrc/cpu/mean_field_kernels.inc",
             "for (int64_t i = 0; i < kLanes; ++i) reached &= !below[i];",
             "for (int64_t i = 0; i < kLanes; ++i) reached |= !below[i];",
             "the pass that tracks who sends stops tracking an image before all its classes reached"),
    Mutation("first_maxima_stop_early", "crfrnn/csrc/cpu/mean_field_kernels.inc",
             "if (!(most[l] >= in.thresholds[l])) return false;", "if (most[l] >= in.thresholds[l]) return true;",
             "beyond 32 classes, the first senders' pass stops an image once one class reached"),
    # Bad input (found by audits).
    Mutation("pruning_hides_overflow", "crfrnn/csrc/mean_field_checks.h",
             "TORCH_CHECK_VALUE(largest <= limit,", "TORCH_CHECK_VALUE(true || largest <= limit,",
             "pruned iterations run with matrices that can overflow: the NaN silences its class"),
    Mutation("every_three_channel_guide_is_rgb", "crfrnn/layer.py",
             "rgb_image = channels == 3 and any(", "rgb_image = channels == 3 or any(",
             "a volume's or point set's 3-channel guide is range-checked as RGB in 0..255"),
]

# The library's tests first: most mutations are caught there, and -x stops at the first failure.
FIRST = ["tests/test_features.py", "tests/test_crf.py", "tests/test_crf_densecrf.py", "tests/test_crf_fused.py",
         "tests/test_crf_learning.py", "tests/test_crf_inputs.py", "tests/test_lattice.py",
         "tests/test_lattice_feature_grad.py", "tests/test_crf_pruning.py"]


def repository_files():
    """The files git tracks, and the untracked ones it does not ignore."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (REPO / name).is_file()]


def make_copy(folder: Path):
    for name in repository_files():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    for built in (REPO / "crfrnn").glob("_C*.so"):  # the extension as built for the repository
        shutil.copy2(built, folder / "crfrnn" / built.name)


def apply(mutation: Mutation, folder: Path) -> str:
    """Make the change in the copy; returns the original text (to restore it)."""
    path = folder / mutation.path
    text = path.read_text()
    count = text.count(mutation.old)
    if count != 1:
        raise SystemExit(f"mutation {mutation.name}: {mutation.path} holds its text {count} times, not once: "
                         "update the mutation to the code")
    path.write_text(text.replace(mutation.old, mutation.new))
    return text


def build_extension(folder: Path, build_temp: Path):
    """Rebuild the C++ extension of the copy in place (ninja rebuilds only what changed)."""
    env = dict(os.environ, CRFRNN_STRICT_BUILD="1", CRFRNN_NO_CUDA="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace", "--build-temp",
                             str(build_temp)], cwd=folder, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"the build failed:\n{result.stderr[-3000:]}")


def run_suite(folder: Path, timeout: int):
    """(exit status, the first failing test or the output's tail, seconds) of the default suite."""
    env = dict(os.environ, CRFRNN_SHARED_DATA=str(folder / "no-shared-data"), PYTHONDONTWRITEBYTECODE="1")
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *FIRST,
                                 "tests"], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"no verdict in {timeout} s", time.perf_counter() - start
    failed = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    tail = failed[0] if failed else "\n".join(result.stdout.splitlines()[-5:])
    return result.returncode, tail, time.perf_counter() - start


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    p.add_argument("--timeout", type=int, default=1200, help="seconds one run of the suite may take")
    return p


def main(args):
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:32s} {m.path}: {m.what}")
        return 0
    chosen = MUTATIONS
    if args.only:
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        if unknown:
            raise SystemExit(f"unknown mutations {unknown}; --list names them")
        chosen = [m for m in MUTATIONS if m.name in args.only]
    survived = []
    with tempfile.TemporaryDirectory(prefix="crfrnn-mutations-") as scratch:
        folder, build_temp = Path(scratch) / "repo", Path(scratch) / "build"
        make_copy(folder)
        for k, mutation in enumerate(chosen, 1):
            original = apply(mutation, folder)
            native = mutation.path.startswith("crfrnn/csrc/")
            try:
                if native:
                    build_extension(folder, build_temp)
                status, first_failure, seconds = run_suite(folder, args.timeout)
            finally:
                (folder / mutation.path).write_text(original)
                if native:
                    build_extension(folder, build_temp)
            caught = status == 1
            print(f"[{k}/{len(chosen)}] {mutation.name}: {'caught' if caught else 'SURVIVED'} in {seconds:.0f} s"
                  f" ({mutation.what})\n    {first_failure}", flush=True)
            if not caught:
                survived.append(mutation.name)
    if survived:
        print(f"\n{len(survived)} of {len(chosen)} mutations survived the default suite: {', '.join(survived)}")
        return 1
    print(f"\nall {len(chosen)} mutations were caught")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
