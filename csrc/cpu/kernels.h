// The CPU kernels (OpenMP, torch-free) on the shared interface of mas_fast_kernels.h; the
// penalty and step kernels take one call's element types as DTypes (lean θ*/Ω widened on load).
// The penalty's terms Ω(θ−θ*)² are computed and summed in double per 65,536-element chunk,
// the chunk sums added in a fixed order: deterministic, independent of the thread count, and
// finite even for Ω near the fp32 limit. Gradients are (2λ·Ω)·(θ−θ*), in that order.
#pragma once

#include <cstdint>

#include "mas_fast_kernels.h"

namespace mas_fast {
namespace cpu {

// λΣΩ(θ − θ*)² (grads unused).
double penalty(const DTypes& dtypes, const TensorLists& t, double lam, int threads);
// grads[i] = scale·Ω(θ − θ*) (grads is an output here): the penalty's backward, scale = 2λ·ḡ.
void penalty_grad(const DTypes& dtypes, const TensorLists& t, double scale, int threads);
// grads[i] += 2λΩ(θ − θ*); returns λΣΩ(θ − θ*)².
double penalty_and_grad(const DTypes& dtypes, const TensorLists& t, double lam, int threads);

// dst ← a·dst + b·src (Ω merge across tasks). dtype is f32 or f64 for both.
void merge(DType dtype, int64_t n, const int64_t* numel, void* const* dst, void* const* src, double a,
           double b, int threads);
// Kahan-compensated running mean: mean ← mean + (S − n_b·mean)/(N + n_b), comp holds the
// lost low-order bits (same operation order as mas_fast.ops.reference.running_mean_update_).
void running_mean_update(DType dtype, int64_t n, const int64_t* numel, void* const* means, void* const* comps,
                         void* const* batch_sums, int64_t count, int64_t batch_count, int threads);

// Optimizer steps; both return λΣΩ(θ − θ*)² at the parameters before the step (0 without θ*).
double sgd_step(const DTypes& dtypes, const TensorLists& t, void* const* momentum_buffers, const SgdConfig& c,
                int threads);
double adam_step(const DTypes& dtypes, const TensorLists& t, void* const* exp_avgs, void* const* exp_avg_sqs,
                 void* const* max_exp_avg_sqs, const AdamConfig& c, int threads);

// Per-sample importance of a weight used at T positions per sample: out[g] += Σ_k |Σ_t δ_kgt x_kgtᵀ|
// for delta (G, B, T, O), x (G, B, T, I), out (G, O, I), all contiguous, of the accumulation
// type `dtype` (f32 or f64).
void per_sample_abs_matmul(DType dtype, int64_t G, int64_t B, int64_t T, int64_t O, int64_t I, const void* delta,
                           const void* x, void* out, int threads);

}  // namespace cpu
}  // namespace mas_fast
