// The fused mean-field ops on CUDA: the launcher between the dispatcher and the schedules of
// mean_field_device.cuh (launched by mean_field_kernels.cu). Checks the arguments (as the CPU
// kernels, mean_field_checks.h), makes what the GPU's gather splat needs (each lattice's
// vertex -> entries table, the splat weights times the normalisation scales), the matrices as the
// schedules mix them, and every buffer, with torch; launches; checks the launches.
//
// Results equal the CPU op's to rounding (its splat adds the same terms in another order) and are
// deterministic (gathers only, no float atomics). The forward can save the marginals Q_1..Q_{T-1}
// (the layer asks for them on CUDA: the splat reads Q from memory anyway); without them the
// backward recomputes each Q from the unary and the saved blurred grids, as on the CPU. With
// sender pruning (prune > 0) the forward finds each iteration's senders by the same thresholds
// as the CPU (sender_thresholds) and filters Q D (mean_field_device.cuh); it then saves no
// marginals, and returns the senders, which the backward takes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../lattice_math.h"
#include "../mean_field_checks.h"
#include "launch_utils.h"
#include "mean_field_kernels.cuh"

namespace crfrnn {
namespace {

// The tensors behind one kernel's CrfKernelView (kept alive while the schedules run).
struct KernelTensors {
  at::Tensor vertex_index, weights, splat_scale, slice_scale, neighbors, splat_offsets, splat_entries,
      splat_weights, adjoint_weights, transform, adjoint_transform, grid, next, mixed, outer_total;
};

// Kernel i's tensors and view. backward: the adjoint weights, matrix and the outer products' total.
template <typename T>
device::CrfKernelView<T> kernel_view(const MeanFieldArgs& a, size_t i, bool backward, at::Tensor blurred,
                                     cudaStream_t stream, KernelTensors& h) {
  const int64_t c = a.unary.size(2);
  h.vertex_index = a.vertex_index[i].contiguous();
  h.weights = a.weights[i].contiguous();
  h.splat_scale = a.splat_scale[i].contiguous();
  h.slice_scale = a.slice_scale[i].contiguous();
  h.neighbors = a.neighbors[i].contiguous();
  const int64_t m = h.neighbors.size(1);
  std::tie(h.splat_offsets, h.splat_entries) = vertex_entries_table(h.vertex_index, m, stream);
  // The C++ op scatters (scale * weight) * value: the same products.
  h.splat_weights = (h.splat_scale.unsqueeze(1) * h.weights).contiguous();
  const double alpha = blur_alpha(h.vertex_index.size(1) - 1);
  h.transform = (a.pairwise[i].t() * alpha).contiguous();
  h.grid = at::zeros({m + 1, c}, a.unary.options());
  h.next = at::zeros({m + 1, c}, a.unary.options());
  h.mixed = at::zeros({m + 1, c}, a.unary.options());
  if (backward) {
    h.adjoint_weights = (h.slice_scale.unsqueeze(1) * h.weights).contiguous();
    h.adjoint_transform = (a.pairwise[i] * -alpha).contiguous();
    h.outer_total = at::zeros({c, c}, a.unary.options());
  }
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
  device::CrfKernelView<T> k{};
  k.tables = PointTables<T>{h.vertex_index.data_ptr<int>(), h.weights.data_ptr<T>(), h.splat_scale.data_ptr<T>(),
                            h.slice_scale.data_ptr<T>(), static_cast<int>(h.vertex_index.size(1))};
  k.neighbors = h.neighbors.data_ptr<int>();
  k.splat_offsets = h.splat_offsets.data_ptr<int>();
  k.splat_entries = h.splat_entries.data_ptr<int>();
  k.splat_weights = h.splat_weights.data_ptr<T>();
  k.adjoint_weights = ptr(h.adjoint_weights);
  k.transform = h.transform.data_ptr<T>();
  k.adjoint_transform = ptr(h.adjoint_transform);
  k.m = m;
  k.grid = h.grid.data_ptr<T>();
  k.next = h.next.data_ptr<T>();
  k.mixed = h.mixed.data_ptr<T>();
  k.blurred = blurred.data_ptr<T>();
  k.outer_total = ptr(h.outer_total);
  return k;
}

// The problem's view: the unary as contiguous rows, the kernels, scratch rows; `out` and
// `marginals` (a defined, non-empty [T-1, N, P, C] tensor, or recompute) as given.
template <typename T>
device::MeanFieldView<T> problem_view(const MeanFieldArgs& a, const at::Tensor& unary, std::vector<at::Tensor>& blurred,
                                      bool backward, cudaStream_t stream, std::vector<KernelTensors>& held,
                                      std::vector<at::Tensor>& scratch, const at::Tensor& out,
                                      const at::Tensor& marginals) {
  const int64_t num_points = unary.size(0) * unary.size(1), c = unary.size(2);
  device::MeanFieldView<T> mf{};
  mf.unary = unary.data_ptr<T>();
  mf.num_points = num_points;
  mf.c = c;
  mf.iterations = a.iterations;
  mf.kernels.count = static_cast<int>(a.vertex_index.size());
  held.resize(a.vertex_index.size());
  for (size_t i = 0; i < held.size(); ++i) {
    mf.kernels.k[i] = kernel_view<T>(a, i, backward, blurred[i], stream, held[i]);
  }
  mf.out = out.defined() ? out.data_ptr<T>() : nullptr;
  mf.marginals = marginals.defined() && marginals.numel() > 0 ? marginals.data_ptr<T>() : nullptr;
  for (int j = 0; j < 2; ++j) scratch.push_back(at::empty({num_points, c}, unary.options()));
  mf.q_scratch[0] = scratch[0].data_ptr<T>();
  mf.q_scratch[1] = scratch[1].data_ptr<T>();
  return mf;
}

void check_cuda_args(const char* op, const MeanFieldArgs& a) {
  check_mean_field_args(op, a, at::kCUDA);
  TORCH_CHECK(a.vertex_index.size() <= static_cast<size_t>(device::kMaxCrfKernels), op, " (CUDA kernel): at most ",
              device::kMaxCrfKernels, " CRF kernels, got ", a.vertex_index.size());
}

// The forward into `out` (the unary's layout, as on the CPU) with the saves; with prune > 0 the
// senders into `senders` ([T, N, C] uint8, if defined and not empty).
void run_forward_cuda(const MeanFieldArgs& a, at::Tensor& out, std::vector<at::Tensor>& blurred,
                      const at::Tensor& marginals, double prune = 0.0, const at::Tensor& senders = at::Tensor()) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor unary = a.unary.contiguous();
  const at::Tensor rows = out.is_contiguous() ? out : at::empty(unary.sizes(), unary.options());
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "crfrnn_mean_field_cuda", [&] {
    std::vector<KernelTensors> held;
    std::vector<at::Tensor> scratch;
    auto mf = problem_view<scalar_t>(a, unary, blurred, false, stream, held, scratch, rows, marginals);
    if (prune > 0) {
      const int64_t images = unary.size(0), c = unary.size(2);
      std::vector<scalar_t> theta;
      for (double t : sender_thresholds(a.pairwise, prune)) theta.push_back(static_cast<scalar_t>(t));
      scratch.push_back(at::tensor(theta, unary.options().device(at::kCPU)).to(unary.device()));
      mf.prune.thresholds = scratch.back().data_ptr<scalar_t>();
      mf.prune.images = images;
      scratch.push_back(at::empty({images * device::max_blocks(unary.size(1)) * c}, unary.options()));
      mf.prune.block_max = scratch.back().data_ptr<scalar_t>();
      scratch.push_back(at::empty({images * c}, unary.options()));
      mf.prune.mask = scratch.back().data_ptr<scalar_t>();
      mf.prune.senders = senders.defined() && senders.numel() > 0 ? senders.data_ptr<uint8_t>() : nullptr;
    }
    check_launch(cuda::launch_mean_field_forward<scalar_t>(mf, stream), "mean_field_forward");
  });
  if (!rows.is_same(out)) out.copy_(rows);
}

