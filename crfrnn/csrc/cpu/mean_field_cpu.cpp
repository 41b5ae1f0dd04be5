// The fused mean-field ops on the CPU: all iterations of the CRF in one op.
//
//   crfrnn::mean_field_inference  the last iteration's logits (evaluation, post-processing);
//   crfrnn::mean_field_forward    the same, and what the backward needs: the blurred grids of
//                                 every iteration (a few percent of P x C each) and, if asked,
//                                 the marginals Q_1..Q_{T-1};
//   crfrnn::mean_field_backward   the gradients of the unary and of every C x C matrix from the
//                                 logits' gradient, running the iterations backwards.
//
// The autograd path (crfrnn/inference.py) runs each iteration as separate ops: two lattice filters,
// two C x C matmuls on the P pixels, the unary addition and a softmax, each a pass over
// P x C values. Here one iteration is
//
//   add the chunks' partial grids -> blur -> grid <- alpha * grid * A^T (C x C, on the M
//   vertices) -> one pass over the points: L = U - sum over kernels of the sliced grids,
//   Q = softmax(L), and splat Q into the next iteration's partial grids
//
// Moving the C x C matrices before the slice is exact algebra (the slice is a per-channel
// weighted sum of vertex rows, so it commutes with a matrix acting on the channels) and they
// then act on M rows instead of P (M is 2-15% of P on natural images). Slicing one iteration
// and splatting the next in the same pass over the points means Q is never stored. The backward
// has the same shape (mean_field_steps.h): per iteration the vertex work (the matrices'
// gradient as outer products on the M rows, the adjoint mix, the blur in reverse order), then
// one pass over the points that slices the adjoint grids, takes the softmax's gradient (with Q
// saved, or recomputed from U and the saved grids) and splats the result for the iteration
// before. The results equal the autograd path up to float rounding; tests/test_crf_fused.py
// checks them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../mean_field_checks.h"
#include "../lattice_math.h"
#include "../mean_field_steps.h"
#include "filter_loops.h"

namespace crfrnn {
namespace {

// Rows of Q, the unary and the grids hold the C channels padded to a multiple of kRowAlign
// (padded lanes: 0 in Q and the grids, -inf in the unary, so 0 after a softmax).
constexpr int64_t kRowAlign = 8;

inline int64_t padded_width(int64_t c) { return (c + kRowAlign - 1) / kRowAlign * kRowAlign; }

// Allocator of cache-line-aligned memory: rows of kRowAlign floats then never straddle two cache
// lines (malloc aligns to 16 bytes only, so half of the 32-byte vector accesses would).
template <typename T>
struct CacheAligned {
  typedef T value_type;
  static constexpr std::align_val_t kAlignment{64};
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlignment)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlignment); }
  // A vector of n elements (or resize) leaves them uninitialised, as new T[n] does; an explicit
  // value (assign(n, 0)) is still written. Every large buffer here is written in full before it
  // is read, and zero-filling them (the unary, dU and the grids: tens of MB at 500x375) took a
  // few percent of a call, on one thread.
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};
template <typename T>
using AlignedVector = std::vector<T, CacheAligned<T>>;

// The splat adds each chunk of points (a range of consecutive points) into a partial grid of its
// own, and the partial grids are then added in chunk order: the sums run in an order that depends
// on the problem only, never on the thread count. A chunk's partial grid holds only the vertex
// rows [lo, hi) its points touch: consecutive pixels share vertices, so on images these ranges
// are a fraction of M for the spatial kernel (vertices are numbered in order of first touch).
struct ChunkRange {
  int64_t lo = 0, hi = 0;  // vertex rows [lo, hi)
  int64_t first_row = 0;   // where its rows start in CrfKernelState::partial
};

// Where row p of a [N, P, C] tensor with any strides starts (channel k is k * channel further).
struct PointLayout {
  int64_t per_image = 1, image = 0, point = 0, channel = 0;
  int64_t offset(int64_t p) const { return (p / per_image) * image + (p % per_image) * point; }
};

inline PointLayout layout_of(const at::Tensor& t) {
  return PointLayout{t.size(1), t.stride(0), t.stride(1), t.stride(2)};
}

