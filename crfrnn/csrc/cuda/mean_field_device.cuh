// The fused mean-field ops on CUDA: per-thread bodies and the launch schedule, shared with the
// CPU harness (tests/cuda_emulation/harness.cpp runs the same schedule on the host, each launch's
// indices one at a time in a random order).
//
// The maths is the C++ op's (cpu/mean_field_cpu.cpp, mean_field_steps.h), with the GPU's way of
// splatting: a point pass writes each point's row (Q, or the logits' gradient) to memory, and the
// splat is a gather through the vertex -> entries table (splat_vertex, one thread per vertex and
// channel, in increasing entry order), so no float atomics and the same bits on every run. The
// per-point factors of the splat (the normalisation scale) are folded into its weights by the
// launcher. The CPU's splat adds the same terms in another order (partial grids per chunk of
// points): the two agree to rounding, not bit for bit.
//
// Forward (iterations t = 1..T, Q_0 = softmax(U)), launches in order:
//   points    Q_{t-1} = softmax(U - sum_m r_m slice(X_m))   (first: softmax(U); last: L_T out)
//   per kernel m: splat s_m Q_{t-1} -> grid; blur; save the blurred grid B_t; X_m = alpha B_t A^T
// Backward (t = T..1, dL_T given), per kernel m: H = splat(r_m dL_t); dA += B_t^T H (a C x C
// thread per entry, summed in blocks of vertices in the CPU's order); dB = -alpha H A; blur
// reversed; then the points: dQ_{t-1} = sum_m s_m slice(dB~_m), the softmax's gradient with
// Q_{t-1} (saved, or recomputed from U and X of iteration t-1), dU += dL_{t-1}.
//
// Sender pruning (prune > 0, thresholds given): before iteration t's splat, the largest Q_{t-1}
// of each class over each image's points (in blocks, then over the blocks) is compared with the
// class's threshold, and Q_{t-1} is multiplied by the 0/1 result (D_t): the splat, blur and mix
// then carry zeros for the classes that do not send, so the grids, the messages and the saved
// blurred grids (B D) are those of K(Q D), the function the C++ op computes (with fewer channels).
// The backward multiplies dQ_{t-1} by D_t. The GPU keeps all C channels: on it a channel is a
// thread, and the work that pruning saves on the CPU is not its bottleneck.
#pragma once

#include <cstdint>
#include <utility>

#include "../mean_field_steps.h"

namespace crfrnn {
namespace device {

// At most this many CRF kernels per op (the layer has two): the kernels travel by value in the
// launch arguments.
constexpr int kMaxCrfKernels = 4;

// One CRF kernel's tables, matrices and grids as the CUDA op holds them (device pointers).
template <typename T>
struct CrfKernelView {
  PointTables<T> tables;         // vertex_index, weights, splat_scale, slice_scale [P], d1
  const int* neighbors;          // [d1, M, 2]
  const int* splat_offsets;      // [M+1]: the vertex -> entries table (CSR), built by the launcher
  const int* splat_entries;      // [P d1]
  const T* splat_weights;        // [P, d1]: splat_scale[p] * weights[p, r] (forward splat)
  const T* adjoint_weights;      // [P, d1]: slice_scale[p] * weights[p, r] (backward splat)
  const T* transform;            // [C, C]: row j = alpha A[:, j]   (X = B transform)
  const T* adjoint_transform;    // [C, C]: row l = -alpha A[l, :]  (dB = H adjoint_transform)
  int64_t m;
  T* grid;                       // (M+1) x C each, row M zero (missing blur neighbours)
  T* next;
  T* mixed;
  T* blurred;                    // [iterations, M, C]: the forward's saves (pruned: B D)
  T* outer_total;                // [C, C]: sum over the iterations of B^T H (backward)
  const T* adjoint;              // the current blurred adjoint grid (grid or next; backward)
};

template <typename T>
struct CrfKernelViews {
  int count;
  CrfKernelView<T> k[kMaxCrfKernels];
};

// Sender pruning's buffers (device pointers), or thresholds null: no pruning.
template <typename T>
struct PruneView {
  const T* thresholds = nullptr;  // [C]: class l sends while its largest Q reaches thresholds[l]
  int64_t images = 1;             // N: the points of image n are [n P / N, (n + 1) P / N)
  T* block_max = nullptr;         // [N, blocks, C]: the largest Q per block of points (scratch)
  T* mask = nullptr;              // [N, C]: D_t, 1 or 0 (scratch)
  uint8_t* senders = nullptr;     // [T, N, C]: every iteration's D_t, or null
};

// The whole problem (device pointers, all rows contiguous with C values).
template <typename T>
struct MeanFieldView {
  const T* unary;          // [P, C]
  int64_t num_points, c, iterations;
  CrfKernelViews<T> kernels;
  T* out;                  // [P, C]: L_T
  T* marginals;            // [T-1, P, C]: Q_1..Q_{T-1}, or null (then recomputed in the backward)
  T* q_scratch[2];         // [P, C] each: Q_t when not saved (and Q_0 always)
  PruneView<T> prune;
};

// The backward's own buffers.
template <typename T>
struct MeanFieldGradientView {
  const T* grad_logits;    // [P, C]: dL_T
  T* grad;                 // [P, C]: dL_t, the rows the backward splats
  T* du;                   // [P, C]: dU so far
  T* grad_unary;           // [P, C]: the result
  T* q;                    // [P, C]: recomputed Q_{t-1}
  const uint8_t* senders = nullptr;  // [T, N, C]: what the pruned forward returned, or null
  int64_t images = 1;
};

// ---- per-thread bodies (functors: one launch template runs them all) ------------------------------

// Point p of a forward pass: x = U[p] (first) or U[p] - sum_m r_m slice(X_m)[p]; the last pass
// writes x to out, the others softmax(x) to q.
template <typename T>
struct ForwardPoint {
  const T* unary;
  int64_t c;
  CrfKernelViews<T> kernels;
  bool first, last;
  T* out;
  T* q;

