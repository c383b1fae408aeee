// CUDA implementations of the mas_fast ops (TORCH_LIBRARY_IMPL(mas_fast, CUDA)), built as the
// separate extension mas_fast._C_cuda: the only CUDA file with torch headers. Validates every
// argument, groups the tensors per dtype (and Adam step), and launches the torch-free kernels
// of cuda/kernels.h on the current stream. Penalty values stay on the device (no host sync).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <utility>
#include <vector>

#include "cuda/kernels.h"
#include "tensor_lists.h"
#include "validation.h"

#ifdef MAS_FAST_FORCE_CUDA_FAILURE
#error "MAS_FAST_FORCE_CUDA_FAILURE is set: the CUDA part fails to build on purpose"
#endif

// `import mas_fast._C_cuda` (after mas_fast._C, which declares the ops) registers the kernels.
extern "C" PyObject* PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace mas_fast {
namespace {

using at::Tensor;
using at::TensorList;

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The CUDA device all tensors of an op must share (that of the first list's first tensor).
at::Device cuda_device(const char* op, TensorList first) {
  TORCH_CHECK_VALUE(!first.empty() && first[0].is_cuda(), op, ": expected CUDA tensors");
  return first[0].device();
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

// Per-launch-group device doubles: the chunk partials and the group's penalty value.
struct Reduction {
  Tensor partials, value;
  Reduction(const GroupLists& g, const at::Device& device) {
    const auto options = at::TensorOptions().dtype(at::kDouble).device(device);
    partials = at::empty({std::max<int64_t>(1, cuda::partials_len(g.lists.n, g.lists.numel))}, options);
    value = at::empty({}, options);
  }
};

// Σ of the groups' values (double, on the device) in the dtype reference.py returns.
Tensor sum_values(const std::vector<Tensor>& values, TensorList omega, const at::Device& device) {
  Tensor total = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
  for (const Tensor& v : values) total.add_(v);
  return penalty_result(total, omega);
}

// λΣΩ(θ−θ*)², adding 2λΩ(θ−θ*) into grads when they are given (penalty_and_grad_).
Tensor penalty_impl(const char* op, TensorList params, TensorList grads, TensorList theta_star, TensorList omega,
                    double lam) {
  const at::Device device = cuda_device(op, params);
  if (grads.empty())
    check_penalty_op(op, params, theta_star, omega, device);
  else
    check_penalty_and_grad_op(op, params, grads, theta_star, omega, device);
  const c10::cuda::CUDAGuard guard(device);
  std::vector<Tensor> values;
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    GroupLists g(index, params, grads, theta_star, omega);
    Reduction r(g, device);
    check_launch(op, cuda::penalty_and_grad(dtype, g.lists, lam, r.partials.data_ptr<double>(),
                                            r.value.data_ptr<double>(), stream()));
    values.push_back(r.value);
    g.grads.write_back();
  }
  return sum_values(values, omega, device);
}

Tensor penalty(TensorList params, TensorList theta_star, TensorList omega, double lam) {
  return penalty_impl("mas_fast::penalty", params, {}, theta_star, omega, lam);
}

Tensor penalty_and_grad(TensorList params, TensorList grads, TensorList theta_star, TensorList omega, double lam) {
  const char* op = "mas_fast::penalty_and_grad_";
  TORCH_CHECK_VALUE(grads.size() == params.size(), op, ": grads has ", grads.size(), " tensors, expected ",
                    params.size(), " (one per parameter)");
  return penalty_impl(op, params, grads, theta_star, omega, lam);
}

std::vector<Tensor> penalty_backward(const Tensor& grad_out, TensorList params, TensorList theta_star,
                                     TensorList omega, double lam) {
  const char* op = "mas_fast::penalty_backward";
  const at::Device device = cuda_device(op, params);
  check_penalty_op(op, params, theta_star, omega, device);
  check_grad_out(op, grad_out);
  const c10::cuda::CUDAGuard guard(device);
  // 2λ·ḡ stays on the device: no host synchronisation in the backward.
  const Tensor scale = (grad_out.to(device, at::kDouble).reshape({}) * (2.0 * lam)).contiguous();
  std::vector<Tensor> grads;
  for (const Tensor& p : params) grads.push_back(at::empty(p.sizes(), p.options()));
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    GroupLists g(index, params, grads, theta_star, omega);
    check_launch(op, cuda::penalty_grad(dtype, g.lists, scale.data_ptr<double>(), stream()));
  }
  return grads;
}

void merge(TensorList dst, TensorList src, double a, double b) {
  const char* op = "mas_fast::merge_";
  if (dst.empty()) return check_state_op(op, {{"dst", dst}, {"src", src}}, at::kCPU);  // lengths only
  const at::Device device = cuda_device(op, dst);
  check_state_op(op, {{"dst", dst}, {"src", src}}, device);
  const c10::cuda::CUDAGuard guard(device);
  for (const auto& [dtype, index] : group_by_dtype(dst)) {
    Operand d(dst, index), s(src, index);
    const std::vector<int64_t> numel = numels(dst, index);
    check_launch(op, cuda::merge(dtype, int64_t(index.size()), numel.data(), d.ptrs(), s.ptrs(), a, b, stream()));
    d.write_back();
  }
}

void running_mean_update(TensorList means, TensorList comps, TensorList batch_sums, int64_t count,
                         int64_t batch_count) {
  const char* op = "mas_fast::running_mean_update_";
  check_counts(op, count, batch_count);
  if (means.empty()) return check_state_op(op, {{"means", means}, {"comps", comps}, {"batch_sums", batch_sums}}, at::kCPU);
  const at::Device device = cuda_device(op, means);
  check_state_op(op, {{"means", means}, {"comps", comps}, {"batch_sums", batch_sums}}, device);
  const c10::cuda::CUDAGuard guard(device);
  for (const auto& [dtype, index] : group_by_dtype(means)) {
    Operand m(means, index), c(comps, index), s(batch_sums, index);
    const std::vector<int64_t> numel = numels(means, index);
    check_launch(op, cuda::running_mean_update(dtype, int64_t(index.size()), numel.data(), m.ptrs(), c.ptrs(),
                                               s.ptrs(), count, batch_count, stream()));
    m.write_back();
    c.write_back();
  }
}

Tensor sgd_step(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList theta_star,
                TensorList omega, double lam, double lr, double momentum, double dampening, double weight_decay,
                bool nesterov, bool maximize, bool init_buffers) {
  const char* op = "mas_fast::sgd_step_";
  const at::Device device = cuda_device(op, params);
  check_sgd_op(op, params, grads, momentum_buffers, theta_star, omega, momentum, dampening, nesterov, device);
  const SgdConfig config{lam, lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffers};
  const c10::cuda::CUDAGuard guard(device);
  std::vector<Tensor> values;
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    GroupLists g(index, params, grads, theta_star, omega);
    Operand buf(momentum_buffers, index);
    Reduction r(g, device);
    check_launch(op, cuda::sgd_step(dtype, g.lists, buf.ptrs(), config, r.partials.data_ptr<double>(),
                                    r.value.data_ptr<double>(), stream()));
    values.push_back(r.value);
    g.params.write_back();
    buf.write_back();
  }
  return sum_values(values, omega, device);
}

Tensor adam_step(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList max_exp_avg_sqs, TensorList steps, TensorList theta_star, TensorList omega, double lam,
                 double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                 bool amsgrad, bool maximize) {
  const char* op = "mas_fast::adam_step_";
  const at::Device device = cuda_device(op, params);
  check_adam_op(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, theta_star, omega, amsgrad,
                device);
  // torch.optim: step += 1 first. One launch per (dtype, step count): the kernel takes the
  // bias corrections as scalars.
  std::map<std::pair<DType, double>, std::vector<int64_t>> groups;
  for (const auto& [dtype, index] : group_by_dtype(params))
    for (int64_t i : index) groups[{dtype, steps[i].add_(1).item<double>()}].push_back(i);
  const c10::cuda::CUDAGuard guard(device);
  std::vector<Tensor> values;
  for (const auto& [key, index] : groups) {
    const double step = key.second;
    const AdamConfig config{lam,     lr,       beta1,    beta2, eps, weight_decay, decoupled_weight_decay,
                            amsgrad, maximize, &step};
    GroupLists g(index, params, grads, theta_star, omega);
    Operand m(exp_avgs, index), v(exp_avg_sqs, index), vmax(max_exp_avg_sqs, index);
    Reduction r(g, device);
    check_launch(op, cuda::adam_step(key.first, g.lists, m.ptrs(), v.ptrs(), vmax.ptrs(), config,
                                     r.partials.data_ptr<double>(), r.value.data_ptr<double>(), stream()));
    values.push_back(r.value);
    g.params.write_back();
    m.write_back();
    v.write_back();
    vmax.write_back();
  }
  return sum_values(values, omega, device);
}

// Σ_k |Σ_t δ_ktc · s_ktc| for (B, T, C) of any strides: bias and norm-affine importance.
Tensor per_sample_abs_sum(const Tensor& delta, const std::optional<Tensor>& scale) {
  const char* op = "mas_fast::per_sample_abs_sum";
  TORCH_CHECK_VALUE(delta.is_cuda(), op, ": expected a CUDA tensor");
  check_per_sample_abs_sum(op, delta, scale);
  const int64_t B = delta.size(0), T = delta.size(1), C = delta.size(2);
  const c10::cuda::CUDAGuard guard(delta.device());
  Tensor out = at::zeros({C}, delta.options().dtype(at::kFloat));
  if (B == 0 || T == 0 || C == 0) return out;
  Tensor workspace = at::empty({cuda::per_sample_abs_sum_workspace_len(B, C)}, delta.options().dtype(at::kDouble));
  const int64_t delta_strides[3] = {delta.stride(0), delta.stride(1), delta.stride(2)};
  int64_t scale_strides[3] = {0, 0, 0};
  if (scale.has_value())
    for (int d = 0; d < 3; ++d) scale_strides[d] = scale->stride(d);
  const DType scale_dtype = kernel_dtype(scale.has_value() ? scale->scalar_type() : delta.scalar_type());
  check_launch(op, cuda::per_sample_abs_sum(kernel_dtype(delta.scalar_type()), delta.data_ptr(), delta_strides,
                                            scale_dtype, scale.has_value() ? scale->data_ptr() : nullptr,
                                            scale.has_value() ? scale_strides : nullptr, B, T, C,
                                            out.data_ptr<float>(), workspace.data_ptr<double>(), stream()));
  return out;
}

}  // namespace
}  // namespace mas_fast

TORCH_LIBRARY_IMPL(mas_fast, CUDA, m) {
  m.impl("penalty", &mas_fast::penalty);
  m.impl("penalty_backward", &mas_fast::penalty_backward);
  m.impl("penalty_and_grad_", &mas_fast::penalty_and_grad);
  m.impl("merge_", &mas_fast::merge);
  m.impl("running_mean_update_", &mas_fast::running_mean_update);
  m.impl("sgd_step_", &mas_fast::sgd_step);
  m.impl("adam_step_", &mas_fast::adam_step);
  m.impl("per_sample_abs_sum", &mas_fast::per_sample_abs_sum);
}