// What the ops hold for one CRF kernel: its lattice and normalisation (tables), its C x C matrix
// as the forward and the backward mix it (transposed, padded and scaled by the slice's alpha) and
// its grids.
template <typename T>
struct CrfKernelState {
  PointTables<T> tables;
  const int* neighbors;  // [d1, M, 2]
  int64_t m;
  AlignedVector<T> transform;          // [C, cp]: row j holds alpha * A[:, j]
  AlignedVector<T> adjoint_transform;  // [C, cp]: row l holds -alpha * A[l, :] (backward only)
  AlignedVector<T> grid, next, mixed;  // (M+1) x cp each; row M is the zero row
  std::vector<ChunkRange> chunk;       // per chunk of points
  AlignedVector<T> partial;            // the chunks' partial grids, one after the other
  // Backward only: the current iteration's blurred adjoint grid (grid or next), and B^T H per
  // block of vertices and summed over the blocks and iterations ([C, cp]).
  const T* adjoint = nullptr;
  AlignedVector<T> outer_partials, outer_total;
  // Sender pruning only (mean_field_pruned in mean_field_kernels.inc): the matrix A ([C, C],
  // contiguous) and the slice's alpha, from which each iteration's per-image mixing matrices
  // (image_transforms) are made; the image of every vertex (a vertex belongs to one image: the
  // lattice's keys hold the image index); the last blurred grid (for mixing it again).
  const T* matrix = nullptr;
  double alpha = 1.0;
  std::vector<int> vertex_image;
  AlignedVector<T> image_transforms;
  const T* blurred_rows = nullptr;
};

// The whole problem but the kernels: the points and their unary, and where the output goes.
template <typename T>
struct MeanFieldProblem {
  const T* u;  // [P, cp]: the unary, padded lanes at -inf
  int64_t num_points, c, cp, chunks;
  T* out;  // the logits, row p at out + out_layout.offset(p)
  PointLayout out_layout;
};

// What the forward saves for the backward: per kernel the blurred grid B_t of every iteration
// ([T, M, C] each; with pruning, B_t D_t: zero in the columns of the classes that did not send),
// the marginals Q_1..Q_{T-1} ([T-1, P, C]) or null, and with pruning the senders of every
// iteration ([T, N, C], 1 where class l of image n sent in iteration t) or null.
template <typename T>
struct ForwardSaves {
  T* const* blurred = nullptr;
  T* marginals = nullptr;
  uint8_t* senders = nullptr;
};

// Sender pruning (mean_field_pruned, mean_field_kernels.inc): in each iteration a class whose Q
// stays below its threshold at every point of an image sends no message in that image (its
// channel is not splatted, blurred or sliced); every class still receives the senders' messages.
template <typename T>
struct PruneInput {
  const T* thresholds; // [C]: class l sends while its largest Q reaches thresholds[l] (sender_thresholds)
  int64_t images;      // N; the points of image n are [n P / N, (n + 1) P / N)
  const T* unary;      // the unary tensor as given (any layout), read through `layout`
  PointLayout layout;
  // Every matrix has equal off-diagonal entries in each column (A[l, j] = a_j for l != j: Potts,
  // diagonal or scalar weights times Potts): then the classes that send nothing all receive the
  // same message, and they are carried through each point's softmax as one class (their
  // log-sum-exp unary) instead of one each.
  bool shared;
};

// The backward's gradients: dL_T in, dU out (any layouts), and dU as it accumulates ([P, cp]).
// With pruning, sender_masks: [T, N, cp], 1 where class l of image n sent in iteration t, else 0
// (and in the padded lanes); null without.
template <typename T>
struct MeanFieldGradient {
  const T* grad_logits;
  PointLayout grad_layout;
  T* grad_unary;
  PointLayout unary_layout;
  T* du;
  const T* sender_masks = nullptr;
  int64_t images = 1;
};

}  // namespace
}  // namespace crfrnn

// The point pass inlines the bodies of lattice_filter_steps.h whole (see chunk_pass).
#if defined(__GNUC__) || defined(__clang__)
#define CRFRNN_MF_FLATTEN __attribute__((flatten))
#define CRFRNN_NOINLINE __attribute__((noinline))
#else
#define CRFRNN_MF_FLATTEN
#define CRFRNN_NOINLINE
#endif

#define CRFRNN_MF_NAMESPACE mean_field_generic
#define CRFRNN_MF_LANES 4
#include "mean_field_kernels.inc"
#undef CRFRNN_MF_NAMESPACE
#undef CRFRNN_MF_LANES

