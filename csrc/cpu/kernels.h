// Torch-free multi-tensor CPU kernels (OpenMP). csrc/ops.cpp validates tensors and passes raw
// pointers; every list holds one pointer per tensor, all lists aligned with `numel`.
// Parameters/grads/optimizer state have the element type `dtype`; θ* and Ω have its
// accumulation type (float, or double for fp64 parameters).
#pragma once

#include <cstdint>

namespace mas_fast {

enum class DType : int { f32, f64, bf16, f16 };

// The tensors of one multi-tensor call. Pointers a kernel does not use may be null.
struct TensorLists {
  int64_t n = 0;                            // number of tensors
  const int64_t* numel = nullptr;           // elements of tensor i
  void* const* params = nullptr;            // θ (written by optimizer steps)
  void* const* grads = nullptr;             // ∂L/∂θ (written by penalty_and_grad / penalty_grad)
  const void* const* theta_star = nullptr;  // θ* (null: no MAS penalty for these tensors)
  const void* const* omega = nullptr;       // Ω
};

namespace cpu {

// The penalty's terms Ω(θ−θ*)² are computed and summed in double per 65,536-element chunk,
// the chunk sums added in a fixed order: deterministic, independent of the thread count, and
// finite even for Ω near the fp32 limit. Gradients are (2λ·Ω)·(θ−θ*), in that order.

// Σ Ω(θ − θ*)² (without λ).
double penalty(DType dtype, const TensorLists& t, int threads);
// grads[i] = scale·Ω(θ − θ*) (grads is an output here): the penalty's backward, scale = 2λ·ḡ.
void penalty_grad(DType dtype, const TensorLists& t, double scale, int threads);
// grads[i] += 2λΩ(θ − θ*); returns λΣΩ(θ − θ*)².
double penalty_and_grad(DType dtype, const TensorLists& t, double lam, int threads);

// dst ← a·dst + b·src (Ω merge across tasks). dtype is f32 or f64 for both.
void merge(DType dtype, int64_t n, const int64_t* numel, void* const* dst, const void* const* src,
           double a, double b, int threads);
// Kahan-compensated running mean: mean ← mean + (S − n_b·mean)/(N + n_b), comp holds the
// lost low-order bits (same operation order as mas_fast.ops.reference.running_mean_update_).
void running_mean_update(DType dtype, int64_t n, const int64_t* numel, void* const* means,
                         void* const* comps, const void* const* batch_sums, int64_t count,
                         int64_t batch_count, int threads);

// Optimizer steps on the gradient g + 2λΩ(θ − θ*) (penalty folded in where theta_star is
// given); the arithmetic follows torch.optim's foreach implementation. Both return
// λΣΩ(θ − θ*)² at the parameters before the step (0 without theta_star).
struct SgdConfig {
  double lam, lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
  bool init_buffers;  // first step: buffer ← g (torch.optim's clone of the gradient)
};
double sgd_step(DType dtype, const TensorLists& t, void* const* momentum_buffers, const SgdConfig& c,
                int threads);

struct AdamConfig {
  double lam, lr, beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay, amsgrad, maximize;
  const double* step_size;  // per tensor: lr / (1 − β1^step)
  const double* bc2_sqrt;   // per tensor: sqrt(1 − β2^step)
};
double adam_step(DType dtype, const TensorLists& t, void* const* exp_avgs, void* const* exp_avg_sqs,
                 void* const* max_exp_avg_sqs, const AdamConfig& c, int threads);

}  // namespace cpu
}  // namespace mas_fast
