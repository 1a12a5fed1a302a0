// Weighted aggregation out[K, P] = W[K, N] @ buffers: N separate client buffers, one pass over each.
//
// Each input element is read from memory once and each output written once (no stacking copy).
// The columns are cut into blocks whose K output rows fit in L2; OpenMP hands the blocks to the
// threads in small dynamic chunks (contiguous runs, and robust to a busy core). Inside a block the
// buffers are taken kGroup at a time, as kGroup sequential streams: with all N buffers interleaved
// (100 streams) the hardware prefetcher gives up and streaming ran at half speed (measured). A
// register tile of R output rows x 2 vectors accumulates a group; the first group initialises the
// outputs, the others add to them. At K = 10 this is as much FMA work as memory traffic on AVX2
// (1 G FMA for 100 x 1M), which is why float16 storage gains less than the bytes it saves.
#include <algorithm>
#include <type_traits>
#include <vector>

#include "kernels.hpp"
#include "simd.hpp"

namespace fedcmd {
namespace {

using namespace simd;

constexpr int kMaxR = 5;                   // 2*R accumulators + 2 inputs + 1 broadcast <= 16 AVX2 registers
constexpr int64_t kGroup = 8;              // buffers streamed together: few enough for the hardware prefetcher
constexpr int64_t kOutBlockBytes = 96 << 10;  // the K output rows of one column block: stays in L2
constexpr int64_t kParallelMin = 1 << 21;  // multiply-adds (K * N * P) below which one thread is safer

template <class T>
struct Lanes;
template <>
struct Lanes<float> {
  using V = v8f;
  static constexpr int n = 8;
};
template <>
struct Lanes<double> {
  using V = v4d;
  static constexpr int n = 4;
};

// Load one vector of T at element index i of a buffer stored as KD.
template <class T, Kind KD>
inline typename Lanes<T>::V vload(const void* base, int64_t i) {
  using V = typename Lanes<T>::V;
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (KD == Kind::F32) return loadu<V>(static_cast<const float*>(base) + i);
    if constexpr (KD == Kind::F16) return load8_f16(static_cast<const uint16_t*>(base) + i);
    if constexpr (KD == Kind::BF16) return load8_bf16(static_cast<const uint16_t*>(base) + i);
    if constexpr (KD == Kind::F64) {
      const double* d = static_cast<const double*>(base) + i;
      V r;
      for (int q = 0; q < 8; ++q) r[q] = static_cast<float>(d[q]);
      return r;
    }
  } else {
    if constexpr (KD == Kind::F64) return loadu<V>(static_cast<const double*>(base) + i);
    if constexpr (KD == Kind::F32) return __builtin_convertvector(loadu<v4f>(static_cast<const float*>(base) + i), v4d);
    if constexpr (KD == Kind::F16) return __builtin_convertvector(load4_f16(static_cast<const uint16_t*>(base) + i), v4d);
    if constexpr (KD == Kind::BF16)
      return __builtin_convertvector(load4_bf16(static_cast<const uint16_t*>(base) + i), v4d);
  }
}

template <class T>
inline T sload(const void* base, Kind kd, int64_t i) {
  switch (kd) {
    case Kind::F16:
      return static_cast<T>(half_to_float(static_cast<const uint16_t*>(base)[i]));
    case Kind::BF16:
      return static_cast<T>(bf16_to_float(static_cast<const uint16_t*>(base)[i]));
    case Kind::F32:
      return static_cast<T>(static_cast<const float*>(base)[i]);
    default:
      return static_cast<T>(static_cast<const double*>(base)[i]);
  }
}

// out rows k0..k0+R-1, columns [0, len) of the block: rows[j] point at the block's first element.
template <class T, Kind KD, int R>
void tile(const T* Wt, int64_t K, int64_t k0, const void* const* rows, int64_t N, int64_t len, T* out, int64_t P,
          bool accumulate) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::n;
  int64_t c = 0;
  for (; c + 2 * L <= len; c += 2 * L) {
    V a0[R], a1[R];
    if (accumulate) {
      for (int r = 0; r < R; ++r) {
        a0[r] = loadu<V>(out + (k0 + r) * P + c);
        a1[r] = loadu<V>(out + (k0 + r) * P + c + L);
      }
    } else {
      for (int r = 0; r < R; ++r) a0[r] = a1[r] = V{};
    }
    for (int64_t j = 0; j < N; ++j) {
      const void* row = rows[j];
      const V x0 = vload<T, KD>(row, c), x1 = vload<T, KD>(row, c + L);
      const T* w = Wt + j * K + k0;
      for (int r = 0; r < R; ++r) {
        a0[r] += w[r] * x0;
        a1[r] += w[r] * x1;
      }
    }
    for (int r = 0; r < R; ++r) {
      storeu(out + (k0 + r) * P + c, a0[r]);
      storeu(out + (k0 + r) * P + c + L, a1[r]);
    }
  }
  for (; c < len; ++c) {  // ragged tail of the block
    T acc[R] = {};
    if (accumulate)
      for (int r = 0; r < R; ++r) acc[r] = out[(k0 + r) * P + c];
    for (int64_t j = 0; j < N; ++j) {
      const T x = sload<T>(rows[j], KD, c);
      for (int r = 0; r < R; ++r) acc[r] += Wt[j * K + k0 + r] * x;
    }
    for (int r = 0; r < R; ++r) out[(k0 + r) * P + c] = acc[r];
  }
}

