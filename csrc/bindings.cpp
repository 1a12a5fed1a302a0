// pybind11 module fedcmd_core._native: argument checks, then the kernels with the GIL released.
//
// The Python face (fedcmd_core/kernels/__init__.py) validates everything before it calls here, so
// these checks are the second line: anything that could still arrive (a direct call, a wrong dtype,
// a non-contiguous view, NaN that would break std::sort's ordering) raises TypeError/ValueError
// naming the function and argument, never crashes. Arrays are never converted or copied here.
//
// This file is compiled without -march flags so that the import-time choice of the ISA variant runs on
// any CPU; each variant's kernel translation units carry their own ISA flags.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.hpp"
#include "simd.hpp"

namespace py = pybind11;
using fedcmd::Buffer;
using fedcmd::Kind;

namespace fedcmd {
// The ISA variants this build holds (CMakeLists.txt compiles the kernel sources once per variant).
namespace portable {
FEDCMD_KERNEL_API
}
#ifdef FEDCMD_HAS_AVX2
namespace avx2 {
FEDCMD_KERNEL_API
}
#endif
#ifdef FEDCMD_HAS_AVX512
namespace avx512 {
FEDCMD_KERNEL_API
}
#endif

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
}  // namespace fedcmd

namespace {

// One variant's kernels; the module calls through the table chosen at import (choose_variant).
struct Variant {
  const char* name;
  void (*wasserstein_1d)(const double*, const double*, int64_t, int64_t, int64_t, double, const double*,
                         const double*, double*);
  void (*wasserstein_pairwise)(const double*, int64_t, int64_t, double, double*);
  double (*sliced_wasserstein)(const double*, int64_t, const double*, int64_t, int64_t, const double*, int64_t, double,
                               const double*, const double*);
  void (*aggregate_f)(const double*, int64_t, int64_t, const Buffer*, int64_t, float*);
  void (*aggregate_d)(const double*, int64_t, int64_t, const Buffer*, int64_t, double*);
  void (*rowwise_mean_cosine)(const Buffer*, int64_t, int64_t, int64_t, double, double*);
  double (*fma_peak_gflops)(int64_t);
  double (*read_sum)(const float*, int64_t);
  int (*vector_lanes)();
};

#define FEDCMD_VARIANT(ns)                                                                                        \
  Variant {                                                                                                       \
    #ns, &fedcmd::ns::wasserstein_1d, &fedcmd::ns::wasserstein_pairwise, &fedcmd::ns::sliced_wasserstein,         \
        static_cast<void (*)(const double*, int64_t, int64_t, const Buffer*, int64_t, float*)>(                   \
            &fedcmd::ns::weighted_aggregate),                                                                     \
        static_cast<void (*)(const double*, int64_t, int64_t, const Buffer*, int64_t, double*)>(                  \
            &fedcmd::ns::weighted_aggregate),                                                                     \
        &fedcmd::ns::rowwise_mean_cosine, &fedcmd::ns::fma_peak_gflops, &fedcmd::ns::read_sum,                    \
        &fedcmd::ns::vector_lanes                                                                                 \
  }

Variant g_kernels = FEDCMD_VARIANT(portable);  // replaced at import by the best usable variant

inline void run_aggregate(const double* W, int64_t K, int64_t N, const Buffer* b, int64_t P, float* out) {
  g_kernels.aggregate_f(W, K, N, b, P, out);
}
inline void run_aggregate(const double* W, int64_t K, int64_t N, const Buffer* b, int64_t P, double* out) {
  g_kernels.aggregate_d(W, K, N, b, P, out);
}

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    s += std::to_string(a.shape(i));
    s += a.ndim() == 1 ? "," : (i + 1 < a.ndim() ? ", " : "");
  }
  return s + ")";
}

[[noreturn]] void type_fail(const char* fn, const std::string& name, const std::string& what) {
  throw py::type_error(std::string(fn) + ": " + name + " " + what);
}
[[noreturn]] void value_fail(const char* fn, const std::string& name, const std::string& what) {
  throw py::value_error(std::string(fn) + ": " + name + " " + what);
}

