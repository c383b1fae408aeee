// CUDA implementations of the mas_fast ops (TORCH_LIBRARY_IMPL(mas_fast, CUDA)), built as the
// separate extension mas_fast._C_cuda: the only CUDA file with torch headers. Validates every
// argument, makes contiguous copies (written back after), and hands all tensors to the
// torch-free cuda/host.h, which groups them per dtype (and Adam step) into kernel launches on
// the current stream. Penalty values stay on the device (no host sync).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "cuda/host.h"
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

std::vector<int64_t> every(size_t n) {
  std::vector<int64_t> index(n);
  std::iota(index.begin(), index.end(), 0);
  return index;
}

std::vector<DType> dtypes_of(TensorList list) {
  std::vector<DType> dtypes;
  for (const Tensor& t : list) dtypes.push_back(kernel_dtype(t.scalar_type()));
  return dtypes;
}

// Per tensor: the element types of its parameter, θ* and Ω (host.h groups by them).
std::vector<DTypes> dtypes_of(TensorList params, TensorList theta_star, TensorList omega) {
  std::vector<DTypes> dtypes;
  for (size_t i = 0; i < params.size(); ++i) dtypes.push_back(dtypes_at(params, theta_star, omega, i));
  return dtypes;
}

// Device doubles for a penalty-reducing host call: its workspace and its value.
struct Reduction {
  Tensor workspace, value;
  Reduction(TensorList params, const std::vector<DTypes>& dtypes, const double* steps, const at::Device& device) {
    const auto options = at::TensorOptions().dtype(at::kDouble).device(device);
    const std::vector<int64_t> numel = numels(params, every(params.size()));
    const int64_t len = cuda::host::workspace_len(int64_t(params.size()), dtypes.data(), numel.data(), steps);
    workspace = at::empty({std::max<int64_t>(1, len)}, options);
    value = at::empty({}, options);
  }
};

// λΣΩ(θ−θ*)², adding 2λΩ(θ−θ*) into grads when they are given (penalty_and_grad_).
Tensor penalty_impl(const char* op, TensorList params, TensorList grads, TensorList theta_star, TensorList omega,
                    double lam) {
  const at::Device device = cuda_device(op, params);
  if (grads.empty())
    check_penalty_op(op, params, theta_star, omega, device);
  else
    check_penalty_and_grad_op(op, params, grads, theta_star, omega, device);
  const c10::cuda::CUDAGuard guard(device);
  const std::vector<DTypes> dtypes = dtypes_of(params, theta_star, omega);
  GroupLists all(every(params.size()), params, grads, theta_star, omega);
  Reduction r(params, dtypes, nullptr, device);
  check_launch(op, cuda::host::penalty_and_grad(dtypes.data(), all.lists, lam, r.workspace.data_ptr<double>(),
                                                r.value.data_ptr<double>(), stream()));
  all.grads.write_back();
  return penalty_result(r.value, theta_star, omega);
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
  const std::vector<DTypes> dtypes = dtypes_of(params, theta_star, omega);
  GroupLists all(every(params.size()), params, grads, theta_star, omega);
  check_launch(op, cuda::host::penalty_grad(dtypes.data(), all.lists, scale.data_ptr<double>(), stream()));
  return grads;
}

void merge(TensorList dst, TensorList src, double a, double b) {
  const char* op = "mas_fast::merge_";
  if (dst.empty()) return check_state_op(op, {{"dst", dst}, {"src", src}}, at::kCPU);  // lengths only
  const at::Device device = cuda_device(op, dst);
  check_state_op(op, {{"dst", dst}, {"src", src}}, device);
  const c10::cuda::CUDAGuard guard(device);
  const std::vector<int64_t> index = every(dst.size()), numel = numels(dst, index);
  const std::vector<DType> dtypes = dtypes_of(dst);
  Operand d(dst, index), s(src, index);
  check_launch(op, cuda::host::merge(dtypes.data(), int64_t(index.size()), numel.data(), d.ptrs(), s.ptrs(), a, b,
                                     stream()));
  d.write_back();
}

