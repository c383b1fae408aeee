// The CUDA kernels on the shared interface of mas_fast_kernels.h: raw pointers and
// cudaStream_t only, no torch headers, so that the .cu files compile in seconds.
// cuda/register.cpp validates tensors, groups them and calls these.
//
// Each op launches on `stream` and returns the launch's cudaError_t. The penalty-reducing ops
// write λΣΩ(θ−θ*)² to *out, a device double, summed deterministically from one double per
// 65,536-element chunk in `partials` (partials_len() slots). The fused optimizers also accept
// null θ*/Ω entries per tensor (a parameter MAS does not cover: a plain step). The penalty and
// step kernels read θ* and Ω in the element types of `dtypes` (lean state: widened on load).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "mas_fast_kernels.h"

namespace mas_fast {
namespace cuda {

// Number of double slots `partials` must hold for a multi-tensor reduction over `numel`.
int64_t partials_len(int64_t n, const int64_t* numel);

// *out = Σ values[0:n) in a fixed order (the penalty values of several calls).
cudaError_t sum(const double* values, int64_t n, double* out, cudaStream_t stream);

// λΣΩ(θ − θ*)² to *out, and grad += 2λΩ(θ − θ*) when t.grads is not null.
cudaError_t penalty_and_grad(const DTypes& dtypes, const TensorLists& t, double lam, double* partials, double* out,
                             cudaStream_t stream);

// grads[i] = (*scale)·Ω(θ − θ*) (grads written, not accumulated): the penalty's backward, with
// scale = 2λ·(upstream gradient) as a device double, so no host synchronisation is needed.
cudaError_t penalty_grad(const DTypes& dtypes, const TensorLists& t, const double* scale, cudaStream_t stream);

// dst ← a·dst + b·src; dtype f32 or f64 for both lists.
cudaError_t merge(DType dtype, int64_t n, const int64_t* numel, void* const* dst, void* const* src, double a,
                  double b, cudaStream_t stream);

// Kahan-compensated running mean: mean += (sum − batch_count·mean)/(count + batch_count).
cudaError_t running_mean_update(DType dtype, int64_t n, const int64_t* numel, void* const* means,
                                void* const* comps, void* const* batch_sums, int64_t count, int64_t batch_count,
                                cudaStream_t stream);

// Fused optimizer steps (see mas_fast/ops/reference.py sgd_step_ / adam_step_ for the order of
// operations); the penalty at the parameters before the step goes to *out. adam_step takes
// the bias corrections of c.steps[0] for every tensor of the call.
cudaError_t sgd_step(const DTypes& dtypes, const TensorLists& t, void* const* momentum_buffers, const SgdConfig& c,
                     double* partials, double* out, cudaStream_t stream);
cudaError_t adam_step(const DTypes& dtypes, const TensorLists& t, void* const* exp_avgs, void* const* exp_avg_sqs,
                      void* const* max_exp_avg_sqs, const AdamConfig& c, double* partials, double* out,
                      cudaStream_t stream);

// out[c] = Σ_k |Σ_t δ[k,t,c] · s[k,t,c]| (s == nullptr: 1) for strided (B, T, C) inputs of
// dtype f32, bf16 or f16 (each its own); out is float32. `workspace` holds at least
// per_sample_abs_sum_workspace_len(B, C) doubles.
int64_t per_sample_abs_sum_workspace_len(int64_t B, int64_t C);
cudaError_t per_sample_abs_sum(DType delta_dtype, const void* delta, const int64_t* delta_strides,
                               DType scale_dtype, const void* scale, const int64_t* scale_strides, int64_t B,
                               int64_t T, int64_t C, float* out, double* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace mas_fast