py::array as_array(const char* fn, const std::string& name, const py::handle& obj) {
  if (!py::isinstance<py::array>(obj)) type_fail(fn, name, "must be a numpy.ndarray (the Python face converts)");
  return py::reinterpret_borrow<py::array>(obj);
}

// A storage kind for float16/32/64; anything else is a TypeError.
Kind float_kind(const char* fn, const std::string& name, const py::array& a) {
  const py::dtype dt = a.dtype();
  if (dt.kind() == 'f') {
    switch (dt.itemsize()) {
      case 2: return Kind::F16;
      case 4: return Kind::F32;
      case 8: return Kind::F64;
      default: break;
    }
  }
  type_fail(fn, name, "has dtype " + std::string(py::str(dt)) + ", expected float16, float32 or float64");
}

void require(const char* fn, const std::string& name, const py::array& a, py::ssize_t ndim) {
  if (a.ndim() != ndim)
    value_fail(fn, name, "must be " + std::to_string(ndim) + "-D, got shape " + shape_str(a));
  if (!(a.flags() & py::array::c_style)) value_fail(fn, name, "must be C-contiguous, got strides that are not");
  if (a.size() == 0) value_fail(fn, name, "is empty (shape " + shape_str(a) + ")");
}

// A C-contiguous float64 array of ndim dimensions, all finite (NaN breaks the ordering std::sort needs).
const double* f64(const char* fn, const std::string& name, const py::array& a, py::ssize_t ndim) {
  require(fn, name, a, ndim);
  if (float_kind(fn, name, a) != Kind::F64) type_fail(fn, name, "has dtype " + std::string(py::str(a.dtype())) + ", expected float64");
  const double* p = static_cast<const double*>(a.data());
  for (py::ssize_t i = 0; i < a.size(); ++i)
    if (!std::isfinite(p[i])) value_fail(fn, name, "contains NaN/Inf (shape " + shape_str(a) + ")");
  return p;
}

void check_p(const char* fn, double p) {
  if (!std::isfinite(p) || p < 1) throw py::value_error(std::string(fn) + ": p must be a finite number >= 1, got " + std::to_string(p));
}

// Optional sample weights: same shape as their values, >= 0, every row with a positive total.
const double* weights_or_null(const char* fn, const std::string& name, const py::object& w, const py::array& values) {
  if (w.is_none()) return nullptr;
  py::array a = as_array(fn, name, w);
  const double* p = f64(fn, name, a, values.ndim());
  for (py::ssize_t d = 0; d < values.ndim(); ++d)
    if (a.shape(d) != values.shape(d))
      value_fail(fn, name, "has shape " + shape_str(a) + ", expected the shape of its values " + shape_str(values));
  const py::ssize_t n = a.shape(a.ndim() - 1), rows = a.size() / n;
  for (py::ssize_t r = 0; r < rows; ++r) {
    double total = 0;
    for (py::ssize_t k = 0; k < n; ++k) {
      if (p[r * n + k] < 0) value_fail(fn, name, "has negative entries");
      total += p[r * n + k];
    }
    if (!(total > 0)) value_fail(fn, name, "are all zero in row " + std::to_string(r));
  }
  return p;
}

py::array_t<double> wasserstein_1d(const py::object& u_obj, const py::object& v_obj, double p, const py::object& uw_obj,
                                   const py::object& vw_obj) {
  const char* fn = "wasserstein_1d";
  check_p(fn, p);
  py::array u = as_array(fn, "u", u_obj), v = as_array(fn, "v", v_obj);
  const double* up = f64(fn, "u", u, 2);
  const double* vp = f64(fn, "v", v, 2);
  if (u.shape(0) != v.shape(0))
    value_fail(fn, "u", "has shape " + shape_str(u) + " but v has " + shape_str(v) + ": batch sizes differ");
  const double* uw = weights_or_null(fn, "u_weights", uw_obj, u);
  const double* vw = weights_or_null(fn, "v_weights", vw_obj, v);
  const int64_t B = u.shape(0), n = u.shape(1), m = v.shape(1);
  py::array_t<double> out(B);
  double* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    g_kernels.wasserstein_1d(up, vp, B, n, m, p, uw, vw, o);
  }
  return out;
}

