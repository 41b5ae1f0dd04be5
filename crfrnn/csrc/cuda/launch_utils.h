// Host helpers shared by the CUDA launchers (lattice_cuda.cpp, mean_field_cuda.cpp).
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace crfrnn {

// Raises a torch error naming `kernel` when a launch (or the work before it) failed.
void check_launch(cudaError_t err, const char* kernel);

// The vertex -> entries table of a lattice (splat_offsets [M+1], splat_entries [P (d+1)]) from
// its vertex_index [N, P, d+1]: the entries stably sorted by vertex, so in increasing order within
// a vertex, as the CPU's counting sort leaves them. On `stream`.
std::pair<at::Tensor, at::Tensor> vertex_entries_table(const at::Tensor& vertex_index, int64_t m,
                                                       cudaStream_t stream);

}  // namespace crfrnn
