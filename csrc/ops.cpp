// The mas_fast custom ops: schemas (device-agnostic), input validation and the CPU and CUDA
// wrappers that hand raw pointers to the torch-free kernels in cpu/ and cuda/. This is the
// only file that includes torch headers; the CUDA part is built when setup.py finds nvcc and
// a CUDA build of torch (MAS_FAST_WITH_CUDA).
//
// Fake (meta) implementations and the autograd formula of `penalty` live in Python:
// mas_fast/ops/cpp_registrations.py (set_python_module below points torch there).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <map>
#include <vector>

#include "cpu/kernels.h"

#ifdef MAS_FAST_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/mas_cuda.h"
#endif

// `import mas_fast._C` loads this library, whose static initialisers register the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace mas_fast {
namespace {

using at::Tensor;
using at::TensorList;

// ------------------------------------------------------------------ validation

DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: TORCH_CHECK_TYPE(false, "unreachable: unsupported dtype ", t);
  }
}

// The dtype Ω and θ* are kept in for parameters of dtype t.
at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool is_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_length(const char* op, const char* name, TensorList list, size_t n) {
  TORCH_CHECK_VALUE(list.size() == n, op, ": ", name, " has ", list.size(), " tensors, expected ", n,
                    " (one per parameter)");
}

void check_device(const char* op, const char* name, TensorList list, const at::Device& device) {
  for (size_t i = 0; i < list.size(); ++i)
    TORCH_CHECK_VALUE(list[i].device() == device, op, ": ", name, "[", i, "] is on ", list[i].device(),
                      ", expected ", device);
}

// list[i] must have the shape of ref[i] and dtype `dtype(ref[i])`.
template <typename DtypeOf>
void check_like(const char* op, const char* name, TensorList list, const char* ref_name, TensorList ref,
                DtypeOf dtype) {
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK_VALUE(list[i].sizes() == ref[i].sizes(), op, ": ", name, "[", i, "] has shape ",
                      list[i].sizes(), " but ", ref_name, "[", i, "] has shape ", ref[i].sizes());
    const at::ScalarType want = dtype(ref[i].scalar_type());
    TORCH_CHECK_TYPE(list[i].scalar_type() == want, op, ": ", name, "[", i, "] is ", list[i].scalar_type(),
                     ", expected ", want, " (", ref_name, "[", i, "] is ", ref[i].scalar_type(), ")");
  }
}

auto same_dtype = [](at::ScalarType t) { return t; };

void check_params(const char* op, TensorList params) {
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK_TYPE(is_param_dtype(params[i].scalar_type()), op, ": params[", i, "] is ",
                     params[i].scalar_type(), "; supported: float32, float64, bfloat16, float16");
}

// θ* and Ω: empty (no penalty) or one per parameter, in the parameter's accumulation dtype.
void check_penalty_terms(const char* op, TensorList params, TensorList theta_star, TensorList omega,
                         bool optional) {
  if (optional && theta_star.empty() && omega.empty()) return;
  check_length(op, "theta_star", theta_star, params.size());
  check_length(op, "omega", omega, params.size());
  check_like(op, "theta_star", theta_star, "params", params, acc_type);
  check_like(op, "omega", omega, "params", params, acc_type);
}

// Every tensor of a state op (Ω merge, running mean) is float32 or float64 and matches list 0.
void check_state_lists(const char* op, std::initializer_list<std::pair<const char*, TensorList>> lists) {
  const auto& [ref_name, ref] = *lists.begin();
  for (size_t i = 0; i < ref.size(); ++i)
    TORCH_CHECK_TYPE(ref[i].scalar_type() == at::kFloat || ref[i].scalar_type() == at::kDouble, op, ": ",
                     ref_name, "[", i, "] is ", ref[i].scalar_type(), "; expected float32 or float64");
  for (const auto& [name, list] : lists) {
    check_length(op, name, list, ref.size());
    check_like(op, name, list, ref_name, ref, same_dtype);
    if (!ref.empty()) check_device(op, name, list, ref[0].device());
  }
}

