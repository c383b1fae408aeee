// C++ API of the CUDA kernels: raw pointers and cudaStream_t only, no torch headers, so that
// the .cu files compile in seconds. csrc/ops.cpp validates tensors and calls these.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace mas_fast {
namespace cuda {

// Storage type of parameters/gradients (and of the per-sample importance inputs).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Number of double slots `partials` must hold for a multi-tensor reduction over `numels`.
int64_t partials_len(int n, const int64_t* numels);

// Penalty λ Σ Ω (θ − θ*)² over n tensors, and (when grads != nullptr) grad += 2λΩ(θ − θ*).
// params/grads: `dtype`; theta_star/omega: float32, or float64 when dtype is kFloat64.
// The value is written to *out (a device scalar of the state dtype), summed deterministically.
cudaError_t penalty_and_grad(DType dtype, int n, void* const* params, void* const* grads,
                             void* const* theta_star, void* const* omega, const int64_t* numels,
                             double lam, double* partials, void* out, cudaStream_t stream);

// grads[i] = (*scale)·Ω(θ − θ*) (grads written, not accumulated): the penalty's backward, with
// scale = 2λ·(upstream gradient) as a device double, so no host synchronisation is needed.
cudaError_t penalty_grad(DType dtype, int n, void* const* params, void* const* grads, void* const* theta_star,
                         void* const* omega, const int64_t* numels, const double* scale, cudaStream_t stream);

// dst ← a·dst + b·src for n tensors of the state dtype (float32, or float64 when is_double).
cudaError_t merge(bool is_double, int n, void* const* dst, void* const* src, const int64_t* numels,
                  double a, double b, cudaStream_t stream);

// Kahan-compensated running mean: mean += (sum − batch_count·mean)/(count + batch_count).
cudaError_t running_mean_update(bool is_double, int n, void* const* mean, void* const* comp,
                                void* const* batch_sum, const int64_t* numels, int64_t count,
                                int64_t batch_count, cudaStream_t stream);

// out[c] = Σ_k |Σ_t δ[k,t,c] · s[k,t,c]| (s == nullptr: 1) for strided (B, T, C) inputs.
// delta and scale have their own dtypes; out is float32 (float64 when out_double).
// `workspace` holds at least per_sample_abs_sum_workspace_len(B, C) doubles.
int64_t per_sample_abs_sum_workspace_len(int64_t B, int64_t C);
cudaError_t per_sample_abs_sum(DType delta_dtype, const void* delta, const int64_t* delta_strides,
                               DType scale_dtype, const void* scale, const int64_t* scale_strides,
                               int64_t B, int64_t T, int64_t C, bool out_double, void* out,
                               double* workspace, cudaStream_t stream);

// Fused optimizer steps with the penalty folded in (see mas_fast/ops/reference.py sgd_step_ /
// adam_step_ for the exact order of operations). All lists hold `n` tensors of `numels`;
// a list pointer may be nullptr (no momentum / no amsgrad), and theta_star/omega entries may
// be nullptr per tensor (a parameter MAS does not cover: plain step). The penalty at the
// parameters before the step goes to *out_penalty (state dtype); partials as for
// penalty_and_grad.
struct SgdArgs {
  int n;
  void* const* params;
  void* const* grads;
  void* const* momentum_buffers;
  void* const* theta_star;
  void* const* omega;
  const int64_t* numels;
  double lam, lr, momentum, dampening, weight_decay;
  bool nesterov, maximize, init_buffers;
  double* partials;
  void* out_penalty;
};
cudaError_t sgd_step(DType dtype, const SgdArgs& args, cudaStream_t stream);

struct AdamArgs {
  int n;
  void* const* params;
  void* const* grads;
  void* const* exp_avgs;
  void* const* exp_avg_sqs;
  void* const* max_exp_avg_sqs;  // nullptr without amsgrad
  void* const* theta_star;
  void* const* omega;
  const int64_t* numels;
  double lam, lr, beta1, beta2, eps, weight_decay;
  double step;  // the step count after incrementing (same for all n tensors)
  bool decoupled_weight_decay, maximize;
  double* partials;
  void* out_penalty;
};
cudaError_t adam_step(DType dtype, const AdamArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace mas_fast
