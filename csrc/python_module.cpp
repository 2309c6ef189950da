// The Python module fastreg._C. Importing it loads this library, which registers every
// op (schemas in csrc/ops.cpp, kernels per dispatch key); the module's one function is a
// direct Python entry to the row norms' forward, norm_fwd_y.
#include <ATen/PythonTorchFunctionTLS.h>
#include <Python.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <tuple>

#include "autograd/norm_op.h"

namespace {

using fastreg::OptionalTensor;

// A tensor argument this entry takes as it is: a torch.Tensor or nn.Parameter, whose
// __torch_function__ is torch's own (a subclass may define its own).
bool plain_tensor(PyObject* obj) { return THPVariable_CheckExact(obj); }

bool plain_optional_tensor(PyObject* obj) { return obj == Py_None || plain_tensor(obj); }

OptionalTensor unpack_optional(PyObject* obj) {
  return obj == Py_None ? OptionalTensor() : OptionalTensor(THPVariable_Unpack(obj));
}

// norm_fwd_y(x, weight, bias, eps: float, is_rms: bool) -> y, the first output of
// fastreg::norm_fwd with its fused arguments at their defaults, called through the
// dispatcher's typed path as torch's generated bindings call its own ops. Calling
// torch.ops.fastreg.norm_fwd.default instead boxes all ten arguments into a stack and
// wraps all four outputs for Python, which on a small layer costs more than the kernel.
// Every dispatch key runs as for that call (autograd, a TorchDispatchMode, fake tensors),
// with the GIL released as there. Only __torch_function__ is not handled here: when an
// argument is not a plain tensor (or None, a float, a bool), or a TorchFunctionMode is
// active, this returns NotImplemented and the caller calls the op.
PyObject* norm_fwd_y(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5) {
    PyErr_Format(PyExc_TypeError, "norm_fwd_y() takes 5 positional arguments but %zd were given", nargs);
    return nullptr;
  }
  PyObject* const x = args[0];
  PyObject* const weight = args[1];
  PyObject* const bias = args[2];
  PyObject* const eps = args[3];
  PyObject* const is_rms = args[4];
  if (!plain_tensor(x) || !plain_optional_tensor(weight) || !plain_optional_tensor(bias) || !PyFloat_CheckExact(eps) ||
      !PyBool_Check(is_rms) || at::impl::torch_function_mode_enabled()) {
    Py_RETURN_NOTIMPLEMENTED;
  }
  const at::Tensor& x_tensor = THPVariable_Unpack(x);
  const OptionalTensor weight_tensor = unpack_optional(weight);
  const OptionalTensor bias_tensor = unpack_optional(bias);
  const double eps_value = PyFloat_AS_DOUBLE(eps);
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;
    y = std::get<0>(fastreg::norm_fwd_op(/*triton=*/false)
                        .call(x_tensor, weight_tensor, bias_tensor, eps_value, is_rms == Py_True, std::nullopt,
                              std::nullopt, 0.0, false, true));
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef module_methods[] = {
    {"norm_fwd_y", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(norm_fwd_y)), METH_FASTCALL,
     "norm_fwd_y(x, weight, bias, eps, is_rms) -> y: fastreg::norm_fwd(...)[0] through the dispatcher's typed "
     "path, or NotImplemented where __torch_function__ may apply."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}