at::Tensor mean_field_inference_cuda(const at::Tensor& unary, at::TensorList vertex_index, at::TensorList weights,
                                     at::TensorList splat_scale, at::TensorList slice_scale,
                                     at::TensorList neighbors, at::TensorList pairwise, int64_t iterations,
                                     double prune) {
  const MeanFieldArgs a{unary, vertex_index, weights, splat_scale, slice_scale, neighbors, pairwise, iterations};
  check_cuda_args("crfrnn::mean_field_inference", a);
  check_prune("crfrnn::mean_field_inference", prune);
  const c10::cuda::CUDAGuard guard(unary.device());
  // (grids written, dropped)
  [[maybe_unused]] auto [out, blurred, marginals, senders] = empty_forward_outputs(a, false, prune);
  if (unary.numel() > 0) run_forward_cuda(a, out, blurred, at::Tensor(), prune);
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor, at::Tensor> mean_field_forward_cuda(
    const at::Tensor& unary, at::TensorList vertex_index, at::TensorList weights, at::TensorList splat_scale,
    at::TensorList slice_scale, at::TensorList neighbors, at::TensorList pairwise, int64_t iterations,
    bool save_marginals, double prune) {
  const MeanFieldArgs a{unary, vertex_index, weights, splat_scale, slice_scale, neighbors, pairwise, iterations};
  check_cuda_args("crfrnn::mean_field_forward", a);
  check_prune("crfrnn::mean_field_forward", prune);
  const c10::cuda::CUDAGuard guard(unary.device());
  auto [out, blurred, marginals, senders] = empty_forward_outputs(a, save_marginals, prune);
  if (unary.numel() > 0) run_forward_cuda(a, out, blurred, marginals, prune, senders);
  return {out, blurred, marginals, senders};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mean_field_backward_cuda(
    const at::Tensor& grad_logits, const at::Tensor& unary_in, at::TensorList vertex_index, at::TensorList weights,
    at::TensorList splat_scale, at::TensorList slice_scale, at::TensorList neighbors, at::TensorList pairwise,
    at::TensorList blurred_in, const at::Tensor& marginals_in, int64_t iterations,
    const std::optional<at::Tensor>& senders_in) {
  const char* op = "crfrnn::mean_field_backward";
  const MeanFieldArgs a{unary_in, vertex_index, weights, splat_scale, slice_scale, neighbors, pairwise, iterations};
  check_cuda_args(op, a);
  check_backward_args(op, a, grad_logits, blurred_in, marginals_in, senders_in);
  const c10::cuda::CUDAGuard guard(unary_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t c = unary_in.size(2);
  at::Tensor grad_unary = at::empty_like(unary_in);  // the unary's layout, as on the CPU
  std::vector<at::Tensor> grad_pairwise;
  if (unary_in.numel() == 0) {
    for (const at::Tensor& matrix : pairwise) grad_pairwise.push_back(at::zeros_like(matrix));
    return {grad_unary, grad_pairwise};
  }
  const at::Tensor unary = unary_in.contiguous(), grad = grad_logits.contiguous();
  const at::Tensor marginals = marginals_in.contiguous();
  const at::Tensor senders = senders_in && senders_in->defined() ? senders_in->contiguous() : at::Tensor();
  std::vector<at::Tensor> blurred;
  for (const at::Tensor& b : blurred_in) blurred.push_back(b.contiguous());
  AT_DISPATCH_FLOATING_TYPES(unary.scalar_type(), "crfrnn_mean_field_backward_cuda", [&] {
    std::vector<KernelTensors> held;
    std::vector<at::Tensor> scratch;
    const auto mf = problem_view<scalar_t>(a, unary, blurred, true, stream, held, scratch, at::Tensor(), marginals);
    std::vector<at::Tensor> rows;
    for (int j = 0; j < 4; ++j) rows.push_back(at::empty({unary.size(0) * unary.size(1), c}, unary.options()));
    device::MeanFieldGradientView<scalar_t> gv{grad.data_ptr<scalar_t>(), rows[0].data_ptr<scalar_t>(),
                                               rows[1].data_ptr<scalar_t>(), rows[3].data_ptr<scalar_t>(),
                                               rows[2].data_ptr<scalar_t>()};
    if (senders.defined() && senders.numel() > 0) {
      gv.senders = senders.data_ptr<uint8_t>();
      gv.images = unary.size(0);
    }
    check_launch(cuda::launch_mean_field_backward<scalar_t>(mf, gv, stream), "mean_field_backward");
    // dA_m = -alpha (sum over the iterations of B^T H)^T, as the C++ op.
    for (size_t i = 0; i < held.size(); ++i) {
      const double alpha = blur_alpha(held[i].vertex_index.size(1) - 1);
      grad_pairwise.push_back((held[i].outer_total.t() * -alpha).contiguous());
    }
    grad_unary.copy_(rows[3].view(unary.sizes()));
  });
  return {grad_unary, grad_pairwise};
}

}  // namespace

TORCH_LIBRARY_IMPL(crfrnn, CUDA, m) {
  m.impl("mean_field_inference", &mean_field_inference_cuda);
  m.impl("mean_field_forward", &mean_field_forward_cuda);
  m.impl("mean_field_backward", &mean_field_backward_cuda);
}

}  // namespace crfrnn
