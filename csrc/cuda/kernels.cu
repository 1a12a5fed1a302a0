// Optional CUDA versions of the two heavy kernels, built only with -DFEDCMD_CUDA=ON (fixed
// architectures, FEDCMD_CUDA_ARCHITECTURES in CMakeLists.txt). They are explicit entry points
// (_native.cuda_wasserstein_pairwise, _native.cuda_weighted_aggregate), not a dispatch target of
// fedcmd_core.kernels: the callers hold host (NumPy / CPU torch) arrays, and for one call the
// host<->device copies cost more than the CPU kernel. They serve a GPU server that batches many
// comparisons; tests/test_native_kernels.py checks them against the CPU kernels when a GPU exists.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("CUDA ") + what + ": " + cudaGetErrorString(e));
}

// Device buffer freed on every path out (exceptions included).
template <class T>
struct DeviceArray {
  T* ptr = nullptr;
  explicit DeviceArray(size_t n) { check(cudaMalloc(&ptr, n * sizeof(T)), "cudaMalloc"); }
  ~DeviceArray() { cudaFree(ptr); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

py::array checked(const py::handle& obj, const char* fn, const std::string& name, char kind, int itemsize, int ndim) {
  if (!py::isinstance<py::array>(obj)) throw py::type_error(std::string(fn) + ": " + name + " must be a numpy.ndarray");
  py::array a = py::reinterpret_borrow<py::array>(obj);
  if (a.dtype().kind() != kind || a.dtype().itemsize() != itemsize)
    throw py::type_error(std::string(fn) + ": " + name + " has dtype " + std::string(py::str(a.dtype())) +
                         (itemsize == 8 ? ", expected float64" : ", expected float32"));
  if (a.ndim() != ndim || !(a.flags() & py::array::c_style) || a.size() == 0)
    throw py::value_error(std::string(fn) + ": " + name + " must be a non-empty C-contiguous " + std::to_string(ndim) +
                          "-D array");
  return a;
}

// One block per pair (i, j), i < j: threads stride over the sorted samples, then a block reduction.
__global__ void pairwise_kernel(const double* s, int64_t N, int64_t n, double p, double* out) {
  const int64_t i = blockIdx.y, j = blockIdx.x;
  if (i >= j || j >= N) return;
  double acc = 0;
  for (int64_t k = threadIdx.x; k < n; k += blockDim.x) {
    const double d = fabs(s[i * n + k] - s[j * n + k]);
    acc += p == 1.0 ? d : (p == 2.0 ? d * d : pow(d, p));
  }
  __shared__ double red[256];
  red[threadIdx.x] = acc;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double m = red[0] / static_cast<double>(n);
    const double v = p == 1.0 ? m : pow(m, 1.0 / p);
    out[i * N + j] = v;
    out[j * N + i] = v;
  }
}

// One thread per column p: all K outputs of that column from the N client rows (coalesced reads).
__global__ void aggregate_kernel(const float* W, int64_t K, int64_t N, const float* X, int64_t P, float* out) {
  const int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (p >= P) return;
  for (int64_t k = 0; k < K; ++k) {
    float acc = 0.f;
    for (int64_t j = 0; j < N; ++j) acc = fmaf(W[k * N + j], X[j * P + p], acc);
    out[k * P + p] = acc;
  }
}

py::array_t<double> cuda_wasserstein_pairwise(const py::object& obj, double p) {
  const char* fn = "cuda_wasserstein_pairwise";
  if (!std::isfinite(p) || p < 1) throw py::value_error(std::string(fn) + ": p must be a finite number >= 1");
  py::array S = checked(obj, fn, "sketches", 'f', 8, 2);
  const int64_t N = S.shape(0), n = S.shape(1);
  std::vector<double> sorted(static_cast<const double*>(S.data()), static_cast<const double*>(S.data()) + N * n);
  for (int64_t i = 0; i < N * n; ++i)
    if (!std::isfinite(sorted[i])) throw py::value_error(std::string(fn) + ": sketches contains NaN/Inf");
  py::array_t<double> out({N, N});
  double* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    for (int64_t i = 0; i < N; ++i) std::sort(sorted.begin() + i * n, sorted.begin() + (i + 1) * n);
    DeviceArray<double> ds(N * n), dout(N * N);
    check(cudaMemcpy(ds.ptr, sorted.data(), N * n * sizeof(double), cudaMemcpyHostToDevice), "copy in");
    check(cudaMemset(dout.ptr, 0, N * N * sizeof(double)), "memset");
    pairwise_kernel<<<dim3(static_cast<unsigned>(N), static_cast<unsigned>(N)), 256>>>(ds.ptr, N, n, p, dout.ptr);
    check(cudaGetLastError(), "pairwise kernel");
    check(cudaMemcpy(o, dout.ptr, N * N * sizeof(double), cudaMemcpyDeviceToHost), "copy out");
  }
  return out;
}

py::array_t<float> cuda_weighted_aggregate(const py::object& w_obj, const py::sequence& buffers) {
  const char* fn = "cuda_weighted_aggregate";
  py::array w = checked(w_obj, fn, "weights", 'f', 8, 2);
  const int64_t K = w.shape(0), N = w.shape(1);
  if (static_cast<int64_t>(buffers.size()) != N)
    throw py::value_error(std::string(fn) + ": weights has " + std::to_string(N) + " columns for " +
                          std::to_string(buffers.size()) + " buffers");
  std::vector<py::array> bufs;
  for (int64_t j = 0; j < N; ++j) {
    bufs.push_back(checked(buffers[j], fn, "buffers[" + std::to_string(j) + "]", 'f', 4, 1));
    if (bufs[j].shape(0) != bufs[0].shape(0))
      throw py::value_error(std::string(fn) + ": buffers[" + std::to_string(j) + "] differs in length from buffers[0]");
  }
  const int64_t P = bufs[0].shape(0);
  std::vector<float> w32(static_cast<size_t>(K * N));
  const double* wp = static_cast<const double*>(w.data());
  for (int64_t i = 0; i < K * N; ++i) w32[i] = static_cast<float>(wp[i]);
  py::array_t<float> out({K, P});
  float* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    DeviceArray<float> dw(K * N), dx(N * P), dout(K * P);
    check(cudaMemcpy(dw.ptr, w32.data(), K * N * sizeof(float), cudaMemcpyHostToDevice), "copy weights");
    for (int64_t j = 0; j < N; ++j)  // separate host buffers land in one device matrix
      check(cudaMemcpy(dx.ptr + j * P, bufs[j].data(), P * sizeof(float), cudaMemcpyHostToDevice), "copy buffer");
    const unsigned blocks = static_cast<unsigned>((P + 255) / 256);
    aggregate_kernel<<<blocks, 256>>>(dw.ptr, K, N, dx.ptr, P, dout.ptr);
    check(cudaGetLastError(), "aggregate kernel");
    check(cudaMemcpy(o, dout.ptr, K * P * sizeof(float), cudaMemcpyDeviceToHost), "copy out");
  }
  return out;
}

int cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;  // no driver / no device: 0, never an error
}

}  // namespace

void register_cuda(py::module_& m) {
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices visible (0 without a driver or GPU).");
  m.def("cuda_wasserstein_pairwise", &cuda_wasserstein_pairwise, py::arg("sketches"), py::arg("p"),
        "[N, N] W_p between rows of sketches [N, n] float64, pairs on the GPU.");
  m.def("cuda_weighted_aggregate", &cuda_weighted_aggregate, py::arg("weights"), py::arg("buffers"),
        "[K, P] float32 = weights [K, N] @ N float32 buffers, on the GPU.");
}
