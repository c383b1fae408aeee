// Multi-tensor work splitting (like apex/ATen MultiTensorApply): every tensor is cut into
// fixed 65,536-element chunks and one OpenMP loop covers the chunks of all tensors.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "numeric.h"

namespace mas_fast {

constexpr int64_t kChunk = 1 << 16;

struct Chunk {
  int64_t tensor, begin, end;
};

inline std::vector<Chunk> make_chunks(int64_t n, const int64_t* numel) {
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t b = 0; b < numel[i]; b += kChunk)
      chunks.push_back({i, b, b + kChunk < numel[i] ? b + kChunk : numel[i]});
  return chunks;
}

// Calls f(chunk) for every chunk in parallel and returns the sum of its results, added in
// chunk order so that the total does not depend on the number of threads.
template <typename F>
double sum_over_chunks(int64_t n, const int64_t* numel, int threads, F&& f) {
  const std::vector<Chunk> chunks = make_chunks(n, numel);
  const int64_t count = static_cast<int64_t>(chunks.size());
  std::vector<double> partial(chunks.size(), 0.0);
#pragma omp parallel for schedule(static) num_threads(threads) if (count > 1)
  for (int64_t c = 0; c < count; ++c) partial[c] = f(chunks[c]);
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

// sum_over_chunks for in-place ops that return nothing.
template <typename F>
void for_each_chunk(int64_t n, const int64_t* numel, int threads, F&& f) {
  sum_over_chunks(n, numel, threads, [&](const Chunk& c) {
    f(c);
    return 0.0;
  });
}

// Σ term(i) for i in [begin, end), in double, kept in 8 independent partial sums: the loop
// vectorises without -ffast-math and the result is deterministic. term may also write element i.
template <typename F>
inline double lane_sum(int64_t begin, int64_t end, F&& term) {
  constexpr int kLanes = 8;
  double lanes[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes)
    for (int k = 0; k < kLanes; ++k) lanes[k] += term(i + k);
  for (int k = 0; i < end; ++i, ++k) lanes[k] += term(i);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Ω(θ−θ*)² of one element, in double: finite whenever the term itself fits a double, even
// when Ω(θ−θ*) would overflow fp32. (Gradients are computed as (2λ·Ω)·(θ−θ*) for the same
// reason: 2λΩ(θ−θ*) fits where Ω(θ−θ*) may not.)
template <typename D, typename A>
inline double penalty_term(D d, A om) {
  return double(om) * double(d) * double(d);
}

// θ − θ* in double (exact for float operands).
template <typename A>
inline double diff(A theta, A star) {
  return double(theta) - double(star);
}

template <typename T> struct Type { using type = T; };

// Calls body(Type<T>{}) for the C++ type T of `dtype`.
template <typename Body>
auto dispatch_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::f32: return body(Type<float>{});
    case DType::f64: return body(Type<double>{});
    case DType::bf16: return body(Type<bf16>{});
    case DType::f16: return body(Type<f16>{});
  }
  throw std::invalid_argument("mas_fast: unknown dtype");
}

template <typename T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::f32; }
template <> constexpr DType dtype_of<double>() { return DType::f64; }
template <> constexpr DType dtype_of<bf16>() { return DType::bf16; }
template <> constexpr DType dtype_of<f16>() { return DType::f16; }

// Calls body(Type<X>{}) or body(Type<Y>{}), whichever `dtype` names (one instantiation when X is Y).
template <typename X, typename Y, typename Body>
auto dispatch_either(DType dtype, Body&& body) {
  if (dtype == dtype_of<X>()) return body(Type<X>{});
  if (dtype == dtype_of<Y>()) return body(Type<Y>{});
  throw std::invalid_argument("mas_fast: unsupported state dtype");  // validation rejects it before
}

// Calls body(Type<T>{}, Type<TS>{}, Type<OM>{}) for the element types of the parameters, θ*
// (acc_t<T> or T) and Ω (acc_t<T> or bf16) of `dtypes` (mas_fast_kernels.h).
template <typename Body>
auto dispatch_dtypes(const DTypes& dtypes, Body&& body) {
  return dispatch_dtype(dtypes.param, [&](auto param) {
    using T = typename decltype(param)::type;
    return dispatch_either<acc_t<T>, T>(dtypes.theta_star, [&](auto star) {
      return dispatch_either<acc_t<T>, bf16>(dtypes.omega, [&](auto omega) { return body(param, star, omega); });
    });
  });
}

// The element types of a dispatch_dtypes body: parameters T, θ* TS, Ω OM, arithmetic A.
#define MAS_FAST_STATE_TYPES(param, star, omega)   \
  using T = typename decltype(param)::type;         \
  using TS = typename decltype(star)::type;         \
  using OM = typename decltype(omega)::type;        \
  using A = acc_t<T>;

// Same for ops whose tensors are all in an accumulation type (Ω merge, running means).
template <typename Body>
auto dispatch_acc_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::f32: return body(Type<float>{});
    case DType::f64: return body(Type<double>{});
    default: throw std::invalid_argument("mas_fast: expected a float32 or float64 tensor");
  }
}

// Calls f(std::true_type{}) or f(std::false_type{}): turns a flag that decides whether a loop
// stores to an array into a compile-time constant, so that the loop has no branches.
template <typename F>
auto with_flag(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

template <typename T> inline T* ptr(void* const* list, int64_t i) { return static_cast<T*>(list[i]); }

}  // namespace mas_fast