// ------------------------------------------------------------------ pointer lists

// The tensors `index` of one list as the kernels see them: contiguous, with their data
// pointers. In-place results on non-contiguous tensors go to a contiguous copy that
// write_back() copies into the original.
class Operand {
 public:
  Operand(TensorList list, const std::vector<int64_t>& index) {
    for (int64_t i : index) {
      original_.push_back(list[i]);
      work_.push_back(list[i].contiguous());
      ptrs_.push_back(work_.back().data_ptr());
    }
  }
  void* const* ptrs() const { return ptrs_.data(); }
  void write_back() {
    for (size_t i = 0; i < work_.size(); ++i)
      if (!work_[i].is_same(original_[i])) original_[i].copy_(work_[i]);
  }

 private:
  std::vector<Tensor> original_, work_;
  std::vector<void*> ptrs_;
};

// Parameter indices grouped by dtype (one kernel call per dtype), in a fixed order.
std::map<DType, std::vector<int64_t>> group_by_dtype(TensorList params) {
  std::map<DType, std::vector<int64_t>> groups;
  for (size_t i = 0; i < params.size(); ++i)
    groups[kernel_dtype(params[i].scalar_type())].push_back(static_cast<int64_t>(i));
  return groups;
}

std::vector<int64_t> numels(TensorList list, const std::vector<int64_t>& index) {
  std::vector<int64_t> out;
  for (int64_t i : index) out.push_back(list[i].numel());
  return out;
}

// A 0-dim result: float64 when any Ω is float64, else float32.
Tensor scalar_result(double value, TensorList omega) {
  bool f64 = false;
  for (const Tensor& o : omega) f64 |= o.scalar_type() == at::kDouble;
  return at::scalar_tensor(value, at::TensorOptions().dtype(f64 ? at::kDouble : at::kFloat));
}

// The tensors of one dtype group in kernel form; `grads` may be empty (not used).
struct PenaltyGroup {
  std::vector<int64_t> numel;
  Operand params, grads, theta_star, omega;
  TensorLists lists;

  PenaltyGroup(const std::vector<int64_t>& index, TensorList p, TensorList g, TensorList ts, TensorList om)
      : numel(numels(p, index)), params(p, index), grads(g, g.empty() ? std::vector<int64_t>{} : index),
        theta_star(ts, ts.empty() ? std::vector<int64_t>{} : index),
        omega(om, om.empty() ? std::vector<int64_t>{} : index) {
    lists.n = static_cast<int64_t>(index.size());
    lists.numel = numel.data();
    lists.params = params.ptrs();
    lists.grads = g.empty() ? nullptr : grads.ptrs();
    lists.theta_star = ts.empty() ? nullptr : theta_star.ptrs();
    lists.omega = om.empty() ? nullptr : omega.ptrs();
  }
};

int threads() { return at::get_num_threads(); }

// Every tensor of `lists` on `device` (the device of the kernels about to run).
void check_on(const char* op, std::initializer_list<std::pair<const char*, TensorList>> lists,
              const at::Device& device) {
  for (const auto& [name, list] : lists) check_device(op, name, list, device);
}

const at::Device kCPU(at::kCPU);

void check_penalty_op(const char* op, TensorList params, TensorList theta_star, TensorList omega,
                      const at::Device& device) {
  check_params(op, params);
  check_penalty_terms(op, params, theta_star, omega, /*optional=*/false);
  check_on(op, {{"params", params}, {"theta_star", theta_star}, {"omega", omega}}, device);
}

// Shared checks of the optimizer steps: grads and state like params, optional θ*/Ω.
void check_step_op(const char* op, TensorList params, TensorList grads, TensorList theta_star,
                   TensorList omega, std::initializer_list<std::pair<const char*, TensorList>> states,
                   const at::Device& device) {
  check_params(op, params);
  check_length(op, "grads", grads, params.size());
  check_like(op, "grads", grads, "params", params, same_dtype);
  for (const auto& [name, list] : states) {
    check_length(op, name, list, params.size());
    check_like(op, name, list, "params", params, same_dtype);
  }
  check_penalty_terms(op, params, theta_star, omega, /*optional=*/true);
  check_on(op, {{"params", params}, {"grads", grads}, {"theta_star", theta_star}, {"omega", omega}}, device);
  check_on(op, states, device);
}

