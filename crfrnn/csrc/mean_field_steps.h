// The steps of the fused mean-field ops (inference, training forward, backward), written once for
// the C++ op (cpu/mean_field_kernels.inc, rows in SIMD registers) and the CUDA one
// (cuda/mean_field_device.cuh, which the CPU harness of tests/test_cuda_logic_on_cpu.py runs on
// the host). Plain arithmetic on raw pointers, `__host__ __device__` under nvcc, like the filter
// steps of lattice_filter_steps.h that they call.
//
// One mean-field iteration t (t = 1..T; Q_0 = softmax(U)), for the CRF kernels m with lattice
// filters K_m (splat, blur, slice), per-point normalisation scales s_m (splat) and r_m (slice) and
// C x C matrices A_m:
//   B_{m,t}  = blur(splat(s_m Q_{t-1}))                 the blurred grid (M_m x C, on vertices)
//   X_{m,t}  = alpha B_{m,t} A_m^T                      the mixed grid (mix_row)
//   L_t      = U - sum_m r_m slice(X_{m,t})             (subtract_message)
//   Q_t      = softmax(L_t)                             (softmax_in_place)
// and the op returns L_T. The backward, given dL_T, runs t = T..1 with H_{m,t} = splat(r_m dL_t):
//   dA_m    -= alpha sum_t H_{m,t}^T B_{m,t}            on vertices (outer_product_column)
//   dB_{m,t} = -alpha H_{m,t} A_m                       (mix_row with -alpha A_m)
//   dQ_{t-1} = sum_m s_m slice(blur_reversed(dB_{m,t})) (add_adjoint_message)
//   dL_{t-1} = Q_{t-1} (dQ_{t-1} - <dQ_{t-1}, Q_{t-1}>) (softmax_backward), into dU with dL_t
// The splat and slice of the adjoint are the filter's own bodies with the roles of the scales
// swapped: the adjoint of "slice times r" is "splat of r times", that of "splat of s times" is
// "slice times s".
//
// Rows and Lanes: the bodies work on rows through a Lanes policy (see lattice_filter_steps.h).
// Those that need a whole row (the softmax and its gradient: a sum over the channels) take a row
// Lanes, whose Sum is a pointer to the row's blocks: ChannelRow (below, one block per channel:
// what one CUDA thread does for one point) or the C++ op's SimdLanes (blocks of SIMD lanes).
// Besides the filter's members, a row Lanes has
//   Scalar, Block                  the channel type and the block type (a scalar or a SIMD vector)
//   kBlockLanes                    channels per block
//   blocks()                       blocks per row
//   lane(Block, i), zero(), max_block(a, b), exp_nonpositive(Block)
//   copy(Sum&, const T* row)       sum = its lanes of row
//   accumulate(Sum& x, const Sum& y) x = x + y
//   mask_padding(Block& e, b)      padded lanes of block b set to 0 (none in a ChannelRow)
// Sums over the channels run in 8 partial sums (channel k into partial k mod 8) added in a fixed
// tree (RowSum8), so that rows of scalars, of 4-lane and of 8-lane vectors give the same bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lattice_filter_steps.h"

