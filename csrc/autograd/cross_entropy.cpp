// Autograd of cross-entropy and of its linear form, for the C++ ops and their Triton twins
// alike. The gradients come out of the forward (the row pass computes them with the loss);
// backward only scales them by the incoming gradient: in place (cross_entropy_bwd_, which
// skips an incoming 1 on the device) when the graph is freed after this backward, into a
// new tensor when it is kept (retain_graph: the saved gradient serves the next backward).
// linear_cross_entropy with reduction none cannot be scaled afterwards (grad_weight sums the
// tokens' gradients): its backward runs the chunk loop again with per-token grad_loss.
// z_term (the z-loss part of the loss, returned for logging) is not differentiable: its
// gradient is already part of the loss's.
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include <tuple>

#include "graph_node.h"
#include "op_handle.h"

namespace fastreg {
namespace {

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

// Whether autograd will want t's gradient.
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

// The backward node of cross_entropy_fwd: gradients to input and (none: not differentiable,
// as in torch) the class weights; its input is the loss's gradient.
template <const char* bwd_name>
struct CrossEntropyBackward final : Node {
  SavedVariable grad;  // d(loss)/d(input), made by forward

  std::string name() const override { return "CrossEntropyBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    grad.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return {at::Tensor(), at::Tensor()};
    return {scaled<bwd_name>(grad.unpack(), grad_loss), at::Tensor()};
  }
};

template <const char* fwd_name, const char* bwd_name>
Tensors3 cross_entropy_fwd_autograd(const at::Tensor& input, const at::Tensor& target, const OptionalTensor& weight,
                                    int64_t ignore_index, double label_smoothing, double z_loss, int64_t reduction,
                                    bool compute_grad) {
  const OptionalTensor input_ = input;
  const bool record = records_graph(fwd_name, {&input_, &weight});
  Tensors3 out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // differentiated: the gradient is made in forward whatever compute_grad says
    out = op_handle<CrossEntropyFwdSignature, fwd_name>().call(input, target, weight, ignore_index, label_smoothing,
                                                               z_loss, reduction, compute_grad || requires_grad(input));
  }
  if (!record) return out;
  const auto& [loss, z_term, grad] = out;  // z_term and grad are not differentiable
  auto node = make_node<CrossEntropyBackward<bwd_name>>(input, or_undefined(weight));
  record_output(loss, node);
  node->grad = SavedVariable(grad, false);
  return out;
}

// The backward node of linear_cross_entropy_fwd: gradients to input, linear_weight,
// linear_bias and (none) the class weights; its input is the loss's gradient. Either the
// gradients forward made (scaled here), or, with `recompute` (reduction none), the inputs
// to run the chunk loop again with the per-token grad_loss.
template <const char* fwd_name, const char* bwd_name>
struct LinearCrossEntropyBackward final : Node {
  SavedVariable input, linear_weight, linear_bias, target, weight;  // recompute
  SavedVariable d_input, d_weight, d_bias;  // not recompute
  bool recompute = false;
  int64_t ignore_index = -100, chunk_tokens = 0;
  double label_smoothing = 0.0, z_loss = 0.0;

  std::string name() const override { return "LinearCrossEntropyBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved :
         {&input, &linear_weight, &linear_bias, &target, &weight, &d_input, &d_weight, &d_bias}) {
      saved->reset_data();
    }
  }

  variable_list apply(variable_list&& grads) override {
    const at::Tensor& grad_loss = grads[0];
    variable_list result(4);
    if (!grad_loss.defined()) return result;
    const bool needs[3] = {task_should_compute_output(0), task_should_compute_output(1),
                           task_should_compute_output(2)};
    if (!recompute) {
      const at::Tensor made[3] = {d_input.unpack(), d_weight.unpack(), d_bias.unpack()};
      for (int i = 0; i < 3; ++i) {
        if (needs[i]) result[i] = scaled<bwd_name>(made[i], grad_loss);
      }
      return result;
    }
    auto [loss, z_term, grad_input, grad_weight, grad_bias] =
        op_handle<LinearCrossEntropyFwdSignature, fwd_name>().call(
            input.unpack(), linear_weight.unpack(), optional(linear_bias.unpack()), target.unpack(),
            optional(weight.unpack()), ignore_index, label_smoothing, z_loss, kReductionNone, grad_loss, needs[0],
            needs[1], needs[2], chunk_tokens);
    result[0] = needs[0] ? grad_input : at::Tensor();
    result[1] = needs[1] ? grad_weight : at::Tensor();
    result[2] = needs[2] ? grad_bias : at::Tensor();
    return result;
  }
};

// Forward's flags grad_input / grad_weight / grad_bias include what autograd needs, unless
// backward recomputes (reduction none: the gradients are left to backward).
template <const char* fwd_name, const char* bwd_name>
Tensors5 linear_cross_entropy_fwd_autograd(const at::Tensor& input, const at::Tensor& linear_weight,
                                           const OptionalTensor& linear_bias, const at::Tensor& target,
                                           const OptionalTensor& weight, int64_t ignore_index, double label_smoothing,
                                           double z_loss, int64_t reduction, const OptionalTensor& grad_loss,
                                           bool grad_input, bool grad_weight, bool grad_bias, int64_t chunk_tokens) {
  const OptionalTensor input_ = input, linear_weight_ = linear_weight;
  check_no_forward_grad(fwd_name, {&input_, &linear_weight_, &linear_bias, &weight});
  const bool needs[3] = {requires_grad(input), requires_grad(linear_weight), requires_grad(linear_bias)};
  const bool record = needs[0] || needs[1] || needs[2] || requires_grad(weight);
  // reduction none: the gradients come from backward, which knows the per-token scales
  const bool recompute = reduction == kReductionNone && !grad_loss.has_value() && (needs[0] || needs[1] || needs[2]);
  Tensors5 out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = op_handle<LinearCrossEntropyFwdSignature, fwd_name>().call(
        input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, z_loss, reduction, grad_loss,
        grad_input || (needs[0] && !recompute), grad_weight || (needs[1] && !recompute),
        grad_bias || (needs[2] && !recompute), chunk_tokens);
  }
  if (!record) return out;
  const auto& [loss, z_term, d_input, d_weight, d_bias] = out;  // all but loss are not differentiable
  auto node = make_node<LinearCrossEntropyBackward<fwd_name, bwd_name>>(input, linear_weight, or_undefined(linear_bias),
                                                                        or_undefined(weight));
  record_output(loss, node);
  node->recompute = recompute;
  if (recompute) {
    node->input = SavedVariable(input, false);
    node->linear_weight = SavedVariable(linear_weight, false);
    node->linear_bias = SavedVariable(or_undefined(linear_bias), false);
    node->target = SavedVariable(target, false);
    node->weight = SavedVariable(or_undefined(weight), false);
  } else {
    node->d_input = SavedVariable(d_input, false);
    node->d_weight = SavedVariable(d_weight, false);
    node->d_bias = SavedVariable(d_bias, false);
  }
  node->ignore_index = ignore_index;
  node->chunk_tokens = chunk_tokens;
  node->label_smoothing = label_smoothing;
  node->z_loss = z_loss;
  return out;
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
