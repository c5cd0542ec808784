// SIMD building blocks for the CPU kernels: a float vector as wide as the ISA the translation unit is
// compiled for (4 lanes for base x86-64/SSE2 or other CPUs, 8 for AVX2, 16 for AVX-512), loads and
// stores that convert bf16/fp16 in registers, and exp/tanh that vectorize (libm's do not).
//
// Everything here is inside namespace fusedops::cpu::FUSEDOPS_CPU_ISA: each csrc/cpu/*.cpp is compiled
// once per ISA, and inline functions compiled with different -m flags must not share a mangled name
// (the linker would keep one of them for all ISAs).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__SSE__)
#include <immintrin.h>
#endif

#ifndef FUSEDOPS_CPU_ISA
#error "csrc/cpu sources are compiled once per ISA with -DFUSEDOPS_CPU_ISA=<base|avx2|avx512> (see CMakeLists.txt)"
#endif

namespace fusedops::cpu::FUSEDOPS_CPU_ISA {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX2__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
constexpr int kLanes = kVecBytes / 4;  // floats per vector

typedef float vfloat __attribute__((vector_size(kVecBytes)));
typedef int32_t vint __attribute__((vector_size(kVecBytes)));
typedef uint32_t vuint __attribute__((vector_size(kVecBytes)));
typedef uint16_t vhalfbits __attribute__((vector_size(kVecBytes / 2)));

struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// A float in every lane, as one vbroadcastss. (`vfloat{} + x` costs an FP add first, since x + 0 is not x
// for x = -0; a lane-by-lane loop compiles to a chain of vinsertps.)
inline vfloat vbroadcast(float x) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_set1_ps(x);
#elif defined(__AVX__)
  return (vfloat)_mm256_set1_ps(x);
#elif defined(__SSE__)
  return (vfloat)_mm_set1_ps(x);
#else
  static_assert(kLanes == 4, "non-x86 CPUs use 16-byte vectors");
  return vfloat{x, x, x, x};
#endif
}

inline vfloat as_float(vuint v) {
  vfloat f;
  std::memcpy(&f, &v, sizeof f);
  return f;
}
inline vuint as_uint(vfloat v) {
  vuint u;
  std::memcpy(&u, &v, sizeof u);
  return u;
}