py::array_t<double> wasserstein_pairwise(const py::object& s_obj, double p) {
  const char* fn = "wasserstein_pairwise";
  check_p(fn, p);
  py::array s = as_array(fn, "sketches", s_obj);
  const double* sp = f64(fn, "sketches", s, 2);
  const int64_t N = s.shape(0), n = s.shape(1);
  py::array_t<double> out({N, N});
  double* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    g_kernels.wasserstein_pairwise(sp, N, n, p, o);
  }
  return out;
}

double sliced_wasserstein(const py::object& x_obj, const py::object& y_obj, const py::object& t_obj, double p,
                          const py::object& xw_obj, const py::object& yw_obj) {
  const char* fn = "sliced_wasserstein";
  check_p(fn, p);
  py::array X = as_array(fn, "X", x_obj), Y = as_array(fn, "Y", y_obj), T = as_array(fn, "projections", t_obj);
  const double* xp = f64(fn, "X", X, 2);
  const double* yp = f64(fn, "Y", Y, 2);
  const double* tp = f64(fn, "projections", T, 2);
  if (Y.shape(1) != X.shape(1) || T.shape(1) != X.shape(1))
    value_fail(fn, "X", "has shape " + shape_str(X) + ", Y " + shape_str(Y) + ", projections " + shape_str(T) +
                            ": the feature dimensions differ");
  // weights are 1-D over samples; check them against a [n] view of the values
  auto weights = [&](const char* name, const py::object& w, const py::array& values) -> const double* {
    if (w.is_none()) return nullptr;
    py::array a = as_array(fn, name, w);
    if (a.ndim() != 1 || a.shape(0) != values.shape(0))
      value_fail(fn, name, "has shape " + shape_str(a) + ", expected (" + std::to_string(values.shape(0)) + ",)");
    py::array_t<double> like(values.shape(0));
    return weights_or_null(fn, name, w, like);
  };
  const double* xw = weights("x_weights", xw_obj, X);
  const double* yw = weights("y_weights", yw_obj, Y);
  const int64_t n = X.shape(0), m = Y.shape(0), d = X.shape(1), L = T.shape(0);
  py::gil_scoped_release nogil;
  return g_kernels.sliced_wasserstein(xp, n, yp, m, d, tp, L, p, xw, yw);
}

// Client buffers: one [N, P] array or a sequence of N 1-D arrays of one length P, float16/32/64,
// C-contiguous. bf16[j] marks a float16-typed buffer whose bits are bfloat16 (torch storage).
struct Buffers {
  std::vector<py::array> keep;  // hold references while the GIL is released
  std::vector<Buffer> bufs;
  int64_t P = 0;
};

Buffers collect_buffers(const char* fn, const py::object& obj, const py::object& bf16_obj) {
  Buffers b;
  if (py::isinstance<py::array>(obj)) {
    py::array a = py::reinterpret_borrow<py::array>(obj);
    require(fn, "buffers", a, 2);
    const Kind k = float_kind(fn, "buffers", a);
    const int64_t N = a.shape(0);
    b.P = a.shape(1);
    b.keep.push_back(a);
    const char* base = static_cast<const char*>(a.data());
    for (int64_t j = 0; j < N; ++j) b.bufs.push_back({base + j * b.P * static_cast<int64_t>(fedcmd::kind_size(k)), k});
  } else if (py::isinstance<py::sequence>(obj) && !py::isinstance<py::str>(obj)) {
    py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
    if (seq.size() == 0) value_fail(fn, "buffers", "is an empty sequence");
    for (size_t j = 0; j < seq.size(); ++j) {
      const std::string name = "buffers[" + std::to_string(j) + "]";
      py::array a = as_array(fn, name, seq[j]);
      require(fn, name, a, 1);
      const Kind k = float_kind(fn, name, a);
      if (j == 0) b.P = a.shape(0);
      if (a.shape(0) != b.P)
        value_fail(fn, name, "has " + std::to_string(a.shape(0)) + " elements, expected " + std::to_string(b.P) + " (like buffers[0])");
      b.keep.push_back(a);
      b.bufs.push_back({a.data(), k});
    }
  } else {
    type_fail(fn, "buffers", "must be a 2-D array or a sequence of 1-D arrays");
  }
  if (!bf16_obj.is_none()) {
    auto flags = bf16_obj.cast<std::vector<bool>>();
    if (flags.size() != b.bufs.size())
      value_fail(fn, "bf16", "has " + std::to_string(flags.size()) + " flags for " + std::to_string(b.bufs.size()) + " buffers");
    for (size_t j = 0; j < flags.size(); ++j) {
      if (!flags[j]) continue;
      if (b.bufs[j].kind != Kind::F16)
        type_fail(fn, "buffers[" + std::to_string(j) + "]", "is flagged bfloat16 but is not a 2-byte (float16-typed) view");
      b.bufs[j].kind = Kind::BF16;
    }
  }
  return b;
}

