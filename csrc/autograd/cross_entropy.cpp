// Autograd of cross-entropy and of its linear form, for the C++ ops and their Triton twins
// alike. The gradients come out of the forward (the row pass computes them with the loss);
// backward only scales them by the incoming gradient: in place (cross_entropy_bwd_, which
// skips an incoming 1 on the device) when the graph is freed after this backward, into a
// new tensor when it is kept (retain_graph: the saved gradient serves the next backward).
// linear_cross_entropy with reduction none cannot be scaled afterwards (grad_weight sums the
// tokens' gradients): its backward runs the chunk loop again with per-token grad_loss.
// z_term (the z-loss part of the loss, returned for logging) is not differentiable: its
// gradient is already part of the loss's.
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <tuple>

#include "op_handle.h"

namespace fastreg {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors5 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using CrossEntropyFwdSignature = Tensors3(const at::Tensor&, const at::Tensor&, const OptionalTensor&, int64_t, double,
                                          double, int64_t, bool);
using CrossEntropyBwdSignature = void(at::Tensor&, const at::Tensor&);
using LinearCrossEntropyFwdSignature = Tensors5(const at::Tensor&, const at::Tensor&, const OptionalTensor&,
                                                const at::Tensor&, const OptionalTensor&, int64_t, double, double,
                                                int64_t, const OptionalTensor&, bool, bool, bool, int64_t);

constexpr char kCrossEntropyFwd[] = "fastreg::cross_entropy_fwd";
constexpr char kCrossEntropyBwd[] = "fastreg::cross_entropy_bwd_";
constexpr char kCrossEntropyFwdTriton[] = "fastreg::cross_entropy_fwd_triton";
constexpr char kCrossEntropyBwdTriton[] = "fastreg::cross_entropy_bwd_triton_";
constexpr char kLinearCrossEntropyFwd[] = "fastreg::linear_cross_entropy_fwd";
constexpr char kLinearCrossEntropyFwdTriton[] = "fastreg::linear_cross_entropy_fwd_triton";

constexpr int64_t kReductionNone = 0;

// Whether autograd will want t's gradient (asked before Function::apply, which runs forward
// with grad mode off).
bool requires_grad(const at::Tensor& t) { return at::GradMode::is_enabled() && t.defined() && t.requires_grad(); }

bool requires_grad(const OptionalTensor& t) { return t.has_value() && requires_grad(*t); }

// A tensor torch.compile traces with (functional or fake: behind the Python or Functionalize
// key), or a tensor subclass.
bool traced(const at::Tensor& t) {
  return t.key_set().has_any(c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize}));
}

// grad * grad_loss (one value, or (N, S) per row of grad (N, C, S)): in place through the
// backend's backward op; into a new tensor when the graph is kept for another backward, and
// when traced (a functional graph cannot scale a forward output in place; the compiler may
// fuse the multiply into what reads the gradient).
template <const char* bwd_name>
at::Tensor scaled(at::Tensor grad, const at::Tensor& grad_loss) {
  // sym_numel: traced with symbolic shapes under torch.compile
  if (!grad.defined() || grad.sym_numel() == 0) return at::Tensor();
  if (torch::autograd::get_current_graph_task_keep_graph() || traced(grad)) {
    return grad.mul(grad_loss.sym_numel() == 1 ? grad_loss.reshape({}) : grad_loss.unsqueeze(1));
  }
  op_handle<CrossEntropyBwdSignature, bwd_name>().call(grad, grad_loss);
  return grad;
}

