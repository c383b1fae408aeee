// Multi-tensor penalty: one pass over (θ, θ*, Ω, grad) that writes grad += 2λΩ(θ − θ*) and
// reduces λ Σ Ω (θ − θ*)² — 20 bytes per fp32 parameter, the memory-bound minimum (18 with the
// lean bf16 Ω, 10 per bf16 parameter with lean state).
#include "cuda/kernels.h"
#include "multi_tensor.cuh"
#include "reduce.cuh"

namespace mas_fast {
namespace cuda {
namespace {

// θ−θ*, the terms and the gradient entries in double, rounded once (as reference.py): a huge
// 2λΩ with a small θ−θ* gives the reference's finite gradient, not an early inf. θ* (TS) and
// Ω (OM) are widened on load (lean state: TS = P, OM = bf16).
template <typename P, typename TS, typename OM>
struct PenaltyOp {
  using M = typename MathOf<P>::type;
  double two_lam;

  // ptrs: θ, θ*, Ω, grad (nullptr: the value only)
  __device__ __forceinline__ double operator()(void** ptrs, int64_t start, int64_t n, bool vec) const {
    const P* theta = static_cast<const P*>(ptrs[0]) + start;
    const TS* star = static_cast<const TS*>(ptrs[1]) + start;
    const OM* omega = static_cast<const OM*>(ptrs[2]) + start;
    P* grad = ptrs[3] ? static_cast<P*>(ptrs[3]) + start : nullptr;
    double acc = 0.0;
    for_each_slot(n, vec, [&](const IlpSlot& s) {
      P th[kILP], g[kILP];
      TS st[kILP];
      OM om[kILP];
      s.load(th, theta);
      s.load(st, star);
      s.load(om, omega);
      s.load(g, grad);
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        if (!s.valid(j)) continue;
        const double d = static_cast<double>(load_as<M>(&th[j])) - static_cast<double>(load_as<M>(&st[j]));
        const double w = static_cast<double>(load_as<M>(&om[j]));
        acc += penalty_term(w, d);
        if (grad) g[j] = from_math<P, M>(load_as<M>(&g[j]) + static_cast<M>(two_lam * w * d));
      }
      s.store(grad, g);
    });
    return acc;
  }
};

// grad = (*scale)·Ω(θ − θ*): the penalty's backward, the scale (2λ·upstream gradient) read on
// the device so that no host synchronisation is needed.
template <typename P, typename TS, typename OM>
struct PenaltyGradOp {
  using M = typename MathOf<P>::type;
  const double* scale;

  // ptrs: θ, θ*, Ω, grad
  __device__ __forceinline__ double operator()(void** ptrs, int64_t start, int64_t n, bool vec) const {
    const P* theta = static_cast<const P*>(ptrs[0]) + start;
    const TS* star = static_cast<const TS*>(ptrs[1]) + start;
    const OM* omega = static_cast<const OM*>(ptrs[2]) + start;
    P* grad = static_cast<P*>(ptrs[3]) + start;
    const double sc = *scale;
    for_each_slot(n, vec, [&](const IlpSlot& s) {
      P th[kILP], g[kILP];
      TS st[kILP];
      OM om[kILP];
      s.load(th, theta);
      s.load(st, star);
      s.load(om, omega);
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        if (!s.valid(j)) continue;
        const double d = static_cast<double>(load_as<M>(&th[j])) - static_cast<double>(load_as<M>(&st[j]));
        g[j] = from_math<P, M>(static_cast<M>(sc * static_cast<double>(load_as<M>(&om[j])) * d));
      }
      s.store(grad, g);
    });
    return 0.0;
  }
};

}  // namespace

int64_t partials_len(int64_t n, const int64_t* numel) { return total_chunks(n, numel); }

cudaError_t sum(const double* values, int64_t n, double* out, cudaStream_t stream) {
  return sum_partials(values, n, 1.0, out, stream);
}

cudaError_t penalty_and_grad(const DTypes& dtypes, const TensorLists& t, double lam, double* partials, double* out,
                             cudaStream_t stream) {
  void* const* lists[4] = {t.params, t.theta_star, t.omega, t.grads};
  return dispatch_dtypes(dtypes, [&](auto param, auto star, auto omega) {
    const PenaltyOp<typename decltype(param)::type, typename decltype(star)::type, typename decltype(omega)::type> op{
        2.0 * lam};
    const cudaError_t err = launch_multi_tensor<4>(t.n, lists, t.numel, op, partials, stream);
    return err != cudaSuccess ? err : sum_partials(partials, total_chunks(t.n, t.numel), lam, out, stream);
  });
}

cudaError_t penalty_grad(const DTypes& dtypes, const TensorLists& t, const double* scale, cudaStream_t stream) {
  void* const* lists[4] = {t.params, t.theta_star, t.omega, t.grads};
  return dispatch_dtypes(dtypes, [&](auto param, auto star, auto omega) {
    const PenaltyGradOp<typename decltype(param)::type, typename decltype(star)::type,
                        typename decltype(omega)::type>
        op{scale};
    return launch_multi_tensor<4>(t.n, lists, t.numel, op, nullptr, stream);
  });
}

}  // namespace cuda
}  // namespace mas_fast
