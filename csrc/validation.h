// Input checks shared by the CPU and CUDA registrations: every op validates all of its
// arguments before a kernel runs or a tensor is written, and a failure names the list, the
// index and the problem (TypeError for dtypes, ValueError for everything else).
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <utility>

namespace mas_fast {

using NamedLists = std::initializer_list<std::pair<const char*, at::TensorList>>;

// The dtype Ω and θ* are kept in for parameters of dtype t.
at::ScalarType acc_type(at::ScalarType t);

// Every tensor of `lists` on `device`.
void check_on(const char* op, NamedLists lists, const at::Device& device);

// penalty / penalty_backward: params of a supported dtype, θ* and Ω one per parameter, all on
// `device`: θ* in the parameter's accumulation dtype or its own, Ω in the accumulation dtype or
// bfloat16 (mas_fast_kernels.h). The optimizer steps check θ*/Ω the same way.
void check_penalty_op(const char* op, at::TensorList params, at::TensorList theta_star, at::TensorList omega,
                      const at::Device& device);
// penalty_and_grad_: as check_penalty_op, plus grads like params.
void check_penalty_and_grad_op(const char* op, at::TensorList params, at::TensorList grads,
                               at::TensorList theta_star, at::TensorList omega, const at::Device& device);
// penalty_backward's upstream gradient: one element.
void check_grad_out(const char* op, const at::Tensor& grad_out);

// Ω merge / running mean: float32 or float64 lists matching the first list, on `device`.
void check_state_op(const char* op, NamedLists lists, const at::Device& device);
void check_counts(const char* op, int64_t count, int64_t batch_count);

void check_sgd_op(const char* op, at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  at::TensorList theta_star, at::TensorList omega, double momentum, double dampening,
                  bool nesterov, const at::Device& device);
// Adam state like params; steps are one-element floating-point CPU counters.
void check_adam_op(const char* op, at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                   at::TensorList theta_star, at::TensorList omega, bool amsgrad, const at::Device& device);

// per_sample_abs_sum: (B, T, C) delta of float32/bfloat16/float16, scale (optional) like it.
void check_per_sample_abs_sum(const char* op, const at::Tensor& delta, const std::optional<at::Tensor>& scale);

// per_sample_abs_matmul: delta (B, G, T, O) and x (B, G, T, I) of float32/float64/bfloat16/float16
// on one device, with the same B, G and T.
void check_per_sample_abs_matmul(const char* op, const at::Tensor& delta, const at::Tensor& x);

}  // namespace mas_fast
