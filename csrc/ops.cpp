// The table of contents of the fastnode ops: their schemas, and the Python module that loads them
// (`import fastnode._C`). Implementations, one file per op and device, each with its own TORCH_LIBRARY_IMPL block:
// csrc/cpu/<op>_cpu.cpp (every op) and csrc/cuda/<op>_cuda.cu (rk_combine, finish_control, adjoint_weights; built
// when CUDA is available to the build).
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
  // The gradients of rk_combine's out (and of finish_control's y_new) in one pass: one [G, N] tensor per nonzero
  // weight, (h * grad) * w_j, in the order of the weights; and when need_h the step's [G] gradient
  // sum_n grad * sum_j w_j K_j (else an empty tensor; K is read only then and may be [] otherwise).
  m.def("rk_combine_backward(Tensor grad, Tensor[] K, Tensor h, float[] w, bool need_h) -> (Tensor[], Tensor)");
  // Dense output y + h * sum_j w_j(theta) K_j with w_j(theta) = sum_p dense[j, p] theta^(p+1); dense is [S, P].
  m.def("interpolate(Tensor y, Tensor[] K, Tensor h, Tensor theta, float[] dense, int P) -> Tensor");
  // The gradients of interpolate's out in one pass: one [G, N] tensor (h * grad) * w_j(theta) per stage with a
  // nonzero dense row, in stage order; when need_ht the [G] gradients of h and theta (else empty tensors).
  m.def(
      "interpolate_backward(Tensor grad, Tensor[] K, Tensor h, Tensor theta, float[] dense, int P, bool need_ht) -> "
      "(Tensor[], Tensor, Tensor)");
  // The adjoint's per-sample quadrature weights [S, G]: h_g * b_j where the group's step was accepted, else 0
  // (folded into the cotangent of the parameter adjoint's vector-Jacobian product).
  m.def("adjoint_weights(Tensor h, Tensor accept, float[] b) -> Tensor");
  // The starting step (Hairer-Norsett-Wanner) around its probe evaluation k1 = f(t0 + h0, y1) of func: the probe's
  // (h0 [G] float64, y1 [G, N], d1 [G] float64), then the step [G] float64 (csrc/cpu/initial_step_cpu.cpp).
  m.def(
      "initial_step_probe(Tensor y0, Tensor k0, Tensor? rtol_t, float rtol, Tensor? atol_t, float atol, "
      "int[] segments) -> (Tensor, Tensor, Tensor)");
  m.def(
      "initial_step_finish(Tensor y0, Tensor k0, Tensor k1, Tensor h0, Tensor d1, Tensor? rtol_t, float rtol, "
      "Tensor? atol_t, float atol, int[] segments, float order) -> Tensor");
  // A step's set-up per group (no time gradients, no stops besides the output times): the step clipped to the next
  // stop (0 where not running), whether it was clipped, the time it reaches, the step in the state dtype, and
  // every stage's time as func sees it (sign applied; [S] and 0-d when squeeze, else [S, G] and [G]).
  m.def(
      "step_begin(Tensor t, Tensor h, Tensor running, Tensor t_out, Tensor t_end, bool to_outputs, float[] c, "
      "float sign, ScalarType state_dtype, bool squeeze) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // A step's bookkeeping per group after the controller: (h, t, n_att, n_acc, status, last_nonfinite, stuck,
  // crossed, running_next, packet[3] = any running, any stuck, max crossed). codes = (non_finite,
  // step_underflow, time_overflow, max_steps).
  m.def(
      "step_end(Tensor accept, Tensor h_next, Tensor h, Tensor clipped, Tensor running, Tensor t, Tensor t_new, "
      "Tensor t_end, Tensor n_att, Tensor n_acc, Tensor status, Tensor last_nonfinite, Tensor new_ok, "
      "Tensor next_idx, Tensor t_out, int max_num_steps, int[] codes) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
}
