// Argument checks shared by the CPU and CUDA launchers: each failure names what was expected
// and what came (the Python layer checks first; these guard direct op calls).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <utility>

#include "lattice_math.h"

namespace crfrnn {

inline void check_features(const at::Tensor& features) {
  TORCH_CHECK(features.dim() == 3, "crfrnn::build_lattice: features must be [N, P, d], got ",
              features.sizes());
  const int64_t d = features.size(2);
  TORCH_CHECK(d >= 1 && d <= kMaxDim, "crfrnn::build_lattice: feature dimension d must be in 1..",
              kMaxDim, ", got ", d);
  TORCH_CHECK(features.scalar_type() == at::kFloat || features.scalar_type() == at::kDouble ||
                  features.scalar_type() == at::kHalf || features.scalar_type() == at::kBFloat16,
              "crfrnn::build_lattice: features must be floating point, got ", features.scalar_type());
  TORCH_CHECK(features.numel() * (d + 1) < (int64_t{1} << 31),
              "crfrnn::build_lattice: too many points for int32 indices: N*P*(d+1)*d = ",
              features.numel() * (d + 1));
}

// NaN/Inf and range checks with at:: ops (the CUDA launcher; the CPU kernel fuses them into its
// embedding loop). Same messages as crfrnn.reference.check_feature_values (ValueError in Python).
inline void check_feature_values(const at::Tensor& features) {
  if (features.numel() == 0) return;
  const int64_t bad = (~at::isfinite(features)).sum().item<int64_t>();
  TORCH_CHECK_VALUE(bad == 0, "features contain ", bad, " NaN/Inf values");
  const double largest = features.abs().max().item<double>();
  TORCH_CHECK_VALUE(largest <= kMaxAbsFeature, "features must be at most ", kMaxAbsFeature,
                    " in magnitude (after scaling by 1/sigma), got ", largest,
                    ": is a bandwidth tiny or not applied?");
}

inline void check_filter_args(const at::Tensor& values, const at::Tensor& vertex_index,
                              const at::Tensor& weights, const at::Tensor& neighbors,
                              const at::Tensor& splat_offsets, const at::Tensor& splat_entries) {
  TORCH_CHECK(values.dim() == 2, "crfrnn::lattice_filter: values must be [N*P, C], got ", values.sizes());
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble,
              "crfrnn::lattice_filter: values must be float32 or float64, got ", values.scalar_type());
  TORCH_CHECK(weights.scalar_type() == values.scalar_type(), "crfrnn::lattice_filter: weights dtype ",
              weights.scalar_type(), " differs from values dtype ", values.scalar_type());
  TORCH_CHECK(vertex_index.dim() == 2 && vertex_index.size(0) == values.size(0),
              "crfrnn::lattice_filter: vertex_index must be [", values.size(0), ", d+1], got ",
              vertex_index.sizes());
  TORCH_CHECK(weights.sizes() == vertex_index.sizes(), "crfrnn::lattice_filter: weights shape ",
              weights.sizes(), " differs from vertex_index shape ", vertex_index.sizes());
  TORCH_CHECK(neighbors.dim() == 3 && neighbors.size(0) == vertex_index.size(1) && neighbors.size(2) == 2,
              "crfrnn::lattice_filter: neighbors must be [d+1=", vertex_index.size(1), ", M, 2], got ",
              neighbors.sizes());
  TORCH_CHECK(splat_offsets.dim() == 1 && splat_offsets.size(0) == neighbors.size(1) + 1,
              "crfrnn::lattice_filter: splat_offsets must be [M+1=", neighbors.size(1) + 1, "], got ",
              splat_offsets.sizes());
  TORCH_CHECK(splat_entries.dim() == 1 && splat_entries.size(0) == vertex_index.numel(),
              "crfrnn::lattice_filter: splat_entries must be [", vertex_index.numel(), "], got ",
              splat_entries.sizes());
  for (const at::Tensor* t : {&vertex_index, &neighbors, &splat_offsets, &splat_entries}) {
    TORCH_CHECK(t->scalar_type() == at::kInt, "crfrnn::lattice_filter: lattice index tensors must be int32, got ",
                t->scalar_type());
  }
  const std::pair<const char*, const at::Tensor*> named[] = {{"vertex_index", &vertex_index},
                                                            {"weights", &weights},
                                                            {"neighbors", &neighbors},
                                                            {"splat_offsets", &splat_offsets},
                                                            {"splat_entries", &splat_entries}};
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t->device() == values.device(), "crfrnn::lattice_filter: lattice tensor on ", t->device(),
                " but values on ", values.device(), " (", name, ") (all tensors of a call must be on one device)");
  }
}

// ---- index tables -------------------------------------------------------------------------------
// The filter and the fused mean-field op index arrays with the lattice's int32 tables, so a value
// out of range would read or write outside them. Lattice attributes are public and the ops can be
// called directly: the CPU launchers scan every table on every call (a min/max pass over ints, a
// few percent of the filter, which reads the same tables and C values per entry). The CUDA
// launcher checks on the device instead, without a host sync (cuda::launch_check_tables).
// Same rules and messages as crfrnn.reference.check_lattice_tables (ValueError in Python).

// The first i with data[i + 1] < data[i] among the n ints at `data`, or -1. (One vectorised pass
// to tell, a second one to find it only when there is one.)
inline int64_t first_decrease(const int* data, int64_t n) {
  bool non_decreasing = true;
  for (int64_t i = 0; i + 1 < n; ++i) non_decreasing &= data[i] <= data[i + 1];
  if (non_decreasing) return -1;
  for (int64_t i = 0;; ++i) {
    if (data[i + 1] < data[i]) return i;
  }
}

