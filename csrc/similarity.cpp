// Mean row-wise cosine similarity matrix (cosine_similarity_matrix is its one-row case).
//
// S[i, j] = mean_k x_ik . x_jk / (max(|x_ik|, eps) * max(|x_jk|, eps)), accumulated in double from
// float32 / float64 inputs (float16 inputs arrive converted to float32 by the caller). Only the
// upper triangle is computed and then mirrored, so S is exactly symmetric; the diagonal is the
// fraction of non-zero rows (the documented convention of fallback.rowwise_mean_cosine_matrix).
//
// The Gram matrices are computed BLAS-style: a chunk of columns of all N vectors is converted once
// into a padded float64 scratch (L2-sized), then a 3 x 4 register tile of dot products runs over it
// with vector lanes along the columns, summed horizontally once per chunk. Threads never meet at a
// barrier inside the loops: they take whole rows k (personal-layer updates, many short rows) or
// whole column chunks (one long row: whole-model vectors) into private sums, reduced once. On a busy
// machine each barrier can cost a scheduler time slice (a per-chunk barrier made N=64, d=256k take
// 0.5 s), and converting inside the inner loop made the first version 3x slower than NumPy's BLAS path.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.hpp"

namespace fedcmd {
namespace FEDCMD_ISA {  // one copy of this file per ISA variant (kernels.hpp)
namespace {

typedef double v4d __attribute__((vector_size(32)));

constexpr int64_t kChunk = 512;            // columns per chunk: N x 4 KiB of float64 scratch
constexpr int64_t kParallelMin = 1 << 25;  // multiply-adds (N * N * r * c / 2), ~5 ms, below which one thread does it

inline v4d load4(const double* p) {
  v4d v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline double hsum(v4d v) { return (v[0] + v[1]) + (v[2] + v[3]); }

// G[i, j] += sum_k S[i, k] S[j, k] for rows i0..i0+RI-1 and j0..j0+RJ-1 of the chunk scratch S
// (row stride ss, len a multiple of 4, zero-padded), entries with i <= j only.
template <int RI, int RJ>
void gram_tile(const double* S, int64_t ss, int64_t i0, int64_t j0, int64_t len, double* G, int64_t N) {
  v4d a[RI][RJ];
  for (int r = 0; r < RI; ++r)
    for (int q = 0; q < RJ; ++q) a[r][q] = v4d{};
  for (int64_t k = 0; k < len; k += 4) {
    v4d x[RI];
    for (int r = 0; r < RI; ++r) x[r] = load4(S + (i0 + r) * ss + k);
    for (int q = 0; q < RJ; ++q) {
      const v4d y = load4(S + (j0 + q) * ss + k);
      for (int r = 0; r < RI; ++r) a[r][q] += x[r] * y;
    }
  }
  for (int r = 0; r < RI; ++r)
    for (int q = 0; q < RJ; ++q)
      if (i0 + r <= j0 + q) G[(i0 + r) * N + j0 + q] += hsum(a[r][q]);
}

template <int RI>
void gram_row_block(const double* S, int64_t ss, int64_t i0, int64_t N, int64_t len, double* G) {
  int64_t j0 = i0;  // tiles on and right of the diagonal; the few entries below it are skipped
  for (; j0 + 4 <= N; j0 += 4) gram_tile<RI, 4>(S, ss, i0, j0, len, G, N);
  switch (N - j0) {
    case 3: gram_tile<RI, 3>(S, ss, i0, j0, len, G, N); break;
    case 2: gram_tile<RI, 2>(S, ss, i0, j0, len, G, N); break;
    case 1: gram_tile<RI, 1>(S, ss, i0, j0, len, G, N); break;
    default: break;
  }
}

// Upper-triangle Gram update for one chunk already in the scratch.
void gram_chunk(const double* S, int64_t ss, int64_t N, int64_t len, double* G) {
  int64_t i0 = 0;
  for (; i0 + 3 <= N; i0 += 3) gram_row_block<3>(S, ss, i0, N, len, G);
  if (N - i0 == 2) gram_row_block<2>(S, ss, i0, N, len, G);
  if (N - i0 == 1) gram_row_block<1>(S, ss, i0, N, len, G);
}

// Columns [c0, c0 + len) of row k of every item into the scratch, as float64, zero-padded to a multiple of 4.
template <class T>
void load_chunk(const T* const* base, int64_t N, int64_t off, int64_t len, double* S, int64_t ss) {
  const int64_t padded = (len + 3) / 4 * 4;
  for (int64_t i = 0; i < N; ++i) {
    const T* src = base[i] + off;
    double* dst = S + i * ss;
    for (int64_t c = 0; c < len; ++c) dst[c] = static_cast<double>(src[c]);
    for (int64_t c = len; c < padded; ++c) dst[c] = 0.0;
  }
}

// Full upper Gram matrix of row k (columns [0, c)) into G (zeroed here), chunk by chunk.
template <class T>
void gram_row(const T* const* base, int64_t N, int64_t k, int64_t c, double* S, int64_t ss, double* G) {
  std::fill(G, G + N * N, 0.0);
  for (int64_t c0 = 0; c0 < c; c0 += kChunk) {
    const int64_t len = std::min(kChunk, c - c0);
    load_chunk(base, N, k * c + c0, len, S, ss);
    gram_chunk(S, ss, N, (len + 3) / 4 * 4, G);
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
  const size_t NN = static_cast<size_t>(N * N);
  const int64_t ss = kChunk + 8;  // padded scratch rows: consecutive rows in different cache sets
  std::vector<double> total(NN, 0.0), nonzero(static_cast<size_t>(N), 0.0);
  const bool parallel = N * N * r * c / 2 >= kParallelMin;
  if (r > 1) {
    // Many rows (a personal layer's [out, in] update): threads take whole rows k, with private sums.
#pragma omp parallel if (parallel)
    {
      std::vector<double> S(static_cast<size_t>(N * ss)), G(NN), t(NN, 0.0), nz(static_cast<size_t>(N), 0.0),
          den(static_cast<size_t>(N));
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t k = 0; k < r; ++k) {
        gram_row(base, N, k, c, S.data(), ss, G.data());
        accumulate(G.data(), N, eps, t.data(), nz.data(), den.data());
      }
#pragma omp critical
      {
        for (size_t i = 0; i < NN; ++i) total[i] += t[i];
        for (int64_t i = 0; i < N; ++i) nonzero[i] += nz[i];
      }
    }
  } else {
    // One long row (whole-model vectors): threads take whole column chunks into private Gram sums.
    std::vector<double> G(NN, 0.0), den(static_cast<size_t>(N));
    const int64_t chunks = (c + kChunk - 1) / kChunk;
#pragma omp parallel if (parallel && chunks > 1)
    {
      std::vector<double> S(static_cast<size_t>(N * ss)), g(NN, 0.0);
#pragma omp for schedule(dynamic, 4) nowait
      for (int64_t b = 0; b < chunks; ++b) {
        const int64_t c0 = b * kChunk, len = std::min(kChunk, c - c0);
        load_chunk(base, N, c0, len, S.data(), ss);
        gram_chunk(S.data(), ss, N, (len + 3) / 4 * 4, g.data());
      }
#pragma omp critical
      for (size_t i = 0; i < NN; ++i) G[i] += g[i];
    }
    accumulate(G.data(), N, eps, total.data(), nonzero.data(), den.data());
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
  // float32 items are widened chunk by chunk; float64 items (or a mix: bindings.cpp hands float16 in
  // as float32) go through the float64 path, converting the float32 ones once.
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
    const float* f = static_cast<const float*>(items[i].data);
    std::copy(f, f + size, converted[i].begin());
    base[i] = converted[i].data();
  }
  rowwise(base.data(), N, r, c, eps, out);
}

}  // namespace FEDCMD_ISA
}  // namespace fedcmd
