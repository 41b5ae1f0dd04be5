// Fused mean-field inference on the CPU: all iterations of the CRF in one op, for forward passes
// that need no gradient (evaluation, post-processing).
//
// The autograd path (crfrnn/crf.py) runs each iteration as separate ops: two lattice filters,
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
// and splatting the next in the same pass over the points means Q is never stored. The result
// equals the autograd path up to float rounding; tests/test_crf_fused.py checks it.
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
#include <memory>
#include <new>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../lattice_math.h"
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

// What the inference holds for one CRF kernel: its lattice, its normalisation as per-point scales
// of the splat and the slice, its C x C pairwise matrix (transposed, padded and scaled by the
// slice's alpha) and its grids.
template <typename T>
struct CrfKernelState {
  const int* vertex_index;  // [P, d1]
  const T* weights;         // [P, d1]: barycentric
  const T* splat_scale;     // [P]
  const T* slice_scale;     // [P]
  const int* neighbors;     // [d1, M, 2]
  int64_t m;
  int d1;
  AlignedVector<T> transform;          // [cp, cp]: row j holds alpha * A[:, j]
  AlignedVector<T> grid, next, mixed;  // (M+1) x cp each; row M is the zero row
  std::vector<ChunkRange> chunk;       // per chunk of points
  AlignedVector<T> partial;            // the chunks' partial grids, one after the other
};

// The whole inference but the kernels: the points and their unary, and where the output goes.
template <typename T>
struct MeanFieldProblem {
  const T* u;  // [P, cp]: the unary, padded lanes at -inf
  int64_t num_points, c, cp, chunks;
  T* out;  // out[p / per_image * out_stride_image + p % per_image * out_stride_point + k * out_stride_class]
  int64_t per_image, out_stride_image, out_stride_point, out_stride_class;
};

}  // namespace
}  // namespace crfrnn

// The point pass inlines the bodies of lattice_filter_steps.h whole (see chunk_pass).
#if defined(__GNUC__) || defined(__clang__)
#define CRFRNN_MF_FLATTEN __attribute__((flatten))
#else
#define CRFRNN_MF_FLATTEN
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

// The widest copy of the loop this CPU runs.
template <typename T>
void run_mean_field(const MeanFieldProblem<T>& problem, std::vector<CrfKernelState<T>>& kernels, int64_t iterations) {
#ifdef CRFRNN_HAVE_AVX2_COPY
  // CRFRNN_CPU_ISA=generic forces the 4-lane copy (tests compare both).
  static const bool avx2 = __builtin_cpu_supports("avx2") &&
                           !(std::getenv("CRFRNN_CPU_ISA") && std::string(std::getenv("CRFRNN_CPU_ISA")) == "generic");
  if (avx2) return mean_field_avx2::mean_field(problem, kernels, iterations);
#endif
  mean_field_generic::mean_field(problem, kernels, iterations);
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
        const int* vi = k.vertex_index;
        for (int64_t e = chunk_start(num_points, s, kMaxChunks) * k.d1;
             e < chunk_start(num_points, s + 1, kMaxChunks) * k.d1; ++e) {
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
      small_enough &= ranges(i, chunks).second <= kernels[i].m + num_points * kernels[i].d1 / 8;
    }
    if (small_enough) break;
  }
  for (size_t i = 0; i < kernels.size(); ++i) {
    auto coarse = ranges(i, chunks);
    kernels[i].chunk = coarse.first;
    kernels[i].partial.resize(static_cast<size_t>(coarse.second * cp));
  }
  return chunks;
}

void check_mean_field_args(const at::Tensor& unary, const at::TensorList& vertex_index, const at::TensorList& weights,
                           const at::TensorList& splat_scale, const at::TensorList& slice_scale,
                           const at::TensorList& neighbors, const at::TensorList& pairwise, int64_t iterations) {
  const char* op = "crfrnn::mean_field_inference";
  TORCH_CHECK(unary.dim() == 3, op, ": unary must be [N, P, C], got ", unary.sizes());
  TORCH_CHECK(unary.scalar_type() == at::kFloat || unary.scalar_type() == at::kDouble, op,
              ": unary must be float32 or float64, got ", unary.scalar_type());
  TORCH_CHECK(unary.device().is_cpu(), op, " (CPU kernel): unary on ", unary.device());
  TORCH_CHECK(iterations >= 1, op, ": iterations must be >= 1, got ", iterations);
  const size_t kernels = vertex_index.size();
  TORCH_CHECK(kernels >= 1 && weights.size() == kernels && splat_scale.size() == kernels &&
                  slice_scale.size() == kernels && neighbors.size() == kernels && pairwise.size() == kernels,
              op, ": one vertex_index, weights, splat_scale, slice_scale, neighbors and pairwise per kernel, "
              "got ", vertex_index.size(), ", ", weights.size(), ", ", splat_scale.size(), ", ",
              slice_scale.size(), ", ", neighbors.size(), ", ", pairwise.size());
  const int64_t p = unary.size(0) * unary.size(1), c = unary.size(2);
  const auto dtype = unary.scalar_type();
  for (size_t i = 0; i < kernels; ++i) {
    const at::Tensor& vi = vertex_index[i];
    TORCH_CHECK(vi.dim() == 2 && vi.size(0) == p && vi.scalar_type() == at::kInt, op, ": kernel ", i,
                ": vertex_index must be int32 [N*P = ", p, ", d+1], got ", vi.scalar_type(), " ", vi.sizes());
    TORCH_CHECK(weights[i].sizes() == vi.sizes() && weights[i].scalar_type() == dtype, op, ": kernel ", i,
                ": weights must be ", dtype, " ", vi.sizes(), ", got ", weights[i].scalar_type(), " ",
                weights[i].sizes());
    for (const at::Tensor* scale : {&splat_scale[i], &slice_scale[i]}) {
      TORCH_CHECK(scale->dim() == 1 && scale->size(0) == p && scale->scalar_type() == dtype, op, ": kernel ", i,
                  ": splat_scale and slice_scale must be ", dtype, " [N*P = ", p, "], got ", scale->scalar_type(),
                  " ", scale->sizes());
    }
    const at::Tensor& nb = neighbors[i];
    TORCH_CHECK(nb.dim() == 3 && nb.size(0) == vi.size(1) && nb.size(2) == 2 && nb.scalar_type() == at::kInt,
                op, ": kernel ", i, ": neighbors must be int32 [d+1=", vi.size(1), ", M, 2], got ",
                nb.scalar_type(), " ", nb.sizes());
    TORCH_CHECK(pairwise[i].dim() == 2 && pairwise[i].size(0) == c && pairwise[i].size(1) == c &&
                    pairwise[i].scalar_type() == dtype,
                op, ": kernel ", i, ": pairwise must be ", dtype, " [C, C] with C = ", c, ", got ",
                pairwise[i].scalar_type(), " ", pairwise[i].sizes());
    for (const at::Tensor* t : {&vi, &weights[i], &splat_scale[i], &slice_scale[i], &nb, &pairwise[i]}) {
      TORCH_CHECK(t->device().is_cpu(), op, " (CPU kernel): kernel ", i, " tensor on ", t->device());
    }
    check_vertex_tables(std::string(op) + ": kernel " + std::to_string(i), vi, nb);
  }
}

