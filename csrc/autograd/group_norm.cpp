// Autograd of GroupNorm (+ SiLU) and InstanceNorm, for the C++ op and its Triton twin
// alike. Saved for backward: x, weight, bias and the (N, groups) statistics; with SiLU the
// pre-activation is recomputed from them inside gn_bwd, never stored.
#include <torch/library.h>

#include <tuple>

#include "graph_node.h"
#include "op_handle.h"

namespace fastreg {

using OptionalTensor = std::optional<at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using GnFwdSignature = Tensors3(const at::Tensor&, const OptionalTensor&, const OptionalTensor&, int64_t, double, bool);
using GnBwdSignature = Tensors3(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&,
                                const at::Tensor&, const at::Tensor&, int64_t, bool);

namespace {

constexpr char kGnFwd[] = "fastreg::gn_fwd";
constexpr char kGnBwd[] = "fastreg::gn_bwd";
constexpr char kGnFwdTriton[] = "fastreg::gn_fwd_triton";
constexpr char kGnBwdTriton[] = "fastreg::gn_bwd_triton";

const c10::TypedOperatorHandle<GnFwdSignature>& gn_fwd_op(bool triton) {
  return triton ? op_handle<GnFwdSignature, kGnFwdTriton>() : op_handle<GnFwdSignature, kGnFwd>();
}

const c10::TypedOperatorHandle<GnBwdSignature>& gn_bwd_op(bool triton) {
  return triton ? op_handle<GnBwdSignature, kGnBwdTriton>() : op_handle<GnBwdSignature, kGnBwd>();
}

}  // namespace

// The backward node of gn_fwd: gradients to x, weight and bias; its input is y's gradient
// (mean and rstd are not differentiable).
struct GroupNormBackward final : Node {
  SavedVariable x, weight, bias, mean, rstd;
  int64_t groups = 1;
  bool silu = false, triton = false;

  std::string name() const override { return "GroupNormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : {&x, &weight, &bias, &mean, &rstd}) saved->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    // the backward ops have no autograd of their own: skip the dispatcher's fallback for them
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor input = x.unpack(), w = weight.unpack(), b = bias.unpack();
    const at::Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(input);
    auto [grad_x, grad_weight, grad_bias] =
        gn_bwd_op(triton).call(grad_y, input, optional(w), optional(b), mean.unpack(), rstd.unpack(), groups, silu);
    return {grad_x, w.defined() ? grad_weight : at::Tensor(), b.defined() ? grad_bias : at::Tensor()};
  }
};

namespace {

template <bool triton>
Tensors3 gn_fwd_autograd(const at::Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias, int64_t groups,
                         double eps, bool silu) {
  const OptionalTensor x_ = x;
  const bool record = records_graph(triton ? kGnFwdTriton : kGnFwd, {&x_, &weight, &bias});
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Tensors3 out = gn_fwd_op(triton).call(x, weight, bias, groups, eps, silu);
  if (!record) return out;
  const auto& [y, mean, rstd] = out;
  auto node = make_node<GroupNormBackward>(x, or_undefined(weight), or_undefined(bias));
  record_output(y, node);
  node->x = SavedVariable(x, false);
  node->weight = SavedVariable(or_undefined(weight), false);
  node->bias = SavedVariable(or_undefined(bias), false);
  node->mean = SavedVariable(mean, false);
  node->rstd = SavedVariable(rstd, false);
  node->groups = groups;
  node->silu = silu;
  node->triton = triton;
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("gn_fwd", &gn_fwd_autograd<false>);
  m.impl("gn_fwd_triton", &gn_fwd_autograd<true>);
}

}  // namespace fastreg