py::array weighted_aggregate(const py::object& w_obj, const py::object& buffers, const py::object& dtype_obj,
                             const py::object& bf16) {
  const char* fn = "weighted_aggregate";
  py::array w = as_array(fn, "weights", w_obj);
  const double* wp = f64(fn, "weights", w, 2);
  const int64_t K = w.shape(0), N = w.shape(1);
  Buffers b = collect_buffers(fn, buffers, bf16);
  if (static_cast<int64_t>(b.bufs.size()) != N)
    value_fail(fn, "weights", "has shape " + shape_str(w) + ", expected [K, " + std::to_string(b.bufs.size()) + "] to match the buffers");
  for (int64_t i = 0; i < K * N; ++i)
    if (wp[i] < 0) value_fail(fn, "weights", "has negative entries");
  const py::dtype dt = py::dtype::from_args(dtype_obj);
  if (dt.kind() != 'f' || (dt.itemsize() != 4 && dt.itemsize() != 8))
    type_fail(fn, "dtype", "is " + std::string(py::str(dt)) + ", expected float32 or float64");
  if (dt.itemsize() == 4) {
    py::array_t<float> out({K, b.P});
    float* o = out.mutable_data();
    py::gil_scoped_release nogil;
    run_aggregate(wp, K, N, b.bufs.data(), b.P, o);
    return std::move(out);
  }
  py::array_t<double> out({K, b.P});
  double* o = out.mutable_data();
  py::gil_scoped_release nogil;
  run_aggregate(wp, K, N, b.bufs.data(), b.P, o);
  return std::move(out);
}

// Similarity inputs: an [N, *item] array or a sequence of N arrays of shape item; returns one
// Buffer per item plus (r, c). float16 items are converted to float32 copies (kept alive in keep);
// NaN/Inf are rejected (they would silently poison the whole row of S).
struct Items {
  std::vector<py::array> keep;
  std::vector<Buffer> bufs;
  int64_t r = 0, c = 0;
};

