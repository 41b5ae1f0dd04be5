// Host-side launch functions of the fused mean-field CUDA ops (mean_field_kernels.cu): the
// schedules of mean_field_device.cuh on a stream. No ATen here; the launcher (mean_field_cuda.cpp)
// allocates every buffer with torch and checks the returned code (the first failed launch's).
#pragma once

#include <cuda_runtime_api.h>

#include "mean_field_device.cuh"

namespace crfrnn {
namespace cuda {

// run_mean_field_forward (mean_field_device.cuh) on `stream`. T = float or double.
template <typename T>
cudaError_t launch_mean_field_forward(const device::MeanFieldView<T>& mf, cudaStream_t stream);

// run_mean_field_backward on `stream`.
template <typename T>
cudaError_t launch_mean_field_backward(const device::MeanFieldView<T>& mf,
                                       const device::MeanFieldGradientView<T>& grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace crfrnn