// GCC only: clang ignores `#pragma GCC target`, and its copy would be the generic code again.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CRFRNN_HAVE_AVX2_COPY 1
#pragma GCC push_options
#pragma GCC target("avx2")
#define CRFRNN_MF_NAMESPACE mean_field_avx2
#define CRFRNN_MF_LANES 8
#include "mean_field_kernels.inc"
#undef CRFRNN_MF_NAMESPACE
#undef CRFRNN_MF_LANES
#pragma GCC pop_options
#endif

namespace crfrnn {
namespace {

// Whether to run the AVX2 copy of the loops: when the CPU has AVX2, unless CRFRNN_CPU_ISA=generic
// forces the 4-lane copy (tests compare both).
inline bool use_avx2() {
#ifdef CRFRNN_HAVE_AVX2_COPY
  static const bool avx2 = __builtin_cpu_supports("avx2") &&
                           !(std::getenv("CRFRNN_CPU_ISA") && std::string(std::getenv("CRFRNN_CPU_ISA")) == "generic");
  return avx2;
#else
  return false;
#endif
}

// The forward and backward loops, in the widest copy this CPU runs.
template <typename T>
void run_mean_field(const MeanFieldProblem<T>& problem, std::vector<CrfKernelState<T>>& kernels, int64_t iterations,
                    const ForwardSaves<T>& saves) {
#ifdef CRFRNN_HAVE_AVX2_COPY
  if (use_avx2()) return mean_field_avx2::mean_field(problem, kernels, iterations, saves);
#endif
  mean_field_generic::mean_field(problem, kernels, iterations, saves);
}

template <typename T>
void run_mean_field_pruned(const MeanFieldProblem<T>& problem, std::vector<CrfKernelState<T>>& kernels,
                           int64_t iterations, const ForwardSaves<T>& saves, const PruneInput<T>& in,
                           AlignedVector<T>& padded, AlignedVector<T>& rows, AlignedVector<T>& spare,
                           AlignedVector<T>& share) {
#ifdef CRFRNN_HAVE_AVX2_COPY
  if (use_avx2()) {
    return mean_field_avx2::mean_field_pruned(problem, kernels, iterations, saves, in, padded, rows, spare, share);
  }
#endif
  mean_field_generic::mean_field_pruned(problem, kernels, iterations, saves, in, padded, rows, spare, share);
}

template <typename T>
void run_mean_field_backward(const MeanFieldProblem<T>& problem, const MeanFieldGradient<T>& gradient,
                             std::vector<CrfKernelState<T>>& kernels, int64_t iterations, const ForwardSaves<T>& saved) {
#ifdef CRFRNN_HAVE_AVX2_COPY
  if (use_avx2()) return mean_field_avx2::mean_field_backward(problem, gradient, kernels, iterations, saved);
#endif
  mean_field_generic::mean_field_backward(problem, gradient, kernels, iterations, saved);
}

// Most chunks of points; a power of two, so that a coarser chunk is a union of finer ones.
constexpr int64_t kMaxChunks = 16;

// Points [first, last) of chunk s of `chunks`.
inline int64_t chunk_start(int64_t num_points, int64_t s, int64_t chunks) { return num_points * s / chunks; }

// Cuts the points into chunks: as many as kMaxChunks allows, provided that for every kernel the
// partial grids hold at most M + P d1 / 8 rows together (zeroing and adding them stays a small
// part of the splat, which adds P d1 rows). The count depends on the problem only. Sets each
// kernel's chunk ranges and partial grids, and returns the count. The vertex indices are in
// [0, M) (check_mean_field_args).
template <typename T>
int64_t choose_chunks(std::vector<CrfKernelState<T>>& kernels, int64_t num_points, int64_t cp) {
  // The vertex rows touched by each of kMaxChunks fine chunks (empty: lo > hi).
  std::vector<std::vector<ChunkRange>> fine(kernels.size(), std::vector<ChunkRange>(kMaxChunks));
  for (size_t i = 0; i < kernels.size(); ++i) {
    const CrfKernelState<T>& k = kernels[i];
    at::parallel_for(0, kMaxChunks, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        int64_t lo = std::numeric_limits<int64_t>::max(), hi = std::numeric_limits<int64_t>::min();
        const int* vi = k.tables.vertex_index;
        const int d1 = k.tables.d1;
        for (int64_t e = chunk_start(num_points, s, kMaxChunks) * d1; e < chunk_start(num_points, s + 1, kMaxChunks) * d1;
             ++e) {
          lo = std::min<int64_t>(lo, vi[e]);
          hi = std::max<int64_t>(hi, vi[e] + int64_t{1});
        }
        fine[i][s] = ChunkRange{lo, hi, 0};
      }
    });
  }
  auto ranges = [&](size_t i, int64_t chunks) {
    std::vector<ChunkRange> coarse(chunks);
    const int64_t per = kMaxChunks / chunks;
    int64_t rows = 0;
    for (int64_t s = 0; s < chunks; ++s) {
      ChunkRange range{std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::min(), 0};
      for (int64_t f = s * per; f < (s + 1) * per; ++f) {
        range.lo = std::min(range.lo, fine[i][f].lo);
        range.hi = std::max(range.hi, fine[i][f].hi);
      }
      if (range.lo > range.hi) range.lo = range.hi = 0;  // no points
      range.first_row = rows;
      rows += range.hi - range.lo;
      coarse[s] = range;
    }
    return std::make_pair(coarse, rows);
  };
  int64_t chunks = kMaxChunks;
  for (; chunks > 1; chunks /= 2) {
    bool small_enough = true;
    for (size_t i = 0; i < kernels.size(); ++i) {
      small_enough &= ranges(i, chunks).second <= kernels[i].m + num_points * kernels[i].tables.d1 / 8;
    }
    if (small_enough) break;
  }
  for (size_t i = 0; i < kernels.size(); ++i) {
    auto coarse = ranges(i, chunks);
    kernels[i].chunk = coarse.first;
    resize_uninitialised(kernels[i].partial, static_cast<size_t>(coarse.second * cp));
  }
  return chunks;
}

