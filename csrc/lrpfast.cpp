// Every lrpfast op schema, declared once. Implementations are registered per device:
//   csrc/cpu/*.cpp            TORCH_LIBRARY_IMPL(lrpfast, CPU, ...)
//   csrc/cuda/*_glue.cpp      TORCH_LIBRARY_IMPL(lrpfast, CUDA, ...)
//   csrc/layers.cpp           the layer steps (device-generic: fused op, ATen contraction, fused op)
//   lrpfast/ops.py            fake (meta) kernels and the Python names; lrpfast/_fallback.py the spec
#include <Python.h>
#include <torch/library.h>

#include "build_config.h"

TORCH_LIBRARY(lrpfast, m) {
  // Fused primitives. A relevance tensor (r, c) may hold K maps per sample: its rows are
  // K * (rows of x/z), sample-major; x and z are shared by the K maps.
  m.def("stab_div(Tensor r, Tensor z, float eps, str stabilizer) -> Tensor");
  m.def("mul_input(Tensor c, Tensor x) -> Tensor");
  m.def("mul_stab_div(Tensor c, Tensor x, Tensor z, float eps, str stabilizer) -> Tensor");

  // Whole relevance step of one layer type (ε rule; max pool: winner-take-all).
  m.def("linear_relprop(Tensor r, Tensor x, Tensor z, Tensor weight, float eps, str stabilizer) -> Tensor");
  m.def(
      "conv_relprop(Tensor r, Tensor x, Tensor z, Tensor weight, int[] stride, int[] padding, "
      "int[] dilation, int groups, float eps, str stabilizer) -> Tensor");
  // stride/padding: the forward's, given only when its windows do not overlap (then each input
  // element is written once, without a zero fill and atomics); empty: any pooling geometry.
  m.def("max_pool_relprop(Tensor r, Tensor indices, SymInt[] input_size, int[] stride=[], int[] padding=[]) -> Tensor");
  m.def(
      "avg_pool_relprop(Tensor r, Tensor x, Tensor z, int[] kernel_size, int[] stride, int[] padding, "
      "bool ceil_mode, bool count_include_pad, int? divisor_override, float eps, str stabilizer) -> Tensor");
  m.def("adaptive_avg_pool_relprop(Tensor r, Tensor x, Tensor z, float eps, str stabilizer) -> Tensor");

  // Elementwise steps of the z+/αβ/γ/z^B rules around their one contraction (lrpfast/rules.py).
  // "Paired" tensors hold two branches per channel group along `dim` (layout: csrc/rule_args.h).
  m.def("sign_split(Tensor x, int dim, int groups) -> Tensor");
  m.def("sign_split_mul_input(Tensor c, Tensor x, int dim, int groups) -> Tensor");
  m.def("bounds_mul_input(Tensor c, Tensor x, Tensor low, Tensor high, int dim, int groups) -> Tensor");
  m.def(
      "alpha_beta_stab_div(Tensor r, Tensor z, Tensor z_plus, int dim, int groups, float alpha, float beta, "
      "float eps, str stabilizer) -> Tensor");
  m.def(
      "gamma_stab_div(Tensor r, Tensor z, Tensor zp, int dim, int groups, float gamma, float eps, "
      "str stabilizer) -> Tensor");
}

// ------------------------------------------------------------------ the Python module lrpfast._C
// Importing it runs the registrations above; build_info() says what was compiled.
static PyObject* build_info(PyObject*, PyObject*) {
  PyObject* d = PyDict_New();
  PyDict_SetItemString(d, "cpu", Py_True);
#ifdef WITH_CUDA
  PyDict_SetItemString(d, "cuda", Py_True);
#else
  PyDict_SetItemString(d, "cuda", Py_False);
#endif
  PyObject* archs = PyUnicode_FromString(LRPFAST_CUDA_ARCHS);
  PyObject* tv = PyUnicode_FromString(LRPFAST_TORCH_VERSION);
  PyObject* cv = PyUnicode_FromString(LRPFAST_CUDA_VERSION);
  PyDict_SetItemString(d, "cuda_archs", archs);
  PyDict_SetItemString(d, "torch_compiled", tv);
  PyDict_SetItemString(d, "cuda_compiled", cv);
  Py_DECREF(archs);
  Py_DECREF(tv);
  Py_DECREF(cv);
  return d;
}

static PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this build of lrpfast._C contains."},
    {nullptr, nullptr, 0, nullptr}};

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, "_C", "lrpfast compiled ops", -1, methods};
  return PyModule_Create(&def);
}