void running_mean_update(TensorList means, TensorList comps, TensorList batch_sums, int64_t count,
                         int64_t batch_count) {
  const char* op = "mas_fast::running_mean_update_";
  check_counts(op, count, batch_count);
  if (means.empty())
    return check_state_op(op, {{"means", means}, {"comps", comps}, {"batch_sums", batch_sums}}, at::kCPU);
  const at::Device device = cuda_device(op, means);
  check_state_op(op, {{"means", means}, {"comps", comps}, {"batch_sums", batch_sums}}, device);
  const c10::cuda::CUDAGuard guard(device);
  const std::vector<int64_t> index = every(means.size()), numel = numels(means, index);
  const std::vector<DType> dtypes = dtypes_of(means);
  Operand m(means, index), c(comps, index), s(batch_sums, index);
  check_launch(op, cuda::host::running_mean_update(dtypes.data(), int64_t(index.size()), numel.data(), m.ptrs(),
                                                   c.ptrs(), s.ptrs(), count, batch_count, stream()));
  m.write_back();
  c.write_back();
}

Tensor sgd_step(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList theta_star,
                TensorList omega, double lam, double lr, double momentum, double dampening, double weight_decay,
                bool nesterov, bool maximize, bool init_buffers, bool proximal) {
  const char* op = "mas_fast::sgd_step_";
  const at::Device device = cuda_device(op, params);
  check_sgd_op(op, params, grads, momentum_buffers, theta_star, omega, momentum, dampening, nesterov, device);
  const SgdConfig config{lam, lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffers, proximal};
  const c10::cuda::CUDAGuard guard(device);
  const std::vector<DTypes> dtypes = dtypes_of(params, theta_star, omega);
  GroupLists all(every(params.size()), params, grads, theta_star, omega);
  Operand buf(momentum_buffers, every(params.size()));
  Reduction r(params, dtypes, nullptr, device);
  check_launch(op, cuda::host::sgd_step(dtypes.data(), all.lists, buf.ptrs(), config, r.workspace.data_ptr<double>(),
                                        r.value.data_ptr<double>(), stream()));
  all.params.write_back();
  buf.write_back();
  return penalty_result(r.value, theta_star, omega);
}

Tensor adam_step(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                 TensorList max_exp_avg_sqs, TensorList steps, TensorList theta_star, TensorList omega, double lam,
                 double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                 bool amsgrad, bool maximize, bool proximal) {
  const char* op = "mas_fast::adam_step_";
  const at::Device device = cuda_device(op, params);
  check_adam_op(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, theta_star, omega, amsgrad,
                device);
  std::vector<double> new_steps;  // torch.optim: step += 1 first
  for (const Tensor& s : steps) new_steps.push_back(s.add_(1).item<double>());
  const AdamConfig config{lam,     lr,       beta1,    beta2,    eps, weight_decay, decoupled_weight_decay,
                          amsgrad, maximize, proximal, new_steps.data()};
  const c10::cuda::CUDAGuard guard(device);
  const std::vector<int64_t> index = every(params.size());
  const std::vector<DTypes> dtypes = dtypes_of(params, theta_star, omega);
  GroupLists all(index, params, grads, theta_star, omega);
  Operand m(exp_avgs, index), v(exp_avg_sqs, index), vmax(max_exp_avg_sqs, index);
  Reduction r(params, dtypes, new_steps.data(), device);
  check_launch(op, cuda::host::adam_step(dtypes.data(), all.lists, m.ptrs(), v.ptrs(), vmax.ptrs(), config,
                                         r.workspace.data_ptr<double>(), r.value.data_ptr<double>(), stream()));
  all.params.write_back();
  m.write_back();
  v.write_back();
  vmax.write_back();
  return penalty_result(r.value, theta_star, omega);
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