void check_sgd_args(const char* op, TensorList momentum_buffers, double momentum, double dampening,
                    bool nesterov) {
  TORCH_CHECK_VALUE(momentum != 0 || momentum_buffers.empty(), op,
                    ": momentum_buffers must be empty when momentum is 0");
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0 && dampening == 0), op,
                    ": nesterov needs momentum > 0 and dampening 0");
}

// The Adam state lists checked against params; steps are one-element CPU counters.
void check_adam_args(const char* op, TensorList params, TensorList grads, TensorList exp_avgs,
                     TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList steps,
                     TensorList theta_star, TensorList omega, bool amsgrad, const at::Device& device) {
  if (amsgrad)
    check_step_op(op, params, grads, theta_star, omega,
                  {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}, {"max_exp_avg_sqs", max_exp_avg_sqs}},
                  device);
  else
    check_step_op(op, params, grads, theta_star, omega, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
                  device);
  TORCH_CHECK_VALUE(amsgrad || max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty without amsgrad");
  check_length(op, "steps", steps, params.size());
  for (size_t i = 0; i < steps.size(); ++i)
    TORCH_CHECK_VALUE(steps[i].numel() == 1 && steps[i].device().is_cpu() && steps[i].is_floating_point(), op,
                      ": steps[", i, "] must be a one-element floating-point CPU tensor");
}

// torch.optim: step += 1, then bias corrections from the new step, in double.
struct AdamCorrections {
  std::vector<double> step, step_size, bc2_sqrt;
};
AdamCorrections advance_steps(TensorList steps, double lr, double beta1, double beta2) {
  AdamCorrections c;
  for (const Tensor& s : steps) {
    s.add_(1);
    const double step = s.item<double>();
    c.step.push_back(step);
    c.step_size.push_back(lr / (1.0 - std::pow(beta1, step)));
    c.bc2_sqrt.push_back(std::sqrt(1.0 - std::pow(beta2, step)));
  }
  return c;
}

// ------------------------------------------------------------------ CPU ops

Tensor penalty_cpu(TensorList params, TensorList theta_star, TensorList omega, double lam) {
  check_penalty_op("mas_fast::penalty", params, theta_star, omega, kCPU);
  double total = 0.0;
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    PenaltyGroup g(index, params, {}, theta_star, omega);
    total += cpu::penalty(dtype, g.lists, threads());
  }
  return scalar_result(lam * total, omega);
}

std::vector<Tensor> penalty_backward_cpu(const Tensor& grad_out, TensorList params, TensorList theta_star,
                                         TensorList omega, double lam) {
  const char* op = "mas_fast::penalty_backward";
  check_penalty_op(op, params, theta_star, omega, kCPU);
  TORCH_CHECK_VALUE(grad_out.numel() == 1, op, ": grad_out must have one element, got shape ",
                    grad_out.sizes());
  std::vector<Tensor> grads;
  for (const Tensor& p : params) grads.push_back(at::empty(p.sizes(), p.options()));
  const double scale = 2.0 * lam * grad_out.item<double>();
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    PenaltyGroup g(index, params, grads, theta_star, omega);
    cpu::penalty_grad(dtype, g.lists, scale, threads());
  }
  return grads;
}

Tensor penalty_and_grad_cpu(TensorList params, TensorList grads, TensorList theta_star, TensorList omega,
                            double lam) {
  const char* op = "mas_fast::penalty_and_grad_";
  check_penalty_op(op, params, theta_star, omega, kCPU);
  check_length(op, "grads", grads, params.size());
  check_like(op, "grads", grads, "params", params, same_dtype);
  check_on(op, {{"grads", grads}}, kCPU);
  double total = 0.0;
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    PenaltyGroup g(index, params, grads, theta_star, omega);
    total += cpu::penalty_and_grad(dtype, g.lists, lam, threads());
    g.grads.write_back();
  }
  return scalar_result(total, omega);
}

