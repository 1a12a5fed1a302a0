// Weighted aggregation out[K, P] = W[K, N] @ buffers: N separate client buffers, one pass over each.
//
// Each input element is read from memory once and each output written once (no stacking copy).
// The columns are cut into blocks; OpenMP hands the blocks to the threads in small dynamic chunks
// (contiguous runs, and robust to a busy core). Inside a block:
// - the buffers are taken kGroup at a time, as kGroup sequential streams read in place (float16 /
//   bfloat16 widened as they are loaded): with all N buffers interleaved (100 streams) the hardware
//   prefetcher gave up and streaming ran at half speed (measured);
// - a register tile of R output rows x 2 vectors accumulates a group into a per-thread scratch
//   [K, block] with padded rows, copied to the output once per block. Accumulating in the output
//   itself was 1.6x slower at K = 10: its rows are P elements apart (4 MiB for 1M parameters), so
//   every row's column c falls into the same cache set and ten of them overflow the 8 ways;
// - a group of mixed storage kinds (or float64 into a float32 sum) is first staged as T.
// At K = 10 this is as much FMA work as memory traffic on AVX2 (1 G FMA for 100 x 1M), which is why
// float16 storage gains less than the bytes it saves; at K = 1 (FedAvg) it is purely memory-bound.
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
constexpr int64_t kBlockBytes = 128 << 10;  // one block: K accumulator rows + a staged group, in L2
// Multiply-adds (K * N * P) below which one thread does it (~2 ms): a team can wait a scheduler
// time slice for its second thread on a busy machine (see wasserstein.cpp).
constexpr int64_t kParallelMin = 1 << 25;

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

// R output rows over the whole block, for a group of g rows xr[j] stored as KD (converted to T as they
// are loaded, so float16/bfloat16 need no staging copy): a register tile of
// R rows x 2 vectors per column step, initialised from the scratch rows acc[r * S + c] (or zero for
// the first group) and stored back once per group.
template <class T, Kind KD, int R>
__attribute__((noinline)) void tile(const T* Wt, int64_t K, int64_t k0, const void* const* xr, int64_t g,
                                    int64_t whole, T* acc, int64_t S, bool first) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::n;
  for (int64_t c = 0; c < whole; c += 2 * L) {
    V a0[R], a1[R];
    if (first) {
      for (int r = 0; r < R; ++r) a0[r] = a1[r] = V{};
    } else {
      for (int r = 0; r < R; ++r) {
        a0[r] = loadu<V>(acc + (k0 + r) * S + c);
        a1[r] = loadu<V>(acc + (k0 + r) * S + c + L);
      }
    }
    for (int64_t j = 0; j < g; ++j) {
      const V x0 = vload<T, KD>(xr[j], c), x1 = vload<T, KD>(xr[j], c + L);
      // first row tile: one line per row per step, 512 B ahead (+12 % for fp16, +3 % fp32 measured;
      // a hint: reading past the end of the buffer never faults)
      if (k0 == 0) __builtin_prefetch(static_cast<const char*>(xr[j]) + c * kind_size(KD) + 512, 0, 3);
      const T* w = Wt + j * K + k0;
      for (int r = 0; r < R; ++r) {
        a0[r] += w[r] * x0;
        a1[r] += w[r] * x1;
      }
    }
    for (int r = 0; r < R; ++r) {
      storeu(acc + (k0 + r) * S + c, a0[r]);
      storeu(acc + (k0 + r) * S + c + L, a1[r]);
    }
  }
}

// Copy (and widen) elements [0, len) of a buffer stored as KD into dst, as T; the vector body
// handles whole steps, the tail goes one element at a time.
template <class T, Kind KD>
inline void stage_row(const void* src, int64_t len, T* dst) {
  constexpr int L = Lanes<T>::n;
  int64_t c = 0;
  for (; c + L <= len; c += L) storeu(dst + c, vload<T, KD>(src, c));
  for (; c < len; ++c) dst[c] = sload<T>(src, KD, c);
}

template <class T, Kind KD>
inline void tiles_of(int64_t R, const T* Wt, int64_t K, int64_t k0, const void* const* xr, int64_t g, int64_t whole,
                     T* acc, int64_t S, bool first) {
  switch (R) {
    case 1: tile<T, KD, 1>(Wt, K, k0, xr, g, whole, acc, S, first); break;
    case 2: tile<T, KD, 2>(Wt, K, k0, xr, g, whole, acc, S, first); break;
    case 3: tile<T, KD, 3>(Wt, K, k0, xr, g, whole, acc, S, first); break;
    case 4: tile<T, KD, 4>(Wt, K, k0, xr, g, whole, acc, S, first); break;
    default: tile<T, KD, 5>(Wt, K, k0, xr, g, whole, acc, S, first); break;
  }
}

template <class T>
constexpr Kind own_kind() {
  return std::is_same_v<T, float> ? Kind::F32 : Kind::F64;
}

template <class T>
inline void stage_any(const Buffer& b, int64_t p0, int64_t len, T* dst) {
  const char* src = static_cast<const char*>(b.data) + p0 * static_cast<int64_t>(kind_size(b.kind));
  switch (b.kind) {
    case Kind::F16: stage_row<T, Kind::F16>(src, len, dst); break;
    case Kind::BF16: stage_row<T, Kind::BF16>(src, len, dst); break;
    case Kind::F32: stage_row<T, Kind::F32>(src, len, dst); break;
    default: stage_row<T, Kind::F64>(src, len, dst); break;
  }
}

