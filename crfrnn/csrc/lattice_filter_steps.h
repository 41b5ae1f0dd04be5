// The three steps of the lattice filter (splat, blur, slice), written once for every backend:
// the C++ filter (cpu/lattice_cpu.cpp), the fused mean-field op (cpu/mean_field_kernels.inc) and
// the CUDA kernels (cuda/lattice_device.cuh, which the CPU harness of
// tests/test_cuda_logic_on_cpu.py runs on the host). Plain arithmetic on raw pointers,
// `__host__ __device__` under nvcc, as lattice_math.h.
//
// A grid is (M+1) rows of `stride` values: one row per lattice vertex, and row M, the zero row that
// missing blur neighbours point at. An entry e = p*(d+1) + r is corner r of point p's simplex,
// with vertex vertex_index[e] and barycentric weight weights[e]. The filter is
// slice(blur_d(... blur_0(splat(values)))), and its adjoint runs the blur directions in reverse:
//   splat    grid row v = sum over the entries e of vertex v of weights[e] * (value row of e's point)
//   blur     next row v = row v + 0.5 (rows of v's two neighbours along one direction)
//   slice    output row p = blur_alpha(d) * sum over r of weights[p, r] * (grid row of corner r's vertex)
// Each body below computes one row (or some channels of one, see Lanes) in a fixed order, so the
// result has the same bits whatever the thread count, and on every backend:
//   splat_vertex  the splat of one vertex, a gather through the vertex -> entries table
//                 (splat_offsets, splat_entries) in increasing entry order: CUDA (one thread per
//                 vertex and channel), the C++ filter for fewer channels than threads;
//   splat_point   the same terms visited from one point: it adds the point's row into the rows of
//                 its d+1 vertices (a scatter, the transpose of slice_point). Run over all the
//                 points in order into one grid, it adds each vertex's terms in the same order as
//                 splat_vertex: the same bits. It reads the values once, in order, and writes rows
//                 of a grid that stays in cache: the fused mean-field op (which makes the values
//                 point by point and never stores them: storing and gathering them measured ~25%
//                 slower there) and the C++ filter with a thread per block of channels (the gather
//                 measured ~35% slower at one thread on a bilateral lattice, C = 21; see
//                 cpu/filter_loops.h);
//   blur_vertex   one blur step of one vertex along one direction;
//   slice_point   the slice of one point: add_slice_point (its terms, added into a running sum:
//                 what the fused mean-field op runs, into the unary), started at zero and scaled.
// and, for the gradient with respect to the barycentric weights (the features' gradient),
//   weight_grad_entry  one simplex corner of one point: dot products of the point's rows with the
//                      rows of a forward and an adjoint grid, over all channels.
//
// Lanes: which channels of a row one call computes, and where it keeps a running sum. A Lanes type
// has a `Sum` type and (those the bodies it runs call) the members
//   clear(Sum&)                      sum = 0
//   add(Sum&, T w, const T* row)     sum = sum + w * (its lanes of `row`)
//   scale(Sum&, T f)                 sum = sum * f
//   blur(self, a, b, dst)            its lanes of dst = blur_value(self, a, b), rows given by pointer
//   scatter(T* row, T w, x)          its lanes of row = row + w * x (splat_point), x the
//                                    point's row: a Sum, or its values in memory (AllChannels)
// and is one of
//   OneChannel<T>   channel k of a row: what one CUDA thread computes (thread t = row * C + k); the
//                   sum is a register
//   AllChannels<T>  all C contiguous channels of a row: the C++ filter; the sum is accumulated in
//                   place in the output row
//   SimdLanes       the fused mean-field op's rows, padded and held in SIMD registers
//                   (cpu/mean_field_kernels.inc)
// Every Lanes computes each channel with add_weighted and blur_value: one multiply and one add per
// term, never fused (setup.py builds with -ffp-contract=off and nvcc --fmad=false), so that the
// CUDA kernels and the C++ filter give the same bits for the same row.
#pragma once

