// Host-side launch functions of the CUDA lattice kernels (lattice_kernels.cu).
//
// Raw device pointers, sizes and a stream in, one kernel launch per function, the launch's
// cudaGetLastError() out. No ATen here: the launcher (lattice_cuda.cpp) allocates every buffer
// with torch and checks the returned codes; the .cu then compiles with nvcc alone, in seconds.
//
// Sizes: P = N*P points, d1 = d+1, K = P*d1 simplex corners ("entries", e = p*d1 + r),
// M = lattice vertices, C = channels. All buffers are contiguous, row-major.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace crfrnn {
namespace cuda {

// ---- build -------------------------------------------------------------------------------------

// Per point p: simplex[p, 0:d1] = rem0, simplex[p, d1:2*d1] = rank, bary[p, 0:d1] = barycentric
// weights (embed_point of lattice_math.h). features: [P, d]. scalar_t: float or double.
template <typename scalar_t>
cudaError_t launch_embed(const scalar_t* features, int64_t num_points, int d, int* simplex,
                         double* bary, cudaStream_t stream);

// Inserts the key of every entry into the open-addressing table `slots` (capacity = mask + 1, a
// power of two, every slot -1 on entry). Afterwards each occupied slot holds the smallest entry
// whose key is that slot's key, and slot_of_entry[e] is the slot of entry e's key. Sets
// *overflow = 1 if a probe sequence ran through the whole table (cannot happen below load 1).
cudaError_t launch_insert(const int* simplex, int d, int64_t per_image, int64_t num_entries,
                          int* slots, uint64_t mask, int* slot_of_entry, int* overflow,
                          cudaStream_t stream);

// owner_flag[e] = 1 if e is the smallest entry of its key (the vertex's "owner"), else 0.
cudaError_t launch_owner_flags(const int* slots, const int* slot_of_entry, int64_t num_entries,
                               int* owner_flag, cudaStream_t stream);

// With owner_csum = inclusive prefix sum of owner_flag (so vertices are numbered by their first
// entry, as the CPU build numbers them): vertex_index[e] = number of e's vertex, and
// owner[v] = the owner entry of vertex v.
cudaError_t launch_number(const int* slots, const int* slot_of_entry, const int* owner_flag,
                          const int* owner_csum, int64_t num_entries, int* vertex_index,
                          int* owner, cudaStream_t stream);

// neighbors[j, v, side] (shape [d1, M, 2]): vertex number of the blur neighbour of vertex v along
// direction j (side 0: sign +1, side 1: sign -1, as neighbor_key), or M when absent.
cudaError_t launch_neighbors(const int* simplex, int d, int64_t per_image, const int* owner,
                             int64_t num_vertices, const int* slots, uint64_t mask,
                             const int* owner_csum, int* neighbors, cudaStream_t stream);

// CSR offsets [M+1] of the vertex -> entries table from the vertex numbers of the entries sorted
// (sorted_vertex [K], non-decreasing): offsets[v] = first position of a vertex >= v.
cudaError_t launch_csr_offsets(const int* sorted_vertex, int64_t num_entries, int64_t num_vertices,
                               int* offsets, cudaStream_t stream);

// ---- filter (T = float or double; accumulation in T) -------------------------------------------

// Checks the index tables of a lattice before a filter reads them (the GPU side of
// check_filter_tables in checks.h, without a host sync): vertex_index [K] in [0, M), neighbors
// [2 * d1 * M] in [0, M], offsets [M+1] non-decreasing from 0 to K, entries [K] in [0, K). On the
// first bad value a thread prints it (table, position, value, expected range) and fails a
// device-side assertion: the stream's later kernels (the filter) then never run, and the process
// gets "device-side assert triggered" at its next CUDA call, as for PyTorch's own index checks.
cudaError_t launch_check_tables(const int* vertex_index, int64_t num_entries, const int* neighbors,
                                int d1, const int* offsets, const int* entries, int64_t num_vertices,
                                cudaStream_t stream);

// grid[v, k] = sum over the entries e of vertex v, in increasing order, of
// weights[e] * values[e / d1, k], for v < M (row M is left untouched: the caller zeroes it).
template <typename T>
cudaError_t launch_splat(const T* values, const T* weights, int d1, const int* offsets,
                         const int* entries, int64_t num_vertices, int64_t channels, T* grid,
                         cudaStream_t stream);

// dst[v, k] = src[v, k] + 0.5 (src[a, k] + src[b, k]) with (a, b) = neighbors_j[v, 0:2], v < M.
template <typename T>
cudaError_t launch_blur(const T* src, const int* neighbors_j, int64_t num_vertices,
                        int64_t channels, T* dst, cudaStream_t stream);

// out[p, k] = alpha * sum_r weights[p, r] * grid[vertex_index[p, r], k].
template <typename T>
cudaError_t launch_slice(const T* grid, const int* vertex_index, const T* weights, int d1,
                         int64_t num_points, int64_t channels, T alpha, T* out,
                         cudaStream_t stream);

// ---- the feature gradient --------------------------------------------------------------------

// grad_weights[e] = alpha (<grad[p], forward_grid[v]> + <values[p], adjoint_grid[v]>) for every
// entry e = p*d1 + r, v = vertex_index[e] (weight_grad_entry of lattice_filter_steps.h).
template <typename T>
cudaError_t launch_weight_grad(const int* vertex_index, int d1, int64_t num_points, const T* values, const T* grad,
                               const T* forward_grid, const T* adjoint_grid, int64_t channels, T alpha,
                               T* grad_weights, cudaStream_t stream);

// grad_features[p, 0:d] (double) from grad_weights[p, 0:d+1] (double), simplices held fixed
// (embed_point_backward of lattice_math.h). features: [P, d], scalar_t float or double.
template <typename scalar_t>
cudaError_t launch_feature_grad(const scalar_t* features, int64_t num_points, int d, const double* grad_weights,
                                double* grad_features, cudaStream_t stream);

}  // namespace cuda
}  // namespace crfrnn
