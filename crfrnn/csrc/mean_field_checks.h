// Argument checks and output shapes of the fused mean-field ops, shared by their CPU
// (cpu/mean_field_cpu.cpp) and CUDA (cuda/mean_field_cuda.cpp) kernels. TORCH_CHECK errors name the
// op and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "checks.h"

namespace crfrnn {

// The arguments of every fused op: the unary [N, P, C] and, per kernel, its lattice
// (vertex_index, weights, neighbors), normalisation (splat_scale, slice_scale) and C x C matrix.
// The most iterations the fused ops run (crfrnn.MAX_ITERATIONS, crfrnn.ops.MAX_ITERATIONS): a
// count beyond it is a mistake (a damaged state dict, an overflowed integer) that would allocate
// [iterations, M, C] per kernel or run for hours.
constexpr int64_t kMaxIterations = 1000;

struct MeanFieldArgs {
  const at::Tensor& unary;
  at::TensorList vertex_index, weights, splat_scale, slice_scale, neighbors, pairwise;
  int64_t iterations;
};

inline void check_mean_field_args(const char* op, const MeanFieldArgs& a, at::DeviceType device) {
  const at::Tensor& unary = a.unary;
  TORCH_CHECK(unary.dim() == 3, op, ": unary must be [N, P, C], got ", unary.sizes());
  TORCH_CHECK(unary.scalar_type() == at::kFloat || unary.scalar_type() == at::kDouble, op,
              ": unary must be float32 or float64, got ", unary.scalar_type());
  TORCH_CHECK(unary.device().type() == device, op, " (", device, " kernel): unary on ", unary.device());
  TORCH_CHECK(a.iterations >= 1 && a.iterations <= kMaxIterations, op, ": iterations must be >= 1 and <= ",
              kMaxIterations, ", got ", a.iterations);
  const size_t kernels = a.vertex_index.size();
  TORCH_CHECK(kernels >= 1 && a.weights.size() == kernels && a.splat_scale.size() == kernels &&
                  a.slice_scale.size() == kernels && a.neighbors.size() == kernels && a.pairwise.size() == kernels,
              op, ": one vertex_index, weights, splat_scale, slice_scale, neighbors and pairwise per kernel, "
              "got ", a.vertex_index.size(), ", ", a.weights.size(), ", ", a.splat_scale.size(), ", ",
              a.slice_scale.size(), ", ", a.neighbors.size(), ", ", a.pairwise.size());
  const int64_t p = unary.size(0) * unary.size(1), c = unary.size(2);
  const auto dtype = unary.scalar_type();
  for (size_t i = 0; i < kernels; ++i) {
    const at::Tensor& vi = a.vertex_index[i];
    TORCH_CHECK(vi.dim() == 2 && vi.size(0) == p && vi.scalar_type() == at::kInt, op, ": kernel ", i,
                ": vertex_index must be int32 [N*P = ", p, ", d+1], got ", vi.scalar_type(), " ", vi.sizes());
    TORCH_CHECK(a.weights[i].sizes() == vi.sizes() && a.weights[i].scalar_type() == dtype, op, ": kernel ", i,
                ": weights must be ", dtype, " ", vi.sizes(), ", got ", a.weights[i].scalar_type(), " ",
                a.weights[i].sizes());
    for (const at::Tensor* scale : {&a.splat_scale[i], &a.slice_scale[i]}) {
      TORCH_CHECK(scale->dim() == 1 && scale->size(0) == p && scale->scalar_type() == dtype, op, ": kernel ", i,
                  ": splat_scale and slice_scale must be ", dtype, " [N*P = ", p, "], got ", scale->scalar_type(),
                  " ", scale->sizes());
    }
    const at::Tensor& nb = a.neighbors[i];
    TORCH_CHECK(nb.dim() == 3 && nb.size(0) == vi.size(1) && nb.size(2) == 2 && nb.scalar_type() == at::kInt,
                op, ": kernel ", i, ": neighbors must be int32 [d+1=", vi.size(1), ", M, 2], got ",
                nb.scalar_type(), " ", nb.sizes());
    TORCH_CHECK(a.pairwise[i].dim() == 2 && a.pairwise[i].size(0) == c && a.pairwise[i].size(1) == c &&
                    a.pairwise[i].scalar_type() == dtype,
                op, ": kernel ", i, ": pairwise must be ", dtype, " [C, C] with C = ", c, ", got ",
                a.pairwise[i].scalar_type(), " ", a.pairwise[i].sizes());
    const std::pair<const char*, const at::Tensor*> named[] = {
        {"vertex_index", &vi},          {"weights", &a.weights[i]}, {"splat_scale", &a.splat_scale[i]},
        {"slice_scale", &a.slice_scale[i]}, {"neighbors", &nb},      {"pairwise", &a.pairwise[i]}};
    for (const auto& [name, t] : named) {
      TORCH_CHECK(t->device() == unary.device(), op, ": ", name, "[", i, "] on ", t->device(), " but the unary on ",
                  unary.device(), " (all tensors of a call must be on one device)");
    }
    check_vertex_tables(std::string(op) + ": kernel " + std::to_string(i), vi, nb);
  }
}

// Sender pruning's epsilon: 0 (none) up to 1.
inline void check_prune(const char* op, double prune) {
  TORCH_CHECK(prune >= 0 && prune <= 1, op, ": prune must be in [0, 1] (a class sends while its Q reaches it "
              "somewhere in the image; 0: every class always), got ", prune);
}

// Sender pruning's thresholds, one per class, from `prune` and the C x C matrices: class j sends
// in an image (its message is computed) while its largest Q there, M, has
//   M (s_j + D_j M) >= prune,
// a bound on how much dropping its message could move any Q in one iteration. Its message is at
// most M times column j of each matrix A (a normalised filter of values below M is below M); a
// message the same for every class moves no Q (softmax), so what counts is how column j differs
// between classes: between the classes l != j by at most s_j = sum over the matrices of
// (max - min of A[l, j] over l != j), which moves their Q by up to M s_j, and from the diagonal by
// at most D_j = sum of max over l != j of |A[l, j] - A[j, j]|, which acts through class j's own
// Q <= M. Returns theta_j, the M where the bound reaches prune: 2 prune / (s_j + sqrt(s_j^2 +
// 4 D_j prune)) (Potts: s_j = 0, theta_j = sqrt(prune / sum of weights)); 0 for prune = 0 (every
// class sends) and +inf where s_j = D_j = 0 (a message that moves nothing). In double, in this
// order (crfrnn.inference.sender_thresholds computes the same bits).
//
// Matrices with NaN/Inf entries, or so large that the iterations could overflow, are refused
// here (ValueError): a NaN Q reaches no threshold, so pruning would silence the classes it hit
// and return a finite result with nothing to show for it (the exact iterations return the NaN,
// which the callers report). The bound: a message to class i is at most the sum of row i's
// |entries| times the filtered Q, which every normalisation keeps below 2^64 for fewer than 2^31
// points; rows summing to less than the dtype's largest value / 2^64 cannot overflow.
inline std::vector<double> sender_thresholds(at::TensorList pairwise, double prune) {
  const int64_t c = pairwise.empty() ? 0 : pairwise[0].size(0);
  std::vector<double> spread(static_cast<size_t>(c), 0.0), diagonal(static_cast<size_t>(c), 0.0), theta(static_cast<size_t>(c), 0.0);
  if (prune == 0) return theta;
  std::vector<double> row_sum(static_cast<size_t>(c), 0.0);
  bool finite = true;
  for (const at::Tensor& matrix : pairwise) {
    const at::Tensor a = matrix.detach().to(at::kCPU, at::kDouble).contiguous();
    const double* m = a.data_ptr<double>();
    for (int64_t i = 0; i < c * c; ++i) {
      finite = finite && std::isfinite(m[i]);
      row_sum[i / c] += std::abs(m[i]);
    }
    for (int64_t j = 0; j < c; ++j) {
      double lo = std::numeric_limits<double>::infinity(), hi = -lo, far = 0.0;
      for (int64_t l = 0; l < c; ++l) {
        if (l == j) continue;
        lo = std::min(lo, m[l * c + j]);
        hi = std::max(hi, m[l * c + j]);
        far = std::max(far, std::abs(m[l * c + j] - m[j * c + j]));
      }
      if (c > 1) spread[j] = spread[j] + (hi - lo);
      diagonal[j] = diagonal[j] + far;
    }
  }
  const bool is_double = !pairwise.empty() && pairwise[0].scalar_type() == at::kDouble;
  const double limit = std::ldexp(is_double ? std::numeric_limits<double>::max()
                                            : static_cast<double>(std::numeric_limits<float>::max()), -64);
  const double largest = c ? *std::max_element(row_sum.begin(), row_sum.end()) : 0.0;
  TORCH_CHECK_VALUE(finite, "the pairwise matrices hold NaN/Inf values (a NaN/Inf parameter, or compatibility @ "
                    "weight overflowing): with sender pruning they would silence classes unseen");
  TORCH_CHECK_VALUE(largest <= limit, "the pairwise matrices are too large for sender pruning: a row of "
                    "|compatibility @ weight| sums to ", largest, ", above ", limit, ", so the iterations could "
                    "overflow ", is_double ? "float64" : "float32", " unseen; use smaller weights, or prune=0 (the "
                    "exact iterations, whose result is checked)");
  for (int64_t j = 0; j < c; ++j) {
    theta[j] = 2 * prune / (spread[j] + std::sqrt(spread[j] * spread[j] + 4 * diagonal[j] * prune));
  }
  return theta;
}

// The backward's own arguments: the logits' gradient (the unary's shape), and what the forward
// saved: per kernel the blurred grids [T, M, C], the marginals [T-1, N, P, C] or nothing, and
// with pruning the senders [T, N, C] (uint8) or nothing.
inline void check_backward_args(const char* op, const MeanFieldArgs& a, const at::Tensor& grad_logits,
                                at::TensorList blurred, const at::Tensor& marginals,
                                const std::optional<at::Tensor>& senders = std::nullopt) {
  if (senders && senders->numel() > 0) {
    const std::vector<int64_t> shape{a.iterations, a.unary.size(0), a.unary.size(2)};
    TORCH_CHECK(senders->sizes() == at::IntArrayRef(shape) && senders->scalar_type() == at::kByte &&
                    senders->device() == a.unary.device(),
                op, ": senders must be empty (every class sent) or uint8 ", at::IntArrayRef(shape),
                " on the unary's device (what crfrnn::mean_field_forward returned), got ", senders->scalar_type(), " ",
                senders->sizes(), " on ", senders->device());
  }
  const auto dtype = a.unary.scalar_type();
  TORCH_CHECK(grad_logits.sizes() == a.unary.sizes() && grad_logits.scalar_type() == dtype &&
                  grad_logits.device() == a.unary.device(),
              op, ": grad_logits must be ", dtype, " ", a.unary.sizes(), " on the unary's device, got ",
              grad_logits.scalar_type(), " ", grad_logits.sizes(), " on ", grad_logits.device());
  TORCH_CHECK(blurred.size() == a.vertex_index.size(), op, ": one blurred grid tensor per kernel (",
              a.vertex_index.size(), "), got ", blurred.size());
  const int64_t c = a.unary.size(2);
  for (size_t i = 0; i < blurred.size(); ++i) {
    const int64_t m = a.neighbors[i].size(1);
    TORCH_CHECK(blurred[i].dim() == 3 && blurred[i].size(0) == a.iterations && blurred[i].size(1) == m &&
                    blurred[i].size(2) == c && blurred[i].scalar_type() == dtype && blurred[i].device() == a.unary.device(),
                op, ": kernel ", i, ": blurred must be ", dtype, " [iterations = ", a.iterations, ", M = ", m,
                ", C = ", c, "] on the unary's device (what crfrnn::mean_field_forward saved), got ", blurred[i].scalar_type(),
                " ", blurred[i].sizes(), " on ", blurred[i].device());
  }
  if (marginals.numel() == 0) return;
  const std::vector<int64_t> expected{a.iterations - 1, a.unary.size(0), a.unary.size(1), c};
  TORCH_CHECK(marginals.sizes() == at::IntArrayRef(expected) && marginals.scalar_type() == dtype &&
                  marginals.device() == a.unary.device(),
              op, ": marginals must be empty (recompute them) or ", dtype, " ", at::IntArrayRef(expected),
              " on the unary's device (what crfrnn::mean_field_forward saved), got ", marginals.scalar_type(), " ",
              marginals.sizes(), " on ", marginals.device());
}

// The outputs of crfrnn::mean_field_forward, unwritten: the logits in the unary's layout, per
// kernel the blurred grids [iterations, M, C], the marginals [iterations - 1, N, P, C] if
// save_marginals and not pruning (else an empty tensor: a pruned forward's backward recomputes
// them), and with pruning (prune > 0) the senders [iterations, N, C] uint8 (else empty).
// `saved` allocates the saved grids and marginals (the CPU's keeps their blocks between steps).
inline std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> empty_forward_outputs(
    const MeanFieldArgs& a, bool save_marginals, double prune = 0.0,
    at::Tensor (*saved)(at::IntArrayRef, const at::TensorOptions&) = nullptr) {
  const at::Tensor& u = a.unary;
  auto allocate = [&](at::IntArrayRef sizes) { return saved ? saved(sizes, u.options()) : at::empty(sizes, u.options()); };
  std::vector<at::Tensor> blurred;
  for (const at::Tensor& nb : a.neighbors) blurred.push_back(allocate({a.iterations, nb.size(1), u.size(2)}));
  at::Tensor marginals = save_marginals && prune == 0
                             ? allocate({a.iterations - 1, u.size(0), u.size(1), u.size(2)})
                             : at::empty({0}, u.options());
  at::Tensor senders = prune > 0 ? at::empty({a.iterations, u.size(0), u.size(2)}, u.options().dtype(at::kByte))
                                 : at::empty({0}, u.options().dtype(at::kByte));
  return {at::empty_like(u), blurred, marginals, senders};
}

}  // namespace crfrnn
