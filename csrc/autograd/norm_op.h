// The row norms' ops as typed dispatcher handles: their C++ signatures (those of the
// schemas in csrc/ops.cpp), for the autograd kernels (norm.cpp) and fastreg._C's direct
// entry (csrc/python_module.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "op_handle.h"

namespace fastreg {

using OptionalTensor = std::optional<at::Tensor>;
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using NormFwdSignature = Tensors4(const at::Tensor&, const OptionalTensor&, const OptionalTensor&, double, bool,
                                  const OptionalTensor&, const OptionalTensor&, double, bool, bool);
using NormBwdSignature = Tensors4(const at::Tensor&, const at::Tensor&, const OptionalTensor&, const at::Tensor&,
                                  const at::Tensor&, bool, bool, const OptionalTensor&, const OptionalTensor&,
                                  double);

inline constexpr char kNormFwd[] = "fastreg::norm_fwd";
inline constexpr char kNormBwd[] = "fastreg::norm_bwd";
inline constexpr char kNormFwdTriton[] = "fastreg::norm_fwd_triton";
inline constexpr char kNormBwdTriton[] = "fastreg::norm_bwd_triton";

// norm_fwd (triton: its Triton twin norm_fwd_triton)
inline const c10::TypedOperatorHandle<NormFwdSignature>& norm_fwd_op(bool triton) {
  return triton ? op_handle<NormFwdSignature, kNormFwdTriton>() : op_handle<NormFwdSignature, kNormFwd>();
}

// norm_bwd (triton: norm_bwd_triton)
inline const c10::TypedOperatorHandle<NormBwdSignature>& norm_bwd_op(bool triton) {
  return triton ? op_handle<NormBwdSignature, kNormBwdTriton>() : op_handle<NormBwdSignature, kNormBwd>();
}

}  // namespace fastreg