Items collect_items(const char* fn, const char* name, const py::object& obj, py::ssize_t item_ndim) {
  Items it;
  auto add = [&](py::array a, const std::string& nm, const char* data, py::ssize_t off_elems) {
    Kind k = float_kind(fn, nm, a);
    const int64_t size = it.r * it.c;
    if (k == Kind::F16) {
      py::array_t<float> f(size);
      float* dst = f.mutable_data();
      const uint16_t* src = reinterpret_cast<const uint16_t*>(data) + off_elems;
      for (int64_t i = 0; i < size; ++i) dst[i] = fedcmd::simd::half_to_float(src[i]);
      it.keep.push_back(f);
      it.bufs.push_back({dst, Kind::F32});
      k = Kind::F32;
    } else {
      it.bufs.push_back({data + off_elems * static_cast<int64_t>(fedcmd::kind_size(k)), k});
    }
    const Buffer& bb = it.bufs.back();
    for (int64_t i = 0; i < size; ++i) {
      const double x = bb.kind == Kind::F32 ? static_cast<const float*>(bb.data)[i] : static_cast<const double*>(bb.data)[i];
      if (!std::isfinite(x)) value_fail(fn, nm, "contains NaN/Inf (shape " + shape_str(a) + ")");
    }
  };
  if (py::isinstance<py::array>(obj)) {
    py::array a = py::reinterpret_borrow<py::array>(obj);
    require(fn, name, a, item_ndim + 1);
    it.r = item_ndim == 2 ? a.shape(1) : 1;
    it.c = a.shape(item_ndim);
    it.keep.push_back(a);
    for (py::ssize_t j = 0; j < a.shape(0); ++j) add(a, name, static_cast<const char*>(a.data()), j * it.r * it.c);
  } else if (py::isinstance<py::sequence>(obj) && !py::isinstance<py::str>(obj)) {
    py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
    if (seq.size() == 0) value_fail(fn, name, "is an empty sequence");
    for (size_t j = 0; j < seq.size(); ++j) {
      const std::string nm = std::string(name) + "[" + std::to_string(j) + "]";
      py::array a = as_array(fn, nm, seq[j]);
      require(fn, nm, a, item_ndim);
      const int64_t r = item_ndim == 2 ? a.shape(0) : 1, c = a.shape(item_ndim - 1);
      if (j == 0) it.r = r, it.c = c;
      if (r != it.r || c != it.c) value_fail(fn, nm, "has shape " + shape_str(a) + ", unlike " + name + "[0]");
      it.keep.push_back(a);
      add(a, nm, static_cast<const char*>(a.data()), 0);
    }
  } else {
    type_fail(fn, name, "must be an array or a sequence of arrays");
  }
  return it;
}

py::array_t<double> rowwise_mean_cosine_matrix(const py::object& mats, double eps) {
  const char* fn = "rowwise_mean_cosine_matrix";
  if (!std::isfinite(eps) || eps <= 0) throw py::value_error(std::string(fn) + ": eps must be a finite number > 0");
  Items it = collect_items(fn, "mats", mats, 2);
  const int64_t N = static_cast<int64_t>(it.bufs.size());
  py::array_t<double> out({N, N});
  double* o = out.mutable_data();
  py::gil_scoped_release nogil;
  g_kernels.rowwise_mean_cosine(it.bufs.data(), N, it.r, it.c, eps, o);
  return out;
}

py::array_t<double> cosine_similarity_matrix(const py::object& A, double eps) {
  const char* fn = "cosine_similarity_matrix";
  if (!std::isfinite(eps) || eps <= 0) throw py::value_error(std::string(fn) + ": eps must be a finite number > 0");
  Items it = collect_items(fn, "A", A, 1);
  const int64_t N = static_cast<int64_t>(it.bufs.size());
  py::array_t<double> out({N, N});
  double* o = out.mutable_data();
  py::gil_scoped_release nogil;
  g_kernels.rowwise_mean_cosine(it.bufs.data(), N, 1, it.c, eps, o);
  return out;
}

// Runtime ISA dispatch, as NumPy and oneDNN do: every variant built is listed (best first); the first this
// CPU runs is used, unless FEDCMD_ISA names one (portable, avx2, avx512; auto = the default). A variant the
// CPU lacks is never entered, so there is no SIGILL; a FEDCMD_ISA that cannot be honoured is an ImportError.
bool cpu_runs(const std::string& name) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (name == "avx2")
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
           __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  if (name == "avx512")  // x86-64-v4: AVX-512 F, BW, CD, DQ, VL (with the OS saving the zmm state)
    return cpu_runs("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl");
#endif
  return name == "portable";
}

std::vector<Variant> built_variants() {
  std::vector<Variant> out;
#ifdef FEDCMD_HAS_AVX512
  out.push_back(FEDCMD_VARIANT(avx512));
#endif
#ifdef FEDCMD_HAS_AVX2
  out.push_back(FEDCMD_VARIANT(avx2));
#endif
  out.push_back(FEDCMD_VARIANT(portable));
  return out;
}