template <const char* fwd_name, const char* bwd_name>
struct CrossEntropyFunction : torch::autograd::Function<CrossEntropyFunction<fwd_name, bwd_name>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& target,
                               const OptionalTensor& weight, int64_t ignore_index, double label_smoothing,
                               double z_loss, int64_t reduction, bool compute_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, z_term, grad] = op_handle<CrossEntropyFwdSignature, fwd_name>().call(
        input, target, weight, ignore_index, label_smoothing, z_loss, reduction, compute_grad);
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({z_term, grad});
    ctx->set_materialize_grads(false);  // no zeros for the gradients of z_term and grad
    return {loss, z_term, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_loss = grads[0];
    at::Tensor grad_input = grad_loss.defined() ? scaled<bwd_name>(ctx->get_saved_variables()[0], grad_loss)
                                                : at::Tensor();
    return {grad_input,  at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

template <const char* fwd_name, const char* bwd_name>
Tensors3 cross_entropy_fwd_autograd(const at::Tensor& input, const at::Tensor& target, const OptionalTensor& weight,
                                    int64_t ignore_index, double label_smoothing, double z_loss, int64_t reduction,
                                    bool compute_grad) {
  // differentiated: the gradient is made in forward whatever compute_grad says
  auto out = CrossEntropyFunction<fwd_name, bwd_name>::apply(input, target, weight, ignore_index, label_smoothing,
                                                              z_loss, reduction, compute_grad || requires_grad(input));
  return {out[0], out[1], out[2]};
}

// Forward's flags grad_input / grad_weight / grad_bias already include what autograd needs;
// recompute: reduction none, the gradients are left to backward.
template <const char* fwd_name, const char* bwd_name>
struct LinearCrossEntropyFunction : torch::autograd::Function<LinearCrossEntropyFunction<fwd_name, bwd_name>> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& linear_weight,
                               const OptionalTensor& linear_bias, const at::Tensor& target,
                               const OptionalTensor& weight, int64_t ignore_index, double label_smoothing,
                               double z_loss, int64_t reduction, const OptionalTensor& grad_loss, bool grad_input,
                               bool grad_weight, bool grad_bias, int64_t chunk_tokens, bool recompute) {
    ctx->saved_data["recompute"] = recompute;
    ctx->saved_data["chunk_tokens"] = chunk_tokens;
    ctx->saved_data["has_bias"] = linear_bias.has_value();
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["label_smoothing"] = label_smoothing;
    ctx->saved_data["z_loss"] = z_loss;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, z_term, d_input, d_weight, d_bias] = op_handle<LinearCrossEntropyFwdSignature, fwd_name>().call(
        input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, z_loss, reduction, grad_loss,
        grad_input, grad_weight, grad_bias, chunk_tokens);
    if (recompute) {
      ctx->save_for_backward({input, linear_weight, linear_bias.value_or(at::Tensor()), target,
                              weight.value_or(at::Tensor())});
    } else {
      ctx->save_for_backward({d_input, d_weight, d_bias});
    }
    ctx->mark_non_differentiable({z_term, d_input, d_weight, d_bias});
    ctx->set_materialize_grads(false);  // no zeros for the gradients of the non-differentiable outputs
    return {loss, z_term, d_input, d_weight, d_bias};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_loss = grads[0];
    variable_list result(15);
    if (!grad_loss.defined()) return result;
    // needs_input_grad counts the tensors given: input, linear_weight, then linear_bias if any
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool needs[3] = {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2)};
    const auto saved = ctx->get_saved_variables();
    if (!ctx->saved_data["recompute"].toBool()) {
      for (int i = 0; i < 3; ++i) {
        if (needs[i]) result[i] = scaled<bwd_name>(saved[i], grad_loss);
      }
      return result;
    }
    const at::Tensor &input = saved[0], &linear_weight = saved[1], &linear_bias = saved[2], &target = saved[3],
                     &weight = saved[4];
    auto optional = [](const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; };
    auto [loss, z_term, d_input, d_weight, d_bias] = op_handle<LinearCrossEntropyFwdSignature, fwd_name>().call(
        input, linear_weight, optional(linear_bias), target, optional(weight), ctx->saved_data["ignore_index"].toInt(),
        ctx->saved_data["label_smoothing"].toDouble(), ctx->saved_data["z_loss"].toDouble(), kReductionNone,
        grad_loss, needs[0], needs[1], needs[2], ctx->saved_data["chunk_tokens"].toInt());
    result[0] = needs[0] ? d_input : at::Tensor();
    result[1] = needs[1] ? d_weight : at::Tensor();
    result[2] = needs[2] ? d_bias : at::Tensor();
    return result;
  }
};

template <const char* fwd_name, const char* bwd_name>
Tensors5 linear_cross_entropy_fwd_autograd(const at::Tensor& input, const at::Tensor& linear_weight,
                                           const OptionalTensor& linear_bias, const at::Tensor& target,
                                           const OptionalTensor& weight, int64_t ignore_index, double label_smoothing,
                                           double z_loss, int64_t reduction, const OptionalTensor& grad_loss,
                                           bool grad_input, bool grad_weight, bool grad_bias, int64_t chunk_tokens) {
  const bool needs[3] = {requires_grad(input), requires_grad(linear_weight), requires_grad(linear_bias)};
  // reduction none: the gradients come from backward, which knows the per-token scales
  const bool recompute = reduction == kReductionNone && !grad_loss.has_value() && (needs[0] || needs[1] || needs[2]);
  auto out = LinearCrossEntropyFunction<fwd_name, bwd_name>::apply(
      input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, z_loss, reduction, grad_loss,
      grad_input || (needs[0] && !recompute), grad_weight || (needs[1] && !recompute),
      grad_bias || (needs[2] && !recompute), chunk_tokens, recompute);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_autograd<kCrossEntropyFwd, kCrossEntropyBwd>);
  m.impl("cross_entropy_fwd_triton", &cross_entropy_fwd_autograd<kCrossEntropyFwdTriton, kCrossEntropyBwdTriton>);
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_autograd<kLinearCrossEntropyFwd, kCrossEntropyBwd>);
  m.impl("linear_cross_entropy_fwd_triton",
         &linear_cross_entropy_fwd_autograd<kLinearCrossEntropyFwdTriton, kCrossEntropyBwdTriton>);
}

}  // namespace fastreg
