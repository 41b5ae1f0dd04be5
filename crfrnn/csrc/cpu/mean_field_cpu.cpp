// Fused mean-field inference on the CPU: all iterations of the CRF in one op, for forward passes
// that need no gradient (evaluation, post-processing).
//
// The autograd path (crfrnn/crf.py) runs each iteration as separate ops: two lattice filters,
// two C x C matmuls on the P pixels, the unary addition and a softmax, each a pass over
// P x C values. Here one iteration is
//
//   splat Q into each kernel's grid -> blur -> grid <- alpha * grid * A^T (C x C, on the M
//   vertices) -> one pass over the points: L = U - sum over kernels of the sliced grids,
//   Q = softmax(L)
//
// Moving the C x C matrices before the slice is exact algebra (the slice is a per-channel
// weighted sum of vertex rows, so it commutes with a matrix acting on the channels) and they
// then act on M rows instead of P (M is 2-10% of P on natural images). The result equals the
// autograd path up to float rounding; tests/test_crf_fused.py checks it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>
#include <algorithm>
#include <cstdlib>

#include "../lattice_math.h"
#include "filter_steps.h"

namespace crfrnn {
namespace {

// Rows of Q, the unary and the grids hold the C channels padded to a multiple of kRowAlign
// (padded lanes: 0 in Q and the grids, -inf in the unary, so 0 after a softmax).
constexpr int64_t kRowAlign = 8;

inline int64_t padded_width(int64_t c) { return (c + kRowAlign - 1) / kRowAlign * kRowAlign; }

// One CRF kernel: its lattice, the weights the splat and slice use (normalisation folded in) and
// its C x C pairwise matrix, transposed, padded and scaled by the slice's alpha.
template <typename T>
struct Kernel {
  const int* vertex_index;  // [P, d1]
  const T* splat_weights;   // [P, d1]
  const T* slice_weights;   // [P, d1]
  const int* neighbors;     // [d1, M, 2]
  int64_t m;
  int d1;
  std::vector<T> transform;          // [cp, cp]: row j holds alpha * A[:, j]
  std::vector<T> grid, next, mixed;  // (M+1) x cp each; row M is the zero row
  std::vector<T> partial;            // chunks x M x cp: the splat's partial grids
};

}  // namespace
}  // namespace crfrnn

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
void run_mean_field(const T* unary, int64_t num_points, int64_t c, std::vector<Kernel<T>>& kernels,
                    int64_t iterations, T* out) {
#ifdef CRFRNN_HAVE_AVX2_COPY
  // CRFRNN_CPU_ISA=generic forces the 4-lane copy (tests compare both).
  static const bool avx2 = __builtin_cpu_supports("avx2") &&
                           !(std::getenv("CRFRNN_CPU_ISA") && std::string(std::getenv("CRFRNN_CPU_ISA")) == "generic");
  if (avx2) return mean_field_avx2::mean_field(unary, num_points, c, kernels, iterations, out);
#endif
  mean_field_generic::mean_field(unary, num_points, c, kernels, iterations, out);
}

