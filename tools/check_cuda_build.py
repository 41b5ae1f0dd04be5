"""Check that a built crfrnn extension registers its kernels: CPU and CUDA for every op.

Needs no GPU: it loads the shared library with `torch.ops.load_library` (which runs its
TORCH_LIBRARY registrations) and asks the dispatcher which backends have a kernel, for every op
of the extension. Exits 1 if a kernel is missing, 2 if no library is found. For CI after a CUDA build, e.g.

    FORCE_CUDA=1 CRFRNN_STRICT_BUILD=1 python setup.py build_ext --build-lib /tmp/cuda-lib
    python tools/check_cuda_build.py --library /tmp/cuda-lib

Run it in a fresh interpreter: it must not import `crfrnn` (that would load a second copy of the
extension, and the dispatcher accepts one definition of the `crfrnn` namespace only).
"""
import argparse
import glob
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Every op of the extension (csrc/ops.cpp); each has a CPU and a CUDA kernel.
OPS = ("build_lattice", "lattice_filter", "lattice_filter_weights_backward", "barycentric_weights_backward",
       "mean_field_inference", "mean_field_forward", "mean_field_backward")


def dispatch_key(name: str) -> str:
    """An argparse type: a dispatch key name such as CPU or CUDA."""
    if not hasattr(torch.DispatchKey, name):
        raise argparse.ArgumentTypeError(f"not a dispatch key: {name!r} (e.g. CPU, CUDA)")
    return name


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--library", default=REPO,
                        help="the extension's .so, or a directory holding crfrnn/_C*.so (a build-lib "
                             "or the repository; default: %(default)s)")
    parser.add_argument("--keys", nargs="+", type=dispatch_key, default=["CPU", "CUDA"],
                        help="dispatch keys every op must have a kernel for (default: CPU CUDA)")
    return parser


def find_library(path: str) -> str:
    """The extension file: `path` itself, or crfrnn/_C*.so (then _C*.so) under the directory."""
    if os.path.isfile(path):
        return path
    for pattern in ("crfrnn/_C*.so", "_C*.so", "crfrnn/_C*.pyd", "_C*.pyd"):
        found = sorted(glob.glob(os.path.join(path, pattern)))
        if found:
            return found[0]
    raise FileNotFoundError(f"no crfrnn extension (crfrnn/_C*.so) under {path!r}")


def main(args) -> int:
    try:
        library = find_library(args.library)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    torch.ops.load_library(library)
    print(f"loaded {library}")
    missing = []
    width = max(len(f"crfrnn::{op}") for op in OPS) + 2
    print(f"{'op':<{width}}" + "".join(f"{key:>8}" for key in args.keys))
    for op in OPS:
        name = f"crfrnn::{op}"
        overload = getattr(torch.ops.crfrnn, op).default
        row = []
        for key in args.keys:
            ok = overload.has_kernel_for_dispatch_key(getattr(torch.DispatchKey, key))
            row.append("yes" if ok else "MISSING")
            if not ok:
                missing.append(f"{name} [{key}]")
        print(f"{name:<{width}}" + "".join(f"{cell:>8}" for cell in row))
    if missing:
        print("missing kernels: " + ", ".join(missing), file=sys.stderr)
        return 1
    print("all kernels registered")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
