"""Build of crfrnn's lattice extension (crfrnn._C) with torch.utils.cpp_extension.

- The C++ (CPU) backend is always built.
- The CUDA backend is built when a CUDA toolkit is found and either a GPU is visible or
  FORCE_CUDA=1 (compile without a GPU; pick architectures with TORCH_CUDA_ARCH_LIST).
- CRFRNN_NO_CUDA=1 skips CUDA even when a toolkit is present.
- A failed compile does not fail the install (crfrnn then falls back to its pure-PyTorch
  reference backend, with a warning at import), unless CRFRNN_STRICT_BUILD=1, as in CI.

Build against the torch you run with: `pip install --no-build-isolation -e .`
"""
import glob
import os
import sys
import warnings

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("crfrnn", "csrc")


def want_cuda() -> bool:
    if os.environ.get("CRFRNN_NO_CUDA") == "1":
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        if CUDA_HOME is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    return CUDA_HOME is not None and torch.cuda.is_available()


def extension():
    sources = [os.path.join(CSRC, "ops.cpp")] + sorted(glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
    # -ffp-contract=off: no fused multiply-add (GCC contracts by default on aarch64), so the
    # lattice arithmetic rounds as in the reference and the CUDA build. -fno-trapping-math
    # changes no value (nothing here reads the floating-point exception flags); it lets GCC
    # vectorise loops with float comparisons, such as the clamp of the softmax's exp. The C++
    # standard is the one torch.utils.cpp_extension picks for this torch.
    cxx = ["-O3", "-ffp-contract=off", "-fno-trapping-math"]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")  # at::parallel_for runs on OpenMP threads
        link.append("-fopenmp")
    kwargs = dict(name="crfrnn._C", include_dirs=[os.path.join(HERE, CSRC)],
                  extra_link_args=link, optional=True)
    if want_cuda():
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
        # --fmad=false: no fused multiply-add, so the lattice arithmetic of lattice_math.h and the
        # filter steps of lattice_filter_steps.h round exactly as on the CPU: both backends build
        # the same lattice and filter to the same bits.
        return CUDAExtension(sources=sources, extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--fmad=false"]},
                             **kwargs)
    return CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


class OptionalBuildExtension(BuildExtension):
    """Keep installing (reference backend only) when the compiler fails, unless strict."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # compiler or toolkit failure of any kind
            if os.environ.get("CRFRNN_STRICT_BUILD") == "1" or not getattr(ext, "optional", False):
                raise
            warnings.warn(f"crfrnn: building {ext.name} failed ({exc}); installing without it: "
                          "the pure-PyTorch reference backend will be used.")


setup(ext_modules=[extension()], cmdclass={"build_ext": OptionalBuildExtension})