// One block of columns [p0, p0 + len) of all K outputs. Per group of kGroup buffers, their slices are
// first staged into xs (converted to T once, whatever the storage), then every row tile runs over
// them. Everything the FMAs touch (xs, the K accumulator rows) is a small padded L1-resident scratch:
// the buffers themselves come from separate page-aligned allocations and the output rows are P
// elements apart, so read in place they fall into the same few cache sets, which measured 2-5x slower.
template <class T>
void block(const T* Wt, int64_t K, int64_t N, const Buffer* bufs, int64_t p0, int64_t len, int64_t P, T* out,
           T* xs, int64_t XS, T* acc, int64_t S) {
  constexpr int L = Lanes<T>::n;
  const int64_t tiles = (K + kMaxR - 1) / kMaxR;  // balanced row tiles: K = 10 -> 5 + 5
  std::vector<int64_t> k0s(static_cast<size_t>(tiles)), Rs(static_cast<size_t>(tiles));
  for (int64_t t = 0, k0 = 0; t < tiles; ++t) {
    Rs[t] = (K - k0 + (tiles - t) - 1) / (tiles - t);
    k0s[t] = k0;
    k0 += Rs[t];
  }
  const int64_t whole = len / (2 * L) * (2 * L);
  for (int64_t j0 = 0; j0 < N; j0 += kGroup) {
    const int64_t g = std::min(kGroup, N - j0);
    bool uniform = true;
    for (int64_t j = 1; j < g; ++j) uniform &= bufs[j0 + j].kind == bufs[j0].kind;
    // One storage kind in the group (the usual case): read in place. Mixed kinds, or float64 into a
    // float32 sum: stage the group as T first, so the tile is always specialised on one kind.
    const Kind kd = uniform && !(std::is_same_v<T, float> && bufs[j0].kind == Kind::F64) ? bufs[j0].kind : own_kind<T>();
    const void* xr[kGroup];
    for (int64_t j = 0; j < g; ++j) {
      const Buffer& b = bufs[j0 + j];
      if (b.kind == kd) {
        xr[j] = static_cast<const char*>(b.data) + p0 * static_cast<int64_t>(kind_size(kd));
      } else {
        stage_any(b, p0, len, xs + j * XS);
        xr[j] = xs + j * XS;
      }
    }
    const T* w = Wt + j0 * K;
    const bool first = j0 == 0;
    for (int64_t t = 0; t < tiles; ++t) {  // the group's lines stay in L1/L2 across the tiles
      switch (kd) {
        case Kind::F16: tiles_of<T, Kind::F16>(Rs[t], w, K, k0s[t], xr, g, whole, acc, S, first); break;
        case Kind::BF16: tiles_of<T, Kind::BF16>(Rs[t], w, K, k0s[t], xr, g, whole, acc, S, first); break;
        case Kind::F32: tiles_of<T, Kind::F32>(Rs[t], w, K, k0s[t], xr, g, whole, acc, S, first); break;
        default: tiles_of<T, Kind::F64>(Rs[t], w, K, k0s[t], xr, g, whole, acc, S, first); break;
      }
    }
    for (int64_t c = whole; c < len; ++c) {  // ragged tail of the block
      for (int64_t k = 0; k < K; ++k) {
        T a = first ? T(0) : acc[k * S + c];
        for (int64_t j = 0; j < g; ++j) a += w[j * K + k] * sload<T>(xr[j], kd, c);
        acc[k * S + c] = a;
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) std::copy(acc + k * S, acc + k * S + len, out + k * P + p0);
}

template <class T>
void aggregate(const double* W, int64_t K, int64_t N, const Buffer* bufs, int64_t P, T* out) {
  // Weights transposed to [N, K] in the accumulation type: the R weights of one buffer are adjacent.
  std::vector<T> Wt(static_cast<size_t>(N * K));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j) Wt[j * K + k] = static_cast<T>(W[k * N + j]);
  // Block width: the K accumulator rows and one staged group fit in L2 (a software prefetch of the
  // next block and smaller, L1-sized blocks both measured slower: long runs suit the prefetcher).
  constexpr int L2 = 2 * Lanes<T>::n;
  int64_t Pb = kBlockBytes / ((K + kGroup) * static_cast<int64_t>(sizeof(T)));
  Pb = std::clamp<int64_t>(Pb / L2 * L2, 4 * L2, 8192);
  Pb = std::min(Pb, P);
  const int64_t S = Pb + 2 * L2, XS = Pb + L2;  // padded strides: consecutive rows in different sets
  const int64_t blocks = (P + Pb - 1) / Pb;

#pragma omp parallel if (K * N * P >= kParallelMin && blocks > 1)
  {
    std::vector<T> xs(static_cast<size_t>(kGroup * XS)), acc(static_cast<size_t>(K * S));
#pragma omp for schedule(dynamic, 16)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t p0 = b * Pb;
      block(Wt.data(), K, N, bufs, p0, std::min(Pb, P - p0), P, out, xs.data(), XS, acc.data(), S);
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
