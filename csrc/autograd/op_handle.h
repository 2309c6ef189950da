// What the autograd files share: a typed handle of a fastreg operator, looked up once.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>

#include <initializer_list>
#include <optional>

namespace fastreg {

// The operator `name` ("fastreg::dropout") with C++ signature `Signature`, found in the
// dispatcher on first use. Its kernels may be registered later than this file's code is
// loaded (the Triton twins' kernels are registered from Python), so it is looked up at
// the first call, not at load time.
template <typename Signature, const char* name>
const c10::TypedOperatorHandle<Signature>& op_handle() {
  static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Signature>();
  return handle;
}

// Forward-mode AD (dual tensors, torch.func.jvp) has no formulas in fastreg: a dual input
// raises torch's error for such ops instead of losing its tangent.
inline void check_no_forward_grad(const char* op, std::initializer_list<const std::optional<at::Tensor>*> inputs) {
  for (const auto* t : inputs) {
    TORCH_CHECK_NOT_IMPLEMENTED(!(t->has_value() && (*t)->defined() && (*t)->_fw_grad(/*level=*/0).defined()),
                                "Trying to use forward AD with ", op,
                                " that does not support it because it has not been implemented yet.");
  }
}

// Whether autograd must record a call of `op` ("fastreg::norm_fwd") with these
// differentiable inputs: grad mode on and one of them requiring grad. Otherwise the
// autograd kernels call the op directly, skipping the cost of a graph node (torch's own
// ops do the same).
inline bool records_graph(const char* op, std::initializer_list<const std::optional<at::Tensor>*> inputs) {
  check_no_forward_grad(op, inputs);
  if (!at::GradMode::is_enabled()) return false;
  for (const auto* t : inputs) {
    if (t->has_value() && (*t)->defined() && (*t)->requires_grad()) return true;
  }
  return false;
}

// The float32 accumulation type of a dtype's reductions (float64 for float64).
inline at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fastreg