void check_mean_field_args(const at::Tensor& unary, const at::TensorList& vertex_index,
                           const at::TensorList& splat_weights, const at::TensorList& slice_weights,
                           const at::TensorList& neighbors, const at::TensorList& pairwise,
                           int64_t iterations) {
  const char* op = "crfrnn::mean_field_inference";
  TORCH_CHECK(unary.dim() == 2, op, ": unary must be [N*P, C], got ", unary.sizes());
  TORCH_CHECK(unary.scalar_type() == at::kFloat || unary.scalar_type() == at::kDouble, op,
              ": unary must be float32 or float64, got ", unary.scalar_type());
  TORCH_CHECK(unary.device().is_cpu(), op, " (CPU kernel): unary on ", unary.device());
  TORCH_CHECK(iterations >= 1, op, ": iterations must be >= 1, got ", iterations);
  const size_t kernels = vertex_index.size();
  TORCH_CHECK(kernels >= 1 && splat_weights.size() == kernels && slice_weights.size() == kernels &&
                  neighbors.size() == kernels && pairwise.size() == kernels,
              op, ": one vertex_index, splat_weights, slice_weights, neighbors and pairwise per "
              "kernel, got ", vertex_index.size(), ", ", splat_weights.size(), ", ", slice_weights.size(),
              ", ", neighbors.size(), ", ", pairwise.size());
  const int64_t p = unary.size(0), c = unary.size(1);
  for (size_t i = 0; i < kernels; ++i) {
    const at::Tensor& vi = vertex_index[i];
    TORCH_CHECK(vi.dim() == 2 && vi.size(0) == p && vi.scalar_type() == at::kInt, op, ": kernel ", i,
                ": vertex_index must be int32 [", p, ", d+1], got ", vi.scalar_type(), " ", vi.sizes());
    for (const at::Tensor* w : {&splat_weights[i], &slice_weights[i]}) {
      TORCH_CHECK(w->sizes() == vi.sizes() && w->scalar_type() == unary.scalar_type(), op, ": kernel ", i,
                  ": weights must be ", unary.scalar_type(), " ", vi.sizes(), ", got ", w->scalar_type(),
                  " ", w->sizes());
    }
    const at::Tensor& nb = neighbors[i];
    TORCH_CHECK(nb.dim() == 3 && nb.size(0) == vi.size(1) && nb.size(2) == 2 && nb.scalar_type() == at::kInt,
                op, ": kernel ", i, ": neighbors must be int32 [d+1=", vi.size(1), ", M, 2], got ",
                nb.scalar_type(), " ", nb.sizes());
    TORCH_CHECK(pairwise[i].dim() == 2 && pairwise[i].size(0) == c && pairwise[i].size(1) == c &&
                    pairwise[i].scalar_type() == unary.scalar_type(),
                op, ": kernel ", i, ": pairwise must be ", unary.scalar_type(), " [C, C] with C = ", c,
                ", got ", pairwise[i].scalar_type(), " ", pairwise[i].sizes());
    for (const at::Tensor* t : {&vi, &splat_weights[i], &slice_weights[i], &nb, &pairwise[i]}) {
      TORCH_CHECK(t->device().is_cpu(), op, " (CPU kernel): kernel ", i, " tensor on ", t->device());
    }
  }
}

at::Tensor mean_field_inference_cpu(const at::Tensor& unary_in, at::TensorList vertex_index,
                                    at::TensorList splat_weights, at::TensorList slice_weights,
                                    at::TensorList neighbors, at::TensorList pairwise, int64_t iterations) {
  check_mean_field_args(unary_in, vertex_index, splat_weights, slice_weights, neighbors, pairwise, iterations);
  const at::Tensor unary = unary_in.contiguous();
  at::Tensor out = at::empty_like(unary);
  const int64_t num_points = unary.size(0), c = unary.size(1), cp = padded_width(c);
  if (unary.numel() == 0) return out;
  // Keep the contiguous copies alive while the kernels point into them.
  std::vector<at::Tensor> held;
  auto contiguous = [&held](const at::Tensor& t) { held.push_back(t.contiguous()); return held.back(); };
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "crfrnn_mean_field", [&] {
    std::vector<Kernel<scalar_t>> kernels(vertex_index.size());
    for (size_t i = 0; i < kernels.size(); ++i) {
      Kernel<scalar_t>& k = kernels[i];
      k.vertex_index = contiguous(vertex_index[i]).data_ptr<int>();
      k.splat_weights = contiguous(splat_weights[i]).data_ptr<scalar_t>();
      k.slice_weights = contiguous(slice_weights[i]).data_ptr<scalar_t>();
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
    run_mean_field<scalar_t>(unary.data_ptr<scalar_t>(), num_points, c, kernels, iterations,
                                  out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crfrnn, CPU, m) {
  m.impl("mean_field_inference", &mean_field_inference_cpu);
}

}  // namespace crfrnn
