// The machine's fused multiply-add ceiling, measured: `fedcmd bench kernels` compares the aggregation
// kernel against it. At K = 10 an aggregation is K * N * P multiply-adds, so its time has a floor of
// (K * N * P) / peak whatever the storage type; float16 buffers can only be faster than float32 ones
// where float32 sits above that floor (memory-bound), not where both reach it.
#include <algorithm>
#include <chrono>

#include "kernels.hpp"
#include "simd.hpp"

namespace fedcmd {
namespace FEDCMD_ISA {  // one copy of this file per ISA variant (kernels.hpp)

#if defined(__AVX512F__)
using Vec = simd::v16f;  // the avx512 variant's kernels run on 512-bit vectors: so does its ceiling
constexpr int kLanes = 16;
#else
using Vec = simd::v8f;
constexpr int kLanes = 8;
#endif

int vector_lanes() { return kLanes; }

// Read bandwidth probe: every thread sums its share of x with independent vector accumulators (one add
// per element loaded: far below the add throughput, so the time is the reading). Returns the sum so that
// nothing is optimised away; the caller times it.
double read_sum(const float* x, int64_t n) {
  double total = 0;
#pragma omp parallel for schedule(static) reduction(+ : total)
  for (int64_t b = 0; b < (n + 65535) / 65536; ++b) {
    const int64_t lo = b * 65536, hi = std::min(n, lo + 65536);
    Vec a[4] = {};
    int64_t i = lo;
    for (; i + 4 * kLanes <= hi; i += 4 * kLanes)
      for (int r = 0; r < 4; ++r) a[r] += simd::loadu<Vec>(x + i + r * kLanes);
    double s = 0;
    for (int r = 0; r < 4; ++r)
      for (int q = 0; q < kLanes; ++q) s += a[r][q];
    for (; i < hi; ++i) s += x[i];
    total += s;
  }
  return total;
}

double fma_peak_gflops(int64_t vector_fmas) {
  constexpr int kChains = 10;  // independent accumulators: enough to cover the FMA latency on 2 pipes
  const auto t0 = std::chrono::steady_clock::now();
  double sink = 0;
#pragma omp parallel reduction(+ : sink)
  {
    Vec a[kChains];
    for (int r = 0; r < kChains; ++r) a[r] = Vec{} + static_cast<float>(r) * 1e-3f;
    const Vec x = Vec{} + 0.999f, y = Vec{} + 1e-4f;
    const int64_t steps = vector_fmas / kChains / max_threads();
    for (int64_t i = 0; i < steps; ++i) {
      for (int r = 0; r < kChains; ++r) a[r] = a[r] * x + y;  // contracted to one FMA (-ffp-contract=fast)
    }
    for (int r = 0; r < kChains; ++r) sink += a[r][0];
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return sink == 12345.0 ? 0.0 : static_cast<double>(vector_fmas) * kLanes / dt / 1e9;
}

}  // namespace FEDCMD_ISA
}  // namespace fedcmd
