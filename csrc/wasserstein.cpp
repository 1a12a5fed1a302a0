// 1-D Wasserstein distances: batched general (weights, unequal sizes), pairwise (sort once), sliced.
#include <algorithm>
#include <cmath>
#include <climits>
#include <cstring>
#include <numeric>
#include <utility>
#include <vector>

#include "kernels.hpp"

namespace fedcmd {
namespace FEDCMD_ISA {  // one copy of this file per ISA variant (kernels.hpp)
namespace {

// Work below these sizes (about 2-3 ms on one thread) stays on one thread. Waking an OpenMP team
// costs microseconds on an idle machine but up to a scheduler time slice (~10 ms, measured) when
// the other core is busy, e.g. with torch's own OpenMP pool spinning after a layer; FedCMD's
// per-batch vote (3 rows of 32 samples) must never pay that.
constexpr int64_t kParallelMin = 1 << 16;     // sorted sample-elements (sort-bound kernels)
constexpr int64_t kParallelPairs = 1 << 23;   // pair-elements (N * N * n) / multiply-adds of projections

// Rows at least this long are radix-sorted: std::sort of 1024 doubles took 2x as long (branch
// misses) and dominated the pairwise kernel; below ~64 samples std::sort wins (measured crossover).
constexpr int64_t kRadixMin = 64;

// Order-preserving map of a (non-NaN) double onto uint64: flip the sign bit of positives, all bits of negatives.
inline uint64_t to_key(double d) {
  uint64_t u;
  std::memcpy(&u, &d, 8);
  return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}
inline double from_key(uint64_t k) {
  const uint64_t u = (k >> 63) ? (k & 0x7fffffffffffffffull) : ~k;
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

// LSD radix sort of x [n] (8 passes of 8 bits, passes where every key shares the byte skipped);
// with idx non-null, the permutation is carried along (idx[k] = original position of sorted x[k]).
struct RadixScratch {
  std::vector<uint64_t> a, b;
  std::vector<uint32_t> ia, ib;
};

void radix_sort(double* x, int64_t n, RadixScratch& s, int64_t* idx) {
  s.a.resize(n);
  s.b.resize(n);
  if (idx) {
    s.ia.resize(n);
    s.ib.resize(n);
  }
  uint32_t hist[8][256];
  std::memset(hist, 0, sizeof(hist));
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t k = to_key(x[i]);
    s.a[i] = k;
    for (int d = 0; d < 8; ++d) ++hist[d][(k >> (8 * d)) & 255];
    if (idx) s.ia[i] = static_cast<uint32_t>(i);
  }
  uint64_t *src = s.a.data(), *dst = s.b.data();
  uint32_t *isrc = s.ia.data(), *idst = s.ib.data();
  for (int d = 0; d < 8; ++d) {
    const int shift = 8 * d;
    if (hist[d][(src[0] >> shift) & 255] == static_cast<uint32_t>(n)) continue;  // all keys share this byte
    uint32_t pos[256], sum = 0;
    for (int b = 0; b < 256; ++b) pos[b] = sum, sum += hist[d][b];
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t to = pos[(src[i] >> shift) & 255]++;
      dst[to] = src[i];
      if (idx) idst[to] = isrc[i];
    }
    std::swap(src, dst);
    std::swap(isrc, idst);
  }
  for (int64_t i = 0; i < n; ++i) x[i] = from_key(src[i]);
  if (idx)
    for (int64_t i = 0; i < n; ++i) idx[i] = isrc[i];
}

void sort_values(double* x, int64_t n, RadixScratch& s) {
  if (n >= kRadixMin) {
    radix_sort(x, n, s, nullptr);
  } else {
    std::sort(x, x + n);
  }
}

inline double pow_abs(double d, double p) {
  d = std::fabs(d);
  return p == 1.0 ? d : (p == 2.0 ? d * d : std::pow(d, p));
}

// Sorted samples and the CDF at each of them. The CDF reaches exactly 1.0 at the last sample (the
// uniform one is (k+1)/n, correctly rounded; the weighted one divides by its own last partial sum),
// so both sides of a merge end together. Same arithmetic as fallback._sorted_with_cdf.
struct Sorted {
  std::vector<double> xs, cdf;
  std::vector<int64_t> order;
  std::vector<std::pair<double, double>> pairs;
  RadixScratch radix;