void merge_cpu(TensorList dst, TensorList src, double a, double b) {
  const char* op = "mas_fast::merge_";
  check_state_lists(op, {{"dst", dst}, {"src", src}});
  check_on(op, {{"dst", dst}}, kCPU);
  for (const auto& [dtype, index] : group_by_dtype(dst)) {
    Operand d(dst, index), s(src, index);
    const std::vector<int64_t> numel = numels(dst, index);
    cpu::merge(dtype, static_cast<int64_t>(index.size()), numel.data(), d.ptrs(), s.ptrs(), a, b, threads());
    d.write_back();
  }
}

void running_mean_update_cpu(TensorList means, TensorList comps, TensorList batch_sums, int64_t count,
                             int64_t batch_count) {
  const char* op = "mas_fast::running_mean_update_";
  check_state_lists(op, {{"means", means}, {"comps", comps}, {"batch_sums", batch_sums}});
  check_on(op, {{"means", means}}, kCPU);
  TORCH_CHECK_VALUE(count >= 0 && batch_count > 0, op, ": need count >= 0 and batch_count > 0, got ", count,
                    " and ", batch_count);
  for (const auto& [dtype, index] : group_by_dtype(means)) {
    Operand m(means, index), c(comps, index), s(batch_sums, index);
    const std::vector<int64_t> numel = numels(means, index);
    cpu::running_mean_update(dtype, static_cast<int64_t>(index.size()), numel.data(), m.ptrs(), c.ptrs(),
                             s.ptrs(), count, batch_count, threads());
    m.write_back();
    c.write_back();
  }
}

Tensor sgd_step_cpu(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList theta_star,
                    TensorList omega, double lam, double lr, double momentum, double dampening,
                    double weight_decay, bool nesterov, bool maximize, bool init_buffers) {
  const char* op = "mas_fast::sgd_step_";
  check_sgd_args(op, momentum_buffers, momentum, dampening, nesterov);
  if (momentum != 0)
    check_step_op(op, params, grads, theta_star, omega, {{"momentum_buffers", momentum_buffers}}, kCPU);
  else
    check_step_op(op, params, grads, theta_star, omega, {}, kCPU);
  const cpu::SgdConfig config{lam, lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffers};
  double total = 0.0;
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    PenaltyGroup g(index, params, grads, theta_star, omega);
    Operand buf(momentum_buffers, momentum != 0 ? index : std::vector<int64_t>{});
    total += cpu::sgd_step(dtype, g.lists, buf.ptrs(), config, threads());
    g.params.write_back();
    buf.write_back();
  }
  return scalar_result(total, omega);
}

Tensor adam_step_cpu(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                     TensorList max_exp_avg_sqs, TensorList steps, TensorList theta_star, TensorList omega,
                     double lam, double lr, double beta1, double beta2, double eps, double weight_decay,
                     bool decoupled_weight_decay, bool amsgrad, bool maximize) {
  const char* op = "mas_fast::adam_step_";
  check_adam_args(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, theta_star, omega, amsgrad,
                  kCPU);
  const AdamCorrections corr = advance_steps(steps, lr, beta1, beta2);
  double total = 0.0;
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    std::vector<double> group_step_size, group_bc2_sqrt;
    for (int64_t i : index) {
      group_step_size.push_back(corr.step_size[i]);
      group_bc2_sqrt.push_back(corr.bc2_sqrt[i]);
    }
    const cpu::AdamConfig config{lam,     lr,       beta1,    beta2, eps, weight_decay, decoupled_weight_decay,
                                 amsgrad, maximize, group_step_size.data(), group_bc2_sqrt.data()};
    PenaltyGroup g(index, params, grads, theta_star, omega);
    Operand m(exp_avgs, index), v(exp_avg_sqs, index);
    Operand vmax(max_exp_avg_sqs, amsgrad ? index : std::vector<int64_t>{});
    total += cpu::adam_step(dtype, g.lists, m.ptrs(), v.ptrs(), vmax.ptrs(), config, threads());
    g.params.write_back();
    m.write_back();
    v.write_back();
    vmax.write_back();
  }
  return scalar_result(total, omega);
}


