// Multi-tensor penalty: one pass over (θ, θ*, Ω, grad) that writes grad += 2λΩ(θ − θ*) and
// reduces λ Σ Ω (θ − θ*)² — 20 bytes per fp32 parameter, the memory-bound minimum.
#include "mas_cuda.h"
#include "multi_tensor.cuh"
#include "reduce.cuh"

namespace mas_fast {
namespace cuda {
namespace {

template <typename P, typename S>
struct PenaltyOp {
  using M = typename MathOf<P>::type;
  M two_lam;

  // ptrs: θ, θ*, Ω, grad (nullptr: the value only)
  __device__ __forceinline__ double operator()(void** ptrs, int64_t start, int64_t n, bool vec) const {
    const P* theta = static_cast<const P*>(ptrs[0]) + start;
    const S* star = static_cast<const S*>(ptrs[1]) + start;
    const S* omega = static_cast<const S*>(ptrs[2]) + start;
    P* grad = ptrs[3] ? static_cast<P*>(ptrs[3]) + start : nullptr;
    double acc = 0.0;
    for_each_slot(n, vec, [&](const IlpSlot& s) {
      P th[kILP], g[kILP];
      S st[kILP], om[kILP];
      s.load(th, theta);
      s.load(st, star);
      s.load(om, omega);
      s.load(g, grad);
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        if (!s.valid(j)) continue;
        const M d = load_as<M>(&th[j]) - static_cast<M>(st[j]);
        const M w = static_cast<M>(om[j]);
        acc += penalty_term(w, d);
        if (grad) g[j] = from_math<P, M>(load_as<M>(&g[j]) + two_lam * w * d);
      }
      s.store(grad, g);
    });
    return acc;
  }
};

// grad = (*scale)·Ω(θ − θ*): the penalty's backward, the scale (2λ·upstream gradient) read on
// the device so that no host synchronisation is needed.
template <typename P, typename S>
struct PenaltyGradOp {
  using M = typename MathOf<P>::type;
  const double* scale;

  // ptrs: θ, θ*, Ω, grad
  __device__ __forceinline__ double operator()(void** ptrs, int64_t start, int64_t n, bool vec) const {
    const P* theta = static_cast<const P*>(ptrs[0]) + start;
    const S* star = static_cast<const S*>(ptrs[1]) + start;
    const S* omega = static_cast<const S*>(ptrs[2]) + start;
    P* grad = static_cast<P*>(ptrs[3]) + start;
    const M sc = static_cast<M>(*scale);
    for_each_slot(n, vec, [&](const IlpSlot& s) {
      P th[kILP], g[kILP];
      S st[kILP], om[kILP];
      s.load(th, theta);
      s.load(st, star);
      s.load(om, omega);
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        if (!s.valid(j)) continue;
        const M d = load_as<M>(&th[j]) - static_cast<M>(st[j]);
        g[j] = from_math<P, M>((sc * static_cast<M>(om[j])) * d);
      }
      s.store(grad, g);
    });
    return 0.0;
  }
};

template <typename P, typename S>
cudaError_t run(int n, void* const* params, void* const* grads, void* const* theta_star,
                void* const* omega, const int64_t* numels, double lam, double* partials, void* out,
                cudaStream_t stream) {
  using M = typename MathOf<P>::type;
  void* const* lists[4] = {params, theta_star, omega, grads};
  const int64_t slots = total_chunks(n, numels);
  cudaError_t err = launch_multi_tensor<4>(n, lists, numels, PenaltyOp<P, S>{static_cast<M>(2.0 * lam)},
                                           partials, stream);
  if (err != cudaSuccess) return err;
  return sum_partials(partials, slots, lam, static_cast<S*>(out), stream);
}

template <typename P, typename S>
cudaError_t run_grad(int n, void* const* params, void* const* grads, void* const* theta_star,
                     void* const* omega, const int64_t* numels, const double* scale, cudaStream_t stream) {
  void* const* lists[4] = {params, theta_star, omega, grads};
  return launch_multi_tensor<4>(n, lists, numels, PenaltyGradOp<P, S>{scale}, nullptr, stream);
}

}  // namespace

cudaError_t penalty_grad(DType dtype, int n, void* const* params, void* const* grads, void* const* theta_star,
                         void* const* omega, const int64_t* numels, const double* scale, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return run_grad<float, float>(n, params, grads, theta_star, omega, numels, scale, stream);
    case DType::kFloat16: return run_grad<__half, float>(n, params, grads, theta_star, omega, numels, scale, stream);
    case DType::kBFloat16:
      return run_grad<__nv_bfloat16, float>(n, params, grads, theta_star, omega, numels, scale, stream);
    case DType::kFloat64: return run_grad<double, double>(n, params, grads, theta_star, omega, numels, scale, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t partials_len(int n, const int64_t* numels) { return total_chunks(n, numels); }

cudaError_t penalty_and_grad(DType dtype, int n, void* const* params, void* const* grads,
                             void* const* theta_star, void* const* omega, const int64_t* numels,
                             double lam, double* partials, void* out, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return run<float, float>(n, params, grads, theta_star, omega, numels, lam, partials, out, stream);
    case DType::kFloat16:
      return run<__half, float>(n, params, grads, theta_star, omega, numels, lam, partials, out, stream);
    case DType::kBFloat16:
      return run<__nv_bfloat16, float>(n, params, grads, theta_star, omega, numels, lam, partials, out, stream);
    case DType::kFloat64:
      return run<double, double>(n, params, grads, theta_star, omega, numels, lam, partials, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace mas_fast
