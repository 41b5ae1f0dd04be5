// CUDA backend of the permutohedral lattice: the thin launcher between the dispatcher and the
// kernels of lattice_kernels.cu. Checks the arguments, picks the input's device and its current
// stream, allocates outputs and scratch with torch, launches, and checks every launch.
//
// Same results as the CPU backend (crfrnn/csrc/cpu/lattice_cpu.cpp), bit for bit by design: the
// lattice arithmetic is the shared lattice_math.h (compiled with --fmad=false), vertices are
// numbered in order of first appearance as the CPU build numbers them, and every sum of the filter
// is a gather in the CPU's order. Deterministic: no float atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>
#include <utility>

#include "../checks.h"
#include "../lattice_math.h"
#include "launch_utils.h"
#include "lattice_kernels.cuh"

namespace crfrnn {

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "crfrnn: CUDA kernel '", kernel, "' failed: ", cudaGetErrorString(err));
}

// Phase 5 of the build, also the mean-field launcher's (launch_utils.h).
std::pair<at::Tensor, at::Tensor> vertex_entries_table(const at::Tensor& vertex_index, int64_t m,
                                                       cudaStream_t stream) {
  const auto sorted = at::sort(vertex_index.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_vertex = std::get<0>(sorted).contiguous();
  at::Tensor splat_entries = std::get<1>(sorted).to(at::kInt);
  at::Tensor splat_offsets = at::empty({m + 1}, vertex_index.options());
  check_launch(cuda::launch_csr_offsets(sorted_vertex.const_data_ptr<int>(), vertex_index.numel(), m,
                                        splat_offsets.mutable_data_ptr<int>(), stream),
               "csr_offsets");
  return {splat_offsets, splat_entries};
}

namespace {

// ---- build: its phases in order ---------------------------------------------------------------

// Phase 1's result, per point p: simplex[p] = (rem0[0..d], rank[0..d]) and its barycentric weights.
struct EmbeddedPoints {
  at::Tensor simplex;  // [P, 2(d+1)] int32
  at::Tensor bary;     // [P, d+1] float64
};

// Phase 1: the simplex (rem0, rank) and barycentric weights (double) of every point.
// features: [N, P, d] float32 or float64, contiguous.
EmbeddedPoints embed_points(const at::Tensor& features, cudaStream_t stream) {
  const int64_t num_points = features.size(0) * features.size(1);
  const int d = static_cast<int>(features.size(2));
  EmbeddedPoints points{at::empty({num_points, 2 * (d + 1)}, features.options().dtype(at::kInt)),
                        at::empty({num_points, d + 1}, features.options().dtype(at::kDouble))};
  if (features.scalar_type() == at::kDouble) {
    check_launch(cuda::launch_embed<double>(features.const_data_ptr<double>(), num_points, d,
                                            points.simplex.mutable_data_ptr<int>(),
                                            points.bary.mutable_data_ptr<double>(), stream),
                 "embed");
  } else {
    check_launch(cuda::launch_embed<float>(features.const_data_ptr<float>(), num_points, d,
                                           points.simplex.mutable_data_ptr<int>(),
                                           points.bary.mutable_data_ptr<double>(), stream),
                 "embed");
  }
  return points;
}

// Phase 2's result: the hash table of the entries' keys.
struct EntryKeyTable {
  int64_t capacity;
  uint64_t mask;             // capacity - 1
  at::Tensor slots;          // [capacity]: per occupied slot, the smallest entry of its key
  at::Tensor slot_of_entry;  // [P (d+1)]
  at::Tensor overflow;       // [1]: 1 if an insert ran through the whole table
};

// Phase 2: the hash table of the entries' keys: a power of two at least twice the number of
// entries, so it is never more than half full and every probe sequence meets an empty slot.
EntryKeyTable insert_entry_keys(const at::Tensor& simplex, int d, int64_t per_image, int64_t num_entries,
                                cudaStream_t stream) {
  int64_t capacity = 1024;
  while (capacity < 2 * num_entries) capacity *= 2;
  TORCH_CHECK(capacity <= (int64_t{1} << 31), "crfrnn::build_lattice (CUDA kernel): ", num_entries,
              " simplex corners N*P*(d+1) exceed the hash table's limit of 2^30");
  const auto int_opts = simplex.options();
  EntryKeyTable table{capacity, static_cast<uint64_t>(capacity - 1), at::full({capacity}, -1, int_opts),
                      at::empty({num_entries}, int_opts), at::zeros({1}, int_opts)};
  check_launch(cuda::launch_insert(simplex.const_data_ptr<int>(), d, per_image, num_entries,
                                   table.slots.mutable_data_ptr<int>(), table.mask,
                                   table.slot_of_entry.mutable_data_ptr<int>(),
                                   table.overflow.mutable_data_ptr<int>(), stream),
               "insert");
  return table;
}

// Phase 3's result: the vertex numbering.
struct VertexNumbering {
  int64_t m;                // number of vertices M
  at::Tensor vertex_index;  // [P, d+1]
  at::Tensor owner;         // [M]: the owner (smallest) entry of each vertex
  at::Tensor owner_csum;    // [P (d+1)]: inclusive prefix sum of the owner flags
};

// Phase 3: the vertices numbered by their owner (smallest) entry, a prefix sum over the owner
// flags: in order of first appearance, as the CPU build numbers them. Holds the build's one
// synchronisation: the vertex count M and the overflow flag of phase 2.
VertexNumbering number_vertices(const EntryKeyTable& table, int64_t num_points, int d1, cudaStream_t stream) {
  const int64_t num_entries = num_points * d1;
  at::Tensor owner_flag = at::empty({num_entries}, table.slots.options());
  check_launch(cuda::launch_owner_flags(table.slots.const_data_ptr<int>(), table.slot_of_entry.const_data_ptr<int>(),
                                        num_entries, owner_flag.mutable_data_ptr<int>(), stream),
               "owner_flags");
  const at::Tensor owner_csum = at::cumsum(owner_flag, 0, at::kInt);
  const at::Tensor host = at::cat({owner_csum.slice(0, num_entries - 1, num_entries), table.overflow}).cpu();
  const int64_t m = host.const_data_ptr<int>()[0];
  TORCH_CHECK(host.const_data_ptr<int>()[1] == 0, "crfrnn::build_lattice (CUDA kernel): the vertex hash table (",
              table.capacity, " slots for ", num_entries, " entries) overflowed; this is a bug, please report it");
  VertexNumbering numbering{m, at::empty({num_points, d1}, owner_flag.options()), at::empty({m}, owner_flag.options()),
                            owner_csum};
  check_launch(cuda::launch_number(table.slots.const_data_ptr<int>(), table.slot_of_entry.const_data_ptr<int>(),
                                   owner_flag.const_data_ptr<int>(), owner_csum.const_data_ptr<int>(), num_entries,
                                   numbering.vertex_index.mutable_data_ptr<int>(),
                                   numbering.owner.mutable_data_ptr<int>(), stream),
               "number");
  return numbering;
}

// Phase 4: the blur neighbours [d+1, M, 2]; a missing one is M (the zero row of the filter's buffers).
at::Tensor blur_neighbors(const EmbeddedPoints& points, int d, int64_t per_image, const EntryKeyTable& table,
                          const VertexNumbering& numbering, cudaStream_t stream) {
  at::Tensor neighbors = at::empty({d + 1, numbering.m, 2}, points.simplex.options());
  check_launch(cuda::launch_neighbors(points.simplex.const_data_ptr<int>(), d, per_image,
                                      numbering.owner.const_data_ptr<int>(), numbering.m,
                                      table.slots.const_data_ptr<int>(), table.mask,
                                      numbering.owner_csum.const_data_ptr<int>(), neighbors.mutable_data_ptr<int>(),
                                      stream),
               "neighbors");
  return neighbors;
}

// The lattice of features [N, P, d], phase by phase (the kernels' bodies: lattice_device.cuh).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> build_lattice_cuda(
    const at::Tensor& features_in) {
  check_features(features_in);
  check_feature_values(features_in);
  TORCH_CHECK(features_in.is_cuda(), "crfrnn::build_lattice (CUDA kernel): features must be on a CUDA device, got ",
              features_in.device());
  const c10::cuda::CUDAGuard guard(features_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const auto dtype = features_in.scalar_type();
  const bool low_precision = dtype == at::kHalf || dtype == at::kBFloat16;
  const auto weight_dtype = low_precision ? at::kFloat : dtype;
  // half/bfloat16 -> float32 is exact, and embed_point decides their simplices in float32 anyway
  // (as the C++ build does for every non-double dtype), its weights in double.
  const at::Tensor features = (low_precision ? features_in.to(at::kFloat) : features_in).contiguous();
  const int64_t per_image = features.size(1), num_points = features.size(0) * per_image;
  const int d = static_cast<int>(features.size(2)), d1 = d + 1;
  const auto int_opts = features.options().dtype(at::kInt);
  if (num_points == 0) {
    return {at::empty({0, d1}, int_opts), at::empty({0, d1}, features.options().dtype(weight_dtype)),
            at::empty({d1, 0, 2}, int_opts), at::zeros({1}, int_opts), at::empty({0}, int_opts)};
  }

  const EmbeddedPoints points = embed_points(features, stream);
  const EntryKeyTable table = insert_entry_keys(points.simplex, d, per_image, num_points * d1, stream);
  const VertexNumbering numbering = number_vertices(table, num_points, d1, stream);
  at::Tensor neighbors = blur_neighbors(points, d, per_image, table, numbering, stream);
  auto [splat_offsets, splat_entries] = vertex_entries_table(numbering.vertex_index, numbering.m, stream);
  return {numbering.vertex_index, points.bary.to(weight_dtype), neighbors, splat_offsets, splat_entries};
}

// ---- filter ---------------------------------------------------------------------------------------

// The device tensors of one filter call (contiguous) and its sizes.
struct FilterArgs {
  at::Tensor vi, w, nb, off, ent;
  int64_t num_points, m;
  int d1;
};

// Checks the tables on the device, before the kernels that read them on the same stream, and
// without a host sync: the CRF filters one lattice dozens of times per forward (see checks.h for
// the CPU's scan).
FilterArgs filter_args(const at::Tensor& vertex_index, const at::Tensor& weights, const at::Tensor& neighbors,
                       const at::Tensor& splat_offsets, const at::Tensor& splat_entries, cudaStream_t stream) {
  FilterArgs a{vertex_index.contiguous(), weights.contiguous(), neighbors.contiguous(), splat_offsets.contiguous(),
               splat_entries.contiguous(), vertex_index.size(0), neighbors.size(1),
               static_cast<int>(vertex_index.size(1))};
  check_launch(cuda::launch_check_tables(a.vi.const_data_ptr<int>(), a.vi.numel(), a.nb.const_data_ptr<int>(), a.d1,
                                         a.off.const_data_ptr<int>(), a.ent.const_data_ptr<int>(), a.m, stream),
               "check_tables");
  return a;
}

// The blurred splat of values [P, C] (contiguous, dtype T): grid [M+1, C], blur directions in reverse
// order if `reverse`; row M stays zero (missing neighbours point at it).
template <typename T>
at::Tensor splat_and_blur(const at::Tensor& values, const FilterArgs& a, bool reverse, cudaStream_t stream) {
  const int64_t channels = values.size(1);
  at::Tensor grid = at::zeros({a.m + 1, channels}, values.options());
  at::Tensor next = at::zeros({a.m + 1, channels}, values.options());
  check_launch(cuda::launch_splat<T>(values.const_data_ptr<T>(), a.w.const_data_ptr<T>(), a.d1,
                                     a.off.const_data_ptr<int>(), a.ent.const_data_ptr<int>(), a.m, channels,
                                     grid.mutable_data_ptr<T>(), stream),
               "splat");
  for (int step = 0; step < a.d1; ++step) {
    const int j = reverse ? a.d1 - 1 - step : step;
    check_launch(cuda::launch_blur<T>(grid.const_data_ptr<T>(), a.nb.const_data_ptr<int>() + static_cast<int64_t>(j) * a.m * 2,
                                      a.m, channels, next.mutable_data_ptr<T>(), stream),
                 "blur");
    std::swap(grid, next);
  }
  return grid;
}

at::Tensor lattice_filter_cuda(const at::Tensor& values_in, const at::Tensor& vertex_index,
                               const at::Tensor& weights, const at::Tensor& neighbors,
                               const at::Tensor& splat_offsets, const at::Tensor& splat_entries,
                               bool reverse) {
  check_filter_args(values_in, vertex_index, weights, neighbors, splat_offsets, splat_entries);
  TORCH_CHECK(values_in.is_cuda(), "crfrnn::lattice_filter (CUDA kernel): values must be on a CUDA device, got ",
              values_in.device());
  const c10::cuda::CUDAGuard guard(values_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor values = values_in.contiguous();
  at::Tensor out = at::empty(values.sizes(), values.options());
  const FilterArgs a = filter_args(vertex_index, weights, neighbors, splat_offsets, splat_entries, stream);
  if (values.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "crfrnn_filter_cuda", [&] {
    const at::Tensor grid = splat_and_blur<scalar_t>(values, a, reverse, stream);
    const scalar_t alpha = static_cast<scalar_t>(blur_alpha(a.d1 - 1));
    check_launch(cuda::launch_slice<scalar_t>(grid.const_data_ptr<scalar_t>(), a.vi.const_data_ptr<int>(),
                                              a.w.const_data_ptr<scalar_t>(), a.d1, a.num_points, values.size(1),
                                              alpha, out.mutable_data_ptr<scalar_t>(), stream),
                 "slice");
  });
  return out;
}

// ---- the feature gradient ------------------------------------------------------------------------

// The weights' gradient [P, d+1] of <grad, filter(values)>: the forward grid (values, the filter's
// blur order) and the adjoint grid (grad, reversed), then one thread per simplex corner.
at::Tensor lattice_filter_weights_backward_cuda(const at::Tensor& values_in, const at::Tensor& grad_in,
                                                const at::Tensor& vertex_index, const at::Tensor& weights,
                                                const at::Tensor& neighbors, const at::Tensor& splat_offsets,
                                                const at::Tensor& splat_entries, bool reverse) {
  check_weights_backward_args(values_in, grad_in, vertex_index, weights, neighbors, splat_offsets, splat_entries);
  TORCH_CHECK(values_in.is_cuda(), "crfrnn::lattice_filter_weights_backward (CUDA kernel): values must be on a ",
              "CUDA device, got ", values_in.device());
  const c10::cuda::CUDAGuard guard(values_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const at::Tensor values = values_in.contiguous(), grad = grad_in.contiguous();
  at::Tensor out = at::zeros(vertex_index.sizes(), values.options());
  const FilterArgs a = filter_args(vertex_index, weights, neighbors, splat_offsets, splat_entries, stream);
  if (values.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "crfrnn_weights_backward_cuda", [&] {
    const at::Tensor forward_grid = splat_and_blur<scalar_t>(values, a, reverse, stream);
    const at::Tensor adjoint_grid = splat_and_blur<scalar_t>(grad, a, !reverse, stream);
    const scalar_t alpha = static_cast<scalar_t>(blur_alpha(a.d1 - 1));
    check_launch(cuda::launch_weight_grad<scalar_t>(a.vi.const_data_ptr<int>(), a.d1, a.num_points,
                                                    values.const_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
                                                    forward_grid.const_data_ptr<scalar_t>(),
                                                    adjoint_grid.const_data_ptr<scalar_t>(), values.size(1), alpha,
                                                    out.mutable_data_ptr<scalar_t>(), stream),
                 "weight_grad");
  });
  return out;
}

// The features' gradient [N, P, d] from the weights' (one thread per point, in double), in the
// features' dtype (float32 for half/bfloat16 features, which are converted to float32 as for the
// build: exact).
at::Tensor barycentric_weights_backward_cuda(const at::Tensor& features_in, const at::Tensor& grad_weights) {
  check_barycentric_backward_args(features_in, grad_weights);
  TORCH_CHECK(features_in.is_cuda(), "crfrnn::barycentric_weights_backward (CUDA kernel): features must be on a ",
              "CUDA device, got ", features_in.device());
  check_feature_values(features_in);
  const c10::cuda::CUDAGuard guard(features_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const auto dtype = features_in.scalar_type();
  const bool low_precision = dtype == at::kHalf || dtype == at::kBFloat16;
  const at::Tensor features = (low_precision ? features_in.to(at::kFloat) : features_in).contiguous();
  const at::Tensor g = grad_weights.to(at::kDouble).contiguous();
  const int64_t num_points = features.size(0) * features.size(1);
  const int d = static_cast<int>(features.size(2));
  at::Tensor grad = at::empty(features.sizes(), features.options().dtype(at::kDouble));
  if (features.scalar_type() == at::kDouble) {
    check_launch(cuda::launch_feature_grad<double>(features.const_data_ptr<double>(), num_points, d,
                                                   g.const_data_ptr<double>(), grad.mutable_data_ptr<double>(), stream),
                 "feature_grad");
  } else {
    check_launch(cuda::launch_feature_grad<float>(features.const_data_ptr<float>(), num_points, d,
                                                  g.const_data_ptr<double>(), grad.mutable_data_ptr<double>(), stream),
                 "feature_grad");
  }
  return grad.to(low_precision ? at::kFloat : dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(crfrnn, CUDA, m) {
  m.impl("build_lattice", &build_lattice_cuda);
  m.impl("lattice_filter", &lattice_filter_cuda);
  m.impl("lattice_filter_weights_backward", &lattice_filter_weights_backward_cuda);
  m.impl("barycentric_weights_backward", &barycentric_weights_backward_cuda);
}

}  // namespace crfrnn