#ifdef MAS_FAST_WITH_CUDA
// ------------------------------------------------------------------ CUDA ops

cuda::DType cuda_dtype(DType t) {
  switch (t) {
    case DType::f32: return cuda::DType::kFloat32;
    case DType::f64: return cuda::DType::kFloat64;
    case DType::bf16: return cuda::DType::kBFloat16;
    case DType::f16: return cuda::DType::kFloat16;
  }
  TORCH_CHECK_TYPE(false, "unreachable: unsupported dtype");
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The CUDA device all tensors of an op must share (that of the first list's first tensor).
at::Device cuda_device(const char* op, TensorList first) {
  TORCH_CHECK_VALUE(!first.empty() && first[0].is_cuda(), op, ": expected CUDA tensors");
  return first[0].device();
}

void* const* mutable_ptrs(const void* const* ptrs) { return const_cast<void* const*>(ptrs); }

// A device scalar of the accumulation dtype of `dtype`, for one group's penalty value.
Tensor group_value(DType dtype, const at::Device& device) {
  return at::empty({}, at::TensorOptions().dtype(dtype == DType::f64 ? at::kDouble : at::kFloat).device(device));
}

// Σ of the groups' device scalars, in the dtype scalar_result would give; zero without groups.
Tensor sum_values(const std::vector<Tensor>& values, TensorList omega, const at::Device& device) {
  Tensor total = at::zeros({}, at::TensorOptions().dtype(scalar_result(0.0, omega).scalar_type()).device(device));
  for (const Tensor& v : values) total.add_(v);
  return total;
}

Tensor partials_for(const PenaltyGroup& g, const at::Device& device) {
  const int64_t len = std::max<int64_t>(1, cuda::partials_len(static_cast<int>(g.lists.n), g.lists.numel));
  return at::empty({len}, at::TensorOptions().dtype(at::kDouble).device(device));
}

// λΣΩ(θ−θ*)², adding 2λΩ(θ−θ*) into grads when they are given (penalty_and_grad_).
Tensor penalty_cuda_impl(const char* op, TensorList params, TensorList grads, TensorList theta_star,
                         TensorList omega, double lam) {
  const at::Device device = cuda_device(op, params);
  check_penalty_op(op, params, theta_star, omega, device);
  if (!grads.empty()) {
    check_length(op, "grads", grads, params.size());
    check_like(op, "grads", grads, "params", params, same_dtype);
    check_on(op, {{"grads", grads}}, device);
  }
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  std::vector<Tensor> values;
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    PenaltyGroup g(index, params, grads, theta_star, omega);
    Tensor partials = partials_for(g, device);
    values.push_back(group_value(dtype, device));
    check_launch(op, cuda::penalty_and_grad(cuda_dtype(dtype), static_cast<int>(g.lists.n),
                                            mutable_ptrs(g.lists.params), mutable_ptrs(g.lists.grads),
                                            mutable_ptrs(g.lists.theta_star), mutable_ptrs(g.lists.omega),
                                            g.lists.numel, lam, partials.data_ptr<double>(),
                                            values.back().data_ptr(), stream));
    if (!grads.empty()) g.grads.write_back();
  }
  return sum_values(values, omega, device);
}

Tensor penalty_cuda(TensorList params, TensorList theta_star, TensorList omega, double lam) {
  return penalty_cuda_impl("mas_fast::penalty", params, {}, theta_star, omega, lam);
}

Tensor penalty_and_grad_cuda(TensorList params, TensorList grads, TensorList theta_star, TensorList omega,
                             double lam) {
  return penalty_cuda_impl("mas_fast::penalty_and_grad_", params, grads, theta_star, omega, lam);
}

std::vector<Tensor> penalty_backward_cuda(const Tensor& grad_out, TensorList params, TensorList theta_star,
                                          TensorList omega, double lam) {
  const char* op = "mas_fast::penalty_backward";
  const at::Device device = cuda_device(op, params);
  check_penalty_op(op, params, theta_star, omega, device);
  TORCH_CHECK_VALUE(grad_out.numel() == 1, op, ": grad_out must have one element, got shape ",
                    grad_out.sizes());
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // 2λ·ḡ stays on the device: no host synchronisation in the backward.
  const Tensor scale = (grad_out.to(device, at::kDouble).reshape({}) * (2.0 * lam)).contiguous();
  std::vector<Tensor> grads;
  for (const Tensor& p : params) grads.push_back(at::empty(p.sizes(), p.options()));
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    PenaltyGroup g(index, params, grads, theta_star, omega);
    check_launch(op, cuda::penalty_grad(cuda_dtype(dtype), static_cast<int>(g.lists.n), mutable_ptrs(g.lists.params),
                                        mutable_ptrs(g.lists.grads), mutable_ptrs(g.lists.theta_star),
                                        mutable_ptrs(g.lists.omega), g.lists.numel, scale.data_ptr<double>(),
                                        stream));
  }
  return grads;
}

