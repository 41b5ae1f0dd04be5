// CUDA kernels of the permutohedral lattice: grid-stride loops around the per-element bodies of
// lattice_device.cuh, and their host launch functions (declared in lattice_kernels.cuh).
//
// No ATen/torch includes here (nvcc compiles this file in seconds); the launcher
// lattice_cuda.cpp allocates the buffers and checks the cudaError_t each function returns.
// Built with --fmad=false (setup.py) so the shared arithmetic rounds as on the CPU.
#include <assert.h>

#include <cstdint>
#include <cstdio>

#include <cuda_runtime.h>

#include "grid_stride.cuh"
#include "lattice_device.cuh"
#include "lattice_kernels.cuh"

namespace crfrnn {
namespace cuda {
namespace {

template <typename scalar_t>
__global__ void embed_kernel(const scalar_t* __restrict__ features, int64_t num_points, int d,
                             int* __restrict__ simplex, double* __restrict__ bary) {
  CRFRNN_GRID_STRIDE_LOOP(p, num_points) { device::embed_one(p, features, d, simplex, bary); }
}

// slots is read and written concurrently by all threads: no __restrict__ on it.
__global__ void insert_kernel(const int* __restrict__ simplex, int d, int64_t per_image,
                              int64_t num_entries, int* slots, uint64_t mask,
                              int* __restrict__ slot_of_entry, int* overflow) {
  CRFRNN_GRID_STRIDE_LOOP(e, num_entries) {
    device::insert_one(e, simplex, d, per_image, slots, mask, slot_of_entry, overflow);
  }
}

__global__ void owner_flags_kernel(const int* __restrict__ slots, const int* __restrict__ slot_of_entry,
                                   int64_t num_entries, int* __restrict__ owner_flag) {
  CRFRNN_GRID_STRIDE_LOOP(e, num_entries) { device::owner_flag_one(e, slots, slot_of_entry, owner_flag); }
}

__global__ void number_kernel(const int* __restrict__ slots, const int* __restrict__ slot_of_entry,
                              const int* __restrict__ owner_flag, const int* __restrict__ owner_csum,
                              int64_t num_entries, int* __restrict__ vertex_index,
                              int* __restrict__ owner) {
  CRFRNN_GRID_STRIDE_LOOP(e, num_entries) {
    device::number_one(e, slots, slot_of_entry, owner_flag, owner_csum, vertex_index, owner);
  }
}

__global__ void neighbors_kernel(const int* __restrict__ simplex, int d, int64_t per_image,
                                 const int* __restrict__ owner, int64_t num_vertices,
                                 const int* __restrict__ slots, uint64_t mask,
                                 const int* __restrict__ owner_csum, int* __restrict__ neighbors) {
  const int64_t n = num_vertices * (d + 1);
  CRFRNN_GRID_STRIDE_LOOP(t, n) {
    device::neighbor_one(t, simplex, d, per_image, owner, num_vertices, slots, mask, owner_csum, neighbors);
  }
}

__global__ void csr_offsets_kernel(const int* __restrict__ sorted_vertex, int64_t num_entries,
                                   int64_t num_vertices, int* __restrict__ offsets) {
  CRFRNN_GRID_STRIDE_LOOP(i, num_entries) {
    device::csr_offsets_one(i, sorted_vertex, num_entries, num_vertices, offsets);
  }
}

template <typename T>
__global__ void splat_kernel(const T* __restrict__ values, const T* __restrict__ weights, int d1,
                             const int* __restrict__ offsets, const int* __restrict__ entries,
                             int64_t num_vertices, int64_t channels, T* __restrict__ grid) {
  const int64_t n = num_vertices * channels;
  CRFRNN_GRID_STRIDE_LOOP(t, n) { device::splat_one(t, values, weights, d1, offsets, entries, channels, grid); }
}

template <typename T>
__global__ void blur_kernel(const T* __restrict__ src, const int* __restrict__ neighbors_j,
                            int64_t num_vertices, int64_t channels, T* __restrict__ dst) {
  const int64_t n = num_vertices * channels;
  CRFRNN_GRID_STRIDE_LOOP(t, n) { device::blur_one(t, src, neighbors_j, channels, dst); }
}

template <typename T>
__global__ void slice_kernel(const T* __restrict__ grid, const int* __restrict__ vertex_index,
                             const T* __restrict__ weights, int d1, int64_t num_points,
                             int64_t channels, T alpha, T* __restrict__ out) {
  const int64_t n = num_points * channels;
  CRFRNN_GRID_STRIDE_LOOP(t, n) { device::slice_one(t, grid, vertex_index, weights, d1, channels, alpha, out); }
}

// Prints a bad table value and fails a device-side assertion. __assert_fail is what assert()
// calls: called directly, the check stays in NDEBUG builds. Its message names the table.
__device__ void report_bad_table_value(const char* table, int64_t position, int value, int64_t lo,
                                       int64_t hi, const char* assertion) {
  printf("crfrnn::lattice_filter (CUDA): %s[%lld] = %d, expected a value in [%lld, %lld]\n", table,
         static_cast<long long>(position), value, static_cast<long long>(lo), static_cast<long long>(hi));
  __assert_fail(assertion, __FILE__, __LINE__, __func__);
}

// Positions t of the four tables one after the other: vertex_index, neighbors, offsets, entries.
__global__ void check_tables_kernel(const int* __restrict__ vertex_index, int64_t num_entries,
                                    const int* __restrict__ neighbors, int64_t num_neighbors,
                                    const int* __restrict__ offsets, const int* __restrict__ entries,
                                    int64_t num_vertices) {
  const int64_t k = num_entries, m = num_vertices;
  CRFRNN_GRID_STRIDE_LOOP(t, k + num_neighbors + (m + 1) + k) {
    int64_t i = t;
    if (i < k) {
      const int v = vertex_index[i];
      if (v < 0 || v >= m) {
        report_bad_table_value("vertex_index", i, v, 0, m - 1,
                               "crfrnn::lattice_filter: vertex_index holds a value outside [0, M)");
      }
      continue;
    }
    i -= k;
    if (i < num_neighbors) {
      const int v = neighbors[i];
      if (v < 0 || v > m) {
        report_bad_table_value("neighbors", i, v, 0, m,
                               "crfrnn::lattice_filter: neighbors holds a value outside [0, M]");
      }
      continue;
    }
    i -= num_neighbors;
    if (i <= m) {
      // The ends exactly 0 and K, in between within [offsets[i-1], K].
      const int v = offsets[i];
      const int64_t lo = i == 0 ? 0 : (i == m ? k : offsets[i - 1]);
      const int64_t hi = i == 0 ? 0 : k;
      if (v < lo || v > hi) {
        report_bad_table_value("splat_offsets", i, v, lo, hi,
                               "crfrnn::lattice_filter: splat_offsets is not non-decreasing from 0 to K");
      }
      continue;
    }
    i -= m + 1;
    const int v = entries[i];
    if (v < 0 || v >= k) {
      report_bad_table_value("splat_entries", i, v, 0, k - 1,
                             "crfrnn::lattice_filter: splat_entries holds a value outside [0, K)");
    }
  }
}

template <typename T>
__global__ void weight_grad_kernel(const int* __restrict__ vertex_index, int d1, int64_t num_entries,
                                   const T* __restrict__ values, const T* __restrict__ grad,
                                   const T* __restrict__ forward_grid, const T* __restrict__ adjoint_grid,
                                   int64_t channels, T alpha, T* __restrict__ grad_weights) {
  CRFRNN_GRID_STRIDE_LOOP(e, num_entries) {
    device::weight_grad_one(e, d1, vertex_index, values, grad, forward_grid, adjoint_grid, channels, alpha,
                            grad_weights);
  }
}

template <typename scalar_t>
__global__ void feature_grad_kernel(const scalar_t* __restrict__ features, int64_t num_points, int d,
                                    const double* __restrict__ grad_weights, double* __restrict__ grad_features) {
  CRFRNN_GRID_STRIDE_LOOP(p, num_points) { device::feature_grad_one(p, features, d, grad_weights, grad_features); }
}

#undef CRFRNN_GRID_STRIDE_LOOP

}  // namespace

// Every launch function: nothing to do -> no launch (a 0-block launch is an error); else one
// launch on `stream`, then the launch's error code.

template <typename scalar_t>
cudaError_t launch_embed(const scalar_t* features, int64_t num_points, int d, int* simplex,
                         double* bary, cudaStream_t stream) {
  if (num_points <= 0) return cudaSuccess;
  embed_kernel<scalar_t><<<num_blocks(num_points), kThreads, 0, stream>>>(features, num_points, d, simplex, bary);
  return cudaGetLastError();
}

cudaError_t launch_insert(const int* simplex, int d, int64_t per_image, int64_t num_entries,
                          int* slots, uint64_t mask, int* slot_of_entry, int* overflow,
                          cudaStream_t stream) {
  if (num_entries <= 0) return cudaSuccess;
  insert_kernel<<<num_blocks(num_entries), kThreads, 0, stream>>>(simplex, d, per_image, num_entries, slots,
                                                                   mask, slot_of_entry, overflow);
  return cudaGetLastError();
}

cudaError_t launch_owner_flags(const int* slots, const int* slot_of_entry, int64_t num_entries,
                               int* owner_flag, cudaStream_t stream) {
  if (num_entries <= 0) return cudaSuccess;
  owner_flags_kernel<<<num_blocks(num_entries), kThreads, 0, stream>>>(slots, slot_of_entry, num_entries,
                                                                        owner_flag);
  return cudaGetLastError();
}

cudaError_t launch_number(const int* slots, const int* slot_of_entry, const int* owner_flag,
                          const int* owner_csum, int64_t num_entries, int* vertex_index,
                          int* owner, cudaStream_t stream) {
  if (num_entries <= 0) return cudaSuccess;
  number_kernel<<<num_blocks(num_entries), kThreads, 0, stream>>>(slots, slot_of_entry, owner_flag,
                                                                   owner_csum, num_entries, vertex_index, owner);
  return cudaGetLastError();
}

cudaError_t launch_neighbors(const int* simplex, int d, int64_t per_image, const int* owner,
                             int64_t num_vertices, const int* slots, uint64_t mask,
                             const int* owner_csum, int* neighbors, cudaStream_t stream) {
  const int64_t n = num_vertices * (d + 1);
  if (n <= 0) return cudaSuccess;
  neighbors_kernel<<<num_blocks(n), kThreads, 0, stream>>>(simplex, d, per_image, owner, num_vertices, slots,
                                                            mask, owner_csum, neighbors);
  return cudaGetLastError();
}

cudaError_t launch_csr_offsets(const int* sorted_vertex, int64_t num_entries, int64_t num_vertices,
                               int* offsets, cudaStream_t stream) {
  if (num_entries <= 0) return cudaSuccess;
  csr_offsets_kernel<<<num_blocks(num_entries), kThreads, 0, stream>>>(sorted_vertex, num_entries,
                                                                        num_vertices, offsets);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_splat(const T* values, const T* weights, int d1, const int* offsets,
                         const int* entries, int64_t num_vertices, int64_t channels, T* grid,
                         cudaStream_t stream) {
  const int64_t n = num_vertices * channels;
  if (n <= 0) return cudaSuccess;
  splat_kernel<T><<<num_blocks(n), kThreads, 0, stream>>>(values, weights, d1, offsets, entries, num_vertices,
                                                          channels, grid);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_blur(const T* src, const int* neighbors_j, int64_t num_vertices,
                        int64_t channels, T* dst, cudaStream_t stream) {
  const int64_t n = num_vertices * channels;
  if (n <= 0) return cudaSuccess;
  blur_kernel<T><<<num_blocks(n), kThreads, 0, stream>>>(src, neighbors_j, num_vertices, channels, dst);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_slice(const T* grid, const int* vertex_index, const T* weights, int d1,
                         int64_t num_points, int64_t channels, T alpha, T* out,
                         cudaStream_t stream) {
  const int64_t n = num_points * channels;
  if (n <= 0) return cudaSuccess;
  slice_kernel<T><<<num_blocks(n), kThreads, 0, stream>>>(grid, vertex_index, weights, d1, num_points,
                                                          channels, alpha, out);
  return cudaGetLastError();
}

cudaError_t launch_check_tables(const int* vertex_index, int64_t num_entries, const int* neighbors,
                                int d1, const int* offsets, const int* entries, int64_t num_vertices,
                                cudaStream_t stream) {
  const int64_t num_neighbors = 2 * static_cast<int64_t>(d1) * num_vertices;
  const int64_t n = 2 * num_entries + num_neighbors + num_vertices + 1;
  check_tables_kernel<<<num_blocks(n), kThreads, 0, stream>>>(vertex_index, num_entries, neighbors, num_neighbors,
                                                               offsets, entries, num_vertices);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_weight_grad(const int* vertex_index, int d1, int64_t num_points, const T* values, const T* grad,
                               const T* forward_grid, const T* adjoint_grid, int64_t channels, T alpha,
                               T* grad_weights, cudaStream_t stream) {
  const int64_t n = num_points * d1;
  if (n <= 0) return cudaSuccess;
  weight_grad_kernel<T><<<num_blocks(n), kThreads, 0, stream>>>(vertex_index, d1, n, values, grad, forward_grid,
                                                                adjoint_grid, channels, alpha, grad_weights);
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_feature_grad(const scalar_t* features, int64_t num_points, int d, const double* grad_weights,
                                double* grad_features, cudaStream_t stream) {
  if (num_points <= 0) return cudaSuccess;
  feature_grad_kernel<scalar_t><<<num_blocks(num_points), kThreads, 0, stream>>>(features, num_points, d,
                                                                                 grad_weights, grad_features);
  return cudaGetLastError();
}

// Explicit instantiations: features float (also for half/bfloat16, converted by the launcher)
// and double; filter and weight gradient float and double.
template cudaError_t launch_embed<float>(const float*, int64_t, int, int*, double*, cudaStream_t);
template cudaError_t launch_embed<double>(const double*, int64_t, int, int*, double*, cudaStream_t);
template cudaError_t launch_splat<float>(const float*, const float*, int, const int*, const int*, int64_t,
                                         int64_t, float*, cudaStream_t);
template cudaError_t launch_splat<double>(const double*, const double*, int, const int*, const int*, int64_t,
                                          int64_t, double*, cudaStream_t);
template cudaError_t launch_blur<float>(const float*, const int*, int64_t, int64_t, float*, cudaStream_t);
template cudaError_t launch_blur<double>(const double*, const int*, int64_t, int64_t, double*, cudaStream_t);
template cudaError_t launch_slice<float>(const float*, const int*, const float*, int, int64_t, int64_t, float,
                                         float*, cudaStream_t);
template cudaError_t launch_slice<double>(const double*, const int*, const double*, int, int64_t, int64_t,
                                          double, double*, cudaStream_t);

template cudaError_t launch_weight_grad<float>(const int*, int, int64_t, const float*, const float*, const float*,
                                               const float*, int64_t, float, float*, cudaStream_t);
template cudaError_t launch_weight_grad<double>(const int*, int, int64_t, const double*, const double*,
                                                const double*, const double*, int64_t, double, double*,
                                                cudaStream_t);
template cudaError_t launch_feature_grad<float>(const float*, int64_t, int, const double*, double*, cudaStream_t);
template cudaError_t launch_feature_grad<double>(const double*, int64_t, int, const double*, double*, cudaStream_t);

}  // namespace cuda
}  // namespace crfrnn
