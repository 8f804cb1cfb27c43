// Autograd kernels of the ops that carry values (rk_combine, finish_control's solution, interpolate), on the
// Autograd key of every device: a C++ node per call instead of a Python one (register_autograd's generic wrapper
// cost about 35 us per forward call and 100 us per backward on a CPU, against a few us for the op itself).
//
// Formulas (the same as the reference's autograd through its torch ops):
// - rk_combine, out = y + h * sum_j w_j K[j]: d y = g; d K[j] = (h * g) * w_j for w_j != 0 (no gradient at zero
//   weights: the reference skips those stages); d h = sum_n g * sum_j w_j K[j] per row (the stages are saved only
//   when h needs a gradient).
// - finish_control: only y_new (the same formula with the weights b) is differentiable; the ratio, the flags, the
//   next step and the controller memory are marked non-differentiable, as the reference computes them under no_grad.
// - interpolate, out = y + h * sum_j w_j(theta) K[j]: as rk_combine, plus d theta = h * sum_n g * sum_j w_j' K[j].
//
// The backward is the fused op (rk_combine_backward, interpolate_backward, called through the dispatcher so fake
// tensors and functionalization see it) where the gradient's device has a kernel for it and no second derivative is
// asked for. Under create_graph (grad mode on in the backward) or on a device without the fused kernel (the CUDA
// build has none), the same formulas run as differentiable ATen ops. Gradients of unused outputs are never
// materialised as zeros. Without grad mode, or when no input requires grad, the kernel only steps below Autograd.
//
// The ops' state is y: [G, N] (G: h's rows). With one group (h: [1]) a state of any other shape is taken too (the
// solve's single-tensor state in the shape its func takes): it is viewed as one row [1, N] below Autograd and the
// solution takes y's shape back (interpolate's M outputs of the row: [M, *y.shape]), so a solve that keeps its state
// as func sees it records no view nodes around each func call. The stages then have y's shape.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastnode {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using Tuple6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptT = std::optional<at::Tensor>;

using RkCombineSig = at::Tensor(const at::Tensor&, at::TensorList, const at::Tensor&, at::ArrayRef<double>);
using RkBackSig = std::tuple<std::vector<at::Tensor>, at::Tensor>(const at::Tensor&, at::TensorList,
                                                                  const at::Tensor&, at::ArrayRef<double>, bool);
using FinishSig = Tuple6(const at::Tensor&, at::TensorList, const at::Tensor&, at::ArrayRef<double>,
                         at::ArrayRef<double>, const OptT&, double, const OptT&, double, at::IntArrayRef,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&, at::ArrayRef<double>);
using InterpSig = at::Tensor(const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&,
                             at::ArrayRef<double>, int64_t);
using InterpBackSig = std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor>(
    const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&, at::ArrayRef<double>, int64_t, bool);

// Each op's handle, looked up once (the schemas are registered in ops.cpp before any call can reach here).
#define FASTNODE_OP(fn, sig, name)                                                                  \
  const c10::TypedOperatorHandle<sig>& fn() {                                                       \
    static const auto h = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<sig>(); \
    return h;                                                                                       \
  }
FASTNODE_OP(rk_combine_op, RkCombineSig, "fastnode::rk_combine")
FASTNODE_OP(rk_combine_backward_op, RkBackSig, "fastnode::rk_combine_backward")
FASTNODE_OP(finish_control_op, FinishSig, "fastnode::finish_control")
FASTNODE_OP(interpolate_op, InterpSig, "fastnode::interpolate")
FASTNODE_OP(interpolate_backward_op, InterpBackSig, "fastnode::interpolate_backward")
#undef FASTNODE_OP

// y's shape when the op must see it as one row [1, N] (h: [1]); empty when y is [G, N] already (or is to be refused
// by the op's checks).
std::vector<int64_t> state_shape(const at::Tensor& y, const at::Tensor& h, at::TensorList K, const char* op) {
  // sym_size: fake tensors of a traced (compiled) call may have symbolic sizes; those calls pass [G, N].
  // Only one group's state is taken in another shape; with G > 1 the op's own checks name a mismatch.
  if (h.dim() != 1 || (y.dim() == 2 && y.sym_size(0) == h.sym_size(0)) || h.sym_size(0) != 1) return {};
  for (size_t j = 0; j < K.size(); ++j)
    TORCH_CHECK(K[j].sizes() == y.sizes(), "fastnode.", op, ": stage ", j, " has shape ", K[j].sizes(),
                "; the stages need y's shape ", y.sizes());
  return y.sizes().vec();
}