template <class T, Kind KD>
void block_rows(const T* Wt, int64_t K, const void* const* rows, int64_t N, int64_t len, T* out, int64_t P,
                bool acc) {
  // Row tiles of balanced size <= kMaxR (K = 10 -> 5 + 5); the later tiles find the group's
  // columns in L1/L2.
  const int64_t tiles = (K + kMaxR - 1) / kMaxR;
  int64_t k0 = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t R = (K - k0 + (tiles - t) - 1) / (tiles - t);
    switch (R) {
      case 1: tile<T, KD, 1>(Wt, K, k0, rows, N, len, out, P, acc); break;
      case 2: tile<T, KD, 2>(Wt, K, k0, rows, N, len, out, P, acc); break;
      case 3: tile<T, KD, 3>(Wt, K, k0, rows, N, len, out, P, acc); break;
      case 4: tile<T, KD, 4>(Wt, K, k0, rows, N, len, out, P, acc); break;
      default: tile<T, KD, 5>(Wt, K, k0, rows, N, len, out, P, acc); break;
    }
    k0 += R;
  }
}

template <class T>
constexpr Kind native_kind() {
  return std::is_same_v<T, float> ? Kind::F32 : Kind::F64;
}

template <class T>
void aggregate(const double* W, int64_t K, int64_t N, const Buffer* bufs, int64_t P, T* out) {
  // Weights transposed to [N, K] in the accumulation type: the R weights of one buffer are adjacent.
  std::vector<T> Wt(static_cast<size_t>(N * K));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j) Wt[j * K + k] = static_cast<T>(W[k * N + j]);

  bool uniform = true;
  for (int64_t j = 1; j < N; ++j) uniform &= bufs[j].kind == bufs[0].kind;
  // Mixed storage (or float64 buffers into a float32 sum) goes through a per-block staging copy in
  // T, so the hot loop is always specialised on one storage kind.
  const Kind kd = uniform && !(std::is_same_v<T, float> && bufs[0].kind == Kind::F64) ? bufs[0].kind : native_kind<T>();
  const bool staged = kd != bufs[0].kind || !uniform;
  constexpr int L2 = 2 * Lanes<T>::n;
  int64_t Pb = kOutBlockBytes / (K * static_cast<int64_t>(sizeof(T)));
  Pb = std::clamp<int64_t>(Pb / L2 * L2, 16 * L2, 8192);
  Pb = std::min(Pb, P);
  const int64_t blocks = (P + Pb - 1) / Pb;

#pragma omp parallel if (K * N * P >= kParallelMin && blocks > 1)
  {
    std::vector<const void*> rows(static_cast<size_t>(N));
    std::vector<T> scratch(staged ? static_cast<size_t>(N * Pb) : 0);
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t p0 = b * Pb, len = std::min(Pb, P - p0);
      for (int64_t j = 0; j < N; ++j) {
        const Buffer& buf = bufs[j];
        const char* base = static_cast<const char*>(buf.data) + p0 * static_cast<int64_t>(kind_size(buf.kind));
        if (staged && buf.kind != kd) {
          T* dst = scratch.data() + j * Pb;
          for (int64_t c = 0; c < len; ++c) dst[c] = sload<T>(base, buf.kind, c);
          rows[j] = dst;
        } else {
          rows[j] = base;
        }
      }
      T* o = out + p0;
      for (int64_t j0 = 0; j0 < N; j0 += kGroup) {
        const int64_t g = std::min(kGroup, N - j0);
        const T* w = Wt.data() + j0 * K;
        const void* const* rr = rows.data() + j0;
        const bool acc = j0 > 0;
        switch (kd) {
          case Kind::F16: block_rows<T, Kind::F16>(w, K, rr, g, len, o, P, acc); break;
          case Kind::BF16: block_rows<T, Kind::BF16>(w, K, rr, g, len, o, P, acc); break;
          case Kind::F32: block_rows<T, Kind::F32>(w, K, rr, g, len, o, P, acc); break;
          default: block_rows<T, Kind::F64>(w, K, rr, g, len, o, P, acc); break;
        }
      }
    }
  }
}

}  // namespace

void weighted_aggregate(const double* W, int64_t K, int64_t N, const Buffer* bufs, int64_t P, float* out) {
  aggregate<float>(W, K, N, bufs, P, out);
}

void weighted_aggregate(const double* W, int64_t K, int64_t N, const Buffer* bufs, int64_t P, double* out) {
  aggregate<double>(W, K, N, bufs, P, out);
}

}  // namespace fedcmd
