// Launch geometry shared by the CUDA kernels (lattice_kernels.cu, mean_field_kernels.cu): blocks
// of kThreads threads, at most kMaxBlocks blocks, each thread looping over the indices a
// grid-stride apart, so one launch covers any n.
#pragma once

#include <algorithm>
#include <cstdint>

namespace crfrnn {
namespace cuda {

constexpr int kThreads = 256;
// Grid-stride loops: this many blocks at most (16.7M threads), each thread looping as needed.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

// Blocks for n indices: enough for one index per thread, at least 1, at most kMaxBlocks.
inline unsigned int num_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min(std::max<int64_t>(blocks, 1), kMaxBlocks));
}

}  // namespace cuda
}  // namespace crfrnn

// for (int64_t i = this thread's first index; i < n; i += the grid's thread count)
#define CRFRNN_GRID_STRIDE_LOOP(i, n)                                                      \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
