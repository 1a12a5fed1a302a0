// Mean row-wise cosine similarity matrix (cosine_similarity_matrix is its one-row case).
//
// S[i, j] = mean_k x_ik . x_jk / (max(|x_ik|, eps) * max(|x_jk|, eps)), accumulated in double from
// float32 / float64 inputs (float16 inputs arrive converted to float32 by the caller). Only the
// upper triangle is computed and then mirrored, so S is exactly symmetric; the diagonal is the
// fraction of non-zero rows (the documented convention of fallback.rowwise_mean_cosine_matrix).
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.hpp"

namespace fedcmd {
namespace {

constexpr int64_t kChunk = 2048;  // columns per pass: a quad of rows (4 x 2048 floats) stays in L1
// Below this many multiply-adds (N * N * r * c / 2) one thread does it: an OpenMP team can wait a
// whole time slice for its second thread on a busy machine (see wasserstein.cpp).
constexpr int64_t kParallelMin = 1 << 21;

template <class T>
inline void dot4(const T* a0, const T* a1, const T* a2, const T* a3, const T* b, int64_t c, double* res) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t k = 0; k < c; ++k) {
    const double y = b[k];
    s0 += static_cast<double>(a0[k]) * y;
    s1 += static_cast<double>(a1[k]) * y;
    s2 += static_cast<double>(a2[k]) * y;
    s3 += static_cast<double>(a3[k]) * y;
  }
  res[0] += s0, res[1] += s1, res[2] += s2, res[3] += s3;
}

template <class T>
inline double dot1(const T* a, const T* b, int64_t c) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < c; ++k) s += static_cast<double>(a[k]) * static_cast<double>(b[k]);
  return s;
}

// Upper triangle (i <= j) of the Gram matrix of the vectors x_i = base[i] + off, columns [c0, c1),
// added into G [N, N]. Quads of rows i0..i0+3 against every j >= i0, so each loaded x_j serves four dots.
template <class T>
void gram_upper_quads(const T* const* base, int64_t N, int64_t off, int64_t c0, int64_t c1, int64_t q, double* G) {
  const int64_t i0 = 4 * q, rows = std::min<int64_t>(4, N - i0), len = c1 - c0;
  const int64_t o = off + c0;
  for (int64_t j = i0; j < N; ++j) {
    double acc[4] = {0, 0, 0, 0};
    if (rows == 4) {
      dot4(base[i0] + o, base[i0 + 1] + o, base[i0 + 2] + o, base[i0 + 3] + o, base[j] + o, len, acc);
    } else {
      for (int64_t r = 0; r < rows; ++r) acc[r] = dot1(base[i0 + r] + o, base[j] + o, len);
    }
    for (int64_t r = 0; r < rows && i0 + r <= j; ++r) G[(i0 + r) * N + j] += acc[r];
  }
}

// total[i, j] (i < j) += G[i, j] / den_i / den_j, nonzero[i] += |x_i| > 0; same operation order as the fallback.
void accumulate(const double* G, int64_t N, double eps, double* total, double* nonzero, double* den) {
  for (int64_t i = 0; i < N; ++i) {
    const double sq = G[i * N + i];
    den[i] = std::max(std::sqrt(sq), eps);
    nonzero[i] += sq > 0 ? 1.0 : 0.0;
  }
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = i + 1; j < N; ++j) total[i * N + j] += G[i * N + j] / den[i] / den[j];
}

template <class T>
void rowwise(const T* const* base, int64_t N, int64_t r, int64_t c, double eps, double* out) {
  const int64_t quads = (N + 3) / 4;
  std::vector<double> total(static_cast<size_t>(N * N), 0.0), nonzero(static_cast<size_t>(N), 0.0);
  if (r >= 8) {
    // Many rows (a personal layer's [out, in] update): threads take whole rows k, with private sums.
#pragma omp parallel if (N * N * r * c >= 2 * kParallelMin)
    {
      std::vector<double> G(static_cast<size_t>(N * N)), t(static_cast<size_t>(N * N), 0.0);
      std::vector<double> nz(static_cast<size_t>(N), 0.0), den(static_cast<size_t>(N));
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t k = 0; k < r; ++k) {
        std::fill(G.begin(), G.end(), 0.0);
        for (int64_t c0 = 0; c0 < c; c0 += kChunk)
          for (int64_t q = 0; q < quads; ++q) gram_upper_quads(base, N, k * c, c0, std::min(c, c0 + kChunk), q, G.data());
        accumulate(G.data(), N, eps, t.data(), nz.data(), den.data());
      }
#pragma omp critical
      {
        for (size_t i = 0; i < total.size(); ++i) total[i] += t[i];
        for (int64_t i = 0; i < N; ++i) nonzero[i] += nz[i];
      }
    }
  } else {
    // Few long rows (whole-model vectors): threads take quads of rows i0..i0+3, each against every
    // j >= i0 over column chunks that keep the quad in L1. No barrier inside a row: on a busy machine
    // each one can cost a scheduler time slice (a per-chunk barrier made N=64, d=256k take 0.5 s).
    std::vector<double> G(static_cast<size_t>(N * N)), den(static_cast<size_t>(N));
    for (int64_t k = 0; k < r; ++k) {
      std::fill(G.begin(), G.end(), 0.0);
#pragma omp parallel for schedule(dynamic, 1) if (N * N * c >= 2 * kParallelMin)
      for (int64_t q = 0; q < quads; ++q)  // quads write disjoint rows of G
        for (int64_t c0 = 0; c0 < c; c0 += kChunk) gram_upper_quads(base, N, k * c, c0, std::min(c, c0 + kChunk), q, G.data());
      accumulate(G.data(), N, eps, total.data(), nonzero.data(), den.data());
    }
  }
  const double inv_r = 1.0 / static_cast<double>(r);
  for (int64_t i = 0; i < N; ++i) {
    out[i * N + i] = std::clamp(nonzero[i] * inv_r, -1.0, 1.0);
    for (int64_t j = i + 1; j < N; ++j) {
      const double s = std::clamp(total[i * N + j] * inv_r, -1.0, 1.0);
      out[i * N + j] = s;
      out[j * N + i] = s;
    }
  }
}

}  // namespace

void rowwise_mean_cosine(const Buffer* items, int64_t N, int64_t r, int64_t c, double eps, double* out) {
  // One storage type per call: float32 items are read as they are; anything else (float64, or a mix)
  // is read as float64, converting the odd items once (similarity inputs are small next to the work).
  bool all_f32 = true, all_f64 = true;
  for (int64_t i = 0; i < N; ++i) {
    all_f32 &= items[i].kind == Kind::F32;
    all_f64 &= items[i].kind == Kind::F64;
  }
  if (all_f32) {
    std::vector<const float*> base(static_cast<size_t>(N));
    for (int64_t i = 0; i < N; ++i) base[i] = static_cast<const float*>(items[i].data);
    rowwise(base.data(), N, r, c, eps, out);
    return;
  }
  std::vector<const double*> base(static_cast<size_t>(N));
  std::vector<std::vector<double>> converted(static_cast<size_t>(N));
  const int64_t size = r * c;
  for (int64_t i = 0; i < N; ++i) {
    if (all_f64 || items[i].kind == Kind::F64) {
      base[i] = static_cast<const double*>(items[i].data);
      continue;
    }
    converted[i].resize(static_cast<size_t>(size));
    const float* f = static_cast<const float*>(items[i].data);  // bindings.cpp hands float16 in as float32
    std::copy(f, f + size, converted[i].begin());
    base[i] = converted[i].data();
  }
  rowwise(base.data(), N, r, c, eps, out);
}

}  // namespace fedcmd