  CRFRNN_HD void operator()(int64_t p) const {
    const ChannelRow<T> lanes{{c}};
    T* x = (last ? out : q) + p * c;
    lanes.copy(x, unary + p * c);
    if (!first) {
      for (int i = 0; i < kernels.count; ++i) subtract_message(lanes, x, p, kernels.k[i].tables, kernels.k[i].mixed, c);
    }
    if (!last) softmax_in_place(lanes, x);
  }
};

// t = v C + k: channel k of the splat of vertex v (a gather; splat_one of lattice_device.cuh's
// filter, with the scaled weights).
template <typename T>
struct SplatVertex {
  const T* values;
  const T* weights;
  int d1;
  const int* offsets;
  const int* entries;
  int64_t c;
  T* grid;

  CRFRNN_HD void operator()(int64_t t) const {
    const int64_t v = t / c;
    T sum;
    splat_vertex(OneChannel<T>{t - v * c}, sum, v, offsets, entries, weights, d1, values, c);
    grid[t] = sum;
  }
};

// t = v C + k: one blur step of vertex v along one direction (neighbors_j: [M, 2]).
template <typename T>
struct BlurVertex {
  const T* src;
  const int* neighbors_j;
  int64_t c;
  T* dst;

  CRFRNN_HD void operator()(int64_t t) const {
    const int64_t v = t / c;
    blur_vertex(OneChannel<T>{t - v * c}, v, neighbors_j, src, c, dst);
  }
};

// t = v C + k: out[v, k] = row v of `rows` (rows `row_stride` apart) times column k of the C x C
// matrix (mix_row).
template <typename T>
struct MixVertex {
  const T* rows;
  int64_t row_stride, c;
  const T* matrix;
  T* out;

  CRFRNN_HD void operator()(int64_t t) const {
    const int64_t v = t / c;
    T sum;
    mix_row(OneChannel<T>{t - v * c}, sum, rows + v * row_stride, c, matrix, c);
    out[t] = sum;
  }
};

// dst[t] = src[t].
template <typename T>
struct CopyValue {
  const T* src;
  T* dst;

  CRFRNN_HD void operator()(int64_t t) const { dst[t] = src[t]; }
};

// e = j C + k: total[e] += (B^T H)[j, k], summed over blocks of kOuterProductBlock vertices and
// the blocks added in order, as the C++ op does. blurred: [M, C], h: rows of C.
template <typename T>
struct OuterProductEntry {
  int64_t c, m;
  const T* blurred;
  const T* h;
  T* total;

  CRFRNN_HD void operator()(int64_t e) const {
    const int64_t j = e / c;
    const OneChannel<T> lanes{e - j * c};
    T acc = total[e];
    for (int64_t i = 0; i < outer_product_blocks(m); ++i) {
      const int64_t v0 = i * kOuterProductBlock;
      const int64_t v1 = v0 + kOuterProductBlock < m ? v0 + kOuterProductBlock : m;
      T partial;
      outer_product_column(lanes, partial, j, v0, v1, blurred, c, h, c);
      acc = acc + partial;
    }
    total[e] = acc;
  }
};

// ---- sender pruning ----------------------------------------------------------------------------

// Points per block of the largest-Q reduction.
constexpr int64_t kMaxBlockPoints = 256;

CRFRNN_HD int64_t max_blocks(int64_t per_image) { return (per_image + kMaxBlockPoints - 1) / kMaxBlockPoints; }

// t = (n * blocks + b) * C + k: the largest q[p, k] over the points p of block b of image n.
template <typename T>
struct BlockMax {
  const T* q;
  int64_t per_image, blocks, c;
  T* out;