void merge_cuda(TensorList dst, TensorList src, double a, double b) {
  const char* op = "mas_fast::merge_";
  check_state_lists(op, {{"dst", dst}, {"src", src}});
  if (dst.empty()) return;
  const at::Device device = cuda_device(op, dst);
  const c10::cuda::CUDAGuard guard(device);
  for (const auto& [dtype, index] : group_by_dtype(dst)) {
    Operand d(dst, index), s(src, index);
    const std::vector<int64_t> numel = numels(dst, index);
    check_launch(op, cuda::merge(dtype == DType::f64, static_cast<int>(index.size()), d.ptrs(), s.ptrs(),
                                 numel.data(), a, b, c10::cuda::getCurrentCUDAStream()));
    d.write_back();
  }
}

void running_mean_update_cuda(TensorList means, TensorList comps, TensorList batch_sums, int64_t count,
                              int64_t batch_count) {
  const char* op = "mas_fast::running_mean_update_";
  check_state_lists(op, {{"means", means}, {"comps", comps}, {"batch_sums", batch_sums}});
  TORCH_CHECK_VALUE(count >= 0 && batch_count > 0, op, ": need count >= 0 and batch_count > 0, got ", count,
                    " and ", batch_count);
  if (means.empty()) return;
  const at::Device device = cuda_device(op, means);
  const c10::cuda::CUDAGuard guard(device);
  for (const auto& [dtype, index] : group_by_dtype(means)) {
    Operand m(means, index), c(comps, index), s(batch_sums, index);
    const std::vector<int64_t> numel = numels(means, index);
    check_launch(op, cuda::running_mean_update(dtype == DType::f64, static_cast<int>(index.size()), m.ptrs(),
                                               c.ptrs(), s.ptrs(), numel.data(), count, batch_count,
                                               c10::cuda::getCurrentCUDAStream()));
    m.write_back();
    c.write_back();
  }
}

Tensor sgd_step_cuda(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList theta_star,
                     TensorList omega, double lam, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool maximize, bool init_buffers) {
  const char* op = "mas_fast::sgd_step_";
  const at::Device device = cuda_device(op, params);
  check_sgd_args(op, momentum_buffers, momentum, dampening, nesterov);
  if (momentum != 0)
    check_step_op(op, params, grads, theta_star, omega, {{"momentum_buffers", momentum_buffers}}, device);
  else
    check_step_op(op, params, grads, theta_star, omega, {}, device);
  const c10::cuda::CUDAGuard guard(device);
  std::vector<Tensor> values;
  for (const auto& [dtype, index] : group_by_dtype(params)) {
    PenaltyGroup g(index, params, grads, theta_star, omega);
    Operand buf(momentum_buffers, momentum != 0 ? index : std::vector<int64_t>{});
    Tensor partials = partials_for(g, device);
    values.push_back(group_value(dtype, device));
    const cuda::SgdArgs args{static_cast<int>(g.lists.n), mutable_ptrs(g.lists.params),
                             mutable_ptrs(g.lists.grads), momentum != 0 ? buf.ptrs() : nullptr,
                             mutable_ptrs(g.lists.theta_star), mutable_ptrs(g.lists.omega), g.lists.numel,
                             lam, lr, momentum, dampening, weight_decay, nesterov, maximize, init_buffers,
                             partials.data_ptr<double>(), values.back().data_ptr()};
    check_launch(op, cuda::sgd_step(cuda_dtype(dtype), args, c10::cuda::getCurrentCUDAStream()));
    g.params.write_back();
    buf.write_back();
  }
  return sum_values(values, omega, device);
}

