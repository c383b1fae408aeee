// Element types of the CPU kernels and their conversion to the accumulation type.
// Torch-free: bf16/fp16 are bit patterns converted by hand (round to nearest even), so the
// kernels compile in about a second and vectorise with plain integer/float SIMD.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>

namespace mas_fast {

// Storage-only tags for 16-bit floats: kernels read and write them through load()/store(),
// which work on the raw uint16_t bits so that the loops vectorise.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

// Accumulation / arithmetic type: float for fp32/bf16/fp16 parameters, double for fp64 (the
// dtype Ω and θ* are kept in).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// The conversions below are branch-free and compare only values below 2^31 (SSE2 has signed
// compares only), so that GCC vectorises the loops that use them (with -fno-trapping-math,
// see setup.py).

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// float -> bf16, round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t float_to_bf16(float x) {
  const uint32_t u = float_to_bits(x);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = int32_t(u & 0x7FFFFFFFu) > int32_t(0x7F800000u);
  return uint16_t(nan ? ((u >> 16) | 0x40u) : rounded);
}

// IEEE half -> float (after Maratyszcza's FP16 library, also used by c10::Half).
inline float f16_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const bool is_denormal = int32_t(w & 0x7FFFFFFFu) < int32_t(1u << 26);  // two_w < 2^27
  return bits_to_float(sign | float_to_bits(is_denormal ? denormalized : normalized));
}

// float -> IEEE half: round to nearest even, overflow to inf, NaN to NaN (FP16 library).
inline uint16_t float_to_f16(float x) {
  const uint32_t w = float_to_bits(x);
  const uint32_t sign = w & 0x80000000u;
  const uint32_t magnitude = w & 0x7FFFFFFFu;
  float base = (std::fabs(x) * 0x1.0p+112f) * 0x1.0p-110f;
  const int32_t exponent = int32_t(w & 0x7F800000u);  // the library's (2w & 0xFF000000) >> 1
  const int32_t bias = exponent < 0x38800000 ? 0x38800000 : exponent;
  base = bits_to_float(uint32_t(bias) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  const bool nan = int32_t(magnitude) > int32_t(0x7F800000u);
  return uint16_t((sign >> 16) | (nan ? 0x7E00u : nonsign));
}

// Element i of a tensor, in the accumulation type.
inline float load(const float* p, int64_t i) { return p[i]; }
inline double load(const double* p, int64_t i) { return p[i]; }
inline float load(const bf16* p, int64_t i) { return bf16_to_float(reinterpret_cast<const uint16_t*>(p)[i]); }
inline float load(const f16* p, int64_t i) { return f16_to_float(reinterpret_cast<const uint16_t*>(p)[i]); }

// Writes x (accumulation type) to element i, rounding to nearest even.
inline void store(float* p, int64_t i, float x) { p[i] = x; }
inline void store(double* p, int64_t i, double x) { p[i] = x; }
inline void store(bf16* p, int64_t i, float x) { reinterpret_cast<uint16_t*>(p)[i] = float_to_bf16(x); }
inline void store(f16* p, int64_t i, float x) { reinterpret_cast<uint16_t*>(p)[i] = float_to_f16(x); }

}  // namespace mas_fast
