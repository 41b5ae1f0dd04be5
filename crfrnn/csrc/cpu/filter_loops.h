// The CPU loops around the filter steps of lattice_filter_steps.h, parallel with at::parallel_for
// (over the vertices, the points or blocks of channels), prefetching the rows they gather. The
// plain filter (lattice_cpu.cpp) runs all three steps with them; the fused mean-field op
// (mean_field_cpu.cpp) its blur (it splats and slices in its own pass over the points).
//
// A grid is (M+1) x C values, row-major: one row per lattice vertex plus row M, the zero row that
// missing blur neighbours point at. Each value is computed by one thread, in the fixed order of the
// step's body: the same bits whatever the thread count.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "../lattice_filter_steps.h"

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

// Calls f(std::integral_constant<int, d1>) for the usual lattice widths d1 = d + 1 (3: the
// spatial kernel, 6: the bilateral one), else f(d1). A constant d1 turns the steps' divisions of
// an entry index by d1 (its point) into multiplications: an integer division took a third of the
// splat of the normalisation filters.
template <typename F>
void with_lattice_width(int d1, F&& f) {
  switch (d1) {
    case 3: return f(std::integral_constant<int, 3>{});
    case 6: return f(std::integral_constant<int, 6>{});
    default: return f(d1);
  }
}

// The splat of values [P, C] into the M vertex rows of grid [M+1, C] (the zero row M is set too),
// two ways with the same result bit for bit (the same sums in the same order):
//   splat_by_vertex  splat_vertex, parallel over the vertices: a gather through the lattice's
//                    vertex -> entries table (splat_offsets, splat_entries);
//   splat_by_point   splat_point over the points in order, each thread for a block of channels
//                    into a grid of its own (no false sharing), copied into `grid` at the end.
// By point reads the values once, in order, and writes a grid that stays in cache; by vertex reads
// each value row wherever its point is. On the bench image (500x375, C = 21, one thread) the
// bilateral filter took 19 ms by point and 25.5 ms by vertex (the spatial one 15 ms both ways).
// By point leaves threads idle when C is below their count (the normalisation filters have
// C = 1): the filter then splats by vertex.
template <typename T>
void splat_by_vertex(const T* values, int64_t c, const T* weights, int d1, const int* splat_offsets,
                     const int* splat_entries, int64_t m, T* grid) {
  with_lattice_width(d1, [&](auto width) {
    at::parallel_for(0, m, 256, [&](int64_t lo, int64_t hi) {
      if (c == 1) {  // the normalisation filters: the sum in a register, not in the grid's memory
        const OneChannel<T> lanes{0};
        for (int64_t v = lo; v < hi; ++v) {
          T sum;
          splat_vertex(lanes, sum, v, splat_offsets, splat_entries, weights, width, values, c);
          grid[v] = sum;
        }
        return;
      }
      const AllChannels<T> lanes{c};
      for (int64_t v = lo; v < hi; ++v) {
        T* sum = grid + v * c;
        splat_vertex(lanes, sum, v, splat_offsets, splat_entries, weights, width, values, c);
      }
    });
  });
  std::fill(grid + m * c, grid + (m + 1) * c, T(0));
}

template <typename T>
void splat_by_point(const T* values, int64_t num_points, int64_t c, const int* vertex_index, const T* weights,
                    int d1, int64_t m, T* grid) {
  const int64_t threads = at::get_num_threads();
  const int64_t channel_block = std::max<int64_t>(1, (c + threads - 1) / threads);
  at::parallel_for(0, c, channel_block, [&](int64_t c0, int64_t c1) {
    const int64_t width = c1 - c0;
    const AllChannels<T> lanes{width};
    thread_local std::vector<T> kept_part;
    std::vector<T> own_part;
    std::vector<T>& part = m * width * sizeof(T) <= kReusedBytes ? kept_part : own_part;
    part.assign(m * width, T(0));
    for (int64_t p = 0; p < num_points; ++p) {
      splat_point(lanes, values + p * c + c0, p, vertex_index, weights, d1, part.data(), 0, width, T(1));
    }
    for (int64_t v = 0; v < m; ++v) {
      std::copy(part.data() + v * width, part.data() + (v + 1) * width, grid + v * c + c0);
    }
  });
  std::fill(grid + m * c, grid + (m + 1) * c, T(0));
}

// Blur (blur_vertex) along each of the d1 lattice directions; the reversed order gives the
// adjoint. neighbors [d1, M, 2]. Ping-pongs between `grid` and `next` (both (M+1) x C with a zero
// row M) and returns the one holding the result.
template <typename T>
T* blur_grid(T* grid, T* next, const int* neighbors, int64_t m, int64_t c, int d1, bool reverse) {
  const AllChannels<T> lanes{c};
  for (int step = 0; step < d1; ++step) {
    const int j = reverse ? d1 - 1 - step : step;
    const int* nbj = neighbors + static_cast<int64_t>(j) * m * 2;
    at::parallel_for(0, m, 256, [&](int64_t lo, int64_t hi) {
      for (int64_t v = lo; v < hi; ++v) {
        if (v + kPrefetch < hi) {  // neighbour rows are scattered: fetch them ahead
          CRFRNN_PREFETCH(grid + static_cast<int64_t>(nbj[2 * (v + kPrefetch)]) * c);
          CRFRNN_PREFETCH(grid + static_cast<int64_t>(nbj[2 * (v + kPrefetch) + 1]) * c);
        }
        blur_vertex(lanes, v, nbj, grid, c, next);
      }
    });
    std::swap(grid, next);
  }
  return grid;
}

// Slice (slice_point) of grid [M+1, C] at the num_points points into out [P, C], times alpha.
// vertex_index, weights [P, d1].
template <typename T>
void slice_points(const T* grid, const int* vertex_index, const T* weights, int d1, int64_t num_points, int64_t c,
                  T alpha, T* out) {
  at::parallel_for(0, num_points, 1024, [&](int64_t lo, int64_t hi) {
    if (c == 1) {  // the normalisation filters: the sum in a register, not in out's memory
      const OneChannel<T> lanes{0};
      for (int64_t p = lo; p < hi; ++p) {
        T sum;
        slice_point(lanes, sum, p, vertex_index, weights, d1, grid, c, alpha);
        out[p] = sum;
      }
      return;
    }
    const AllChannels<T> lanes{c};
    for (int64_t p = lo; p < hi; ++p) {
      if (p + kPrefetch < hi) {  // the vertex rows are scattered: fetch them ahead
        for (int r = 0; r < d1; ++r) {
          CRFRNN_PREFETCH(grid + static_cast<int64_t>(vertex_index[(p + kPrefetch) * d1 + r]) * c);
        }
      }
      T* sum = out + p * c;
      slice_point(lanes, sum, p, vertex_index, weights, d1, grid, c, alpha);
    }
  });
}

}  // namespace crfrnn