namespace crfrnn {

// ---- exp(x) for x <= 0 ----------------------------------------------------------------------------
// Cephes' expf: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r, the exponent bits
// for 2^n; within 2 ulp of expf. Written for a scalar float or a SIMD vector of floats V (the C++
// op's vector version, in cpu/mean_field_kernels.inc, does the same operations in the same
// order, so both round alike).

// n = x / ln2 rounded to the nearest integer, with the 1.5 * 2^23 trick (no rounding instruction).
template <typename V>
CRFRNN_HD V exp_quotient(V x) {
  return (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
}

// e^r for r = x - n ln2 (ln2 in two parts, so that r is exact to float precision).
template <typename V>
CRFRNN_HD V exp_of_remainder(V x, V n) {
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * (r * r) + r + 1.0f;
}

// e^x for x <= 0, and 0 below -87 (where e^x < 1.6e-38, under float's normal range). Exactly 0,
// not a floor: a softmax term that small must stay nothing when a huge pairwise weight (up to
// 3e38) multiplies it, as it does in torch.softmax's arithmetic.
CRFRNN_HD float exp_nonpositive(float x) {
  if (x < -87.0f) return 0.0f;
  const float n = exp_quotient(x);
  const int bits = (static_cast<int>(n) + 127) << 23;  // 2^n, n in [-126, 0]
#if defined(__CUDA_ARCH__)
  const float scale = __int_as_float(bits);
#else
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
#endif
  return exp_of_remainder(x, n) * scale;
}

CRFRNN_HD double exp_nonpositive(double x) { return exp(x); }

// ---- a whole row of channels per call ----------------------------------------------------------

// The row Lanes of one point, channel by channel (a CUDA thread's point): the AllChannels of the
// filter (rows in memory, the sum accumulated in place) with one block per channel.
template <typename T>
struct ChannelRow : AllChannels<T> {
  using Scalar = T;
  using Block = T;
  static constexpr int kBlockLanes = 1;

  CRFRNN_HD int64_t blocks() const { return this->channels; }
  CRFRNN_HD static T lane(T v, int) { return v; }
  CRFRNN_HD static T zero() { return T(0); }
  CRFRNN_HD static T max_block(T a, T b) { return a > b ? a : b; }
  CRFRNN_HD static T exp_nonpositive(T x) { return crfrnn::exp_nonpositive(x); }
  CRFRNN_HD void copy(T*& sum, const T* row) const {
    for (int64_t k = 0; k < this->channels; ++k) sum[k] = row[k];
  }
  CRFRNN_HD void accumulate(T*& x, T* const& y) const {
    for (int64_t k = 0; k < this->channels; ++k) x[k] = x[k] + y[k];
  }
  CRFRNN_HD void mask_padding(T&, int64_t) const {}
};

// A sum over the channels of a row: channel k into partial k mod 8, the partials added in a fixed
// tree. Add the blocks in order b = 0, 1, ...
template <class Lanes>
struct RowSum8 {
  using Block = typename Lanes::Block;
  using T = typename Lanes::Scalar;
  static constexpr int kParts = 8 / Lanes::kBlockLanes;
  static_assert(kParts * Lanes::kBlockLanes == 8, "blocks of 1, 2, 4 or 8 lanes");
  Block part[kParts];

  CRFRNN_HD RowSum8() {
    for (int j = 0; j < kParts; ++j) part[j] = Lanes::zero();
  }
  CRFRNN_HD void add(int64_t b, Block value) { part[b % kParts] += value; }
  CRFRNN_HD T total() const {
    T p[8];
    for (int j = 0; j < kParts; ++j) {
      for (int i = 0; i < Lanes::kBlockLanes; ++i) p[j * Lanes::kBlockLanes + i] = Lanes::lane(part[j], i);
    }
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  }
};

// row = softmax(row) (padded lanes: 0).
template <class Lanes>
CRFRNN_HD void softmax_in_place(const Lanes& lanes, typename Lanes::Sum row) {
  using Block = typename Lanes::Block;
  using T = typename Lanes::Scalar;
  const int64_t blocks = lanes.blocks();
  Block largest = row[0];
  for (int64_t b = 1; b < blocks; ++b) largest = Lanes::max_block(row[b], largest);
  T row_max = Lanes::lane(largest, 0);
  for (int i = 1; i < Lanes::kBlockLanes; ++i) row_max = Lanes::lane(largest, i) > row_max ? Lanes::lane(largest, i) : row_max;
  RowSum8<Lanes> sum;
  for (int64_t b = 0; b < blocks; ++b) {
    Block e = Lanes::exp_nonpositive(row[b] - row_max);
    lanes.mask_padding(e, b);  // padded lanes: 0, whatever their logits
    row[b] = e;
    sum.add(b, e);
  }
  const T inverse = T(1) / sum.total();
  for (int64_t b = 0; b < blocks; ++b) row[b] *= inverse;
}

// The gradient of the logits from that of Q = softmax(L), in place: g = q (g - <g, q>).
template <class Lanes>
CRFRNN_HD void softmax_backward(const Lanes& lanes, typename Lanes::Sum g, typename Lanes::Sum q) {
  using T = typename Lanes::Scalar;
  const int64_t blocks = lanes.blocks();
  RowSum8<Lanes> dot;
  for (int64_t b = 0; b < blocks; ++b) dot.add(b, g[b] * q[b]);
  const T d = dot.total();
  for (int64_t b = 0; b < blocks; ++b) g[b] = q[b] * (g[b] - d);
}

// ---- per point ------------------------------------------------------------------------------------

// One CRF kernel's per-point tables: its lattice (vertex_index, barycentric weights [P, d1]) and
// its normalisation as per-point scales of the splat and the slice ([P] each).
template <typename T>
struct PointTables {
  const int* vertex_index;
  const T* weights;
  const T* splat_scale;
  const T* slice_scale;
  int d1;
};

// A kernel's message in the logits of point p: x = x - slice_scale[p] slice(mixed)[p], the slice's
// terms added straight into x (add_slice_point with minus the scale: the inference op's arithmetic
// since before the backward, bit for bit). mixed: the kernel's mixed grid (alpha B A^T, rows
// `stride` apart).
template <class Lanes, typename T>
CRFRNN_HD void subtract_message(const Lanes& lanes, typename Lanes::Sum& x, int64_t p, const PointTables<T>& k,
                                const T* mixed, int64_t stride) {
  add_slice_point(lanes, x, p, k.vertex_index, k.weights, k.d1, mixed, stride, -k.slice_scale[p]);
}

// A kernel's share of dQ at point p: the adjoint of its splat (of splat_scale Q) is a slice times
// splat_scale. first: g = that slice; else g = g + that slice.
template <class Lanes, typename T>
CRFRNN_HD void add_adjoint_message(const Lanes& lanes, typename Lanes::Sum& g, int64_t p, const PointTables<T>& k,
                                   const T* adjoint, int64_t stride, bool first) {
  if (first) lanes.clear(g);
  add_slice_point(lanes, g, p, k.vertex_index, k.weights, k.d1, adjoint, stride, k.splat_scale[p]);
}

// ---- per vertex -------------------------------------------------------------------------------------

// A row times a C x C matrix: sum = sum over j < c (in order) of row[j] * (matrix row j, rows
// `matrix_stride` apart). The mixed grid (row of B, matrix alpha A^T) and the gradient of the
// blurred grid (row of H, matrix -alpha A) are both such products, on the M vertex rows.
template <class Lanes, typename T>
CRFRNN_HD void mix_row(const Lanes& lanes, typename Lanes::Sum& sum, const T* row, int64_t c, const T* matrix,
                       int64_t matrix_stride) {
  lanes.clear(sum);
  for (int64_t j = 0; j < c; ++j) lanes.add(sum, row[j], matrix + j * matrix_stride);
}

// Row j of one block's share of B^T H (C x C) over the vertices [v0, v1): sum = sum over v in
// order of b[v, j] * (row v of h). b: rows `b_stride` apart, h: rows `h_stride` apart. The
// matrices' gradient is -alpha times the transpose of sum over blocks and iterations.
template <class Lanes, typename T>
CRFRNN_HD void outer_product_column(const Lanes& lanes, typename Lanes::Sum& sum, int64_t j, int64_t v0,
                                    int64_t v1, const T* b, int64_t b_stride, const T* h, int64_t h_stride) {
  lanes.clear(sum);
  for (int64_t v = v0; v < v1; ++v) lanes.add(sum, b[v * b_stride + j], h + v * h_stride);
}

// Vertices per block of the outer products: the blocks' partial sums are added in block order,
// so the sum's order depends on M only (never on threads).
constexpr int64_t kOuterProductBlock = 512;

CRFRNN_HD int64_t outer_product_blocks(int64_t m) {
  return (m + kOuterProductBlock - 1) / kOuterProductBlock;
}

// Entry e of a C x C' running total: total[e] + the blocks' partials of e (partials[i * size + e]
// for i = 0..blocks-1), added in block order.
template <typename T>
CRFRNN_HD T add_block_partials(int64_t e, T total, const T* partials, int64_t blocks, int64_t size) {
  for (int64_t i = 0; i < blocks; ++i) total = total + partials[i * size + e];
  return total;
}

}  // namespace crfrnn
