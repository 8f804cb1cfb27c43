// Schemas of the fastnode step ops and the Python module that loads them (`import fastnode._C`).
// Implementations: csrc/cpu/step_ops_cpu.cpp (CPU), csrc/cuda/step_ops_cuda.cu (CUDA, when built).
// Shapes: y [G, N] (G groups: 1 in shared mode, B per sample), each stage in K [G, N], h/theta [G] in y's dtype,
// time-side tensors (h_ctl, prev_ratio, the returned ratio and next step) in float64.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A plain extension module: importing it runs the TORCH_LIBRARY registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastnode, m) {
  // y + h[:, None] * sum_j w_j K[j] (j < len(w); zero weights skipped): a stage input or the solution.
  m.def("rk_combine(Tensor y, Tensor[] K, Tensor h, float[] w) -> Tensor");
  // A step's finish in one pass: y_new = y + h * sum b_j K_j; err = h * sum e_j K_j; the error ratio per group,
  // max over `segments` of RMS(err / (atol + rtol * max(|y|, |y_new|))), raised to `ratio_floor`, inf where y_new
  // or the last stage is non-finite; then the controller (ctrl = order, safety, ifactor, dfactor, min_step,
  // max_step, pi (0/1), pi_alpha, pi_beta). Returns (y_new, ratio, ok, accept, h_next, prev_ratio).
  m.def(
      "finish_control(Tensor y, Tensor[] K, Tensor h, float[] b, float[] e, Tensor? rtol_t, float rtol, "
      "Tensor? atol_t, float atol, int[] segments, Tensor h_ctl, Tensor prev_ratio, Tensor running, "
      "Tensor? ratio_floor, float[] ctrl) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Dense output y + h * sum_j w_j(theta) K_j with w_j(theta) = sum_p dense[j, p] theta^(p+1); dense is [S, P].
  m.def("interpolate(Tensor y, Tensor[] K, Tensor h, Tensor theta, float[] dense, int P) -> Tensor");
  // The adjoint's per-sample quadrature weights [S, G]: h_g * b_j where the group's step was accepted, else 0
  // (folded into the cotangent of the parameter adjoint's vector-Jacobian product).
  m.def("adjoint_weights(Tensor h, Tensor accept, float[] b) -> Tensor");
}
