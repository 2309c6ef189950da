// What the autograd files share: a typed handle of a fastreg operator, looked up once.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

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

// The float32 accumulation type of a dtype's reductions (float64 for float64).
inline at::ScalarType accumulate_type(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace fastreg
