// CUDA backend of the permutohedral lattice: the thin launcher between the dispatcher and the
// kernels of lattice_kernels.cu. Checks the arguments, picks the input's device and its current
// stream, allocates outputs and scratch with torch, launches, and checks every launch.
//
// Same results as the CPU backend (crfrnn/csrc/cpu/lattice_cpu.cpp), bit for bit by design: the
// lattice arithmetic is the shared lattice_math.h (compiled with --fmad=false), vertices are
// numbered in order of first appearance as in the serial CPU build, and every sum of the filter
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
#include "lattice_kernels.cuh"

namespace crfrnn {
namespace {

void check_launch(cudaError_t err, const char* kernel) {
  TORCH_CHECK(err == cudaSuccess, "crfrnn: CUDA kernel '", kernel, "' failed: ", cudaGetErrorString(err));
}

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
  // half/bfloat16 -> float32 is exact, and embed_point computes in double anyway.
  const at::Tensor features = (low_precision ? features_in.to(at::kFloat) : features_in).contiguous();
  const int64_t num_images = features.size(0), per_image = features.size(1);
  const int d = static_cast<int>(features.size(2)), d1 = d + 1;
  const int64_t num_points = num_images * per_image;
  const int64_t num_entries = num_points * d1;
  const auto int_opts = features.options().dtype(at::kInt);
  if (num_points == 0) {
    return {at::empty({0, d1}, int_opts), at::empty({0, d1}, features.options().dtype(weight_dtype)),
            at::empty({d1, 0, 2}, int_opts), at::zeros({1}, int_opts), at::empty({0}, int_opts)};
  }

  // 1. Simplex (rem0, rank) and barycentric weights (double) of every point.
  at::Tensor simplex = at::empty({num_points, 2 * d1}, int_opts);
  at::Tensor bary = at::empty({num_points, d1}, features.options().dtype(at::kDouble));
  if (features.scalar_type() == at::kDouble) {
    check_launch(cuda::launch_embed<double>(features.const_data_ptr<double>(), num_points, d,
                                            simplex.mutable_data_ptr<int>(), bary.mutable_data_ptr<double>(),
                                            stream),
                 "embed");
  } else {
    check_launch(cuda::launch_embed<float>(features.const_data_ptr<float>(), num_points, d,
                                           simplex.mutable_data_ptr<int>(), bary.mutable_data_ptr<double>(),
                                           stream),
                 "embed");
  }

  // 2. Hash table of the entries' keys: a power of two at least twice the number of entries, so
  //    it is never more than half full and every probe sequence meets an empty slot.
  int64_t capacity = 1024;
  while (capacity < 2 * num_entries) capacity *= 2;
  TORCH_CHECK(capacity <= (int64_t{1} << 31), "crfrnn::build_lattice (CUDA kernel): ", num_entries,
              " simplex corners N*P*(d+1) exceed the hash table's limit of 2^30");
  const uint64_t mask = static_cast<uint64_t>(capacity - 1);
  at::Tensor slots = at::full({capacity}, -1, int_opts);
  at::Tensor slot_of_entry = at::empty({num_entries}, int_opts);
  at::Tensor overflow = at::zeros({1}, int_opts);
  check_launch(cuda::launch_insert(simplex.const_data_ptr<int>(), d, per_image, num_entries,
                                   slots.mutable_data_ptr<int>(), mask, slot_of_entry.mutable_data_ptr<int>(),
                                   overflow.mutable_data_ptr<int>(), stream),
               "insert");

  // 3. Vertices numbered by their owner (smallest) entry: a prefix sum over the owner flags.
  at::Tensor owner_flag = at::empty({num_entries}, int_opts);
  check_launch(cuda::launch_owner_flags(slots.const_data_ptr<int>(), slot_of_entry.const_data_ptr<int>(),
                                        num_entries, owner_flag.mutable_data_ptr<int>(), stream),
               "owner_flags");
  const at::Tensor owner_csum = at::cumsum(owner_flag, 0, at::kInt);
  // The build's one synchronisation: the vertex count M and the overflow flag.
  const at::Tensor host = at::cat({owner_csum.slice(0, num_entries - 1, num_entries), overflow}).cpu();
  const int64_t m = host.const_data_ptr<int>()[0];
  TORCH_CHECK(host.const_data_ptr<int>()[1] == 0, "crfrnn::build_lattice (CUDA kernel): the vertex hash table (",
              capacity, " slots for ", num_entries, " entries) overflowed; this is a bug, please report it");

