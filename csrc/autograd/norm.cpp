// Autograd of the row norms (LayerNorm, RMSNorm and the fused dropout + residual add +
// norm block), for the C++ op and its Triton twin alike. Saved for backward: the norm
// input (x, or the h forward returned), weight, mean, rstd and the dropout seed; the
// mask is regenerated inside norm_bwd.
#include <torch/library.h>

#include <tuple>

#include "fastreg/norm_args.h"
#include "graph_node.h"
#include "norm_op.h"
#include "op_handle.h"

namespace fastreg {

namespace {

// What backward needs to know of the forward call.
enum NormFlags : int64_t {
  kTriton = 1,
  kIsRms = 2,
  kHasBias = 4,
  kFused = 8,           // residual or seed given: the norm input is h = residual + dropout(x)
  kRecomputeH = 16,     // h was not stored: recompute it from x and residual
  kResidualInFp32 = 32,
  kHasResidual = 64,
};

}  // namespace

// The backward node of norm_fwd: its gradients go to x, weight, bias and residual (in that
// order); its inputs are the gradients of y and h.
struct NormBackward final : Node {
  SavedVariable norm_input, weight, mean, rstd, seed, residual;
  int64_t flags = 0;
  double eps = 0.0, p = 0.0;
  at::ScalarType y_dtype = at::kFloat, x_dtype = at::kFloat, residual_dtype = at::kFloat;

  std::string name() const override { return "NormBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (SavedVariable* saved : {&norm_input, &weight, &mean, &rstd, &seed, &residual}) saved->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    // the backward ops have no autograd of their own: skip the dispatcher's fallback for them
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const bool triton = flags & kTriton, is_rms = flags & kIsRms, fused = flags & kFused;
    const bool recompute_h = flags & kRecomputeH;
    // h is one of this node's outputs: its saved copy is unpacked with the node
    at::Tensor x = fused && !recompute_h ? norm_input.unpack(getptr()) : norm_input.unpack();
    const at::Tensor w = weight.unpack(), mu = mean.unpack(), rs = rstd.unpack(), s = seed.unpack();
    if (recompute_h) {
      x = std::get<1>(norm_fwd_op(triton).call(x, optional(w), std::nullopt, eps, is_rms,
                                               optional(residual.unpack()), optional(s), p,
                                               flags & kResidualInFp32, true));
    }
    at::Tensor grad_y = grads[0];
    if (!grad_y.defined()) {  // only h was used
      grad_y = at::zeros(x.sizes(), x.options().dtype(y_dtype));
    }
    // undefined when h went unused or was not returned
    const at::Tensor grad_h = fused && !recompute_h ? grads[1] : at::Tensor();
    auto [grad_input, grad_weight, grad_bias, grad_input_dropped] = norm_bwd_op(triton).call(
        grad_y, x, optional(w), mu, rs, is_rms, flags & kHasBias, optional(grad_h), optional(s), p);
    at::Tensor grad_x = grad_input, grad_residual;
    if (fused) {
      if (flags & kHasResidual) grad_residual = as_dtype(grad_input, residual_dtype);
      if (s.defined()) grad_x = grad_input_dropped;  // through the dropout: forward's mask, regenerated
      grad_x = as_dtype(grad_x, x_dtype);
    }
    return {grad_x, w.defined() ? grad_weight : at::Tensor(), (flags & kHasBias) ? grad_bias : at::Tensor(),
            grad_residual};
  }
};

namespace {

template <bool triton>
Tensors4 norm_fwd_autograd(const at::Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias, double eps,
                           bool is_rms, const OptionalTensor& residual, const OptionalTensor& seed, double p,
                           bool residual_in_fp32, bool store_h) {
  const OptionalTensor x_ = x;
  const bool record = records_graph(triton ? kNormFwdTriton : kNormFwd, {&x_, &weight, &bias, &residual});
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Tensors4 out = norm_fwd_op(triton).call(x, weight, bias, eps, is_rms, residual, seed, p, residual_in_fp32, store_h);
  if (!record) return out;
  const auto& [y, h, mean, rstd] = out;
  const bool fused = residual.has_value() || seed.has_value();
  const bool recompute_h = fused && !store_h;
  auto node = make_node<NormBackward>(x, or_undefined(weight), or_undefined(bias), or_undefined(residual));
  record_output(y, node);
  if (fused && store_h) {
    record_output(h, node);
  } else {
    skip_output(node);  // h is not returned: no gradient comes
  }
  // mean and rstd get no history: they are not differentiable
  node->norm_input = fused && !recompute_h ? SavedVariable(h, /*is_output=*/true) : SavedVariable(x, false);
  node->weight = SavedVariable(or_undefined(weight), false);
  node->mean = SavedVariable(mean, false);
  node->rstd = SavedVariable(rstd, false);
  node->seed = SavedVariable(or_undefined(seed), false);
  node->residual = SavedVariable(recompute_h ? or_undefined(residual) : at::Tensor(), false);
  node->flags = (triton ? kTriton : 0) | (is_rms ? kIsRms : 0) | (bias.has_value() ? kHasBias : 0) |
                (fused ? kFused : 0) | (recompute_h ? kRecomputeH : 0) | (residual_in_fp32 ? kResidualInFp32 : 0) |
                (residual.has_value() ? kHasResidual : 0);
  node->eps = eps;
  node->p = p;
  node->y_dtype = y.scalar_type();
  node->x_dtype = x.scalar_type();
  node->residual_dtype = residual.has_value() ? residual->scalar_type() : x.scalar_type();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("norm_fwd", &norm_fwd_autograd<false>);
  m.impl("norm_fwd_triton", &norm_fwd_autograd<true>);
}

}  // namespace fastreg