  CRFRNN_HD void operator()(int64_t t) const {
    const int64_t k = t % c, nb = t / c, b = nb % blocks, n = nb / blocks;
    const int64_t p0 = n * per_image + b * kMaxBlockPoints;
    const int64_t p1 = p0 + kMaxBlockPoints < (n + 1) * per_image ? p0 + kMaxBlockPoints : (n + 1) * per_image;
    T most = T(0);
    for (int64_t p = p0; p < p1; ++p) most = q[p * c + k] > most ? q[p * c + k] : most;
    out[t] = most;
  }
};

// t = n * C + k: D_t of class k in image n, 1 if its largest Q (over the blocks) reaches its
// threshold, else 0; also into `senders` if given.
template <typename T>
struct SenderMask {
  const T* block_max;
  int64_t blocks, c;
  const T* thresholds;
  T* mask;
  uint8_t* senders;

  CRFRNN_HD void operator()(int64_t t) const {
    const int64_t n = t / c, k = t - n * c;
    T most = T(0);
    for (int64_t b = 0; b < blocks; ++b) {
      const T m = block_max[(n * blocks + b) * c + k];
      most = m > most ? m : most;
    }
    const bool sends = most >= thresholds[k];
    mask[t] = sends ? T(1) : T(0);
    if (senders) senders[t] = sends ? 1 : 0;
  }
};

// t = p * C + k: q[p, k] times D_t of its image and class.
template <typename T>
struct MaskRow {
  T* q;
  const T* mask;
  int64_t per_image, c;

  CRFRNN_HD void operator()(int64_t t) const {
    const int64_t p = t / c, k = t - p * c;
    q[t] = q[t] * mask[(p / per_image) * c + k];
  }
};

// Point p of a backward pass (t >= 1): g = sum_m s_m slice(adjoint_m)[p] (dQ_{t-1}); Q_{t-1}
// from `q_saved` or recomputed (U minus the messages of X_m, then softmax; Q_0 = softmax(U));
// g = the softmax's gradient; then dU += g, or, at t = 1, grad_unary = dU + g.
template <typename T>
struct BackwardPoint {
  const T* unary;
  int64_t c;
  CrfKernelViews<T> kernels;
  const T* q_saved;   // [P, C] or null
  bool recompute_messages;  // Q_{t-1} for t >= 2 (with the mixed grids of iteration t-1)
  bool end;           // t = 1
  T* g;
  T* q;
  T* du;
  T* grad_unary;
  const uint8_t* senders;   // pruned: D_t ([N, C]), dQ_{t-1} is zero where it is 0; or null
  int64_t per_image;

