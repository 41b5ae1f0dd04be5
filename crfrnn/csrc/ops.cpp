// Op schemas of the crfrnn extension and the Python module stub.
//
// Kernels are registered per device in cpu/*.cpp and cuda/lattice_cuda.cpp; fake
// kernels and autograd are registered from Python (crfrnn/ops.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import crfrnn._C` loads this library, which runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(crfrnn, m) {
  // features [N, P, d] -> (vertex_index [N*P, d+1] int32, weights [N*P, d+1],
  //                        neighbors [d+1, M, 2] int32, splat_offsets [M+1] int32,
  //                        splat_entries [N*P*(d+1)] int32)
  m.def("build_lattice(Tensor features) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // values [N*P, C] -> [N*P, C]: slice(blur(splat(values))), blur order reversed if `reverse`.
  m.def("lattice_filter(Tensor values, Tensor vertex_index, Tensor weights, Tensor neighbors, "
        "Tensor splat_offsets, Tensor splat_entries, bool reverse) -> Tensor");
  // The feature gradient of the filter, through the barycentric weights (simplices held fixed):
  // values, grad [N*P, C] -> the gradient of <grad, lattice_filter(values, ..., reverse)> with
  // respect to the weights, [N*P, d+1] ...
  m.def("lattice_filter_weights_backward(Tensor values, Tensor grad, Tensor vertex_index, Tensor weights, "
        "Tensor neighbors, Tensor splat_offsets, Tensor splat_entries, bool reverse) -> Tensor");
  // ... and features [N, P, d], grad_weights [N*P, d+1] -> the gradient of <grad_weights,
  // build_lattice(features)'s weights> with respect to the features, [N, P, d] (float32 for
  // half/bfloat16 features).
  m.def("barycentric_weights_backward(Tensor features, Tensor grad_weights) -> Tensor");
  // Mean-field inference, all iterations fused: unary [N, P, C] (any strides) and per kernel a
  // lattice over the N*P points (vertex_index, barycentric weights, neighbors), the kernel's
  // normalisation as per-point scales of the splat and the slice ([N*P] each) and its C x C
  // pairwise matrix -> the last iteration's logits [N, P, C] in the unary's memory layout:
  // L = U - sum_m K_m(Q) A_m^T, Q = softmax(L), from Q = softmax(U), with
  // K_m(Q) = slice_scale * slice(blur(splat(splat_scale * Q))). Its autograd (crfrnn/ops.py)
  // saves only the inputs and recomputes with the two ops below in the backward.
  // prune (epsilon in [0, 1]): sender pruning. In each iteration a class whose Q is below
  // epsilon at every point of an image sends no message there (K_m(Q) without its channel, i.e.
  // of Q D with D the senders' 0/1 diagonal); every class still receives. 0: none, the exact
  // iterations (bit for bit what the op computed before it had the argument).
  m.def("mean_field_inference(Tensor unary, Tensor[] vertex_index, Tensor[] weights, "
        "Tensor[] splat_scale, Tensor[] slice_scale, Tensor[] neighbors, Tensor[] pairwise, "
        "int iterations, float prune=0.) -> Tensor");
  // The same for training: (logits, blurred, marginals, senders) with what mean_field_backward
  // needs: per kernel the blurred grid of every iteration ([iterations, M, C] each; pruned: B D,
  // zero in the columns that sent nothing), if save_marginals and not pruning Q_1..Q_{T-1}
  // ([iterations - 1, N, P, C]; else empty, recomputed in the backward from the unary and the
  // blurred grids), and when pruning which classes sent in each iteration and image
  // ([iterations, N, C] uint8; else empty).
  m.def("mean_field_forward(Tensor unary, Tensor[] vertex_index, Tensor[] weights, "
        "Tensor[] splat_scale, Tensor[] slice_scale, Tensor[] neighbors, Tensor[] pairwise, "
        "int iterations, bool save_marginals, float prune=0.) -> (Tensor, Tensor[], Tensor, Tensor)");
  // Its backward: grad_logits [N, P, C] (any strides) and the forward's inputs and saves ->
  // (grad_unary [N, P, C] in the unary's layout, grad_pairwise [C, C] per kernel): the gradient of
  // the function the forward computed, its senders held fixed. No gradient for the lattice, its
  // weights or the normalisation scales.
  m.def("mean_field_backward(Tensor grad_logits, Tensor unary, Tensor[] vertex_index, "
        "Tensor[] weights, Tensor[] splat_scale, Tensor[] slice_scale, Tensor[] neighbors, "
        "Tensor[] pairwise, Tensor[] blurred, Tensor marginals, int iterations, Tensor? senders=None) "
        "-> (Tensor, Tensor[])");
}