// x viewed in `shape` (a copy only when x is not contiguous); called below Autograd: no view is recorded. The row
// [1, N] of a state-shaped tensor, and a gradient computed on the row back in the state's shape.
at::Tensor in_shape(const at::Tensor& x, at::IntArrayRef shape) {
  return x.is_contiguous() ? x.view(shape) : x.reshape(shape);
}
at::Tensor rows_of(const at::Tensor& x) { return in_shape(x, {1, -1}); }
std::vector<at::Tensor> rows_of(at::TensorList K) {
  std::vector<at::Tensor> out;
  out.reserve(K.size());
  for (const auto& k : K) out.push_back(rows_of(k));
  return out;
}

bool any_requires_grad(const at::Tensor& a, const at::Tensor& b, at::TensorList K) {
  if (a.requires_grad() || b.requires_grad()) return true;
  for (const auto& k : K)
    if (k.requires_grad()) return true;
  return false;
}

// Whether the fused backward op `op` runs for a gradient on this device: no second derivative is recorded, and the
// device has a kernel for it (fake and functional tensors of a CPU computation reach the op's fake).
template <class Sig>
bool fused(const c10::TypedOperatorHandle<Sig>& op, const at::Tensor& grad) {
  if (at::GradMode::is_enabled()) return false;
  const auto dev = grad.device().type();
  if (dev == c10::DeviceType::CPU) return op.hasKernelForDispatchKey(c10::DispatchKey::CPU);
  if (dev == c10::DeviceType::CUDA) return op.hasKernelForDispatchKey(c10::DispatchKey::CUDA);
  return false;
}

// ---- rk_combine and finish_control's solution ----

// The stage and step gradients of y + h * sum_j w_j K[j]: `out` gets d K[j] at the stages' positions from `first`
// (undefined at zero weights); returns d h (undefined unless need_h). K holds the stages only when need_h.
at::Tensor combine_grads(const at::Tensor& grad, at::TensorList K, const at::Tensor& h, at::ArrayRef<double> w,
                         bool need_h, variable_list& out, size_t first) {
  std::vector<at::Tensor> gk;
  at::Tensor gh;
  if (fused(rk_combine_backward_op(), grad)) {
    std::tie(gk, gh) = rk_combine_backward_op().call(grad, K, h, w, need_h);
  } else {  // the same formulas as ATen ops: differentiable (create_graph), and on every device
    const auto hg = grad * h.unsqueeze(1);
    at::Tensor acc;
    for (size_t j = 0; j < w.size(); ++j) {
      if (w[j] == 0.0) continue;
      gk.push_back(hg * w[j]);
      if (need_h) acc = acc.defined() ? acc + K[j] * w[j] : K[j] * w[j];
    }
    if (need_h) gh = acc.defined() ? (grad * acc).sum(1) : at::zeros_like(h);
  }
  size_t m = 0;
  for (size_t j = 0; j < w.size(); ++j)
    if (w[j] != 0.0) out[first + j] = gk[m++];
  return need_h ? gh : at::Tensor();
}

// Every node below is a plain autograd Node (not torch::autograd::Function: its generic bookkeeping, the context's
// string-keyed saved data, per-input metadata and output wrapping, cost about as much as the op): its edges are the
// differentiable inputs in order, its one input the differentiable output.

// The node of out = y + h * sum_j w_j K[j]: edges y, h, K[0..len(w)).
struct CombineBackward : public torch::autograd::Node {
  std::string node_name;
  std::vector<double> w;
  bool need_h = false;
  std::vector<int64_t> shape;  // the state's shape when it is not [G, N] (state_shape)
  SavedVariable h_;
  std::vector<SavedVariable> K_;  // the stages serve only h's gradient: saved then only

  explicit CombineBackward(const char* name) : node_name(name) {}
  std::string name() const override { return node_name; }
  void release_variables() override {
    h_.reset_data();
    for (auto& k : K_) k.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    variable_list out(2 + w.size());
    if (!grads[0].defined()) return out;
    const auto h = h_.unpack();
    const bool rows = !shape.empty();
    const auto g = rows ? rows_of(grads[0]) : grads[0];
    std::vector<at::Tensor> K;
    K.reserve(K_.size());
    for (auto& k : K_) K.push_back(rows ? rows_of(k.unpack()) : k.unpack());
    out[0] = g;
    out[1] = combine_grads(g, K, h, w, need_h, out, 2);
    if (rows)  // the gradients of y and of the stages in the state's shape (h's is [G])
      for (size_t i = 0; i < out.size(); ++i)
        if (i != 1 && out[i].defined()) out[i] = in_shape(out[i], shape);
    return out;
  }
};