at::Tensor mean_field_inference_cpu(const at::Tensor& unary, at::TensorList vertex_index, at::TensorList weights,
                                    at::TensorList splat_scale, at::TensorList slice_scale,
                                    at::TensorList neighbors, at::TensorList pairwise, int64_t iterations) {
  check_mean_field_args(unary, vertex_index, weights, splat_scale, slice_scale, neighbors, pairwise, iterations);
  // The layout of `unary` (e.g. [N, C, P] memory behind an [N, P, C] view): no transposed copies
  // on the way in or out.
  at::Tensor out = at::empty_like(unary);
  if (unary.numel() == 0) return out;
  const int64_t per_image = unary.size(1), num_points = unary.size(0) * per_image;
  const int64_t c = unary.size(2), cp = padded_width(c);
  // Keep the contiguous copies alive while the kernels point into them.
  std::vector<at::Tensor> held;
  auto contiguous = [&held](const at::Tensor& t) { held.push_back(t.contiguous()); return held.back(); };
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "crfrnn_mean_field", [&] {
    std::vector<CrfKernelState<scalar_t>> kernels(vertex_index.size());
    for (size_t i = 0; i < kernels.size(); ++i) {
      CrfKernelState<scalar_t>& k = kernels[i];
      k.vertex_index = contiguous(vertex_index[i]).data_ptr<int>();
      k.weights = contiguous(weights[i]).data_ptr<scalar_t>();
      k.splat_scale = contiguous(splat_scale[i]).data_ptr<scalar_t>();
      k.slice_scale = contiguous(slice_scale[i]).data_ptr<scalar_t>();
      k.neighbors = contiguous(neighbors[i]).data_ptr<int>();
      k.m = neighbors[i].size(1);
      k.d1 = static_cast<int>(vertex_index[i].size(1));
      // transform[j, l] = alpha * A[l, j] (zero in the padded rows and columns): the slice's
      // 1/(1 + 2^-d) scale folded in.
      const at::Tensor transform = (pairwise[i].t() * blur_alpha(k.d1 - 1)).contiguous();
      const scalar_t* t = transform.data_ptr<scalar_t>();
      k.transform.assign(static_cast<size_t>(cp * cp), scalar_t(0));
      for (int64_t j = 0; j < c; ++j) std::copy(t + j * c, t + (j + 1) * c, k.transform.data() + j * cp);
      const size_t size = static_cast<size_t>((k.m + 1) * cp);
      k.grid.assign(size, scalar_t(0));
      k.next.assign(size, scalar_t(0));
      k.mixed.assign(size, scalar_t(0));
    }
    const int64_t chunks = choose_chunks(kernels, num_points, cp);
    // u: the unary in padded rows, padded lanes at -inf (0 after a softmax).
    AlignedVector<scalar_t> u(static_cast<size_t>(num_points * cp));
    const scalar_t* src = unary.data_ptr<scalar_t>();
    const int64_t s_image = unary.stride(0), s_point = unary.stride(1), s_class = unary.stride(2);
    at::parallel_for(0, num_points, 1024, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const scalar_t* from = src + (p / per_image) * s_image + (p % per_image) * s_point;
        scalar_t* row = u.data() + p * cp;
        for (int64_t k = 0; k < c; ++k) row[k] = from[k * s_class];
        std::fill(row + c, row + cp, -std::numeric_limits<scalar_t>::infinity());
      }
    });
    const MeanFieldProblem<scalar_t> problem{u.data(), num_points, c, cp, chunks, out.data_ptr<scalar_t>(),
                                             per_image, out.stride(0), out.stride(1), out.stride(2)};
    run_mean_field(problem, kernels, iterations);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crfrnn, CPU, m) {
  m.impl("mean_field_inference", &mean_field_inference_cpu);
}

}  // namespace crfrnn