// What a call allocates by the size of its problem: each kernel's grids and partial grids, the
// padded unary and (backward) dU. The calling thread keeps them for its next call, up to
// kKeptWorkspaceBytes: tens of MB freed and allocated again every call go back to the system
// and come back as fresh pages, whose faults cost 5-18% of a call at 500x375, C = 21 (more on two
// threads than on one, more for forward+backward than for the forward).
template <typename T>
struct Workspace {
  std::vector<CrfKernelState<T>> kernels;
  AlignedVector<T> u, du;
  AlignedVector<T> rows, spare, share;  // sender pruning's point rows (shared mode)

  size_t bytes() const {
    size_t n = u.capacity() + du.capacity() + rows.capacity() + spare.capacity() + share.capacity();
    for (const CrfKernelState<T>& k : kernels) {
      n += k.grid.capacity() + k.next.capacity() + k.mixed.capacity() + k.partial.capacity() +
           k.outer_partials.capacity();
    }
    return n * sizeof(T);
  }
};

constexpr size_t kKeptWorkspaceBytes = size_t{256} << 20;

// The thread's kept workspace for the length of a call (moved out, so that a call that throws
// or nests never shares it), given back at the end unless larger than kKeptWorkspaceBytes.
template <typename T>
class BorrowedWorkspace {
 public:
  BorrowedWorkspace() : workspace_(std::move(kept())) {}
  ~BorrowedWorkspace() {
    if (workspace_.bytes() <= kKeptWorkspaceBytes) kept() = std::move(workspace_);
  }
  BorrowedWorkspace(const BorrowedWorkspace&) = delete;
  BorrowedWorkspace& operator=(const BorrowedWorkspace&) = delete;
  Workspace<T>* operator->() { return &workspace_; }

 private:
  static Workspace<T>& kept() {
    thread_local Workspace<T> workspace;
    return workspace;
  }
  Workspace<T> workspace_;
};

// `buffer` holding n elements, uninitialised: a kept buffer's memory when large enough (clear
// first: growing a vector copies its old elements).
template <typename T>
void resize_uninitialised(AlignedVector<T>& buffer, size_t n) {
  buffer.clear();
  buffer.resize(n);
}

// A contiguous copy of t (or t), kept alive in `held` while raw pointers point into it.
const at::Tensor& keep_contiguous(std::vector<at::Tensor>& held, const at::Tensor& t) {
  held.push_back(t.contiguous());
  return held.back();
}

