// The machine's fused multiply-add ceiling, measured: `fedcmd bench kernels` compares the aggregation
// kernel against it. At K = 10 an aggregation is K * N * P multiply-adds, so its time has a floor of
// (K * N * P) / peak whatever the storage type; float16 buffers can only be faster than float32 ones
// where float32 sits above that floor (memory-bound), not where both reach it.
#include <chrono>

#include "kernels.hpp"
#include "simd.hpp"

namespace fedcmd {

double fma_peak_gflops(int64_t vector_fmas) {
  using simd::v8f;
  constexpr int kChains = 10;  // independent accumulators: enough to cover the FMA latency on 2 pipes
  const auto t0 = std::chrono::steady_clock::now();
  double sink = 0;
#pragma omp parallel reduction(+ : sink)
  {
    v8f a[kChains];
    for (int r = 0; r < kChains; ++r) a[r] = v8f{} + static_cast<float>(r) * 1e-3f;
    const v8f x = v8f{} + 0.999f, y = v8f{} + 1e-4f;
    const int64_t steps = vector_fmas / kChains / max_threads();
    for (int64_t i = 0; i < steps; ++i) {
      for (int r = 0; r < kChains; ++r) a[r] = a[r] * x + y;  // contracted to one FMA (-ffp-contract=fast)
    }
    for (int r = 0; r < kChains; ++r) sink += a[r][0];
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return sink == 12345.0 ? 0.0 : static_cast<double>(vector_fmas) * 8 / dt / 1e9;
}

}  // namespace fedcmd