// Records the combination node for `out` (a fresh tensor) over the inputs y, h and the stages K[0..len(w)).
void record_combine(const char* name, const at::Tensor& out, const at::Tensor& y, const at::Tensor& h,
                    at::TensorList K, at::ArrayRef<double> w, std::vector<int64_t> shape) {
  const auto Kw = K.slice(0, w.size());
  auto node = c10::make_intrusive<CombineBackward>(name);
  node->set_next_edges(torch::autograd::collect_next_edges(y, h, Kw));
  node->w = w.vec();
  node->shape = std::move(shape);
  node->need_h = h.requires_grad();
  node->h_ = SavedVariable(h, false);
  if (node->need_h) {
    node->K_.reserve(Kw.size());
    for (const auto& k : Kw) node->K_.emplace_back(k, false);
  }
  torch::autograd::set_history(out, node);
}

at::Tensor rk_combine_autograd(const at::Tensor& y, at::TensorList K, const at::Tensor& h, at::ArrayRef<double> w) {
  const auto Kw = K.slice(0, std::min(K.size(), w.size()));
  auto shape = state_shape(y, h, Kw, "rk_combine");
  const bool record = at::GradMode::is_enabled() && any_requires_grad(y, h, Kw);
  if (!record && shape.empty()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return rk_combine_op().call(y, K, h, w);
  }
  TORCH_CHECK(K.size() >= w.size(), "fastnode.rk_combine: K holds ", K.size(), " stages, fewer than the ", w.size(),
              " weights");
  at::Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = shape.empty() ? rk_combine_op().call(y, K, h, w)
                        : rk_combine_op().call(rows_of(y), rows_of(Kw), h, w).view(shape);
  }
  if (record) record_combine("fastnode::RkCombineBackward", out, y, h, Kw, w, std::move(shape));
  return out;
}

// finish_control's arguments after h, passed through apply as one non-differentiable value.
struct FinishArgs {
  at::ArrayRef<double> b, e;
  const OptT& rtol_t;
  double rtol;
  const OptT& atol_t;
  double atol;
  at::IntArrayRef segments;
  const at::Tensor &h_ctl, &prev_ratio, &running;
  const OptT& ratio_floor;
  at::ArrayRef<double> ctrl;
};

Tuple6 finish_control_below(const at::Tensor& y, at::TensorList K, const at::Tensor& h, const FinishArgs& a) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return finish_control_op().call(y, K, h, a.b, a.e, a.rtol_t, a.rtol, a.atol_t, a.atol, a.segments, a.h_ctl,
                                  a.prev_ratio, a.running, a.ratio_floor, a.ctrl);
}

Tuple6 finish_control_autograd(const at::Tensor& y, at::TensorList K, const at::Tensor& h, at::ArrayRef<double> b,
                               at::ArrayRef<double> e, const OptT& rtol_t, double rtol, const OptT& atol_t,
                               double atol, at::IntArrayRef segments, const at::Tensor& h_ctl,
                               const at::Tensor& prev_ratio, const at::Tensor& running, const OptT& ratio_floor,
                               at::ArrayRef<double> ctrl) {
  const FinishArgs a{b, e, rtol_t, rtol, atol_t, atol, segments, h_ctl, prev_ratio, running, ratio_floor, ctrl};
  auto shape = state_shape(y, h, K, "finish_control");
  Tuple6 out;
  if (shape.empty()) {
    out = finish_control_below(y, K, h, a);
  } else {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = finish_control_below(rows_of(y), rows_of(K), h, a);
    std::get<0>(out) = std::get<0>(out).view(shape);
  }
  if (!at::GradMode::is_enabled() || !any_requires_grad(y, h, K)) return out;
  // Only y_new gets a node: the ratio, flags, next step and controller memory stay without history (the controller's,
  // computed under no_grad on the reference). b has one weight per stage (checked by the op).
  record_combine("fastnode::FinishControlBackward", std::get<0>(out), y, h, K, b, std::move(shape));
  return out;
}

// ---- interpolate ----

// The composite backward: (d K at the used stages, d h, d theta) as differentiable ATen ops.
// With `many` (M outputs of one row: g [M, N], theta [M]) the stages' and h's gradients are summed over the outputs.
void interpolate_grads_composite(const at::Tensor& g, at::TensorList K, const at::Tensor& h, const at::Tensor& theta,
                                 at::ArrayRef<double> dense, int64_t P, bool need_ht, const std::vector<int64_t>& used,
                                 bool many, variable_list& out) {
  const auto th = theta.unsqueeze(1);
  std::vector<at::Tensor> pw{th};  // theta^(p+1), p < P
  for (int64_t p = 1; p < P; ++p) pw.push_back(pw.back() * th);
  const auto hg = g * h.unsqueeze(1);
  at::Tensor a, da;
  for (auto j : used) {
    at::Tensor wj, dwj;
    for (int64_t p = 0; p < P; ++p) {
      const double d = dense[j * P + p];
      const auto term = pw[p] * d;
      wj = wj.defined() ? wj + term : term;
      if (need_ht) {
        const auto dterm = p == 0 ? at::full_like(th, d) : pw[p - 1] * (d * static_cast<double>(p + 1));
        dwj = dwj.defined() ? dwj + dterm : dterm;
      }
    }
    out[1 + j] = many ? (hg * wj).sum(0, true) : hg * wj;
    if (need_ht) {
      a = a.defined() ? a + wj * K[j] : wj * K[j];
      da = da.defined() ? da + dwj * K[j] : dwj * K[j];
    }
  }
  if (need_ht) {
    out[1 + K.size()] = a.defined() ? (many ? (g * a).sum(1).sum(0, true) : (g * a).sum(1)) : at::zeros_like(h);
    out[2 + K.size()] = da.defined() ? h * (g * da).sum(1) : at::zeros_like(theta);
  }
}

