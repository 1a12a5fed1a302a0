// Weighted aggregation out[K, P] = W[K, N] @ buffers: N separate client buffers, one pass over each.
//
// Each input element is read from memory once and each output written once (no stacking copy).
// The columns are cut into blocks, which OpenMP hands to the threads in small dynamic chunks. Inside
// a block, per column step of two vectors (16 floats):
// - the buffers are taken kGroup = 8 at a time, as 8 sequential streams read in place (float16 /
//   bfloat16 widened as they are loaded): with all N buffers interleaved (100 streams) the hardware
//   prefetcher gave up and streaming ran at half speed, and 16 streams measured 10-25 % slower than 8;
//   a short last group (N % 8) is padded with zero rows to 4 or 8, so every loop is unrolled;
// - every row tile (R <= 5 output rows x 2 vectors: 10 accumulators + 2 inputs + 1 broadcast of the
//   16 AVX2 registers) runs on this step before the next step starts (K = 10: tiles 5 + 5), so the
//   group's input lines come from memory once and the later tiles re-read (re-widen) them from L1;
// - the accumulators of a block live in a per-thread scratch laid out [step][K][16]: the K rows of
//   one step are adjacent lines at constant offsets (no cache-set conflicts between rows, which sit
//   P elements apart in the output), copied to the output rows once per block;
// - weights are packed per group and row tile, so the unrolled loop reads them at fixed offsets;
// - float32 blocks start on a 4 KiB boundary of the first buffer: NumPy buffers share their offset
//   within a page (16), so all vector loads are aligned and none straddles two cache lines (-7 %);
// - a group of mixed storage kinds (or float64 into a float32 sum) is first staged as T.
//
// Measured (AMD EPYC, 2 cores AVX2; K = 10, N = 100 x 2^20; one thread, CPU time, same process):
//                       previous kernel          this one
//   float32             47 ms                    35 ms   (30 G multiply-adds/s)
//   float16             41-44 ms                 32 ms   (33 G/s)
//   K = 1 f32 / f16     19.5 / 10.5 ms           17.8 / 9.7 ms
// against a measured peak of 49-51 G multiply-adds/s per core: the unrolled step reaches ~41 G/s
// with its data in L1 (loads: 7 per 10 multiply-adds; 5x2 beat 10x1, 6x2, 4x3 and 3x4 tiles) and
// ~36 G/s with it in cache; streaming costs float16 ~10 % and float32 ~15 % more. Software prefetch
// (ahead in the stream, or the next group's block, into L1 or L2) measured 0-15 % slower. At K = 10
// the work is K * N * P = 1.05 G multiply-adds whatever the storage type (21 ms on one core at peak,
// 10.5 ms on two), while one core reads at ~25 GB/s (400 MB of float32 in 16 ms): both storage
// kinds are bound by the arithmetic, and float16 gains only the streaming share (~1.1x). At K = 1
// (FedAvg) the kernel is memory-bound and float16 is ~1.8x faster. Two-thread timings on that machine
// share it with two background processes of another session: with autogroup scheduling their nice
// does not apply across sessions, so a 2-thread team gets about one core (fma_peak_gflops 43-48 G/s).
#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "kernels.hpp"
#include "simd.hpp"

