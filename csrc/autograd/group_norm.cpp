// Autograd of GroupNorm (+ SiLU) and InstanceNorm, for the C++ op and its Triton twin
// alike. Saved for backward: x, weight, bias and the (N, groups) statistics; with SiLU the
// pre-activation is recomputed from them inside gn_bwd, never stored.
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "op_handle.h"

namespace fastreg {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
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

OptionalTensor optional(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

}  // namespace

// (A short, non-template name: autograd demangles it on every backward.)
struct GroupNormFn : torch::autograd::Function<GroupNormFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptionalTensor& weight,
                               const OptionalTensor& bias, int64_t groups, double eps, bool silu, bool triton) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd] = gn_fwd_op(triton).call(x, weight, bias, groups, eps, silu);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, rstd});
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);  // no zero tensors for the statistics' gradients
    // groups, then silu and triton as bits 0 and 1 above it
    ctx->saved_data["groups_flags"] = groups << 2 | int64_t{silu} | int64_t{triton} << 1;
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // the backward ops have no autograd of their own: skip the dispatcher's fallback for them
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &bias = saved[2], &mean = saved[3], &rstd = saved[4];
    const int64_t groups_flags = ctx->saved_data["groups_flags"].toInt();
    // undefined when backward is reached through mean / rstd alone (gradcheck does)
    const at::Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(x);
    auto [grad_x, grad_weight, grad_bias] = gn_bwd_op(groups_flags & 2).call(
        grad_y, x, optional(weight), optional(bias), mean, rstd, groups_flags >> 2, groups_flags & 1);
    return {grad_x,
            weight.defined() ? grad_weight : at::Tensor(),
            bias.defined() ? grad_bias : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace {

template <bool triton>
Tensors3 gn_fwd_autograd(const at::Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias, int64_t groups,
                         double eps, bool silu) {
  const OptionalTensor x_ = x;
  if (!records_graph({&x_, &weight, &bias})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return gn_fwd_op(triton).call(x, weight, bias, groups, eps, silu);
  }
  auto out = GroupNormFn::apply(x, weight, bias, groups, eps, silu, triton);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("gn_fwd", &gn_fwd_autograd<false>);
  m.impl("gn_fwd_triton", &gn_fwd_autograd<true>);
}

}  // namespace fastreg
