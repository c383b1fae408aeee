// The kernel interface shared by the CPU (cpu/kernels.h) and CUDA (cuda/kernels.h) kernels:
// torch-free and CUDA-free, so both devices speak one dialect. The registrations
// (cpu/register.cpp, cuda/register.cpp) validate tensors and fill these structs with the raw
// pointers of contiguous tensors of one dtype.
//
// Conventions for every multi-tensor op:
// - params, grads and optimizer state have the element type `DTypes::param`; θ* and Ω have
//   their own (`DTypes`): by default the parameters' accumulation type (f32 for f32/bf16/f16
//   parameters, f64 for f64 ones), in the lean state θ* in the parameters' dtype and Ω in
//   bf16. Kernels widen θ* and Ω to the accumulation type in registers (no copies);
// - an op that reduces the penalty returns λΣΩ(θ−θ*)² WITH λ, as a double (CPU: the return
//   value; CUDA: a device double the caller converts), each term computed in double;
// - a pointer list a call does not use is null; θ*/Ω null means "no MAS penalty".
#pragma once

#include <cstdint>
#include <tuple>

namespace mas_fast {

// Element type of the parameters (and of per-sample importance inputs).
enum class DType : int { f32 = 0, f64 = 1, bf16 = 2, f16 = 3 };

// The accumulation type of parameters of dtype `param`: f64 for f64, else f32.
constexpr DType acc_dtype(DType param) { return param == DType::f64 ? DType::f64 : DType::f32; }

// The element types of one multi-tensor call: parameters (with grads and optimizer state), θ*
// (acc_dtype(param) or param) and Ω (acc_dtype(param) or bf16).
struct DTypes {
  DType param, theta_star, omega;
};

// The default state (θ* and Ω in the accumulation type); also what a call without θ*/Ω passes.
constexpr DTypes full_state(DType param) { return {param, acc_dtype(param), acc_dtype(param)}; }

inline bool operator<(const DTypes& a, const DTypes& b) {
  return std::tie(a.param, a.theta_star, a.omega) < std::tie(b.param, b.theta_star, b.omega);
}

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