// Each kernel's state for the arguments: tables pointing into contiguous copies (kept alive in
// `held`), the mixing matrices (the adjoint one for the backward), zeroed grids; and the chunks
// of points. Returns the chunk count.
template <typename T>
int64_t setup_kernels(const MeanFieldArgs& a, int64_t cp, bool backward, std::vector<at::Tensor>& held,
                      std::vector<CrfKernelState<T>>& kernels) {
  const int64_t c = a.unary.size(2), num_points = a.unary.size(0) * a.unary.size(1);
  // rows j < c of a [c, c] matrix into [c, cp] (zero in the padded columns).
  auto padded_rows = [&](const at::Tensor& matrix) {
    const at::Tensor dense = matrix.contiguous();
    const T* from = dense.data_ptr<T>();
    AlignedVector<T> rows(static_cast<size_t>(c * cp), T(0));
    for (int64_t j = 0; j < c; ++j) std::copy(from + j * c, from + (j + 1) * c, rows.data() + j * cp);
    return rows;
  };
  kernels.resize(a.vertex_index.size());
  for (size_t i = 0; i < kernels.size(); ++i) {
    CrfKernelState<T>& k = kernels[i];
    const int d1 = static_cast<int>(a.vertex_index[i].size(1));
    k.tables = PointTables<T>{keep_contiguous(held, a.vertex_index[i]).template data_ptr<int>(),
                              keep_contiguous(held, a.weights[i]).template data_ptr<T>(),
                              keep_contiguous(held, a.splat_scale[i]).template data_ptr<T>(),
                              keep_contiguous(held, a.slice_scale[i]).template data_ptr<T>(), d1};
    k.neighbors = keep_contiguous(held, a.neighbors[i]).template data_ptr<int>();
    k.m = a.neighbors[i].size(1);
    // The slice's 1/(1 + 2^-d) scale is folded into the matrices: transform[j, l] = alpha A[l, j]
    // (mixed = B transform), adjoint_transform[l, j] = -alpha A[l, j] (dB = H adjoint_transform).
    const double alpha = blur_alpha(d1 - 1);
    k.transform = padded_rows(a.pairwise[i].t() * alpha);
    if (backward) {
      k.adjoint_transform = padded_rows(a.pairwise[i] * -alpha);
      k.outer_total.assign(static_cast<size_t>(c * cp), T(0));
    }
    // Rows [0, M) are written before they are read (merge, blur, mix); row M, the zero row that
    // missing blur neighbours point to, is never written.
    const size_t size = static_cast<size_t>((k.m + 1) * cp);
    for (AlignedVector<T>* g : {&k.grid, &k.next, &k.mixed}) {
      resize_uninitialised(*g, size);
      std::fill(g->end() - cp, g->end(), T(0));
    }
  }
  return choose_chunks(kernels, num_points, cp);
}

// The unary in padded rows [P, cp], padded lanes at -inf (0 after a softmax), read through its
// strides: no transposed copy of a channels-first unary.
template <typename T>
void padded_unary(const at::Tensor& unary, int64_t cp, AlignedVector<T>& u) {
  const int64_t num_points = unary.size(0) * unary.size(1), c = unary.size(2);
  const PointLayout layout = layout_of(unary);
  resize_uninitialised(u, static_cast<size_t>(num_points * cp));
  const T* src = unary.data_ptr<T>();
  at::parallel_for(0, num_points, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const T* from = src + layout.offset(p);
      T* row = u.data() + p * cp;
      for (int64_t k = 0; k < c; ++k) row[k] = from[k * layout.channel];
      std::fill(row + c, row + cp, -std::numeric_limits<T>::infinity());
    }
  });
}

// Whether every matrix has equal off-diagonal entries in each column (PruneInput::shared).
template <typename T>
bool potts_structured(const std::vector<CrfKernelState<T>>& kernels, int64_t c) {
  for (const CrfKernelState<T>& k : kernels) {
    for (int64_t j = 0; j < c; ++j) {
      const T off_diagonal = k.matrix[(j == 0 ? 1 : 0) * c + j];
      for (int64_t l = 0; l < c; ++l) {
        if (l != j && !(k.matrix[l * c + j] == off_diagonal)) return false;
      }
    }
  }
  return true;
}

