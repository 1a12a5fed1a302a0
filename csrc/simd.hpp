// Small portable SIMD layer: GCC/Clang vector extensions (AVX2 registers on x86-64-v3, AVX-512 ones in
// the avx512 variant, two NEON registers on aarch64), plus half / bfloat16 loads. Intrinsics only where the vector extensions
// have no portable spelling (F16C conversions).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace fedcmd::simd {
// Internal linkage: bindings.cpp is compiled without the ISA flags, so these must not be merged
// across translation units.
namespace {

typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));
typedef uint16_t v4u16 __attribute__((vector_size(8)));
typedef uint32_t v4u32 __attribute__((vector_size(16)));

template <class V>
inline V loadu(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // compiles to one unaligned vector load
  return v;
}

template <class V>
inline void storeu(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// IEEE half -> float, exact (subnormals, Inf and NaN included); scalar path for tails and non-F16C CPUs.
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#elif defined(__aarch64__)
  __fp16 f;
  std::memcpy(&f, &h, 2);
  return static_cast<float>(f);
#else
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);  // Inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;  // signed zero
  } else {  // subnormal half: normalise
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;  // bfloat16 is the top half of a float32
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline v8f load8_f16(const uint16_t* p) {
#if defined(__F16C__)
  return (v8f)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
  v8f r;
  for (int i = 0; i < 8; ++i) r[i] = half_to_float(p[i]);
  return r;
#endif
}

inline v4f load4_f16(const uint16_t* p) {
#if defined(__F16C__)
  return (v4f)_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
#else
  v4f r;
  for (int i = 0; i < 4; ++i) r[i] = half_to_float(p[i]);
  return r;
#endif
}

inline v8f load8_bf16(const uint16_t* p) {
#if defined(__AVX2__)
  // one zero-extending load + one shift (GCC lowers the generic form below to four instructions)
  return (v8f)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#else
  v8u32 w = __builtin_convertvector(loadu<v8u16>(p), v8u32) << 16;
  return (v8f)w;
#endif
}

inline v4f load4_bf16(const uint16_t* p) {
  v4u32 w = __builtin_convertvector(loadu<v4u16>(p), v4u32) << 16;
  return (v4f)w;
}

#if defined(__AVX512F__)
// The avx512 variant's 512-bit vectors (16 floats / 8 doubles): 32 registers, twice the lanes per FMA.
typedef float v16f __attribute__((vector_size(64)));
typedef double v8d __attribute__((vector_size(64)));

inline v16f load16_f16(const uint16_t* p) {
  return (v16f)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline v16f load16_bf16(const uint16_t* p) {
  return (v16f)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
}
#endif

}  // namespace
}  // namespace fedcmd::simd