// ---- scalar conversions --------------------------------------------------------------------------------
inline float to_float(float x) { return x; }
inline float to_float(bf16_t x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float to_float(fp16_t x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  const uint32_t h = x.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal: value mant * 2^-24
    float f = static_cast<float>(mant) * 5.9604644775390625e-8f;
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

template <class T>
inline T from_float(float x);
template <>
inline float from_float<float>(float x) {
  return x;
}
template <>
inline bf16_t from_float<bf16_t>(float x) {  // round to nearest even; NaN stays a (quiet) NaN
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}
template <>
inline fp16_t from_float<fp16_t>(float x) {
#if defined(__F16C__)
  return fp16_t{static_cast<uint16_t>(_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC))};
#else
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return fp16_t{static_cast<uint16_t>(sign | 0x7e00u)};
  if (abs >= 0x477ff000u) return fp16_t{static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
  if (abs < 0x38800000u) {  // below the smallest normal: round x·2^24 to an integer (ties to even)
    float f;
    std::memcpy(&f, &abs, 4);
    return fp16_t{static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(f * 16777216.0f)))};
  }
  const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return fp16_t{static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
#endif
}

// ---- vector loads and stores (unaligned; `n` lanes, the rest zero / untouched) ------------------------
inline vfloat load(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vfloat load(const bf16_t* p) {
  vhalfbits h;
  std::memcpy(&h, p, sizeof h);
  return as_float(__builtin_convertvector(h, vuint) << 16);
}
inline vfloat load(const fp16_t* p) {
#if defined(__AVX512F__)
  vfloat v;
  __m256i h;
  std::memcpy(&h, p, sizeof h);
  __m512 f = _mm512_cvtph_ps(h);
  std::memcpy(&v, &f, sizeof v);
  return v;
#elif defined(__F16C__) && defined(__AVX2__)
  vfloat v;
  __m128i h;
  std::memcpy(&h, p, sizeof h);
  __m256 f = _mm256_cvtph_ps(h);
  std::memcpy(&v, &f, sizeof v);
  return v;
#else
  vfloat v;
  for (int i = 0; i < kLanes; ++i) v[i] = to_float(p[i]);
  return v;
#endif
}

inline void store(float* p, vfloat v) { std::memcpy(p, &v, sizeof v); }
inline void store(bf16_t* p, vfloat v) {
  vuint u = as_uint(v);
  const vuint is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  const vuint rounded = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
  const vuint quiet = (u >> 16) | 0x40u;
  const vuint bits = (rounded & ~is_nan) | (quiet & is_nan);
  const vhalfbits h = __builtin_convertvector(bits, vhalfbits);
  std::memcpy(p, &h, sizeof h);
}
// fp32 -> bf16 rounded to nearest even without store()'s NaN test, about half its integer work: exact for
// every finite or infinite value and for NaNs whose low 16 bits are zero, which are every NaN the hardware
// generates and every NaN that came from a bf16 value. Any other NaN may come out as inf or a zero, so this
// is for kernels whose only other NaN sources are scalars passed through canonical_nan() below.
inline void store_lean(bf16_t* p, vfloat v) {
  const vuint u = as_uint(v);
  const vuint bits = (u + (0x7fffu + ((u >> 16) & 1u))) >> 16;
#if defined(__AVX2__) && !defined(__AVX512F__)
  // The generic narrowing masks each lane to 16 bits first, which these already are.
  __m256i w;
  std::memcpy(&w, &bits, sizeof w);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(w, w), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
#else
  const vhalfbits h = __builtin_convertvector(bits, vhalfbits);
  std::memcpy(p, &h, sizeof h);
#endif
}
inline float canonical_nan(float x) { return x != x ? std::numeric_limits<float>::quiet_NaN() : x; }

inline void store(fp16_t* p, vfloat v) {
#if defined(__AVX512F__)
  __m512 f;
  std::memcpy(&f, &v, sizeof f);
  __m256i h = _mm512_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  std::memcpy(p, &h, sizeof h);
#elif defined(__F16C__) && defined(__AVX2__)
  __m256 f;
  std::memcpy(&f, &v, sizeof f);
  __m128i h = _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  std::memcpy(p, &h, sizeof h);
#else
  for (int i = 0; i < kLanes; ++i) p[i] = from_float<fp16_t>(v[i]);
#endif
}
// store_lean for bf16 when kLean, else store (fp32 and fp16 have no cheaper rounding).
template <bool kLean, class T>
inline void store_maybe_lean(T* p, vfloat v) {
  if constexpr (kLean && std::is_same<T, bf16_t>::value) {
    store_lean(p, v);
  } else {
    store(p, v);
  }
}

// The first n (< kLanes) elements; the other lanes read as `fill`.
template <class T>
inline vfloat load_partial(const T* p, int n, float fill = 0.0f) {
  vfloat v = vbroadcast(fill);
  for (int i = 0; i < n; ++i) v[i] = to_float(p[i]);
  return v;
}
template <class T>
inline void store_partial(T* p, vfloat v, int n) {
  for (int i = 0; i < n; ++i) p[i] = from_float<T>(v[i]);
}

// ---- arithmetic ----------------------------------------------------------------------------------------
// a > b ? a : b and a < b ? a : b: exactly x86's max/min (NaN in either gives b), one instruction there;
// GCC compiles the vector selects to a compare and a blend instead. NaN in a is not propagated: use hmax_nan.
inline vfloat vmax(vfloat a, vfloat b) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_mask_max_ps((__m512)b, 0xFFFF, (__m512)a, (__m512)b);  // the unmasked form warns in GCC 12
#elif defined(__AVX__)
  return (vfloat)_mm256_max_ps((__m256)a, (__m256)b);
#elif defined(__SSE__)
  return (vfloat)_mm_max_ps((__m128)a, (__m128)b);
#else
  return a > b ? a : b;
#endif
}
inline vfloat vmin(vfloat a, vfloat b) {
#if defined(__AVX512F__)
  return (vfloat)_mm512_mask_min_ps((__m512)b, 0xFFFF, (__m512)a, (__m512)b);
#elif defined(__AVX__)
  return (vfloat)_mm256_min_ps((__m256)a, (__m256)b);
#elif defined(__SSE__)
  return (vfloat)_mm_min_ps((__m128)a, (__m128)b);
#else
  return a < b ? a : b;
#endif
}
inline vfloat vfma(vfloat a, vfloat b, vfloat c) {
#if defined(__FMA__)
  return a * b + c;  // contracted into vfmadd with -ffp-contract=fast (GCC's default)
#else
  return a * b + c;
#endif
}

inline float hsum(vfloat v) {
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
inline float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

inline vfloat copysign(vfloat magnitude, vfloat sign) {
  return as_float((as_uint(magnitude) & 0x7fffffffu) | (as_uint(sign) & 0x80000000u));
}

// exp(x) to ~1 ulp over the finite range (Cephes' expf): x = n·ln2 + r with |r| <= ln2/2 (Cody–Waite),
// e^r by a degree-5 minimax polynomial, and 2^n applied in two factors so results down to the
// subnormals stay exact. exp(-inf) = 0, exp(+inf) = inf, NaN stays NaN.
inline vfloat vexp(vfloat x) {
  const float lo = -103.97208f, hi = 88.7228391f;
  const vfloat xc = vmin(vmax(x, vbroadcast(lo)), vbroadcast(hi));
  const vfloat t = xc * 1.44269504088896341f;
  const vfloat n = __builtin_convertvector(__builtin_convertvector(t + copysign(vbroadcast(0.5f), t), vint), vfloat);
  const vfloat r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  const vfloat z = r * r;
  vfloat p = vbroadcast(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  const vint ni = __builtin_convertvector(n, vint);
  const vint n1 = ni >> 1, n2 = ni - n1;
  vfloat result = p * as_float((vuint)((n1 + 127) << 23)) * as_float((vuint)((n2 + 127) << 23));
  result = x < lo ? vbroadcast(0.0f) : result;
  result = x > hi ? vbroadcast(std::numeric_limits<float>::infinity()) : result;
  return x != x ? x : result;
}

// Round to the nearest integer (ties to even), one instruction from SSE4.1 on, where the round trip through
// 1.5·2^23 costs two adds and two registers.
inline vfloat vround(vfloat t) {
#if defined(__AVX512F__)
  // (the unmasked form warns in GCC 12)
  return (vfloat)_mm512_mask_roundscale_ps((__m512)t, 0xFFFF, (__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(__AVX__)
  return (vfloat)_mm256_round_ps((__m256)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif defined(__SSE4_1__)
  return (vfloat)_mm_round_ps((__m128)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vfloat magic = vbroadcast(12582912.0f);  // |t| < 2^22: t + 1.5·2^23 has no fraction bits left
  return (t + magic) - magic;
#endif
}

// 2^t for the softmaxes, whose arguments are <= ~0 (a logit or score minus its running max or its
// logsumexp); leaner than vexp. t = n + f with n = round(t) and |f| <= 1/2, 2^f by a polynomial fitted for
// relative error over |f| <= 1/2, 2^n built in the exponent bits. kWide: degree 5 (relative error 1e-7 in exact arithmetic, 2e-7 evaluated
// in fp32), for fp32 results; else degree 4 (3e-6), one FMA less, far below bf16/fp16 rounding (2^-9,
// 2^-12). t is first clamped to >= -127, whose exponent field 0 makes the result exactly 0: -inf gives 0
// (masked entries get exactly zero probability) and so does anything below -127 (true values there are
// subnormal). NaN stays NaN; t = 128 gives +inf (larger t is not supported). On the AVX2 EPYC of bench/results:
// ~0.8 ns per fp32 element.
template <bool kWide>
inline vfloat vexp2_lean(vfloat t) {
  t = vmax(vbroadcast(-127.0f), t);  // NaN passes through
  // n = round(t) by vround for the 16-bit loops (~5% faster on the AVX2 EPYC: two registers fewer, no spill),
  // by the 1.5·2^23 round trip for fp32, where vround measured ~7% slower in cross-entropy's forward that
  // also keeps the exps (its rounding and conversion compete with the stores for the same FP ports).
  vfloat n;
  vuint bits;  // 2^n
  if constexpr (kWide) {
    const vfloat magic = vbroadcast(12582912.0f), k = t + magic;  // n in k's low mantissa bits
    n = k - magic;
    bits = (as_uint(k) + (127u - 0x4B400000u)) << 23;  // 0x4B400000: the bits of `magic`
  } else {
    n = vround(t);
    bits = (vuint)(__builtin_convertvector(n, vint) + 127) << 23;
  }
  const vfloat f = t - n;
  // Estrin's scheme (a dependent chain of three FMAs instead of five).
  const vfloat f2 = f * f;
  vfloat p;
  if constexpr (kWide) {
    const vfloat hi = (vbroadcast(1.3308824272826314e-3f) * f + 9.671516716480255e-3f) * f2 +
                      (vbroadcast(5.550582334399223e-2f) * f + 2.4022242426872253e-1f);
    p = hi * f2 + (vbroadcast(6.931470632553101e-1f) * f + 1.0f);
  } else {
    const vfloat hi = vbroadcast(9.585633873939514e-3f) * f2 +
                      (vbroadcast(5.590590462088585e-2f) * f + 2.402404099702835e-1f);
    p = hi * f2 + (vbroadcast(6.931242942810059e-1f) * f + 1.0f);
  }
  return p * as_float(bits);
}

inline float exp_scalar(float x) { return vexp(vbroadcast(x))[0]; }

// tanh(x) (Cephes' tanhf): an odd polynomial for |x| < 0.625, 1 - 2/(e^{2|x|} + 1) above, the sign of x.
inline vfloat vtanh(vfloat x) {
  const vfloat ax = as_float(as_uint(x) & 0x7fffffffu);
  const vfloat z = x * x;
  vfloat p = vbroadcast(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const vfloat small = p * z * x + x;
  const vfloat large = copysign(1.0f - 2.0f / (vexp(vmin(ax, vbroadcast(20.0f)) * 2.0f) + 1.0f), x);
  const vfloat t = ax < 0.625f ? small : large;
  return x != x ? x : t;
}

}  // namespace fusedops::cpu::FUSEDOPS_CPU_ISA
