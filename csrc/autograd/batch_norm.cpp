// Autograd of BatchNorm (bn_fwd), for the C++ op and its Triton twin alike. Saved for
// backward: x, weight and the per-channel mean and invstd bn_fwd returned (the batch's in
// training, the running statistics' in eval); backward is one bn_bwd call. The running
// statistics bn_fwd updates in place are not differentiated (as in torch).
// SyncBatchNorm does not come here: it composes the four step ops with its collectives
// (fastreg/_batch_norm.py).
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "op_handle.h"

namespace fastreg {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
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

OptionalTensor optional(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

enum BnFlags : int64_t { kTriton = 1, kTraining = 2, kHasWeight = 4, kHasBias = 8 };

// The version counters of the running statistics bn_fwd updated (the ADInplaceOrView
// kernel below autograd is skipped, as for every fastreg op).
void bump_versions(const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training) {
  if (!training || c10::InferenceMode::is_enabled()) return;
  for (const auto* t : {&running_mean, &running_var}) {
    if (t->has_value() && !(*t)->is_inference()) torch::autograd::impl::bump_version(**t);
  }
}

}  // namespace

// (A short, non-template name: autograd demangles it on every backward.)
struct BatchNormFn : torch::autograd::Function<BatchNormFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptionalTensor& weight,
                               const OptionalTensor& bias, const OptionalTensor& running_mean,
                               const OptionalTensor& running_var, bool training, double momentum, double eps,
                               const OptionalTensor& batches_tracked, bool triton) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, invstd] =
        bn_fwd_op(triton).call(x, weight, bias, running_mean, running_var, training, momentum, eps, batches_tracked);
    ctx->save_for_backward({x, weight.value_or(at::Tensor()), mean, invstd});
    ctx->mark_non_differentiable({mean, invstd});
    ctx->set_materialize_grads(false);  // no zero tensors for the statistics' gradients
    ctx->saved_data["flags"] = int64_t{(triton ? kTriton : 0) | (training ? kTraining : 0) |
                                       (weight.has_value() ? kHasWeight : 0) | (bias.has_value() ? kHasBias : 0)};
    return {y, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // the backward op has no autograd of its own: skip the dispatcher's fallback for it
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3];
    const int64_t flags = ctx->saved_data["flags"].toInt();
    // undefined when backward is reached through mean / invstd alone (gradcheck does)
    const at::Tensor grad_y = grads[0].defined() ? grads[0] : at::zeros_like(x);
    // needs_input_grad counts the given tensors only: bias is edge 1 without a weight
    const bool has_weight = flags & kHasWeight;
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
                                   (flags & kHasBias) && ctx->needs_input_grad(has_weight ? 2 : 1)};
    auto [grad_x, grad_weight, grad_bias] =
        bn_bwd_op(flags & kTriton).call(grad_y, x, optional(weight), mean, invstd, flags & kTraining, mask);
    return {mask[0] ? grad_x : at::Tensor(), mask[1] ? grad_weight : at::Tensor(),
            mask[2] ? grad_bias : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace {

template <bool triton>
Tensors3 bn_fwd_autograd(const at::Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias,
                         const OptionalTensor& running_mean, const OptionalTensor& running_var, bool training,
                         double momentum, double eps, const OptionalTensor& batches_tracked) {
  const OptionalTensor x_ = x;
  if (!records_graph({&x_, &weight, &bias})) {
    Tensors3 out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = bn_fwd_op(triton).call(x, weight, bias, running_mean, running_var, training, momentum, eps,
                                   batches_tracked);
    }
    bump_versions(running_mean, running_var, training);
    return out;
  }
  auto out = BatchNormFn::apply(x, weight, bias, running_mean, running_var, training, momentum, eps, batches_tracked,
                                triton);
  bump_versions(running_mean, running_var, training);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("bn_fwd", &bn_fwd_autograd<false>);
  m.impl("bn_fwd_triton", &bn_fwd_autograd<true>);
}

}  // namespace fastreg
