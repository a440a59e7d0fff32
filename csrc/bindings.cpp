// pybind11 module rexrag_fast._C: the C++ data structures behind rexrag_fast.cache.
//
// Inputs are Python lists/tuples of ints or 1-D integer numpy arrays; a contiguous int32 array is read in
// place, anything else is converted once (with a range check) before the GIL is released. Outputs are
// int32 numpy arrays. The GIL is released around calls that walk a long token or block list (at least
// kGilReleaseMinItems items), around evict/reset/check_invariants, and is never re-acquired while a cache or
// allocator mutex is held (see prefix_cache.h). Short calls keep the GIL: they finish in about a microsecond,
// less than the two thread-state switches that releasing it costs.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "block_allocator.h"
#include "prefix_cache.h"

namespace py = pybind11;

namespace rexrag {
void bind_paged_attention(py::module_& m);  // paged_attention_bindings.cpp
void bind_decoder_ops(py::module_& m);      // decoder_ops_cpu.cpp
void bind_linear_amx(py::module_& m);       // linear_amx.cpp
}  // namespace rexrag
using rexrag::BlockAllocator;
using rexrag::CacheError;
using rexrag::PrefixCache;

namespace {

PyObject* g_cache_error = nullptr;

constexpr size_t kGilReleaseMinItems = 4096;

// Releases the GIL for its lifetime when `release` is true.
class MaybeReleaseGil {
 public:
  explicit MaybeReleaseGil(bool release) {
    if (release) released_.emplace();
  }

 private:
  std::optional<py::gil_scoped_release> released_;
};

// A read-only view of int32 values: either numpy memory in place or `storage`.
struct IntView {
  const int32_t* data = nullptr;
  size_t size = 0;
};

int32_t checked_int32(long long v, const char* what, size_t i) {
  if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max()) {
    throw CacheError(std::string(what) + "[" + std::to_string(i) + "] = " + std::to_string(v) +
                     " does not fit in int32");
  }
  return static_cast<int32_t>(v);
}

// numpy's ndarray type and its (singleton) native int32 descriptor, looked up once at import: comparing
// pointers is much cheaper than pybind11's generic array and dtype checks on every call.
PyTypeObject* g_ndarray_type = nullptr;
PyObject* g_int32_descr = nullptr;

// A view into numpy memory is read as int32 directly only when aligned (e.g. not a view at an odd byte offset
// of a bytes buffer); anything else is converted.
bool aligned_int32(const void* p) { return reinterpret_cast<uintptr_t>(p) % alignof(int32_t) == 0; }

IntView read_ints(const py::handle& obj, const char* what, std::vector<int32_t>* storage) {
  if (Py_TYPE(obj.ptr()) == g_ndarray_type) {
    const auto* proxy = py::detail::array_proxy(obj.ptr());
    if (proxy->nd == 1 && proxy->descr == g_int32_descr && aligned_int32(proxy->data) &&
        (proxy->dimensions[0] <= 1 || proxy->strides[0] == static_cast<py::ssize_t>(sizeof(int32_t)))) {
      return {reinterpret_cast<const int32_t*>(proxy->data), static_cast<size_t>(proxy->dimensions[0])};
    }
  }
  if (py::isinstance<py::array>(obj)) {
    auto arr = py::reinterpret_borrow<py::array>(obj);
    if (arr.ndim() != 1) {
      throw CacheError(std::string(what) + " must be 1-D, got an array with ndim=" + std::to_string(arr.ndim()));
    }
    const char kind = arr.dtype().kind();
    if (kind != 'i' && kind != 'u') {
      throw CacheError(std::string(what) + " must hold integers, got dtype " + std::string(py::str(arr.dtype())));
    }
    const auto n = static_cast<size_t>(arr.shape(0));
    if (arr.dtype().is(py::dtype::of<int32_t>()) && aligned_int32(arr.data()) &&
        (n <= 1 || arr.strides(0) == sizeof(int32_t))) {
      return {static_cast<const int32_t*>(arr.data()), n};
    }
    auto as64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
    if (!as64) throw py::error_already_set();
    if (kind == 'u' && arr.itemsize() == 8) {
      // uint64 values above int64 max wrap negative in the cast; check the unsigned view instead.
      auto u = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(arr);
      for (size_t i = 0; i < n; ++i) {
        if (u.data()[i] > static_cast<uint64_t>(std::numeric_limits<int32_t>::max())) {
          throw CacheError(std::string(what) + "[" + std::to_string(i) + "] = " + std::to_string(u.data()[i]) +
                           " does not fit in int32");
        }
      }
    }
    storage->resize(n);
    const int64_t* src = as64.data();
    for (size_t i = 0; i < n; ++i) (*storage)[i] = checked_int32(src[i], what, i);
    return {storage->data(), n};
  }
  if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
    const bool is_list = py::isinstance<py::list>(obj);
    const auto n = static_cast<size_t>(is_list ? PyList_GET_SIZE(obj.ptr()) : PyTuple_GET_SIZE(obj.ptr()));
    storage->resize(n);
    for (size_t i = 0; i < n; ++i) {
      PyObject* item = is_list ? PyList_GET_ITEM(obj.ptr(), i) : PyTuple_GET_ITEM(obj.ptr(), i);
      long long v;
      if (PyLong_CheckExact(item)) {
        int overflow = 0;
        v = PyLong_AsLongLongAndOverflow(item, &overflow);
        if (overflow) {
          throw CacheError(std::string(what) + "[" + std::to_string(i) + "] = " + std::string(py::repr(item)) +
                           " does not fit in int32");
        }
      } else {
        PyObject* idx = PyNumber_Index(item);  // accepts numpy integer scalars, rejects floats
        if (!idx) {
          PyErr_Clear();
          throw CacheError(std::string(what) + "[" + std::to_string(i) + "] must be an int, got " +
                           std::string(py::str(py::type::handle_of(item).attr("__name__"))));
        }
        int overflow = 0;
        v = PyLong_AsLongLongAndOverflow(idx, &overflow);
        Py_DECREF(idx);
        if (overflow) {
          throw CacheError(std::string(what) + "[" + std::to_string(i) + "] does not fit in int32");
        }
      }
      (*storage)[i] = checked_int32(v, what, i);
    }
    return {storage->data(), n};
  }
  throw CacheError(std::string(what) + " must be a list/tuple of ints or a 1-D integer numpy array, got " +
                   std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
}

