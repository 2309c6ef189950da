// Every operator schema of fastreg, in one place. The kernels register their
// implementations per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cu; fake
// (meta) kernels and autograd are registered from Python (fastreg/_ops.py).
#include <Python.h>
#include <torch/library.h>

// `import fastreg._C` loads this library and runs the registrations below;
// the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastreg, m) {
  // out = residual + (x + bias) * keep * scale over the contiguous x. `seed` is an int64
  // tensor of one element on x's device; element i takes stream position
  // offset + i / inner of the Philox stream (see csrc/include/fastreg/philox.h), so
  // inner > 1 drops whole groups (channel dropout, drop path). Backward is this
  // same op applied to the incoming gradient with the same seed.
  m.def(
      "dropout(Tensor x, Tensor seed, float p, int offset=0, int inner=1, "
      "Tensor? bias=None, Tensor? residual=None) -> Tensor");
  // In-place form of the above without bias and residual; x must be contiguous.
  m.def("dropout_(Tensor(a!) x, Tensor seed, float p, int offset=0, int inner=1) -> ()");
}
