// CUDA kernels of the fused mean-field ops: one grid-stride launch template around the per-thread
// functors of mean_field_device.cuh, and the schedules run on a stream. No ATen/torch includes
// (nvcc compiles this file alone); built with --fmad=false (setup.py), as the lattice kernels.
#include <cstdint>

#include <cuda_runtime.h>

#include "grid_stride.cuh"
#include "mean_field_kernels.cuh"

namespace crfrnn {
namespace cuda {
namespace {

// body(i) for i in [0, n), a grid-stride loop.
template <class Body>
__global__ void for_each_index_kernel(int64_t n, Body body) {
  CRFRNN_GRID_STRIDE_LOOP(i, n) { body(i); }
}

// The Exec of the schedules: each run() one launch on the stream; after a failed launch the
// later ones are skipped and `error` keeps the first failure.
struct StreamExec {
  cudaStream_t stream;
  cudaError_t error = cudaSuccess;

  template <class Body>
  void run(int64_t n, const Body& body) {
    if (n <= 0 || error != cudaSuccess) return;
    for_each_index_kernel<<<num_blocks(n), kThreads, 0, stream>>>(n, body);
    error = cudaGetLastError();
  }
};

}  // namespace

template <typename T>
cudaError_t launch_mean_field_forward(const device::MeanFieldView<T>& mf, cudaStream_t stream) {
  StreamExec exec{stream};
  device::run_mean_field_forward(exec, mf);
  return exec.error;
}

template <typename T>
cudaError_t launch_mean_field_backward(const device::MeanFieldView<T>& mf,
                                       const device::MeanFieldGradientView<T>& grad, cudaStream_t stream) {
  StreamExec exec{stream};
  device::run_mean_field_backward(exec, mf, grad);
  return exec.error;
}

template cudaError_t launch_mean_field_forward<float>(const device::MeanFieldView<float>&, cudaStream_t);
template cudaError_t launch_mean_field_forward<double>(const device::MeanFieldView<double>&, cudaStream_t);
template cudaError_t launch_mean_field_backward<float>(const device::MeanFieldView<float>&,
                                                       const device::MeanFieldGradientView<float>&, cudaStream_t);
template cudaError_t launch_mean_field_backward<double>(const device::MeanFieldView<double>&,
                                                        const device::MeanFieldGradientView<double>&, cudaStream_t);

}  // namespace cuda
}  // namespace crfrnn