Tensor adam_step_cuda(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                      TensorList max_exp_avg_sqs, TensorList steps, TensorList theta_star, TensorList omega,
                      double lam, double lr, double beta1, double beta2, double eps, double weight_decay,
                      bool decoupled_weight_decay, bool amsgrad, bool maximize) {
  const char* op = "mas_fast::adam_step_";
  const at::Device device = cuda_device(op, params);
  check_adam_args(op, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, theta_star, omega, amsgrad,
                  device);
  const AdamCorrections corr = advance_steps(steps, lr, beta1, beta2);
  // One launch per (dtype, step count): the kernel takes the bias corrections as scalars.
  std::map<std::pair<DType, double>, std::vector<int64_t>> groups;
  for (const auto& [dtype, index] : group_by_dtype(params))
    for (int64_t i : index) groups[{dtype, corr.step[i]}].push_back(i);
  const c10::cuda::CUDAGuard guard(device);
  std::vector<Tensor> values;
  for (const auto& [key, index] : groups) {
    PenaltyGroup g(index, params, grads, theta_star, omega);
    Operand m(exp_avgs, index), v(exp_avg_sqs, index);
    Operand vmax(max_exp_avg_sqs, amsgrad ? index : std::vector<int64_t>{});
    Tensor partials = partials_for(g, device);
    values.push_back(group_value(key.first, device));
    const cuda::AdamArgs args{static_cast<int>(g.lists.n), mutable_ptrs(g.lists.params),
                              mutable_ptrs(g.lists.grads), m.ptrs(), v.ptrs(), amsgrad ? vmax.ptrs() : nullptr,
                              mutable_ptrs(g.lists.theta_star), mutable_ptrs(g.lists.omega), g.lists.numel,
                              lam, lr, beta1, beta2, eps, weight_decay, key.second, decoupled_weight_decay,
                              maximize, partials.data_ptr<double>(), values.back().data_ptr()};
    check_launch(op, cuda::adam_step(cuda_dtype(key.first), args, c10::cuda::getCurrentCUDAStream()));
    g.params.write_back();
    m.write_back();
    v.write_back();
    vmax.write_back();
  }
  return sum_values(values, omega, device);
}

