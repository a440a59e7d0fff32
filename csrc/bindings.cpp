// pybind11 module rexrag_fast._C: the C++ data structures behind rexrag_fast.cache.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "rexrag-fast C++ core: KV block allocator and radix prefix cache";
}