// The node of the dense output: edges y, every stage, h, theta.
struct InterpolateBackward : public torch::autograd::Node {
  std::vector<double> dense;
  int64_t P = 0;
  bool need_ht = false;
  bool many = false;  // M outputs of one row (interpolate's theta [M] with G = 1): y's gradient sums the outputs'
  std::vector<int64_t> shape;  // the state's shape when it is not [G, N] (state_shape)
  SavedVariable h_, theta_;
  std::vector<SavedVariable> K_;

  std::string name() const override { return "fastnode::InterpolateBackward"; }
  void release_variables() override {
    h_.reset_data();
    theta_.reset_data();
    for (auto& k : K_) k.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    const size_t S = K_.size();
    variable_list out(S + 3);
    if (!grads[0].defined()) return out;
    const auto h = h_.unpack(), theta = theta_.unpack();
    const bool rows = !shape.empty();
    std::vector<at::Tensor> K;
    K.reserve(S);
    for (auto& k : K_) K.push_back(rows ? rows_of(k.unpack()) : k.unpack());
    const auto g = rows ? grads[0].reshape({-1, K[0].size(1)}) : grads[0];
    std::vector<int64_t> used;
    for (size_t j = 0; j < S; ++j)
      for (int64_t p = 0; p < P; ++p)
        if (dense[j * P + p] != 0.0) {
          used.push_back(static_cast<int64_t>(j));
          break;
        }
    out[0] = many ? g.sum(0, true) : g;
    if (fused(interpolate_backward_op(), g)) {
      auto [gk, gh, gt] = interpolate_backward_op().call(g, K, h, theta, dense, P, need_ht);
      for (size_t u = 0; u < used.size(); ++u) out[1 + used[u]] = gk[u];
      if (need_ht) {
        out[1 + S] = gh;
        out[2 + S] = gt;
      }
    } else {
      interpolate_grads_composite(g, K, h, theta, dense, P, need_ht, used, many, out);
    }
    if (rows)  // the gradients of y and of the stages in the state's shape (h's and theta's are [G] and [M])
      for (size_t i = 0; i <= S; ++i)
        if (out[i].defined()) out[i] = in_shape(out[i], shape);
    return out;
  }
};

at::Tensor interpolate_autograd(const at::Tensor& y, at::TensorList K, const at::Tensor& h, const at::Tensor& theta,
                                at::ArrayRef<double> dense, int64_t P) {
  auto shape = state_shape(y, h, K, "interpolate");
  const bool record = at::GradMode::is_enabled() && (theta.requires_grad() || any_requires_grad(y, h, K));
  if (!record && shape.empty()) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return interpolate_op().call(y, K, h, theta, dense, P);
  }
  at::Tensor out;
  bool many = false;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (shape.empty()) {
      out = interpolate_op().call(y, K, h, theta, dense, P);
      many = y.size(0) == 1 && out.size(0) != 1;
    } else {  // theta [M] of the one row: [M, *y.shape]; a 0-d theta: y's shape
      out = interpolate_op().call(rows_of(y), rows_of(K), h, theta, dense, P);
      std::vector<int64_t> to(shape);
      if (theta.dim() == 1) to.insert(to.begin(), out.size(0));
      many = out.size(0) != 1;
      out = out.view(to);
    }
  }
  if (!record) return out;
  auto node = c10::make_intrusive<InterpolateBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(y, K, h, theta));
  node->dense = dense.vec();
  node->P = P;
  node->need_ht = h.requires_grad() || theta.requires_grad();
  node->many = many;
  node->shape = std::move(shape);
  node->h_ = SavedVariable(h, false);
  node->theta_ = SavedVariable(theta, false);
  // The stages are saved even without time gradients: the fused backward checks their shapes (a dense output is
  // taken only on the steps that pass an output time, and the stages are alive anyway in a recorded solve).
  node->K_.reserve(K.size());
  for (const auto& k : K) node->K_.emplace_back(k, false);
  torch::autograd::set_history(out, node);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnode, Autograd, m) {
  m.impl("rk_combine", &rk_combine_autograd);
  m.impl("finish_control", &finish_control_autograd);
  m.impl("interpolate", &interpolate_autograd);
}

}  // namespace fastnode
