// Autograd of the row norms (LayerNorm, RMSNorm and the fused dropout + residual add +
// norm block), for the C++ op and its Triton twin alike. Saved for backward: the norm
// input (x, or the h forward returned), weight, mean, rstd and the dropout seed; the
// mask is regenerated inside norm_bwd.
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "op_handle.h"

namespace fastreg {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptionalTensor = std::optional<at::Tensor>;
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using NormFwdSignature = Tensors4(const at::Tensor&, const OptionalTensor&, const OptionalTensor&, double, bool,
                                  const OptionalTensor&, const OptionalTensor&, double, bool, bool);
using NormBwdSignature = Tensors4(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&,
                                  const at::Tensor&, bool, bool, const OptionalTensor&, const OptionalTensor&,
                                  double);

namespace {

constexpr char kNormFwd[] = "fastreg::norm_fwd";
constexpr char kNormBwd[] = "fastreg::norm_bwd";
constexpr char kNormFwdTriton[] = "fastreg::norm_fwd_triton";
constexpr char kNormBwdTriton[] = "fastreg::norm_bwd_triton";

const c10::TypedOperatorHandle<NormFwdSignature>& norm_fwd_op(bool triton) {
  return triton ? op_handle<NormFwdSignature, kNormFwdTriton>() : op_handle<NormFwdSignature, kNormFwd>();
}

const c10::TypedOperatorHandle<NormBwdSignature>& norm_bwd_op(bool triton) {
  return triton ? op_handle<NormBwdSignature, kNormBwdTriton>() : op_handle<NormBwdSignature, kNormBwd>();
}

OptionalTensor optional(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// What backward needs besides tensors, packed into few saved_data entries (each entry is a
// hash-map insert per forward and a lookup per backward).
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

// (A short, non-template name: autograd demangles it on every backward.)
struct NormFn : torch::autograd::Function<NormFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptionalTensor& weight,
                               const OptionalTensor& bias, double eps, bool is_rms, const OptionalTensor& residual,
                               const OptionalTensor& seed, double p, bool residual_in_fp32, bool store_h,
                               bool triton) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, h, mean, rstd] =
        norm_fwd_op(triton).call(x, weight, bias, eps, is_rms, residual, seed, p, residual_in_fp32, store_h);
    const bool fused = residual.has_value() || seed.has_value();
    const bool recompute_h = fused && !store_h;
    const at::Tensor& norm_input = fused && !recompute_h ? h : x;
    ctx->save_for_backward({norm_input, weight.value_or(at::Tensor()), mean, rstd, seed.value_or(at::Tensor()),
                            recompute_h ? residual.value_or(at::Tensor()) : at::Tensor()});
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);  // an unused h (not prenorm) gets no zeros to read
    ctx->saved_data["flags"] = int64_t{(triton ? kTriton : 0) | (is_rms ? kIsRms : 0) |
                                       (bias.has_value() ? kHasBias : 0) | (fused ? kFused : 0) |
                                       (recompute_h ? kRecomputeH : 0) | (residual_in_fp32 ? kResidualInFp32 : 0) |
                                       (residual.has_value() ? kHasResidual : 0)};
    ctx->saved_data["eps_p"] = c10::List<double>({eps, p});
    // dtypes of y, x and residual (x's when there is none)
    ctx->saved_data["dtypes"] = c10::List<int64_t>(
        {int64_t(y.scalar_type()), int64_t(x.scalar_type()),
         int64_t(residual.has_value() ? residual->scalar_type() : x.scalar_type())});
    return {y, h, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // the backward ops have no autograd of their own: skip the dispatcher's fallback for them
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const auto saved = ctx->get_saved_variables();
    at::Tensor norm_input = saved[0];
    const at::Tensor &weight = saved[1], &mean = saved[2], &rstd = saved[3], &seed = saved[4], &residual = saved[5];
    const int64_t flags = ctx->saved_data["flags"].toInt();
    const auto eps_p = ctx->saved_data["eps_p"].toDoubleList();
    const auto dtypes = ctx->saved_data["dtypes"].toIntList();
    const bool triton = flags & kTriton, is_rms = flags & kIsRms, fused = flags & kFused;
    const double p = eps_p[1];
    if (flags & kRecomputeH) {
      norm_input = std::get<1>(norm_fwd_op(triton).call(norm_input, optional(weight), std::nullopt, eps_p[0], is_rms,
                                                        optional(residual), optional(seed), p,
                                                        flags & kResidualInFp32, true));
    }
    at::Tensor grad_y = grads[0];
    if (!grad_y.defined()) {  // only h was used
      grad_y = at::zeros(norm_input.sizes(), norm_input.options().dtype(at::ScalarType(dtypes[0])));
    }
    // undefined when h went unused or was not returned
    const at::Tensor grad_h = fused && !(flags & kRecomputeH) ? grads[1] : at::Tensor();
    auto [grad_input, grad_weight, grad_bias, grad_input_dropped] = norm_bwd_op(triton).call(
        grad_y, norm_input, optional(weight), mean, rstd, is_rms, flags & kHasBias, optional(grad_h), optional(seed),
        p);
    at::Tensor grad_x = grad_input, grad_residual;
    if (fused) {
      if (flags & kHasResidual) grad_residual = grad_input.to(at::ScalarType(dtypes[2]));
      if (seed.defined()) grad_x = grad_input_dropped;  // through the dropout: forward's mask, regenerated
      grad_x = grad_x.to(at::ScalarType(dtypes[1]));
    }
    return {grad_x,
            weight.defined() ? grad_weight : at::Tensor(),
            (flags & kHasBias) ? grad_bias : at::Tensor(),
            at::Tensor(), at::Tensor(), grad_residual, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

namespace {

template <bool triton>
Tensors4 norm_fwd_autograd(const at::Tensor& x, const OptionalTensor& weight, const OptionalTensor& bias, double eps,
                           bool is_rms, const OptionalTensor& residual, const OptionalTensor& seed, double p,
                           bool residual_in_fp32, bool store_h) {
  const OptionalTensor x_ = x;
  if (!records_graph({&x_, &weight, &bias, &residual})) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return norm_fwd_op(triton).call(x, weight, bias, eps, is_rms, residual, seed, p, residual_in_fp32, store_h);
  }
  auto out = NormFn::apply(x, weight, bias, eps, is_rms, residual, seed, p, residual_in_fp32, store_h, triton);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, Autograd, m) {
  m.impl("norm_fwd", &norm_fwd_autograd<false>);
  m.impl("norm_fwd_triton", &norm_fwd_autograd<true>);
}

}  // namespace fastreg
