// Autograd of BatchNorm (bn_fwd), for the C++ op and its Triton twin alike. Saved for
// backward: x, weight and the per-channel mean and invstd bn_fwd returned (the batch's in
// training, the running statistics' in eval); backward is one bn_bwd call. The running
// statistics bn_fwd updates in place are not differentiated (as in torch).
// SyncBatchNorm does not come here: it composes the four step ops with its collectives
// (fastreg/_batch_norm.py).
#include <torch/library.h>

#include <array>
#include <tuple>

#include "graph_node.h"
#include "op_handle.h"

namespace fastreg {

using OptionalTensor = std::optional<at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using BnFwdSignature = Tensors3(const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                                const OptionalTensor&, bool, double, double, const OptionalTensor&);
using BnBwdSignature = Tensors3(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&,
                                const at::Tensor&, bool, std::array<bool, 3>);

namespace {

constexpr char kBnFwd[] = "fastreg::bn_fwd";
constexpr char kBnBwd[] = "fastreg::bn_bwd";
constexpr char kBnFwdTriton[] = "fastreg::bn_fwd_triton";
constexpr char kBnBwdTriton[] = "fastreg::bn_bwd_triton";

const c10::TypedOperatorHandle<BnFwdSignature>& bn_fwd_op(bool triton) {
  return triton ? op_handle<BnFwdSignature, kBnFwdTriton>() : op_handle<BnFwdSignature, kBnFwd>();
}

const c10::TypedOperatorHandle<BnBwdSignature>& bn_bwd_op(bool triton) {
  return triton ? op_handle<BnBwdSignature, kBnBwdTriton>() : op_handle<BnBwdSignature, kBnBwd>();
}

// The version counters of the running statistics bn_fwd updated (the ADInplaceOrView
// kernel below autograd is skipped, as for every fastreg op).
void bump_versions(const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training) {
  if (!training || c10::InferenceMode::is_enabled()) return;
  for (const auto* t : {&running_mean, &running_var}) {
    if (t->has_value() && !(*t)->is_inference()) torch::autograd::impl::bump_version(**t);
  }
}

}  // namespace

// The backward node of bn_fwd: gradients to x, weight and bias; its input is y's gradient
// (mean and invstd are not differentiable).
struct BatchNormBackward final : Node {
  SavedVariable x, weight, mean, invstd;
  bool training = false, triton = false;

  std::string name() const override { return "BatchNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : {&x, &weight, &mean, &invstd}) saved->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    // the backward op has no autograd of its own: skip the dispatcher's fallback for it
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor input = x.unpack(), w = weight.unpack();
    const at::Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(input);
    // the gradients this backward is asked for (torch.autograd.grad may want x's alone)
    const std::array<bool, 3> mask{task_should_compute_output(0), task_should_compute_output(1),
                                   task_should_compute_output(2)};
    auto [grad_x, grad_weight, grad_bias] =
        bn_bwd_op(triton).call(grad_y, input, optional(w), mean.unpack(), invstd.unpack(), training, mask);
    return {mask[0] ? grad_x : at::Tensor(), mask[1] ? grad_weight : at::Tensor(),
            mask[2] ? grad_bias : at::Tensor()};
  }
};

namespace {

template <bool triton>
Tensors3 bn_fwd_autograd(const at::Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias,
                         const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                         double momentum, double eps, const OptionalTensor& batches_tracked) {
  const OptionalTensor x_ = x;
  const bool record = records_graph(triton ? kBnFwdTriton : kBnFwd, {&x_, &weight, &bias});
  Tensors3 out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    out = bn_fwd_op(triton).call(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                 batches_tracked);
  }
  bump_versions(running_mean, running_var, training);
  if (!record) return out;
  const auto& [y, mean, invstd] = out;
  auto node = make_node<BatchNormBackward>(x, or_undefined(weight), or_undefined(bias));
  record_output(y, node);
  node->x = SavedVariable(x, false);
  node->weight = SavedVariable(or_undefined(weight), false);
  node->mean = SavedVariable(mean, false);
  node->invstd = SavedVariable(invstd, false);
  node->training = training;
  node->triton = triton;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("bn_fwd", &bn_fwd_autograd<false>);
  m.impl("bn_fwd_triton", &bn_fwd_autograd<true>);
}

}  // namespace fastreg