Variant choose_variant() {
  const char* env = std::getenv("FEDCMD_ISA");
  const std::string want = env ? env : "";
  std::string built, usable;
  for (const Variant& v : built_variants()) {
    built += (built.empty() ? "" : ", ") + std::string(v.name);
    if (cpu_runs(v.name)) usable += (usable.empty() ? "" : ", ") + std::string(v.name);
  }
  for (const Variant& v : built_variants()) {
    if (!cpu_runs(v.name)) continue;
    if (want.empty() || want == "auto" || want == v.name) return v;
  }
  throw py::import_error("FEDCMD_ISA=" + want + ": this build holds " + built + " and this CPU runs " + usable +
                         " (unset FEDCMD_ISA for the best of them)");
}

}  // namespace

#ifdef FEDCMD_WITH_CUDA
void register_cuda(py::module_& m);  // cuda/kernels.cu
#endif

PYBIND11_MODULE(_native, m) {
  g_kernels = choose_variant();
  m.doc() = "Native (C++/OpenMP) kernels of fedcmd_core.kernels; see that module for the contract.";
  m.def("wasserstein_1d", &wasserstein_1d, py::arg("u"), py::arg("v"), py::arg("p"), py::arg("u_weights") = py::none(),
        py::arg("v_weights") = py::none(), "W_p between rows of u [B, n] and v [B, m] (float64), optional weights.");
  m.def("wasserstein_pairwise", &wasserstein_pairwise, py::arg("sketches"), py::arg("p"),
        "[N, N] W_p between rows of sketches [N, n] float64.");
  m.def("sliced_wasserstein", &sliced_wasserstein, py::arg("X"), py::arg("Y"), py::arg("projections"), py::arg("p"),
        py::arg("x_weights") = py::none(), py::arg("y_weights") = py::none(),
        "Sliced W_p of X [n, d], Y [m, d] over unit directions projections [L, d] (float64).");
  m.def("weighted_aggregate", &weighted_aggregate, py::arg("weights"), py::arg("buffers"), py::arg("dtype"),
        py::arg("bf16") = py::none(),
        "[K, P] = weights [K, N] @ buffers; buffers [N, P] or N 1-D float16/32/64 arrays (bf16 flags: bfloat16 bits).");
  m.def("cosine_similarity_matrix", &cosine_similarity_matrix, py::arg("A"), py::arg("eps"));
  m.def("rowwise_mean_cosine_matrix", &rowwise_mean_cosine_matrix, py::arg("mats"), py::arg("eps"));
  m.def(
      "fma_peak_gflops",
      [](int64_t vector_fmas) {
        if (vector_fmas < 1) throw py::value_error("fma_peak_gflops: vector_fmas must be >= 1");
        py::gil_scoped_release unlocked;
        return g_kernels.fma_peak_gflops(vector_fmas);
      },
      py::arg("vector_fmas"), "Measured float32 multiply-add throughput of all kernel threads (G/s).");
  m.def(
      "read_sum",
      [](py::array_t<float, py::array::c_style> x) {
        const float* p = x.data();
        const int64_t n = static_cast<int64_t>(x.size());
        py::gil_scoped_release unlocked;
        return g_kernels.read_sum(p, n);
      },
      py::arg("x"), "Sum of a C-contiguous float32 array on all kernel threads (the read-bandwidth probe).");
  m.attr("variant") = g_kernels.name;
  m.def("max_threads", &fedcmd::max_threads, "OpenMP threads a kernel uses (OMP_NUM_THREADS, else the cores).");
  py::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["isa"] = g_kernels.name;  // the variant in use
  py::list variants, usable;
  for (const Variant& v : built_variants()) {
    variants.append(v.name);
    if (cpu_runs(v.name)) usable.append(v.name);
  }
  info["variants"] = variants;  // built, best first
  info["usable"] = usable;      // of those, what this CPU runs
#if defined(__aarch64__)
  info["arch"] = "aarch64";
#elif defined(__x86_64__)
  info["arch"] = "x86_64";
#else
  info["arch"] = "other";
#endif
  info["vector_lanes"] = g_kernels.vector_lanes();
#ifdef FEDCMD_WITH_CUDA
  info["cuda"] = true;
  register_cuda(m);
#else
  info["cuda"] = false;
#endif
  info["compiler"] = __VERSION__;
  m.attr("build_info") = info;
}