#include <cstdint>

#include "lattice_math.h"

namespace crfrnn {

// ---- the arithmetic of one channel: V is a scalar, or a SIMD vector of channels -----------------

// sum + w * x: one term of a splat or a slice.
template <typename V, typename S>
CRFRNN_HD V add_weighted(V sum, S w, V x) {
  return sum + w * x;
}

// self + 0.5 (a + b): the [0.5, 1, 0.5] blur of one vertex between its two neighbours a and b.
template <typename S, typename V>
CRFRNN_HD V blur_value(V self, V a, V b) {
  return self + S(0.5) * (a + b);
}

// ---- Lanes ----------------------------------------------------------------------------------------

// Channel k of a row (one CUDA thread); the sum is a register.
template <typename T>
struct OneChannel {
  using Sum = T;
  int64_t k;

  CRFRNN_HD void clear(Sum& sum) const { sum = T(0); }
  CRFRNN_HD void add(Sum& sum, T w, const T* row) const { sum = add_weighted(sum, w, row[k]); }
  CRFRNN_HD void scale(Sum& sum, T f) const { sum = sum * f; }
  CRFRNN_HD void blur(const T* self, const T* a, const T* b, T* dst) const {
    dst[k] = blur_value<T>(self[k], a[k], b[k]);
  }
};

// All `channels` contiguous channels of a row (the C++ filter); Sum points at the output row,
// where the sum is accumulated in place.
template <typename T>
struct AllChannels {
  using Sum = T*;
  int64_t channels;

