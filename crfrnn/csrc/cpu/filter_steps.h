// The three steps of the lattice filter on the CPU (splat, blur, slice), shared by the plain
// filter (lattice_cpu.cpp) and the fused mean-field loop (mean_field_cpu.cpp).
//
// A grid is (M+1) x C values, row-major: one row per lattice vertex plus row M, the zero row that
// missing blur neighbours point at. Every step is deterministic: each output element is summed
// in a fixed order, whatever the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace crfrnn {

// Scratch buffers up to this size are kept per thread between calls: the mean-field loop filters
// the same lattice dozens of times, and fresh multi-megabyte buffers cost as much in page faults
// as the blur itself. Larger ones are allocated per call, so no thread holds gigabytes afterwards.
constexpr size_t kReusedBytes = size_t{64} << 20;
// How many iterations ahead the blur and slice prefetch the rows they will gather.
constexpr int64_t kPrefetch = 8;
#if defined(__GNUC__) || defined(__clang__)
#define CRFRNN_PREFETCH(address) __builtin_prefetch(address)
#else
#define CRFRNN_PREFETCH(address) ((void)0)
#endif

// Splat: grid[v] = sum over entries (p, r) with vertex_index[p, r] = v of w[p, r] * values[p],
// for the M vertex rows; the zero row M is set too. values [P, C], w and vertex_index [P, d1].
//
// Points are visited in order and threads split the channels, not the points, so every sum runs
// in increasing entry order whatever the thread count: the same bits as the vertex -> entries
// gather of the CUDA backend, with a streaming read of the values. Each thread accumulates its
// channels in a grid of its own (no false sharing), copied into the shared grid at the end.
template <typename T>
void splat_points(const T* values, int64_t num_points, int64_t c, const int* vertex_index,
                  const T* w, int d1, int64_t m, T* grid) {
  const int64_t threads = at::get_num_threads();
  const int64_t channel_block = std::max<int64_t>(1, (c + threads - 1) / threads);
  at::parallel_for(0, c, channel_block, [&](int64_t c0, int64_t c1) {
    const int64_t width = c1 - c0;
    thread_local std::vector<T> kept_part;
    std::vector<T> own_part;
    std::vector<T>& part = m * width * sizeof(T) <= kReusedBytes ? kept_part : own_part;
    part.assign(m * width, T(0));
    for (int64_t p = 0; p < num_points; ++p) {
      const T* src = values + p * c + c0;
      for (int r = 0; r < d1; ++r) {
        const T wt = w[p * d1 + r];
        T* row = part.data() + static_cast<int64_t>(vertex_index[p * d1 + r]) * width;
        for (int64_t k = 0; k < width; ++k) row[k] += wt * src[k];
      }
    }
    for (int64_t v = 0; v < m; ++v) {
      std::copy(part.data() + v * width, part.data() + (v + 1) * width, grid + v * c + c0);
    }
  });
  std::fill(grid + m * c, grid + (m + 1) * c, T(0));
}

// The same splat as splat_points (the same sums in the same order, so the same bits), as a gather
// through the vertex -> entries table, parallel over the vertices: for few channels, where
// splat_points would leave threads idle (the normalisation filters have C = 1).
template <typename T>
void splat_gather(const T* values, int64_t c, const T* w, int d1, const int* splat_offsets,
                  const int* splat_entries, int64_t m, T* grid) {
  at::parallel_for(0, m, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t v = lo; v < hi; ++v) {
      T* row = grid + v * c;
      for (int64_t k = 0; k < c; ++k) row[k] = T(0);
      for (int j = splat_offsets[v]; j < splat_offsets[v + 1]; ++j) {
        const int64_t e = splat_entries[j];
        const T wt = w[e];
        const T* src = values + (e / d1) * c;
        for (int64_t k = 0; k < c; ++k) row[k] += wt * src[k];
      }
    }
  });
  std::fill(grid + m * c, grid + (m + 1) * c, T(0));
}

// Blur along each of the d1 lattice directions with [0.5, 1, 0.5]; the reversed order gives the
// adjoint. neighbors [d1, M, 2]. Ping-pongs between `grid` and `next` (both (M+1) x C with a zero
// row M) and returns the one holding the result.
template <typename T>
T* blur_grid(T* grid, T* next, const int* neighbors, int64_t m, int64_t c, int d1, bool reverse) {
  for (int step = 0; step < d1; ++step) {
    const int j = reverse ? d1 - 1 - step : step;
    const int* nbj = neighbors + static_cast<int64_t>(j) * m * 2;
    at::parallel_for(0, m, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t v = lo; v < hi; ++v) {
        if (v + kPrefetch < hi) {  // neighbour rows are scattered: fetch them ahead
          CRFRNN_PREFETCH(grid + static_cast<int64_t>(nbj[2 * (v + kPrefetch)]) * c);
          CRFRNN_PREFETCH(grid + static_cast<int64_t>(nbj[2 * (v + kPrefetch) + 1]) * c);
        }
        const T* self = grid + v * c;
        const T* a = grid + static_cast<int64_t>(nbj[2 * v]) * c;
        const T* b = grid + static_cast<int64_t>(nbj[2 * v + 1]) * c;
        T* dst = next + v * c;
        for (int64_t k = 0; k < c; ++k) dst[k] = self[k] + T(0.5) * (a[k] + b[k]);
      }
    });
    std::swap(grid, next);
  }
  return grid;
}

}  // namespace crfrnn