py::array_t<int32_t> to_numpy(const std::vector<int32_t>& v) {
  py::array_t<int32_t> out(static_cast<py::ssize_t>(v.size()));
  if (!v.empty()) std::memcpy(out.mutable_data(), v.data(), v.size() * sizeof(int32_t));
  return out;
}

// MatchResult is a struct sequence (like os.stat_result): attribute access and tuple unpacking, and as cheap
// to build as a tuple, which matters on the admission hot path.
PyTypeObject* g_match_result_type = nullptr;

PyStructSequence_Field g_match_result_fields[] = {
    {"block_ids", "int32 [n]: KV block ids of the matched prefix, root to leaf"},
    {"num_matched_tokens", "n * block_size"},
    {"handle", "deepest matched node (the namespace root when nothing matched): pass to lock()/unlock()"},
    {nullptr, nullptr},
};

PyStructSequence_Desc g_match_result_desc = {
    "rexrag_fast.cache.MatchResult",
    "Result of PrefixCache.match_prefix: (block_ids, num_matched_tokens, handle).",
    g_match_result_fields,
    3,
};

py::object make_match_result(py::array_t<int32_t> block_ids, int64_t num_matched_tokens, int64_t handle) {
  PyObject* r = PyStructSequence_New(g_match_result_type);
  if (!r) throw py::error_already_set();
  PyStructSequence_SetItem(r, 0, block_ids.release().ptr());
  PyStructSequence_SetItem(r, 1, py::int_(num_matched_tokens).release().ptr());
  PyStructSequence_SetItem(r, 2, py::int_(handle).release().ptr());
  return py::reinterpret_steal<py::object>(r);
}

// ---- Hot per-sequence calls as plain CPython METH_FASTCALL methods. pybind11's generic dispatcher costs
// about 0.2 us per call more than a direct C call, as much as a whole short cache operation.

// Binds positional and keyword arguments to `names` (in order); out[i] stays nullptr for an omitted
// optional argument. Returns false with a Python TypeError set on a bad call.
bool bind_args(const char* fn, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
               const char* const* names, int n_names, int n_required, PyObject** out) {
  if (nargs > n_names) {
    PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fn, n_names, nargs);
    return false;
  }
  for (Py_ssize_t i = 0; i < nargs; ++i) out[i] = args[i];
  const Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  for (Py_ssize_t k = 0; k < nkw; ++k) {
    PyObject* key = PyTuple_GET_ITEM(kwnames, k);
    int idx = -1;
    for (int i = 0; i < n_names; ++i) {
      if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) idx = i;
    }
    if (idx < 0) {
      PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fn, key);
      return false;
    }
    if (out[idx]) {
      PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fn, names[idx]);
      return false;
    }
    out[idx] = args[nargs + k];
  }
  for (int i = 0; i < n_required; ++i) {
    if (!out[i]) {
      PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fn, names[i]);
      return false;
    }
  }
  return true;
}

int64_t to_int64(PyObject* obj, const char* what) {
  PyObject* idx = PyNumber_Index(obj);
  if (!idx) throw py::error_already_set();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
  Py_DECREF(idx);
  if (overflow) throw CacheError(std::string(what) + " = " + std::string(py::repr(obj)) + " does not fit in int64");
  if (v == -1 && PyErr_Occurred()) throw py::error_already_set();
  return v;
}