  CRFRNN_HD void clear(Sum& sum) const {
    for (int64_t k = 0; k < channels; ++k) sum[k] = T(0);
  }
  CRFRNN_HD void add(Sum& sum, T w, const T* row) const {
    for (int64_t k = 0; k < channels; ++k) sum[k] = add_weighted(sum[k], w, row[k]);
  }
  CRFRNN_HD void scale(Sum& sum, T f) const {
    for (int64_t k = 0; k < channels; ++k) sum[k] = sum[k] * f;
  }
  CRFRNN_HD void blur(const T* self, const T* a, const T* b, T* dst) const {
    for (int64_t k = 0; k < channels; ++k) dst[k] = blur_value<T>(self[k], a[k], b[k]);
  }
  CRFRNN_HD void scatter(T* row, T w, const T* x) const {
    for (int64_t k = 0; k < channels; ++k) row[k] = add_weighted(row[k], w, x[k]);
  }
};

// ---- the steps ------------------------------------------------------------------------------------
// To add a step (the fused op's backward, a gradient with respect to the features): a body here
// over Lanes, in a fixed order; per-channel arithmetic that is new goes beside add_weighted.

// Splat of vertex v, a gather: sum = sum over the entries e of v (splat_entries[splat_offsets[v]]
// .. splat_entries[splat_offsets[v+1] - 1], in increasing order) of weights[e] * row e / d1 of
// `values` (rows `stride` apart). weights: [P, d1], one per entry.
template <class Lanes, typename T>
CRFRNN_HD void splat_vertex(const Lanes& lanes, typename Lanes::Sum& sum, int64_t v, const int* splat_offsets,
                            const int* splat_entries, const T* weights, int d1, const T* values,
                            int64_t stride) {
  lanes.clear(sum);
  for (int i = splat_offsets[v]; i < splat_offsets[v + 1]; ++i) {
    const int e = splat_entries[i];
    lanes.add(sum, weights[e], values + static_cast<int64_t>(e / d1) * stride);
  }
}

// Splat of point p, a scatter: for r = 0..d in order, row vertex_index[p, r] - first_vertex of
// `grid` (rows `stride` apart) += (scale * weights[p, r]) * x, with x the point's row (what the
// Lanes' scatter takes). A grid that holds only the rows of vertices first_vertex.. (a partial
// grid) passes that vertex, a whole grid 0.
template <class Lanes, typename T, typename Row>
CRFRNN_HD void splat_point(const Lanes& lanes, const Row& x, int64_t p, const int* vertex_index, const T* weights,
                           int d1, T* grid, int64_t first_vertex, int64_t stride, T scale) {
  for (int r = 0; r < d1; ++r) {
    const int64_t e = p * d1 + r;
    lanes.scatter(grid + (vertex_index[e] - first_vertex) * stride, scale * weights[e], x);
  }
}

// One blur step along one lattice direction, vertex v: row v of dst = blur_value(row v, rows of
// its neighbours) of src. neighbors_j: [M, 2], the direction's two neighbours of each vertex (M,
// the zero row, where missing). src and dst: (M+1) rows `stride` apart.
template <class Lanes, typename T>
CRFRNN_HD void blur_vertex(const Lanes& lanes, int64_t v, const int* neighbors_j, const T* src, int64_t stride,
                           T* dst) {
  lanes.blur(src + v * stride, src + static_cast<int64_t>(neighbors_j[2 * v]) * stride,
             src + static_cast<int64_t>(neighbors_j[2 * v + 1]) * stride, dst + v * stride);
}

// The slice terms of point p added into sum: sum = sum + (scale * weights[p, r]) * row
// vertex_index[p, r] of `grid` (rows `stride` apart), for r = 0..d in order. The fused mean-field
// op starts sum at the unary and passes minus its per-point slice scale: it subtracts the message
// in place, with no row of its own, and x + (-s w) g has the bits of x - (s w) g.
template <class Lanes, typename T>
CRFRNN_HD void add_slice_point(const Lanes& lanes, typename Lanes::Sum& sum, int64_t p, const int* vertex_index,
                               const T* weights, int d1, const T* grid, int64_t stride, T scale) {
  for (int r = 0; r < d1; ++r) {
    const int64_t e = p * d1 + r;
    lanes.add(sum, scale * weights[e], grid + static_cast<int64_t>(vertex_index[e]) * stride);
  }
}

// The filter's slice of point p: sum = alpha * (sum over r = 0..d, in order, of weights[p, r] *
// row vertex_index[p, r] of `grid`). The filter's alpha is blur_alpha(d).
template <class Lanes, typename T>
CRFRNN_HD void slice_point(const Lanes& lanes, typename Lanes::Sum& sum, int64_t p, const int* vertex_index,
                           const T* weights, int d1, const T* grid, int64_t stride, T alpha) {
  lanes.clear(sum);
  add_slice_point(lanes, sum, p, vertex_index, weights, d1, grid, stride, T(1));
  lanes.scale(sum, alpha);
}

// Gradient of <grad, filter(values)> with respect to the barycentric weight of entry e = p*d1 + r
// (corner r of point p's simplex, vertex v = vertex_index[e]). The filter is out = alpha S B S^T
// values, S[p, v] the weights, B the blur; a weight enters through the slice and the splat:
//   d/dweights[e] = alpha (<grad[p], G[v]> + <values[p], H[v]>),
//   G = B S^T values (forward_grid: splat, blur), H = B^T S^T grad (adjoint_grid: splat, blur in
//   reverse order), rows `channels` apart, each dot product summed over the channels in order.
template <typename T>
CRFRNN_HD T weight_grad_entry(int64_t e, int d1, const int* vertex_index, const T* values, const T* grad,
                              const T* forward_grid, const T* adjoint_grid, int64_t channels, T alpha) {
  const int64_t p = e / d1;
  const int64_t v = vertex_index[e];
  const T* g = grad + p * channels;
  const T* x = values + p * channels;
  const T* fg = forward_grid + v * channels;
  const T* ag = adjoint_grid + v * channels;
  T through_slice = T(0), through_splat = T(0);
  for (int64_t k = 0; k < channels; ++k) {
    through_slice = add_weighted(through_slice, g[k], fg[k]);
    through_splat = add_weighted(through_splat, x[k], ag[k]);
  }
  return alpha * (through_slice + through_splat);
}

}  // namespace crfrnn
