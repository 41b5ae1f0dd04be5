// Argument checks shared by the CPU and CUDA launchers: each failure names what was expected
// and what came (the Python layer checks first; these guard direct op calls).
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

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
  for (const at::Tensor* t : {&vertex_index, &weights, &neighbors, &splat_offsets, &splat_entries}) {
    TORCH_CHECK(t->device() == values.device(), "crfrnn::lattice_filter: lattice tensor on ", t->device(),
                " but values on ", values.device());
  }
}

}  // namespace crfrnn