// Σ_k |Σ_t δ_ktc · s_ktc| for (B, T, C) of any strides: bias and norm-affine importance.
Tensor per_sample_abs_sum_cuda(const Tensor& delta, const std::optional<Tensor>& scale) {
  const char* op = "mas_fast::per_sample_abs_sum";
  TORCH_CHECK_VALUE(delta.dim() == 3, op, ": delta must be (B, T, C), got shape ", delta.sizes());
  TORCH_CHECK_VALUE(delta.is_cuda(), op, ": expected a CUDA tensor");
  const at::ScalarType dt = delta.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, ": delta is ", dt,
                   "; supported: float32, bfloat16, float16");
  if (scale.has_value()) {
    TORCH_CHECK_VALUE(scale->sizes() == delta.sizes(), op, ": scale has shape ", scale->sizes(),
                      ", delta has ", delta.sizes());
    TORCH_CHECK_VALUE(scale->device() == delta.device(), op, ": scale is on ", scale->device(), ", delta on ",
                      delta.device());
    const at::ScalarType st = scale->scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, op, ": scale is ", st,
                     "; supported: float32, bfloat16, float16");
  }
  const int64_t B = delta.size(0), T = delta.size(1), C = delta.size(2);
  const c10::cuda::CUDAGuard guard(delta.device());
  Tensor out = at::zeros({C}, delta.options().dtype(at::kFloat));
  if (B == 0 || T == 0 || C == 0) return out;
  Tensor workspace = at::empty({cuda::per_sample_abs_sum_workspace_len(B, C)},
                               delta.options().dtype(at::kDouble));
  const int64_t ds[3] = {delta.stride(0), delta.stride(1), delta.stride(2)};
  int64_t ss[3] = {0, 0, 0};
  if (scale.has_value()) {
    ss[0] = scale->stride(0);
    ss[1] = scale->stride(1);
    ss[2] = scale->stride(2);
  }
  check_launch(op, cuda::per_sample_abs_sum(
                       cuda_dtype(kernel_dtype(dt)), delta.data_ptr(), ds,
                       scale.has_value() ? cuda_dtype(kernel_dtype(scale->scalar_type())) : cuda::DType::kFloat32,
                       scale.has_value() ? scale->data_ptr() : nullptr, scale.has_value() ? ss : nullptr, B, T, C,
                       /*out_double=*/false, out.data_ptr(), workspace.data_ptr<double>(),
                       c10::cuda::getCurrentCUDAStream()));
  return out;
}
#endif  // MAS_FAST_WITH_CUDA

}  // namespace
}  // namespace mas_fast

TORCH_LIBRARY(mas_fast, m) {
  m.set_python_module("mas_fast.ops.cpp_registrations");
  m.def("penalty(Tensor[] params, Tensor[] theta_star, Tensor[] omega, float lam) -> Tensor");
  m.def("penalty_backward(Tensor grad_out, Tensor[] params, Tensor[] theta_star, Tensor[] omega, float lam)"
        " -> Tensor[]");
  m.def("penalty_and_grad_(Tensor[] params, Tensor(a!)[] grads, Tensor[] theta_star, Tensor[] omega, "
        "float lam) -> Tensor");
  m.def("merge_(Tensor(a!)[] dst, Tensor[] src, float a, float b) -> ()");
  m.def("running_mean_update_(Tensor(a!)[] means, Tensor(b!)[] comps, Tensor[] batch_sums, int count, "
        "int batch_count) -> ()");
  m.def("sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor[] theta_star, "
        "Tensor[] omega, float lam, float lr, float momentum, float dampening, float weight_decay, "
        "bool nesterov, bool maximize, bool init_buffers) -> Tensor");
  m.def("adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] steps, Tensor[] theta_star, Tensor[] omega, float lam, "
        "float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
        "bool amsgrad, bool maximize) -> Tensor");
  m.def("per_sample_abs_sum(Tensor delta, Tensor? scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(mas_fast, CPU, m) {
  m.impl("penalty", &mas_fast::penalty_cpu);
  m.impl("penalty_backward", &mas_fast::penalty_backward_cpu);
  m.impl("penalty_and_grad_", &mas_fast::penalty_and_grad_cpu);
  m.impl("merge_", &mas_fast::merge_cpu);
  m.impl("running_mean_update_", &mas_fast::running_mean_update_cpu);
  m.impl("sgd_step_", &mas_fast::sgd_step_cpu);
  m.impl("adam_step_", &mas_fast::adam_step_cpu);
}

#ifdef MAS_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(mas_fast, CUDA, m) {
  m.impl("penalty", &mas_fast::penalty_cuda);
  m.impl("penalty_backward", &mas_fast::penalty_backward_cuda);
  m.impl("penalty_and_grad_", &mas_fast::penalty_and_grad_cuda);
  m.impl("merge_", &mas_fast::merge_cuda);
  m.impl("running_mean_update_", &mas_fast::running_mean_update_cuda);
  m.impl("sgd_step_", &mas_fast::sgd_step_cuda);
  m.impl("adam_step_", &mas_fast::adam_step_cuda);
  m.impl("per_sample_abs_sum", &mas_fast::per_sample_abs_sum_cuda);
}
#endif