// ValueError unless every value of the int32 CPU tensor `table` is in [lo, hi].
inline void check_table_range(const char* op, const char* name, const at::Tensor& table, int64_t lo,
                              int64_t hi, const std::string& meaning) {
  if (table.numel() == 0) return;
  const auto found = at::aminmax(table);  // ATen's vectorised, parallel reduction
  const int64_t smallest = std::get<0>(found).item<int64_t>(), largest = std::get<1>(found).item<int64_t>();
  TORCH_CHECK_VALUE(smallest >= lo && largest <= hi, op, ": ", name, " holds values in [", smallest, ", ", largest,
                    "], expected [", lo, ", ", hi, "] (", meaning, ")");
}

// The blur tables of a lattice on the CPU: vertex_index [P, d+1] in [0, M), neighbors [d+1, M, 2]
// in [0, M] (M: no neighbour). `op` names the op (and kernel) in the messages.
inline void check_vertex_tables(const std::string& op, const at::Tensor& vertex_index, const at::Tensor& neighbors) {
  const int64_t m = neighbors.size(1);
  check_table_range(op.c_str(), "vertex_index", vertex_index, 0, m - 1,
                    c10::str("vertex numbers below M = neighbors.size(1) = ", m));
  check_table_range(op.c_str(), "neighbors", neighbors, 0, m,
                    c10::str("vertex numbers up to M = ", m, ", which marks a missing neighbour"));
}

// All four index tables of crfrnn::lattice_filter on the CPU (shapes checked by check_filter_args):
// the blur tables, and the vertex -> entries table in CSR form: splat_offsets [M+1] non-decreasing
// from 0 to K = vertex_index.numel(), splat_entries [K] in [0, K).
inline void check_filter_tables(const at::Tensor& vertex_index, const at::Tensor& neighbors,
                                const at::Tensor& splat_offsets, const at::Tensor& splat_entries) {
  const char* op = "crfrnn::lattice_filter";
  check_vertex_tables(op, vertex_index, neighbors);
  const int64_t k = vertex_index.numel();
  check_table_range(op, "splat_offsets", splat_offsets, 0, k,
                    c10::str("positions in splat_entries, up to K = vertex_index.numel() = ", k));
  const at::Tensor offsets = splat_offsets.contiguous();
  const int* off = offsets.const_data_ptr<int>();
  const int64_t m = offsets.numel() - 1;
  TORCH_CHECK_VALUE(off[0] == 0 && off[m] == k, op, ": splat_offsets must run from 0 to K = vertex_index.numel() = ",
                    k, ", got ", off[0], " ... ", off[m]);
  const int64_t decrease = first_decrease(off, m + 1);
  TORCH_CHECK_VALUE(decrease < 0, op, ": splat_offsets must be non-decreasing, got splat_offsets[", decrease,
                    "] = ", off[decrease], " > splat_offsets[", decrease + 1, "] = ", off[decrease + 1]);
  check_table_range(op, "splat_entries", splat_entries, 0, k - 1,
                    c10::str("entries p*(d+1) + r below K = vertex_index.numel() = ", k));
}

// ---- the feature gradient's ops ---------------------------------------------------------------

// crfrnn::lattice_filter_weights_backward: the filter's arguments, and grad shaped as values.
inline void check_weights_backward_args(const at::Tensor& values, const at::Tensor& grad,
                                        const at::Tensor& vertex_index, const at::Tensor& weights,
                                        const at::Tensor& neighbors, const at::Tensor& splat_offsets,
                                        const at::Tensor& splat_entries) {
  check_filter_args(values, vertex_index, weights, neighbors, splat_offsets, splat_entries);
  TORCH_CHECK_VALUE(grad.sizes() == values.sizes(), "crfrnn::lattice_filter_weights_backward: values and grad ",
                    "must both be [P, C] with P = vertex_index.size(0) = ", vertex_index.size(0), ", got ",
                    values.sizes(), " and ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == values.scalar_type() && grad.device() == values.device(),
              "crfrnn::lattice_filter_weights_backward: grad (", grad.scalar_type(), " on ", grad.device(),
              ") must have the values' dtype and device (", values.scalar_type(), " on ", values.device(), ")");
}

// crfrnn::barycentric_weights_backward: features as for the build, grad_weights [N*P, d+1]
// floating point on their device.
inline void check_barycentric_backward_args(const at::Tensor& features, const at::Tensor& grad_weights) {
  check_features(features);
  const int64_t num_points = features.size(0) * features.size(1), d1 = features.size(2) + 1;
  TORCH_CHECK_VALUE(grad_weights.dim() == 2 && grad_weights.size(0) == num_points && grad_weights.size(1) == d1,
                    "crfrnn::barycentric_weights_backward: grad_weights must be [N*P, d+1] = [", num_points, ", ",
                    d1, "] for features ", features.sizes(), ", got ", grad_weights.sizes());
  TORCH_CHECK(grad_weights.scalar_type() == at::kFloat || grad_weights.scalar_type() == at::kDouble,
              "crfrnn::barycentric_weights_backward: grad_weights must be float32 or float64, got ",
              grad_weights.scalar_type());
  TORCH_CHECK(grad_weights.device() == features.device(), "crfrnn::barycentric_weights_backward: grad_weights on ",
              grad_weights.device(), " but features on ", features.device());
}

}  // namespace crfrnn
