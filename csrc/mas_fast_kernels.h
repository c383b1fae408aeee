// The kernel interface shared by the CPU (cpu/kernels.h) and CUDA (cuda/kernels.h) kernels:
// torch-free and CUDA-free, so both devices speak one dialect. The registrations
// (cpu/register.cpp, cuda/register.cpp) validate tensors and fill these structs with the raw
// pointers of contiguous tensors of one dtype.
//
// Conventions for every multi-tensor op:
// - params, grads and optimizer state have the element type `dtype`; θ* and Ω have its
//   accumulation type (f32 for f32/bf16/f16 parameters, f64 for f64 ones);
// - an op that reduces the penalty returns λΣΩ(θ−θ*)² WITH λ, as a double (CPU: the return
//   value; CUDA: a device double the caller converts), each term computed in double;
// - a pointer list a call does not use is null; θ*/Ω null means "no MAS penalty".
#pragma once

#include <cstdint>

namespace mas_fast {

// Element type of the parameters (and of per-sample importance inputs).
enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// The tensors of one multi-tensor call; all lists are aligned with `numel`.
struct TensorLists {
  int64_t n = 0;                      // number of tensors
  const int64_t* numel = nullptr;     // elements of tensor i
  void* const* params = nullptr;      // θ (written by optimizer steps)
  void* const* grads = nullptr;       // ∂L/∂θ (written by penalty_and_grad / penalty_grad)
  void* const* theta_star = nullptr;  // θ* (null: no MAS penalty for these tensors)
  void* const* omega = nullptr;       // Ω
};

// How the penalty enters a step (mas_fast/ops/optim_config.py): `proximal` false, the step on
// g + 2λΩ(θ−θ*); true, the step on g alone gives θ', then θ ← θ* + (θ'−θ*) / (1 + 2·lr·λΩ)
// (the optimizer state sees g only). Ignored without θ*.

// SGD in torch.optim's foreach order of operations.
struct SgdConfig {
  double lam, lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
  bool init_buffers;  // first step: buffer ← g (torch.optim's clone of the gradient)
  bool proximal;
};

// Adam / AdamW; bias corrections from `steps`.
struct AdamConfig {
  double lam, lr, beta1, beta2, eps, weight_decay;
  bool decoupled_weight_decay, amsgrad, maximize, proximal;
  // Per tensor: torch.optim's step count after incrementing. The CUDA kernels take one step
  // count per call (steps[0]); cuda/register.cpp groups the tensors by step.
  const double* steps;
};

}  // namespace mas_fast