  void build(const double* x, const double* w, int64_t n) {
    xs.resize(n);
    cdf.resize(n);
    if (w == nullptr) {
      std::copy(x, x + n, xs.begin());
      sort_values(xs.data(), n, radix);
      for (int64_t k = 0; k < n; ++k) cdf[k] = static_cast<double>(k + 1) / static_cast<double>(n);
      return;
    }
    if (n >= kRadixMin && n <= INT32_MAX) {
      order.resize(n);
      std::copy(x, x + n, xs.begin());
      radix_sort(xs.data(), n, radix, order.data());
      double c = 0.0;
      for (int64_t k = 0; k < n; ++k) {
        c += w[order[k]];
        cdf[k] = c;
      }
    } else {  // sorting (value, weight) pairs beats sorting indices (no indirection in the compares)
      pairs.resize(n);
      for (int64_t k = 0; k < n; ++k) pairs[k] = {x[k], w[k]};
      std::sort(pairs.begin(), pairs.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      double c = 0.0;
      for (int64_t k = 0; k < n; ++k) {
        xs[k] = pairs[k].first;
        c += pairs[k].second;
        cdf[k] = c;
      }
    }
    const double total = cdf[n - 1];
    for (int64_t k = 0; k < n; ++k) cdf[k] /= total;
  }
};

// W_p^p as the integral over q in (0, 1] of |F_u^-1(q) - F_v^-1(q)|^p: both quantile functions
// are steps, so walk the merged CDF breakpoints. On (prev, q] u's quantile is xs[i] for the first
// i with cdf[i] >= q, which is where the two-pointer walk stands.
double merged_wpp(const Sorted& a, const Sorted& b, double p) {
  const int64_t n = static_cast<int64_t>(a.xs.size()), m = static_cast<int64_t>(b.xs.size());
  int64_t i = 0, j = 0;
  double prev = 0.0, total = 0.0;
  while (i < n && j < m) {
    const double ca = a.cdf[i], cb = b.cdf[j];
    const double q = ca < cb ? ca : cb;
    total += (q - prev) * pow_abs(a.xs[i] - b.xs[j], p);
    prev = q;
    i += (ca <= q);
    j += (cb <= q);
  }
  return total;
}

inline double root(double wpp, double p) { return p == 1.0 ? wpp : std::pow(wpp, 1.0 / p); }

// Sum over k of |x_r[k] - y[k]|^p for 4 rows at once: y is loaded once for the four rows.
template <int Mode>  // 1: p = 1, 2: p = 2, 0: any p
inline void dist4(const double* x0, const double* x1, const double* x2, const double* x3, const double* y, int64_t n,
                  double p, double* res) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t k = 0; k < n; ++k) {
    const double b = y[k];
    double d0 = x0[k] - b, d1 = x1[k] - b, d2 = x2[k] - b, d3 = x3[k] - b;
    if constexpr (Mode == 1) {
      s0 += std::fabs(d0), s1 += std::fabs(d1), s2 += std::fabs(d2), s3 += std::fabs(d3);
    } else if constexpr (Mode == 2) {
      s0 += d0 * d0, s1 += d1 * d1, s2 += d2 * d2, s3 += d3 * d3;
    } else {
      s0 += std::pow(std::fabs(d0), p), s1 += std::pow(std::fabs(d1), p);
      s2 += std::pow(std::fabs(d2), p), s3 += std::pow(std::fabs(d3), p);
    }
  }
  res[0] = s0, res[1] = s1, res[2] = s2, res[3] = s3;
}

template <int Mode>
inline double dist1(const double* x, const double* y, int64_t n, double p) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) {
    const double d = x[k] - y[k];
    if constexpr (Mode == 1) {
      s += std::fabs(d);
    } else if constexpr (Mode == 2) {
      s += d * d;
    } else {
      s += std::pow(std::fabs(d), p);
    }
  }
  return s;
}

template <int Mode>
void pairwise_sorted(const double* s, int64_t N, int64_t n, double p, double* out) {
  // Tasks are quads of rows i0..i0+3 against every j > i0: each loaded y element serves four pairs.
  // The columns go in chunks of kChunk so the quad's slice (4 x 4 KiB) stays in L1 while the j rows
  // stream past from L2/L3. Later quads have fewer j, hence dynamic scheduling.
  constexpr int64_t kChunk = 512;
  const int64_t quads = (N + 3) / 4;
  const double inv_n = 1.0 / static_cast<double>(n);
#pragma omp parallel if (N * N * n >= kParallelPairs)
  {
    std::vector<double> acc(static_cast<size_t>(4 * N));
#pragma omp for schedule(dynamic, 1)
    for (int64_t q = 0; q < quads; ++q) {
      const int64_t i0 = 4 * q;
      const int64_t rows = std::min<int64_t>(4, N - i0);
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
        const int64_t len = std::min(kChunk, n - c0);
        const double* x = s + i0 * n + c0;
        for (int64_t j = i0 + 1; j < N; ++j) {
          const double* y = s + j * n + c0;
          double* a = acc.data() + 4 * j;
          if (rows == 4) {
            double part[4];
            dist4<Mode>(x, x + n, x + 2 * n, x + 3 * n, y, len, p, part);
            a[0] += part[0], a[1] += part[1], a[2] += part[2], a[3] += part[3];
          } else {
            for (int64_t r = 0; r < rows; ++r) a[r] += dist1<Mode>(x + r * n, y, len, p);
          }
        }
      }
      for (int64_t j = i0 + 1; j < N; ++j) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t i = i0 + r;
          if (i >= j) continue;
          // mean then root, like the fallback (blk / n, then ** (1/p))
          const double d = root(acc[4 * j + r] * inv_n, p);
          out[i * N + j] = d;
          out[j * N + i] = d;  // mirrored: exactly symmetric
        }
      }
    }
  }
}

