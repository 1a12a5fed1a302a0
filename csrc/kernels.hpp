// Native kernels of fedcmd_core.kernels: the plain C++ API that bindings.cpp wraps.
//
// Every function here trusts its arguments (shapes, finiteness, non-null pointers): bindings.cpp
// checks them before it releases the GIL and calls in. The NumPy reference is
// fedcmd_core/kernels/fallback.py; each function names the fallback function it must equal.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fedcmd {

// Storage type of one client buffer / one similarity input.
enum class Kind : int { F16 = 0, BF16 = 1, F32 = 2, F64 = 3 };

inline std::size_t kind_size(Kind k) { return k == Kind::F64 ? 8 : (k == Kind::F32 ? 4 : 2); }

struct Buffer {
  const void* data;
  Kind kind;
};

// Every kernel source is compiled once per ISA variant (CMakeLists.txt: portable everywhere; avx2 and
// avx512 on x86-64), each into its own namespace fedcmd::<variant>; bindings.cpp picks one variant at
// import from the CPU's features (or FEDCMD_ISA). FEDCMD_ISA names the variant being compiled.
#define FEDCMD_KERNEL_API                                                                                          \
  void wasserstein_1d(const double* u, const double* v, int64_t B, int64_t n, int64_t m, double p, const double* uw,  \
                      const double* vw, double* out);                                                               \
  void wasserstein_pairwise(const double* S, int64_t N, int64_t n, double p, double* out);                          \
  double sliced_wasserstein(const double* X, int64_t n, const double* Y, int64_t m, int64_t d, const double* theta, \
                            int64_t L, double p, const double* xw, const double* yw);                              \
  void weighted_aggregate(const double* W, int64_t K, int64_t N, const Buffer* bufs, int64_t P, float* out);        \
  void weighted_aggregate(const double* W, int64_t K, int64_t N, const Buffer* bufs, int64_t P, double* out);       \
  void rowwise_mean_cosine(const Buffer* items, int64_t N, int64_t r, int64_t c, double eps, double* out);          \
  double fma_peak_gflops(int64_t vector_fmas);                                                                      \
  double read_sum(const float* x, int64_t n);                                                                       \
  int vector_lanes();

#ifdef FEDCMD_ISA
namespace FEDCMD_ISA {
// ---- wasserstein.cpp
// W_p between rows of u [B, n] and v [B, m] (optional weights, same shapes, >= 0, positive totals).
void wasserstein_1d(const double* u, const double* v, int64_t B, int64_t n, int64_t m, double p, const double* uw,
                    const double* vw, double* out);
// [N, N] W_p between the rows of S [N, n] (uniform weights): sort once, O(n) per pair.
void wasserstein_pairwise(const double* S, int64_t N, int64_t n, double p, double* out);
// Sliced W_p: (mean over the L unit directions theta [L, d] of W_p^p of the projections)^(1/p).
double sliced_wasserstein(const double* X, int64_t n, const double* Y, int64_t m, int64_t d, const double* theta,
                          int64_t L, double p, const double* xw, const double* yw);

// ---- aggregate.cpp
// out [K, P] = W [K, N] @ buffers (N rows of P elements), accumulated in float / double.
void weighted_aggregate(const double* W, int64_t K, int64_t N, const Buffer* bufs, int64_t P, float* out);
void weighted_aggregate(const double* W, int64_t K, int64_t N, const Buffer* bufs, int64_t P, double* out);

// ---- similarity.cpp
// out [N, N]: mean over the r rows of cos(item_i[k], item_j[k]); items are N contiguous [r, c] blocks.
void rowwise_mean_cosine(const Buffer* items, int64_t N, int64_t r, int64_t c, double eps, double* out);

// ---- peak.cpp
// Measured fused multiply-add throughput of all OpenMP threads, in GFLOP-lanes/s (float32 multiply-adds per
// second / 1e9), from `vector_fmas` FMAs of vector_lanes() lanes in independent register chains.
double fma_peak_gflops(int64_t vector_fmas);
// float32 lanes of this variant's widest vectors (8 for AVX2, 16 for AVX-512, 8 portable)
int vector_lanes();
// Sum of x[0, n) over all OpenMP threads: the read-bandwidth probe of `fedcmd bench kernels`' roofline.
double read_sum(const float* x, int64_t n);

}  // namespace FEDCMD_ISA
#endif

// ---- bindings.cpp helpers shared by the kernels
int max_threads();

}  // namespace fedcmd