PrefixCache& self_cache(PyObject* self) {
  auto* inst = reinterpret_cast<py::detail::instance*>(self);
  auto* ptr = static_cast<PrefixCache*>(inst->get_value_and_holder().value_ptr());
  if (!ptr) throw py::type_error("PrefixCache.__init__() has not been called on this object");
  return *ptr;
}

// Converts the C++ exception in flight into the Python error it stands for; returns nullptr.
PyObject* raise_current() {
  try {
    throw;
  } catch (const CacheError& e) {
    PyErr_SetString(g_cache_error, e.what());
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const py::builtin_exception& e) {
    e.set_error();
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* fast_match_prefix(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {"tokens", "namespace"};
  PyObject* a[2] = {nullptr, nullptr};
  if (!bind_args("match_prefix", args, nargs, kwnames, names, 2, 1, a)) return nullptr;
  try {
    PrefixCache& c = self_cache(self);
    const int64_t ns = a[1] ? to_int64(a[1], "namespace") : 0;
    std::vector<int32_t> buf, blocks;
    IntView t = read_ints(a[0], "tokens", &buf);
    int64_t handle;
    {
      MaybeReleaseGil nogil(t.size >= kGilReleaseMinItems);
      handle = c.match_prefix(t.data, t.size, ns, &blocks);
    }
    const auto n = static_cast<int64_t>(blocks.size());
    return make_match_result(to_numpy(blocks), n * c.block_size(), handle).release().ptr();
  } catch (...) {
    return raise_current();
  }
}

PyObject* fast_insert(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static const char* const names[] = {"tokens", "block_ids", "namespace"};
  PyObject* a[3] = {nullptr, nullptr, nullptr};
  if (!bind_args("insert", args, nargs, kwnames, names, 3, 2, a)) return nullptr;
  try {
    PrefixCache& c = self_cache(self);
    const int64_t ns = a[2] ? to_int64(a[2], "namespace") : 0;
    std::vector<int32_t> tbuf, bbuf;
    IntView t = read_ints(a[0], "tokens", &tbuf);
    IntView b = read_ints(a[1], "block_ids", &bbuf);
    int64_t cached;
    {
      MaybeReleaseGil nogil(t.size >= kGilReleaseMinItems);
      cached = c.insert(t.data, t.size, b.data, b.size, ns);
    }
    return PyLong_FromLongLong(cached);
  } catch (...) {
    return raise_current();
  }
}

template <void (PrefixCache::*Method)(int64_t)>
PyObject* fast_handle_call(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
                           const char* fn) {
  static const char* const names[] = {"handle"};
  PyObject* a[1] = {nullptr};
  if (!bind_args(fn, args, nargs, kwnames, names, 1, 1, a)) return nullptr;
  try {
    PrefixCache& c = self_cache(self);
    (c.*Method)(to_int64(a[0], "handle"));
    Py_RETURN_NONE;
  } catch (...) {
    return raise_current();
  }
}

PyObject* fast_lock(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return fast_handle_call<&PrefixCache::lock>(self, args, nargs, kwnames, "lock");
}

PyObject* fast_unlock(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  return fast_handle_call<&PrefixCache::unlock>(self, args, nargs, kwnames, "unlock");
}

#define REXRAG_FASTCALL(fn) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(fn))

PyMethodDef g_fast_methods[] = {
    {"match_prefix", REXRAG_FASTCALL(fast_match_prefix), METH_FASTCALL | METH_KEYWORDS,
     "match_prefix($self, /, tokens, namespace=0)\n--\n\n"
     "Longest cached full-block prefix of tokens: MatchResult(block_ids int32 [n], num_matched_tokens, handle)."},
    {"insert", REXRAG_FASTCALL(fast_insert), METH_FASTCALL | METH_KEYWORDS,
     "insert($self, /, tokens, block_ids, namespace=0)\n--\n\n"
     "Cache the full blocks of tokens with block_ids [len(tokens) // block_size]; returns the number of tokens "
     "that were already cached (the caller frees its own ids there unless they are the tree's)."},
    {"lock", REXRAG_FASTCALL(fast_lock), METH_FASTCALL | METH_KEYWORDS,
     "lock($self, /, handle)\n--\n\nProtect the handle's node and its ancestors from eviction."},
    {"unlock", REXRAG_FASTCALL(fast_unlock), METH_FASTCALL | METH_KEYWORDS,
     "unlock($self, /, handle)\n--\n\nUndo one lock() of this handle."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rexrag-fast C++ core: KV block allocator and radix prefix cache (Python face: rexrag_fast.cache), CPU paged attention (rexrag_fast.engine.cpu_attention)";
  m.attr("GIL_RELEASE_MIN_ITEMS") = kGilReleaseMinItems;
  g_ndarray_type = py::detail::npy_api::get().PyArray_Type_;
  g_int32_descr = py::dtype::of<int32_t>().release().ptr();  // kept for the module's lifetime

  py::tuple bases = py::make_tuple(py::handle(PyExc_ValueError), py::handle(PyExc_RuntimeError));
  g_cache_error = PyErr_NewExceptionWithDoc("rexrag_fast._C.CacheError",
                                            "Misuse of the block allocator or the prefix cache.", bases.ptr(),
                                            nullptr);
  if (!g_cache_error) throw py::error_already_set();
  m.add_object("CacheError", py::handle(g_cache_error));  // the module keeps one reference, g_cache_error another
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CacheError& e) {
      PyErr_SetString(g_cache_error, e.what());
    }
  });

  g_match_result_type = PyStructSequence_NewType(&g_match_result_desc);
  if (!g_match_result_type) throw py::error_already_set();
  m.add_object("MatchResult", py::handle(reinterpret_cast<PyObject*>(g_match_result_type)));

  py::class_<BlockAllocator, std::shared_ptr<BlockAllocator>>(
      m, "BlockAllocator", "A pool of num_blocks KV block ids with reference counts and a LIFO free list.")
      .def(py::init<int64_t>(), py::arg("num_blocks"))
      .def(
          "allocate",
          [](BlockAllocator& a, int64_t n) {
            std::vector<int32_t> ids;
            {
              MaybeReleaseGil nogil(n >= static_cast<int64_t>(kGilReleaseMinItems));
              ids = a.allocate(n);
            }
            return to_numpy(ids);
          },
          py::arg("n"), "n free blocks (int32 [n]), refcount 1 each; raises CacheError if fewer are free.")
      .def(
          "incref",
          [](BlockAllocator& a, const py::handle& blocks) {
            std::vector<int32_t> buf;
            IntView v = read_ints(blocks, "blocks", &buf);
            MaybeReleaseGil nogil(v.size >= kGilReleaseMinItems);
            a.incref(v.data, v.size);
          },
          py::arg("blocks"), "One more reference on each block (sharing, e.g. a forked sequence).")
      .def(
          "free",
          [](BlockAllocator& a, const py::handle& blocks) {
            std::vector<int32_t> buf;
            IntView v = read_ints(blocks, "blocks", &buf);
            MaybeReleaseGil nogil(v.size >= kGilReleaseMinItems);
            a.free(v.data, v.size);
          },
          py::arg("blocks"),
          "Drop one caller reference per id; refcount 0 returns the block to the free list. Double free, an "
          "unknown id or a block held only by a prefix cache raises CacheError and changes nothing.")
      .def("refcount", &BlockAllocator::refcount, py::arg("block"))
      .def_property_readonly("num_free", &BlockAllocator::num_free)
      .def_property_readonly("num_blocks", &BlockAllocator::num_blocks)
      .def("check_invariants", &BlockAllocator::check_invariants, py::call_guard<py::gil_scoped_release>())
      .def("__repr__", [](const BlockAllocator& a) {
        return "BlockAllocator(num_blocks=" + std::to_string(a.num_blocks()) +
               ", num_free=" + std::to_string(a.num_free()) + ")";
      });

  auto cache_cls = py::class_<PrefixCache>(m, "PrefixCache", "Radix tree of token-id prefixes over full KV blocks (see prefix_cache.h).")
      .def(py::init<int64_t, std::shared_ptr<BlockAllocator>, int>(), py::arg("block_size"), py::arg("allocator"),
           py::kw_only(), py::arg("hash_bits") = 64)
      .def("evict", &PrefixCache::evict, py::arg("num_blocks"), py::call_guard<py::gil_scoped_release>())
      .def("reset", &PrefixCache::reset, py::call_guard<py::gil_scoped_release>())
      .def("check_invariants", &PrefixCache::check_invariants, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("block_size", &PrefixCache::block_size)
      .def_property_readonly("allocator", &PrefixCache::allocator)
      .def_property_readonly("evictable_blocks", &PrefixCache::evictable_blocks)
      .def_property_readonly("locked_blocks", &PrefixCache::locked_blocks)
      .def_property_readonly("cached_tokens", &PrefixCache::cached_tokens)
      .def_property_readonly("hits", &PrefixCache::hits)
      .def_property_readonly("misses", &PrefixCache::misses);
  for (PyMethodDef* def = g_fast_methods; def->ml_name; ++def) {
    PyObject* descr = PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(cache_cls.ptr()), def);
    if (!descr) throw py::error_already_set();
    cache_cls.attr(def->ml_name) = py::reinterpret_steal<py::object>(descr);
  }
  rexrag::bind_paged_attention(m);
  rexrag::bind_decoder_ops(m);
  rexrag::bind_linear_amx(m);
}
