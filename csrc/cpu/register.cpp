// CPU implementations of the mas_fast ops (TORCH_LIBRARY_IMPL(mas_fast, CPU)): validate every
// argument, then hand each dtype group's (parameters, θ*, Ω) contiguous pointers to the OpenMP kernels of
// cpu/kernels.h and write the results back into non-contiguous targets.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "cpu/kernels.h"
#include "tensor_lists.h"
#include "validation.h"

namespace mas_fast {
namespace {

using at::Tensor;
using at::TensorList;

const at::Device kCPU(at::kCPU);

int threads() { return at::get_num_threads(); }

Tensor as_result(double value, TensorList theta_star, TensorList omega) {
  return penalty_result(at::scalar_tensor(value, at::TensorOptions().dtype(at::kDouble)), theta_star, omega);
}

Tensor penalty(TensorList params, TensorList theta_star, TensorList omega, double lam) {
  check_penalty_op("mas_fast::penalty", params, theta_star, omega, kCPU);
  double total = 0.0;
  for (const auto& [dtypes, index] : group_by_dtypes(params, theta_star, omega)) {
    GroupLists g(index, params, {}, theta_star, omega);
    total += cpu::penalty(dtypes, g.lists, lam, threads());
  }
  return as_result(total, theta_star, omega);
}

std::vector<Tensor> penalty_backward(const Tensor& grad_out, TensorList params, TensorList theta_star,
                                     TensorList omega, double lam) {
  const char* op = "mas_fast::penalty_backward";
  check_penalty_op(op, params, theta_star, omega, kCPU);
  check_grad_out(op, grad_out);
  std::vector<Tensor> grads;
  for (const Tensor& p : params) grads.push_back(at::empty(p.sizes(), p.options()));
  const double scale = 2.0 * lam * grad_out.item<double>();
  for (const auto& [dtypes, index] : group_by_dtypes(params, theta_star, omega)) {
    GroupLists g(index, params, grads, theta_star, omega);
    cpu::penalty_grad(dtypes, g.lists, scale, threads());
  }
  return grads;
}

Tensor penalty_and_grad(TensorList params, TensorList grads, TensorList theta_star, TensorList omega, double lam) {
  check_penalty_and_grad_op("mas_fast::penalty_and_grad_", params, grads, theta_star, omega, kCPU);
  double total = 0.0;
  for (const auto& [dtypes, index] : group_by_dtypes(params, theta_star, omega)) {
    GroupLists g(index, params, grads, theta_star, omega);
    total += cpu::penalty_and_grad(dtypes, g.lists, lam, threads());
    g.grads.write_back();
  }
  return as_result(total, theta_star, omega);
}

void merge(TensorList dst, TensorList src, double a, double b) {
  check_state_op("mas_fast::merge_", {{"dst", dst}, {"src", src}}, kCPU);
  for (const auto& [dtype, index] : group_by_dtype(dst)) {
    Operand d(dst, index), s(src, index);
    const std::vector<int64_t> numel = numels(dst, index);
    cpu::merge(dtype, int64_t(index.size()), numel.data(), d.ptrs(), s.ptrs(), a, b, threads());
    d.write_back();
  }
}

void running_mean_update(TensorList means, TensorList comps, TensorList batch_sums, int64_t count,
                         int64_t batch_count) {
  const char* op = "mas_fast::running_mean_update_";
  check_state_op(op, {{"means", means}, {"comps", comps}, {"batch_sums", batch_sums}}, kCPU);
  check_counts(op, count, batch_count);
  for (const auto& [dtype, index] : group_by_dtype(means)) {
    Operand m(means, index), c(comps, index), s(batch_sums, index);
    const std::vector<int64_t> numel = numels(means, index);
    cpu::running_mean_update(dtype, int64_t(index.size()), numel.data(), m.ptrs(), c.ptrs(), s.ptrs(), count,
                             batch_count, threads());
    m.write_back();
    c.write_back();
  }
}

Tensor sgd_step(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList theta_star,
                TensorList omega, double lam, double lr, double momentum, double dampening, double weight_decay,
                bool nesterov, bool maximize, bool init_buffers, bool proximal) {
  check_sgd_op("mas_fast::sgd_step_", params, grads, momentum_buffers, theta_star, omega, momentum, dampening,
               nesterov, kCPU);
  const SgdConfig config{lam, lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffers, proximal};
  double total = 0.0;
  for (const auto& [dtypes, index] : group_by_dtypes(params, theta_star, omega)) {
    GroupLists g(index, params, grads, theta_star, omega);
    Operand buf(momentum_buffers, index);
    total += cpu::sgd_step(dtypes, g.lists, buf.ptrs(), config, threads());
    g.params.write_back();
    buf.write_back();
  }
  return as_result(total, theta_star, omega);
}

Tensor adam_step(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList max_exp_avg_sqs, TensorList steps, TensorList theta_star, TensorList omega, double lam,
                 double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                 bool amsgrad, bool maximize, bool proximal) {
  check_adam_op("mas_fast::adam_step_", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, theta_star,
                omega, amsgrad, kCPU);
  double total = 0.0;
  for (const auto& [dtypes, index] : group_by_dtypes(params, theta_star, omega)) {
    std::vector<double> group_steps;  // torch.optim: step += 1, bias corrections from the new step
    for (int64_t i : index) group_steps.push_back(steps[i].add_(1).item<double>());
    const AdamConfig config{lam,     lr,       beta1,    beta2,    eps, weight_decay, decoupled_weight_decay,
                            amsgrad, maximize, proximal, group_steps.data()};
    GroupLists g(index, params, grads, theta_star, omega);
    Operand m(exp_avgs, index), v(exp_avg_sqs, index), vmax(max_exp_avg_sqs, index);
    total += cpu::adam_step(dtypes, g.lists, m.ptrs(), v.ptrs(), vmax.ptrs(), config, threads());
    g.params.write_back();
    m.write_back();
    v.write_back();
    vmax.write_back();
  }
  return as_result(total, theta_star, omega);
}

// Σ_k |Σ_t δ_kgt x_kgtᵀ| → (G, O, I) in the accumulation dtype (float64 if an input is, else
// float32). Inputs are upcast and laid out (G, B, T, ·) for the kernel: no copy for float32
// contiguous inputs with G == 1 (a Linear over a sequence).
Tensor per_sample_abs_matmul(const Tensor& delta, const Tensor& x) {
  check_per_sample_abs_matmul("mas_fast::per_sample_abs_matmul", delta, x);
  TORCH_CHECK_VALUE(delta.is_cpu(), "mas_fast::per_sample_abs_matmul: expected CPU tensors");
  const auto acc = delta.scalar_type() == at::kDouble || x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t B = delta.size(0), G = delta.size(1), T = delta.size(2), O = delta.size(3), I = x.size(3);
  const Tensor d = delta.to(acc).transpose(0, 1).contiguous(), xs = x.to(acc).transpose(0, 1).contiguous();
  Tensor out = at::zeros({G, O, I}, delta.options().dtype(acc));
  cpu::per_sample_abs_matmul(kernel_dtype(acc), G, B, T, O, I, d.data_ptr(), xs.data_ptr(), out.data_ptr(),
                             threads());
  return out;
}

}  // namespace
}  // namespace mas_fast

TORCH_LIBRARY_IMPL(mas_fast, CPU, m) {
  m.impl("penalty", &mas_fast::penalty);
  m.impl("penalty_backward", &mas_fast::penalty_backward);
  m.impl("penalty_and_grad_", &mas_fast::penalty_and_grad);
  m.impl("merge_", &mas_fast::merge);
  m.impl("running_mean_update_", &mas_fast::running_mean_update);
  m.impl("sgd_step_", &mas_fast::sgd_step);
  m.impl("adam_step_", &mas_fast::adam_step);
  m.impl("per_sample_abs_matmul", &mas_fast::per_sample_abs_matmul);
}