// dst [L, rows] = theta [L, d] @ Z[rows, d]^T, as a small GEMM: Z is transposed once so that vector
// lanes run over samples, and a register tile of 4 directions x 8 samples accumulates over d with
// broadcast direction entries (no horizontal sums; 3-4x faster than a dot product per pair).
template <int R>
inline void project_tile(const double* Zt, int64_t rows, int64_t d, const double* theta, int64_t l0, int64_t i,
                         double* dst) {
  typedef double v4 __attribute__((vector_size(32)));
  v4 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = v4{};
  for (int64_t k = 0; k < d; ++k) {
    v4 z0, z1;
    std::memcpy(&z0, Zt + k * rows + i, sizeof(v4));
    std::memcpy(&z1, Zt + k * rows + i + 4, sizeof(v4));
    for (int r = 0; r < R; ++r) {
      const double t = theta[(l0 + r) * d + k];
      a0[r] += t * z0;
      a1[r] += t * z1;
    }
  }
  for (int r = 0; r < R; ++r) {
    std::memcpy(dst + (l0 + r) * rows + i, &a0[r], sizeof(v4));
    std::memcpy(dst + (l0 + r) * rows + i + 4, &a1[r], sizeof(v4));
  }
}

void project_rows(const double* Z, int64_t rows, int64_t d, const double* theta, int64_t L, double* dst) {
  std::vector<double> Zt(static_cast<size_t>(rows * d));
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t k = 0; k < d; ++k) Zt[k * rows + i] = Z[i * d + k];
  const int64_t whole = rows / 8 * 8;
#pragma omp parallel for schedule(dynamic, 4) if (rows * d * L >= kParallelPairs)
  for (int64_t i = 0; i < whole; i += 8) {  // 8 samples: d x 64 bytes of Zt stay in L1 for all directions
    int64_t l = 0;
    for (; l + 4 <= L; l += 4) project_tile<4>(Zt.data(), rows, d, theta, l, i, dst);
    for (; l < L; ++l) project_tile<1>(Zt.data(), rows, d, theta, l, i, dst);
  }
  for (int64_t i = whole; i < rows; ++i)  // ragged samples
    for (int64_t l = 0; l < L; ++l) {
      double s = 0;
      for (int64_t k = 0; k < d; ++k) s += Z[i * d + k] * theta[l * d + k];
      dst[l * rows + i] = s;
    }
}

}  // namespace

void wasserstein_1d(const double* u, const double* v, int64_t B, int64_t n, int64_t m, double p, const double* uw,
                    const double* vw, double* out) {
#pragma omp parallel if (B * (n + m) >= kParallelMin && B > 1)
  {
    Sorted a, b;  // per-thread scratch, reused across rows
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < B; ++r) {
      a.build(u + r * n, uw ? uw + r * n : nullptr, n);
      b.build(v + r * m, vw ? vw + r * m : nullptr, m);
      out[r] = root(merged_wpp(a, b, p), p);
    }
  }
}

void wasserstein_pairwise(const double* S, int64_t N, int64_t n, double p, double* out) {
  std::vector<double> s(S, S + N * n);
#pragma omp parallel if (N * n >= kParallelMin)
  {
    RadixScratch scratch;
#pragma omp for schedule(dynamic, 8)
    for (int64_t i = 0; i < N; ++i) sort_values(s.data() + i * n, n, scratch);
  }
  for (int64_t i = 0; i < N; ++i) out[i * N + i] = 0.0;
  if (p == 1.0) {
    pairwise_sorted<1>(s.data(), N, n, p, out);
  } else if (p == 2.0) {
    pairwise_sorted<2>(s.data(), N, n, p, out);
  } else {
    pairwise_sorted<0>(s.data(), N, n, p, out);
  }
}

double sliced_wasserstein(const double* X, int64_t n, const double* Y, int64_t m, int64_t d, const double* theta,
                          int64_t L, double p, const double* xw, const double* yw) {
  // Projections laid out [L, n] / [L, m] so each direction's samples are contiguous for the sort.
  std::vector<double> xp(static_cast<size_t>(L * n)), yp(static_cast<size_t>(L * m));
  auto project = [&](const double* Z, int64_t rows, double* dst) { project_rows(Z, rows, d, theta, L, dst); };
  project(X, n, xp.data());
  project(Y, m, yp.data());
  std::vector<double> wpp(static_cast<size_t>(L));
#pragma omp parallel if (L * (n + m) >= kParallelMin && L > 1)
  {
    Sorted a, b;
#pragma omp for schedule(dynamic, 1)
    for (int64_t l = 0; l < L; ++l) {
      a.build(xp.data() + l * n, xw, n);
      b.build(yp.data() + l * m, yw, m);
      wpp[l] = merged_wpp(a, b, p);
    }
  }
  double mean = 0;
  for (int64_t l = 0; l < L; ++l) mean += wpp[l];
  return root(mean / static_cast<double>(L), p);
}

}  // namespace FEDCMD_ISA
}  // namespace fedcmd