  at::Tensor vertex_index = at::empty({num_points, d1}, int_opts);
  at::Tensor owner = at::empty({m}, int_opts);
  check_launch(cuda::launch_number(slots.const_data_ptr<int>(), slot_of_entry.const_data_ptr<int>(),
                                   owner_flag.const_data_ptr<int>(), owner_csum.const_data_ptr<int>(),
                                   num_entries, vertex_index.mutable_data_ptr<int>(),
                                   owner.mutable_data_ptr<int>(), stream),
               "number");

  // 4. Blur neighbours; a missing one is M (the zero row of the filter's buffers).
  at::Tensor neighbors = at::empty({d1, m, 2}, int_opts);
  check_launch(cuda::launch_neighbors(simplex.const_data_ptr<int>(), d, per_image, owner.const_data_ptr<int>(), m,
                                      slots.const_data_ptr<int>(), mask, owner_csum.const_data_ptr<int>(),
                                      neighbors.mutable_data_ptr<int>(), stream),
               "neighbors");

  // 5. Vertex -> entries table (CSR): entries stably sorted by vertex, so in increasing order
  //    within a vertex, as the CPU's counting sort leaves them.
  const auto sorted = at::sort(vertex_index.reshape({-1}), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sorted_vertex = std::get<0>(sorted).contiguous();
  at::Tensor splat_entries = std::get<1>(sorted).to(at::kInt);
  at::Tensor splat_offsets = at::empty({m + 1}, int_opts);
  check_launch(cuda::launch_csr_offsets(sorted_vertex.const_data_ptr<int>(), num_entries, m,
                                        splat_offsets.mutable_data_ptr<int>(), stream),
               "csr_offsets");

  return {vertex_index, bary.to(weight_dtype), neighbors, splat_offsets, splat_entries};
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
  const at::Tensor vi = vertex_index.contiguous(), w = weights.contiguous(), nb = neighbors.contiguous();
  const at::Tensor off = splat_offsets.contiguous(), ent = splat_entries.contiguous();
  const int64_t num_points = values.size(0), channels = values.size(1), m = nb.size(1);
  const int d1 = static_cast<int>(vi.size(1));
  // On the device, before the filter's kernels on the same stream, and without a host sync: the
  // CRF filters one lattice dozens of times per forward (see checks.h for the CPU's scan).
  check_launch(cuda::launch_check_tables(vi.const_data_ptr<int>(), vi.numel(), nb.const_data_ptr<int>(), d1,
                                         off.const_data_ptr<int>(), ent.const_data_ptr<int>(), m, stream),
               "check_tables");
  if (values.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "crfrnn_filter_cuda", [&] {
    // Two (M+1) x C buffers; row M stays zero: missing neighbours point at it.
    at::Tensor grid = at::zeros({m + 1, channels}, values.options());
    at::Tensor next = at::zeros({m + 1, channels}, values.options());
    check_launch(cuda::launch_splat<scalar_t>(values.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), d1,
                                              off.const_data_ptr<int>(), ent.const_data_ptr<int>(), m, channels,
                                              grid.mutable_data_ptr<scalar_t>(), stream),
                 "splat");
    // Blur along each direction; the reversed order gives the adjoint.
    for (int step = 0; step < d1; ++step) {
      const int j = reverse ? d1 - 1 - step : step;
      check_launch(cuda::launch_blur<scalar_t>(grid.const_data_ptr<scalar_t>(),
                                               nb.const_data_ptr<int>() + static_cast<int64_t>(j) * m * 2, m,
                                               channels, next.mutable_data_ptr<scalar_t>(), stream),
                   "blur");
      std::swap(grid, next);
    }
    const scalar_t alpha = static_cast<scalar_t>(blur_alpha(d1 - 1));
    check_launch(cuda::launch_slice<scalar_t>(grid.const_data_ptr<scalar_t>(), vi.const_data_ptr<int>(),
                                              w.const_data_ptr<scalar_t>(), d1, num_points, channels, alpha,
                                              out.mutable_data_ptr<scalar_t>(), stream),
                 "slice");
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(crfrnn, CUDA, m) {
  m.impl("build_lattice", &build_lattice_cuda);
  m.impl("lattice_filter", &lattice_filter_cuda);
}

}  // namespace crfrnn