namespace fedcmd {
namespace FEDCMD_ISA {  // one copy of this file per ISA variant (kernels.hpp)
namespace {

using namespace simd;

#if defined(__AVX512F__)
constexpr int kMaxR = 10;  // 2*R accumulators + 2 inputs + 1 broadcast <= 32 AVX-512 registers (K = 10: one tile)
#else
constexpr int kMaxR = 5;                    // 2*R accumulators + 2 inputs + 1 broadcast <= 16 AVX2 registers
#endif
constexpr int64_t kGroup = 8;               // buffers streamed together: few enough for the hardware prefetcher
constexpr int64_t kAccBytes = 96 << 10;     // accumulators of one block, in L2 (K = 10: 2048 columns)
constexpr int64_t kPage = 4096;
// Multiply-adds (K * N * P) below which one thread does it (~2 ms): a team can wait a scheduler
// time slice for its second thread on a busy machine (see wasserstein.cpp).
constexpr int64_t kParallelMin = 1 << 25;

template <class T>
struct Lanes;
#if defined(__AVX512F__)
template <>
struct Lanes<float> {
  using V = v16f;
  static constexpr int n = 16;
};
template <>
struct Lanes<double> {
  using V = v8d;
  static constexpr int n = 8;
};
#else
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
#endif
template <class T>
constexpr int64_t kStep = 2 * Lanes<T>::n;  // columns per step: two vectors

// Load one vector of T at element index i of a buffer stored as KD.
template <class T, Kind KD>
inline typename Lanes<T>::V vload(const void* base, int64_t i) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::n;
  if constexpr (std::is_same_v<T, float>) {
    if constexpr (KD == Kind::F32) return loadu<V>(static_cast<const float*>(base) + i);
#if defined(__AVX512F__)
    if constexpr (KD == Kind::F16) return load16_f16(static_cast<const uint16_t*>(base) + i);
    if constexpr (KD == Kind::BF16) return load16_bf16(static_cast<const uint16_t*>(base) + i);
#else
    if constexpr (KD == Kind::F16) return load8_f16(static_cast<const uint16_t*>(base) + i);
    if constexpr (KD == Kind::BF16) return load8_bf16(static_cast<const uint16_t*>(base) + i);
#endif
    if constexpr (KD == Kind::F64) {
      const double* d = static_cast<const double*>(base) + i;
      V r;
      for (int q = 0; q < L; ++q) r[q] = static_cast<float>(d[q]);
      return r;
    }
  } else {
#if defined(__AVX512F__)
    if constexpr (KD == Kind::F64) return loadu<V>(static_cast<const double*>(base) + i);
    if constexpr (KD == Kind::F32) return __builtin_convertvector(loadu<v8f>(static_cast<const float*>(base) + i), v8d);
    if constexpr (KD == Kind::F16) return __builtin_convertvector(load8_f16(static_cast<const uint16_t*>(base) + i), v8d);
    if constexpr (KD == Kind::BF16)
      return __builtin_convertvector(load8_bf16(static_cast<const uint16_t*>(base) + i), v8d);
#else
    if constexpr (KD == Kind::F64) return loadu<V>(static_cast<const double*>(base) + i);
    if constexpr (KD == Kind::F32) return __builtin_convertvector(loadu<v4f>(static_cast<const float*>(base) + i), v4d);
    if constexpr (KD == Kind::F16) return __builtin_convertvector(load4_f16(static_cast<const uint16_t*>(base) + i), v4d);
    if constexpr (KD == Kind::BF16)
      return __builtin_convertvector(load4_bf16(static_cast<const uint16_t*>(base) + i), v4d);
#endif
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

// One step (column c) of one row tile: R rows x 2 vectors in registers, summed over the group's
// buffers xr[0, G) with weights w[j * R + r]; a = this step's first row of the tile in the scratch
// (row r at a + r * kStep).
template <class T, Kind KD, int R, int G, bool First>
__attribute__((always_inline)) inline void tile_step(const T* w, const void* const* xr, int64_t c, T* a) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::n;
  V a0[R], a1[R];
  for (int r = 0; r < R; ++r) {
    a0[r] = First ? V{} : loadu<V>(a + r * kStep<T>);
    a1[r] = First ? V{} : loadu<V>(a + r * kStep<T> + L);
  }
#pragma GCC unroll 8
  for (int j = 0; j < G; ++j) {
    const V x0 = vload<T, KD>(xr[j], c), x1 = vload<T, KD>(xr[j], c + L);
    for (int r = 0; r < R; ++r) {
      a0[r] += w[j * R + r] * x0;
      a1[r] += w[j * R + r] * x1;
    }
  }
  for (int r = 0; r < R; ++r) {
    storeu(a + r * kStep<T>, a0[r]);
    storeu(a + r * kStep<T> + L, a1[r]);
  }
}

// All K rows of one group of G buffers over `steps` column steps: per step, n1 tiles of R rows then
// n2 tiles of R - 1 rows (weights packed in that order, G * R per tile).
template <class T, Kind KD, int R, int G, bool First>
__attribute__((noinline)) void pass(const T* w, const void* const* xr, int64_t steps, T* acc, int64_t K, int n1,
                                    int n2) {
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t c = s * kStep<T>;
    T* a = acc + s * K * kStep<T>;
    const T* wt = w;
    for (int t = 0; t < n1; ++t, wt += G * R, a += R * kStep<T>) tile_step<T, KD, R, G, First>(wt, xr, c, a);
    if constexpr (R > 1)
      for (int t = 0; t < n2; ++t, wt += G * (R - 1), a += (R - 1) * kStep<T>)
        tile_step<T, KD, R - 1, G, First>(wt, xr, c, a);
  }
}

template <class T, Kind KD, int R>
void pass_g(const T* w, const void* const* xr, int64_t g, int64_t steps, T* acc, int64_t K, int n1, int n2,
            bool first) {
  if (g == kGroup) {
    if (first) pass<T, KD, R, kGroup, true>(w, xr, steps, acc, K, n1, n2);
    else pass<T, KD, R, kGroup, false>(w, xr, steps, acc, K, n1, n2);
  } else {  // the last group of N % kGroup buffers, padded to kGroup / 2
    if (first) pass<T, KD, R, kGroup / 2, true>(w, xr, steps, acc, K, n1, n2);
    else pass<T, KD, R, kGroup / 2, false>(w, xr, steps, acc, K, n1, n2);
  }
}

template <class T, Kind KD>
void pass_r(int R, const T* w, const void* const* xr, int64_t g, int64_t steps, T* acc, int64_t K, int n1, int n2,
            bool first) {
  switch (R) {
    case 1: pass_g<T, KD, 1>(w, xr, g, steps, acc, K, n1, n2, first); break;
    case 2: pass_g<T, KD, 2>(w, xr, g, steps, acc, K, n1, n2, first); break;
    case 3: pass_g<T, KD, 3>(w, xr, g, steps, acc, K, n1, n2, first); break;
    case 4: pass_g<T, KD, 4>(w, xr, g, steps, acc, K, n1, n2, first); break;
#if defined(__AVX512F__)
    case 5: pass_g<T, KD, 5>(w, xr, g, steps, acc, K, n1, n2, first); break;
    case 6: pass_g<T, KD, 6>(w, xr, g, steps, acc, K, n1, n2, first); break;
    case 7: pass_g<T, KD, 7>(w, xr, g, steps, acc, K, n1, n2, first); break;
    case 8: pass_g<T, KD, 8>(w, xr, g, steps, acc, K, n1, n2, first); break;
    case 9: pass_g<T, KD, 9>(w, xr, g, steps, acc, K, n1, n2, first); break;
    default: pass_g<T, KD, 10>(w, xr, g, steps, acc, K, n1, n2, first); break;
#else
    default: pass_g<T, KD, 5>(w, xr, g, steps, acc, K, n1, n2, first); break;
#endif
  }
}

// Copy (and widen) elements [0, len) of a buffer stored as KD into dst, as T; the vector body
// handles whole vectors, the tail goes one element at a time.
template <class T, Kind KD>
inline void stage_row(const void* src, int64_t len, T* dst) {
  constexpr int L = Lanes<T>::n;
  int64_t c = 0;
  for (; c + L <= len; c += L) storeu(dst + c, vload<T, KD>(src, c));
  for (; c < len; ++c) dst[c] = sload<T>(src, KD, c);
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

// Buffers a group is padded to (zero rows, zero weights): kGroup, or kGroup / 2 for a short last group.
inline int64_t padded(int64_t g) { return g <= kGroup / 2 ? kGroup / 2 : kGroup; }

// Row tiles of K: nt = ceil(K / kMaxR) tiles, n1 of R rows and n2 of R - 1 (K = 10: 5 + 5).
struct Tiles {
  int R, n1, n2;
};

// One block of columns [p0, p0 + len) of all K outputs, accumulated in acc ([step][K][kStep]).
template <class T>
void block(const Tiles& tl, const T* Wp, int64_t K, int64_t N, const Buffer* bufs, int64_t p0, int64_t len, int64_t P,
           T* out, T* xs, int64_t XS, T* acc, const void* zeros) {
  constexpr int64_t St = kStep<T>;
  const int64_t steps = len / St, whole = steps * St;
  for (int64_t j0 = 0; j0 < N; j0 += kGroup) {
    const int64_t g = std::min(kGroup, N - j0), gp = padded(g);
    bool uniform = true;
    for (int64_t j = 1; j < g; ++j) uniform &= bufs[j0 + j].kind == bufs[j0].kind;
    // One storage kind in the group (the usual case): read in place. Mixed kinds, or float64 into a
    // float32 sum: stage the group as T first, so the tiles are always specialised on one kind.
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
    for (int64_t j = g; j < gp; ++j) xr[j] = zeros;  // padding: zero rows with zero weights
    const T* w = Wp + j0 * K;  // this group's weights, packed [tile][j][r]
    const bool first = j0 == 0;
    if (steps > 0) {
      switch (kd) {
        case Kind::F16: pass_r<T, Kind::F16>(tl.R, w, xr, gp, steps, acc, K, tl.n1, tl.n2, first); break;
        case Kind::BF16: pass_r<T, Kind::BF16>(tl.R, w, xr, gp, steps, acc, K, tl.n1, tl.n2, first); break;
        case Kind::F32: pass_r<T, Kind::F32>(tl.R, w, xr, gp, steps, acc, K, tl.n1, tl.n2, first); break;
        default: pass_r<T, Kind::F64>(tl.R, w, xr, gp, steps, acc, K, tl.n1, tl.n2, first); break;
      }
    }
    for (int64_t c = whole; c < len; ++c) {  // ragged tail of the block: same layout, one column at a time
      T* a = acc + steps * K * St + (c - whole);
      const T* wt = w;
      for (int t = 0, k = 0; t < tl.n1 + tl.n2; ++t) {
        const int R = t < tl.n1 ? tl.R : tl.R - 1;
        for (int r = 0; r < R; ++r, ++k) {
          T s = first ? T(0) : a[k * St];
          for (int64_t j = 0; j < g; ++j) s += wt[j * R + r] * sload<T>(xr[j], kd, c);
          a[k * St] = s;
        }
        wt += gp * R;
      }
    }
  }
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::n;
  for (int64_t k = 0; k < K; ++k) {
    T* o = out + k * P + p0;
    const T* a = acc + k * St;
    for (int64_t c = 0; c < whole; c += St, a += K * St) {
      storeu(o + c, loadu<V>(a));
      storeu(o + c + L, loadu<V>(a + L));
    }
    for (int64_t c = whole; c < len; ++c) o[c] = a[c - whole];
  }
}

template <class T>
void aggregate(const double* W, int64_t K, int64_t N, const Buffer* bufs, int64_t P, T* out) {
  constexpr int64_t St = kStep<T>;
  Tiles tl;
  const int nt = static_cast<int>((K + kMaxR - 1) / kMaxR);
  tl.R = static_cast<int>((K + nt - 1) / nt);
  tl.n1 = static_cast<int>(K - nt * (tl.R - 1));
  tl.n2 = nt - tl.n1;
  // Weights in the accumulation type, packed per group of kGroup buffers, then per row tile: the
  // tile's R weights of one buffer adjacent, at offsets fixed at compile time in the unrolled loop.
  std::vector<T> Wp(static_cast<size_t>((N + kGroup) * K), T(0));
  for (int64_t j0 = 0; j0 < N; j0 += kGroup) {
    const int64_t g = std::min(kGroup, N - j0), gp = padded(g);
    T* w = Wp.data() + j0 * K;
    for (int t = 0, k0 = 0; t < nt; ++t) {
      const int R = t < tl.n1 ? tl.R : tl.R - 1;
      for (int64_t j = 0; j < g; ++j)
        for (int r = 0; r < R; ++r) w[j * R + r] = static_cast<T>(W[(k0 + r) * N + j0 + j]);
      w += gp * R;
      k0 += R;
    }
  }
  // Block width: a power of two of columns whose K accumulator rows take ~kAccBytes.
  int64_t Pb = 8192;
  while (Pb > 4 * St && K * Pb * static_cast<int64_t>(sizeof(T)) > kAccBytes) Pb /= 2;
  // Where buffer 0's vector loads would straddle cache lines (float32 at NumPy's offset 16), blocks
  // start where it crosses a page (modulo the block width), so that the loads of every buffer sharing
  // its offset within a page are aligned: the head block takes the columns before. (float16 loads
  // are 16 bytes and never straddle; moving its blocks measured 2 % slower.)
  const int64_t es = static_cast<int64_t>(kind_size(bufs[0].kind)), vb = es * Lanes<T>::n;
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(bufs[0].data) % kPage);
  const int64_t head = mis % es == 0 && mis % vb != 0 ? std::min(P, (kPage - mis) % kPage / es % Pb) : 0;
  const int64_t blocks = (head > 0 ? 1 : 0) + (P - head + Pb - 1) / Pb;
  const int64_t XS = Pb + St;  // staging row stride
  const std::vector<double> zeros(static_cast<size_t>(XS), 0.0);  // a zero row of any storage kind

#pragma omp parallel if (K * N * P >= kParallelMin && blocks > 1)
  {
    // per-thread scratch: accumulators [steps + 1][K][St] (64-byte aligned), kGroup staging rows
    std::vector<T> accv(static_cast<size_t>((Pb / St + 1) * K * St + 64 / sizeof(T))), xs(static_cast<size_t>(kGroup * XS));
    T* acc = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(accv.data()) + 63) & ~uintptr_t(63));
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t p0 = head > 0 ? (b == 0 ? 0 : head + (b - 1) * Pb) : b * Pb;
      const int64_t len = head > 0 && b == 0 ? head : std::min(Pb, P - p0);
      block(tl, Wp.data(), K, N, bufs, p0, len, P, out, xs.data(), XS, acc, zeros.data());
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

}  // namespace FEDCMD_ISA
}  // namespace fedcmd