// What sender pruning adds to the kernels' state: each matrix, the image of each vertex (a vertex
// belongs to one image: the lattice's keys hold the image index) and grids wide enough for any
// row of mean_field_pruned (the explicit classes and the pseudo class: up to C + 1 lanes, padded).
template <typename T>
void setup_pruning(const MeanFieldArgs& a, std::vector<at::Tensor>& held, std::vector<CrfKernelState<T>>& kernels) {
  const int64_t images = a.unary.size(0), per_image = a.unary.size(1), width = padded_width(a.unary.size(2) + 1);
  for (size_t i = 0; i < kernels.size(); ++i) {
    CrfKernelState<T>& k = kernels[i];
    k.matrix = keep_contiguous(held, a.pairwise[i]).template data_ptr<T>();
    k.alpha = blur_alpha(k.tables.d1 - 1);
    k.vertex_image.assign(static_cast<size_t>(k.m), 0);
    const int d1 = k.tables.d1;
    at::parallel_for(0, images, 1, [&](int64_t n0, int64_t n1) {  // an image writes its own vertices only
      for (int64_t n = n0; n < n1; ++n) {
        for (int64_t e = n * per_image * d1; e < (n + 1) * per_image * d1; ++e) {
          k.vertex_image[k.tables.vertex_index[e]] = static_cast<int>(n);
        }
      }
    });
    for (AlignedVector<T>* g : {&k.grid, &k.next, &k.mixed}) resize_uninitialised(*g, static_cast<size_t>((k.m + 1) * width));
    const ChunkRange& last = k.chunk.back();
    resize_uninitialised(k.partial, static_cast<size_t>((last.first_row + last.hi - last.lo) * width));
  }
}

// The forward: the last logits into `out` (the unary's layout) and, with `blurred` (one
// [T, M, C] tensor per kernel), what the backward needs (`marginals`, [T-1, N, P, C], if defined
// and not empty; `senders`, [T, N, C] uint8, when pruning). prune: sender pruning's epsilon (0:
// none, the loops of mean_field).
void run_forward(const MeanFieldArgs& a, at::Tensor& out, const std::vector<at::Tensor>* blurred,
                 const at::Tensor* marginals, double prune = 0.0, at::Tensor* senders = nullptr) {
  const int64_t num_points = a.unary.size(0) * a.unary.size(1);
  const int64_t c = a.unary.size(2), cp = padded_width(c);
  std::vector<at::Tensor> held;
  AT_DISPATCH_FLOATING_TYPES(a.unary.scalar_type(), "crfrnn_mean_field", [&] {
    BorrowedWorkspace<scalar_t> workspace;
    std::vector<CrfKernelState<scalar_t>>& kernels = workspace->kernels;
    const int64_t chunks = setup_kernels(a, cp, /*backward=*/false, held, kernels);
    std::vector<scalar_t> thresholds;
    PruneInput<scalar_t> in{nullptr, a.unary.size(0), a.unary.data_ptr<scalar_t>(), layout_of(a.unary), false};
    if (prune > 0) {
      setup_pruning(a, held, kernels);
      in.shared = potts_structured(kernels, c);
      for (double theta : sender_thresholds(a.pairwise, prune)) thresholds.push_back(static_cast<scalar_t>(theta));
      in.thresholds = thresholds.data();
    } else {
      padded_unary<scalar_t>(a.unary, cp, workspace->u);  // (pruning makes it when a layout needs it)
    }
    const MeanFieldProblem<scalar_t> problem{workspace->u.data(), num_points, c, cp, chunks, out.data_ptr<scalar_t>(),
                                             layout_of(out)};
    std::vector<scalar_t*> blurred_data;
    ForwardSaves<scalar_t> saves;
    if (blurred) {
      for (const at::Tensor& b : *blurred) blurred_data.push_back(b.data_ptr<scalar_t>());
      saves.blurred = blurred_data.data();
      if (marginals && marginals->numel() > 0) saves.marginals = marginals->data_ptr<scalar_t>();
    }
    if (prune == 0) return run_mean_field(problem, kernels, a.iterations, saves);
    if (senders && senders->numel() > 0) saves.senders = senders->data_ptr<uint8_t>();
    run_mean_field_pruned(problem, kernels, a.iterations, saves, in, workspace->u, workspace->rows, workspace->spare,
                          workspace->share);
  });
}