  CRFRNN_HD void operator()(int64_t p) const {
    const ChannelRow<T> lanes{{c}};
    T* gp = g + p * c;
    for (int i = 0; i < kernels.count; ++i) {
      add_adjoint_message(lanes, gp, p, kernels.k[i].tables, kernels.k[i].adjoint, c, i == 0);
    }
    if (senders) {
      const uint8_t* sent = senders + (p / per_image) * c;
      for (int64_t k = 0; k < c; ++k) gp[k] = gp[k] * (sent[k] ? T(1) : T(0));
    }
    T* qp = q + p * c;
    if (q_saved) {
      lanes.copy(qp, q_saved + p * c);
    } else {
      lanes.copy(qp, unary + p * c);
      if (recompute_messages) {
        for (int i = 0; i < kernels.count; ++i) {
          subtract_message(lanes, qp, p, kernels.k[i].tables, kernels.k[i].mixed, c);
        }
      }
      softmax_in_place(lanes, qp);
    }
    softmax_backward(lanes, gp, qp);
    T* dup = du + p * c;
    if (end) {
      for (int64_t k = 0; k < c; ++k) grad_unary[p * c + k] = dup[k] + gp[k];
    } else {
      for (int64_t k = 0; k < c; ++k) dup[k] = dup[k] + gp[k];
    }
  }
};

// ---- the schedule: the launches in order, for any Exec with run(n, body) ----------------------------
// Exec::run(n, body) runs body(i) for i in [0, n), in any order and in parallel (a CUDA launch,
// or the harness's shuffled loop); launches run one after the other. Host code.

// The blur of `grid` (ping-ponging with `next`) along every direction, reversed for the adjoint;
// returns the buffer holding the result.
template <class Exec, typename T>
T* run_blur(Exec& exec, const CrfKernelView<T>& k, int64_t c, T* grid, T* next, bool reverse) {
  const int d1 = k.tables.d1;
  for (int step = 0; step < d1; ++step) {
    const int j = reverse ? d1 - 1 - step : step;
    exec.run(k.m * c, BlurVertex<T>{grid, k.neighbors + static_cast<int64_t>(j) * k.m * 2, c, next});
    std::swap(grid, next);
  }
  return grid;
}

// Q_t's buffer in the forward: saved marginals for 1 <= t < T when asked, else scratch.
template <typename T>
T* marginal_buffer(const MeanFieldView<T>& mf, int64_t t) {
  if (mf.marginals && t >= 1) return mf.marginals + (t - 1) * mf.num_points * mf.c;
  return mf.q_scratch[t % 2];
}

// The forward: out = L_T; each kernel's blurred grids into its `blurred`; Q_1..Q_{T-1} into
// `marginals` if given.
template <class Exec, typename T>
void run_mean_field_forward(Exec& exec, const MeanFieldView<T>& mf) {
  const int64_t c = mf.c, points = mf.num_points;
  exec.run(points, ForwardPoint<T>{mf.unary, c, mf.kernels, true, false, nullptr, marginal_buffer(mf, 0)});
  for (int64_t t = 1; t <= mf.iterations; ++t) {
    T* q = marginal_buffer(mf, t - 1);
    if (mf.prune.thresholds) {  // D_t from Q_{t-1}, and Q_{t-1} D_t (in place: never saved when pruning)
      const PruneView<T>& pv = mf.prune;
      const int64_t per_image = points / pv.images, blocks = max_blocks(per_image);
      exec.run(pv.images * blocks * c, BlockMax<T>{q, per_image, blocks, c, pv.block_max});
      exec.run(pv.images * c, SenderMask<T>{pv.block_max, blocks, c, pv.thresholds, pv.mask,
                                            pv.senders ? pv.senders + (t - 1) * pv.images * c : nullptr});
      exec.run(points * c, MaskRow<T>{q, pv.mask, per_image, c});
    }
    for (int i = 0; i < mf.kernels.count; ++i) {
      const CrfKernelView<T>& k = mf.kernels.k[i];
      exec.run(k.m * c, SplatVertex<T>{q, k.splat_weights, k.tables.d1, k.splat_offsets, k.splat_entries, c,
                                       k.grid});
      const T* blurred = run_blur(exec, k, c, k.grid, k.next, false);
      exec.run(k.m * c, CopyValue<T>{blurred, k.blurred + (t - 1) * k.m * c});
      exec.run(k.m * c, MixVertex<T>{blurred, c, c, k.transform, k.mixed});
    }
    const bool last = t == mf.iterations;
    exec.run(points, ForwardPoint<T>{mf.unary, c, mf.kernels, false, last, mf.out,
                                     last ? nullptr : marginal_buffer(mf, t)});
  }
}

// The backward: grad.grad_unary = dU; each kernel's outer_total (zeroed by the caller) = sum over
// the iterations of B^T H. `mf` as the forward's, with its blurred grids filled; mf.marginals
// null means recompute. Writes the kernels' `adjoint` (a copy of mf.kernels is kept in `views`).
template <class Exec, typename T>
void run_mean_field_backward(Exec& exec, const MeanFieldView<T>& mf, const MeanFieldGradientView<T>& grad) {
  const int64_t c = mf.c, points = mf.num_points;
  CrfKernelViews<T> views = mf.kernels;
  exec.run(points * c, CopyValue<T>{grad.grad_logits, grad.grad});
  exec.run(points * c, CopyValue<T>{grad.grad_logits, grad.du});
  for (int64_t t = mf.iterations; t >= 1; --t) {
    for (int i = 0; i < views.count; ++i) {
      CrfKernelView<T>& k = views.k[i];
      exec.run(k.m * c, SplatVertex<T>{grad.grad, k.adjoint_weights, k.tables.d1, k.splat_offsets,
                                       k.splat_entries, c, k.grid});  // H_t
      const T* blurred = k.blurred + (t - 1) * k.m * c;
      exec.run(c * c, OuterProductEntry<T>{c, k.m, blurred, k.grid, k.outer_total});
      exec.run(k.m * c, MixVertex<T>{k.grid, c, c, k.adjoint_transform, k.next});  // dB_t
      k.adjoint = run_blur(exec, k, c, k.next, k.grid, true);
      if (t >= 2 && !mf.marginals) {  // X of iteration t-1, for Q_{t-1}
        exec.run(k.m * c, MixVertex<T>{k.blurred + (t - 2) * k.m * c, c, c, k.transform, k.mixed});
      }
    }
    const T* q_saved = t >= 2 && mf.marginals ? mf.marginals + (t - 2) * points * c : nullptr;
    const uint8_t* senders = grad.senders ? grad.senders + (t - 1) * grad.images * c : nullptr;
    exec.run(points, BackwardPoint<T>{mf.unary, c, views, q_saved, t >= 2, t == 1, grad.grad, grad.q,
                                      grad.du, grad.grad_unary, senders, points / grad.images});
  }
}

}  // namespace device
}  // namespace crfrnn
