// The Python module shell of lightning_compress._C. Importing it loads this shared library,
// whose static initialisers register the CPU (and CUDA) kernels of the ops that
// lightning_compress/ops/_library.py defined beforehand; the module itself is empty.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "lightning-compress compiled ops", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}