at::Tensor mean_field_inference_cpu(const at::Tensor& unary, at::TensorList vertex_index, at::TensorList weights,
                                    at::TensorList splat_scale, at::TensorList slice_scale,
                                    at::TensorList neighbors, at::TensorList pairwise, int64_t iterations,
                                    double prune) {
  const MeanFieldArgs a{unary, vertex_index, weights, splat_scale, slice_scale, neighbors, pairwise, iterations};
  check_mean_field_args("crfrnn::mean_field_inference", a, at::kCPU);
  check_prune("crfrnn::mean_field_inference", prune);
  // The layout of `unary` (e.g. [N, C, P] memory behind an [N, P, C] view): no transposed copies
  // on the way in or out.
  at::Tensor out = at::empty_like(unary);
  if (unary.numel() > 0) run_forward(a, out, nullptr, nullptr, prune);
  return out;
}

// What the training forward saves for the backward (the marginals, T - 1 of [N, P, C]: 142 MB at
// 500x375, C = 21, T = 10; the blurred grids) lives from the forward to the backward, so it cannot
// be the calling thread's workspace. Allocated afresh every step, blocks that large are mapped
// afresh by malloc (above its 32 MB threshold) and page-fault as the forward writes them: that
// cost more than recomputing the marginals in the backward saves. SavedBlocks keeps freed blocks
// (up to kKeptSavedBytes in all) for the next forward: a tensor on a block comes with a deleter
// that gives the block back, from whichever thread frees it, so no setting of the process's
// malloc is needed.
class SavedBlocks {
 public:
  // An uninitialised tensor; large ones on a kept block of at least its size (and at most twice).
  static at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (int64_t size : sizes) numel *= size;
    const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
    if (bytes < kSmallest) return at::empty(sizes, options);
    auto [block, capacity] = blocks().take(bytes);
    return at::from_blob(block, sizes, [capacity = capacity](void* p) { blocks().give_back(p, capacity); }, options);
  }

 private:
  static constexpr size_t kSmallest = size_t{1} << 20;        // below: malloc reuses them anyway
  static constexpr size_t kKeptSavedBytes = size_t{1} << 30;  // kept while no tensor holds them
  static constexpr std::align_val_t kAlignment{64};

  static SavedBlocks& blocks() {
    static SavedBlocks* kept = new SavedBlocks;  // never destroyed: a tensor may outlive static objects
    return *kept;
  }
  std::pair<void*, size_t> take(size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= 2 * bytes) {
        const std::pair<void*, size_t> block{it->second, it->first};
        kept_ -= it->first;
        free_.erase(it);
        return block;
      }
    }
    try {
      return {::operator new(bytes, kAlignment), bytes};
    } catch (const std::bad_alloc&) {  // (a bare "std::bad_alloc" says neither what nor what to do)
      TORCH_CHECK_WITH(OutOfMemoryError, false, "crfrnn: not enough memory for the ", bytes >> 20,
                       " MiB block of what the fused mean-field forward keeps for its backward (each iteration's "
                       "grids and marginals): pass keep_marginals=False or checkpoint=True, run fewer iterations, "
                       "or a smaller batch or image");
    }
  }
  void give_back(void* block, size_t capacity) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (kept_ + capacity <= kKeptSavedBytes) {
        free_.emplace(capacity, block);
        kept_ += capacity;
        return;
      }
    }
    ::operator delete(block, kAlignment);
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // capacity -> block
  size_t kept_ = 0;
};

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> mean_field_forward_cpu(
    const at::Tensor& unary, at::TensorList vertex_index, at::TensorList weights, at::TensorList splat_scale,
    at::TensorList slice_scale, at::TensorList neighbors, at::TensorList pairwise, int64_t iterations,
    bool save_marginals, double prune) {
  const MeanFieldArgs a{unary, vertex_index, weights, splat_scale, slice_scale, neighbors, pairwise, iterations};
  check_mean_field_args("crfrnn::mean_field_forward", a, at::kCPU);
  check_prune("crfrnn::mean_field_forward", prune);
  auto [out, blurred, marginals, senders] = empty_forward_outputs(a, save_marginals, prune, SavedBlocks::empty);
  if (unary.numel() > 0) run_forward(a, out, &blurred, &marginals, prune, &senders);
  return {out, blurred, marginals, senders};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mean_field_backward_cpu(
    const at::Tensor& grad_logits, const at::Tensor& unary, at::TensorList vertex_index, at::TensorList weights,
    at::TensorList splat_scale, at::TensorList slice_scale, at::TensorList neighbors, at::TensorList pairwise,
    at::TensorList blurred, const at::Tensor& marginals, int64_t iterations, const std::optional<at::Tensor>& senders) {
  const char* op = "crfrnn::mean_field_backward";
  const MeanFieldArgs a{unary, vertex_index, weights, splat_scale, slice_scale, neighbors, pairwise, iterations};
  check_mean_field_args(op, a, at::kCPU);
  check_backward_args(op, a, grad_logits, blurred, marginals, senders);
  at::Tensor grad_unary = at::empty_like(unary);
  const int64_t c = unary.size(2), cp = padded_width(c), num_points = unary.size(0) * unary.size(1);
  std::vector<at::Tensor> grad_pairwise;
  if (unary.numel() == 0) {
    for (const at::Tensor& matrix : pairwise) grad_pairwise.push_back(at::zeros_like(matrix));
    return {grad_unary, grad_pairwise};
  }
  std::vector<at::Tensor> held;
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "crfrnn_mean_field_backward", [&] {
    BorrowedWorkspace<scalar_t> workspace;
    std::vector<CrfKernelState<scalar_t>>& kernels = workspace->kernels;
    const int64_t chunks = setup_kernels(a, cp, /*backward=*/true, held, kernels);
    padded_unary<scalar_t>(unary, cp, workspace->u);
    AlignedVector<scalar_t>& du = workspace->du;
    resize_uninitialised(du, static_cast<size_t>(num_points * cp));
    const MeanFieldProblem<scalar_t> problem{workspace->u.data(), num_points, c, cp, chunks, nullptr, PointLayout{}};
    const at::Tensor grad = grad_logits;
    MeanFieldGradient<scalar_t> gradient{grad.data_ptr<scalar_t>(), layout_of(grad),
                                         grad_unary.data_ptr<scalar_t>(), layout_of(grad_unary), du.data()};
    // Pruning: iteration t's senders as rows of 0 and 1 ([T, N, cp]).
    AlignedVector<scalar_t> masks;
    if (senders && senders->numel() > 0) {
      const at::Tensor sent = senders->contiguous();
      const uint8_t* from = sent.data_ptr<uint8_t>();
      const int64_t rows = iterations * unary.size(0);
      masks.assign(static_cast<size_t>(rows * cp), scalar_t(0));
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t l = 0; l < c; ++l) masks[r * cp + l] = from[r * c + l] ? scalar_t(1) : scalar_t(0);
      }
      gradient.sender_masks = masks.data();
      gradient.images = unary.size(0);
    }
    std::vector<scalar_t*> blurred_data;
    for (const at::Tensor& b : blurred) {
      held.push_back(b.contiguous());
      blurred_data.push_back(held.back().data_ptr<scalar_t>());
    }
    ForwardSaves<scalar_t> saved{blurred_data.data(), nullptr};
    if (marginals.numel() > 0) {
      held.push_back(marginals.contiguous());
      saved.marginals = held.back().data_ptr<scalar_t>();
    }
    run_mean_field_backward(problem, gradient, kernels, iterations, saved);
    // dA_m = -alpha (B^T H)^T summed over the iterations (mean_field_steps.h).
    for (size_t i = 0; i < kernels.size(); ++i) {
      const at::Tensor total = at::from_blob(kernels[i].outer_total.data(), {c, cp}, unary.options());
      const double alpha = blur_alpha(kernels[i].tables.d1 - 1);
      grad_pairwise.push_back((total.narrow(1, 0, c).t() * -alpha).contiguous());
    }
  });
  return {grad_unary, grad_pairwise};
}

}  // namespace

TORCH_LIBRARY_IMPL(crfrnn, CPU, m) {
  m.impl("mean_field_inference", &mean_field_inference_cpu);
  m.impl("mean_field_forward", &mean_field_forward_cpu);
  m.impl("mean_field_backward", &mean_field_backward_cpu);
}

}  // namespace crfrnn
