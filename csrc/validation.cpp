// Input checks of the mas_fast ops (see validation.h).
#include "validation.h"

namespace mas_fast {

using at::TensorList;

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

namespace {

bool is_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

at::ScalarType same_dtype(at::ScalarType t) { return t; }

void check_length(const char* op, const char* name, TensorList list, size_t n) {
  TORCH_CHECK_VALUE(list.size() == n, op, ": ", name, " has ", list.size(), " tensors, expected ", n,
                    " (one per parameter)");
}

// list[i] must have the shape of ref[i] and dtype `dtype(ref[i])` (any dtype for a null `dtype`).
void check_like(const char* op, const char* name, TensorList list, const char* ref_name, TensorList ref,
                at::ScalarType (*dtype)(at::ScalarType)) {
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK_VALUE(list[i].sizes() == ref[i].sizes(), op, ": ", name, "[", i, "] has shape ",
                      list[i].sizes(), " but ", ref_name, "[", i, "] has shape ", ref[i].sizes());
    if (dtype == nullptr) continue;  // the caller checks the dtypes
    const at::ScalarType want = dtype(ref[i].scalar_type());
    TORCH_CHECK_TYPE(list[i].scalar_type() == want, op, ": ", name, "[", i, "] is ", list[i].scalar_type(),
                     ", expected ", want, " (", ref_name, "[", i, "] is ", ref[i].scalar_type(), ")");
  }
}

// One tensor per parameter, shaped like it, of dtype `dtype(parameter dtype)`.
void check_per_param(const char* op, const char* name, TensorList list, TensorList params,
                     at::ScalarType (*dtype)(at::ScalarType)) {
  check_length(op, name, list, params.size());
  check_like(op, name, list, "params", params, dtype);
}

void check_params(const char* op, TensorList params) {
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK_TYPE(is_param_dtype(params[i].scalar_type()), op, ": params[", i, "] is ",
                     params[i].scalar_type(), "; supported: float32, float64, bfloat16, float16");
}

// list[i] has dtype `first` or `second` (the dtypes its parameter allows).
void check_state_dtype(const char* op, const char* name, TensorList list, TensorList params,
                       at::ScalarType (*first)(at::ScalarType), at::ScalarType (*second)(at::ScalarType)) {
  for (size_t i = 0; i < list.size(); ++i) {
    const at::ScalarType p = params[i].scalar_type(), a = first(p), b = second(p);
    TORCH_CHECK_TYPE(list[i].scalar_type() == a || list[i].scalar_type() == b, op, ": ", name, "[", i, "] is ",
                     list[i].scalar_type(), ", expected ", a, (a == b ? "" : " or "), (a == b ? "" : c10::toString(b)),
                     " (params[", i, "] is ", p, ")");
  }
}

at::ScalarType lean_omega(at::ScalarType) { return at::kBFloat16; }

// θ* and Ω: empty (no penalty, when optional) or one per parameter, shaped like it: θ* in its
// accumulation dtype or its own (lean state), Ω in its accumulation dtype or bfloat16 (lean).
void check_penalty_terms(const char* op, TensorList params, TensorList theta_star, TensorList omega,
                         bool optional) {
  if (optional && theta_star.empty() && omega.empty()) return;
  check_per_param(op, "theta_star", theta_star, params, nullptr);
  check_per_param(op, "omega", omega, params, nullptr);
  check_state_dtype(op, "theta_star", theta_star, params, acc_type, same_dtype);
  check_state_dtype(op, "omega", omega, params, acc_type, lean_omega);
}

// Shared checks of the optimizer steps: grads and `states` like params, optional θ*/Ω.
void check_step(const char* op, TensorList params, TensorList grads, TensorList theta_star, TensorList omega,
                NamedLists states, const at::Device& device) {
  check_params(op, params);
  check_per_param(op, "grads", grads, params, same_dtype);
  for (const auto& [name, list] : states) check_per_param(op, name, list, params, same_dtype);
  check_penalty_terms(op, params, theta_star, omega, /*optional=*/true);
  check_on(op, {{"params", params}, {"grads", grads}, {"theta_star", theta_star}, {"omega", omega}}, device);
  check_on(op, states, device);
}

void check_importance_dtype(const char* op, const char* name, at::ScalarType t) {
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op, ": ", name, " is ", t,
                   "; supported: float32, bfloat16, float16");
}

}  // namespace

void check_on(const char* op, NamedLists lists, const at::Device& device) {
  for (const auto& [name, list] : lists)
    for (size_t i = 0; i < list.size(); ++i)
      TORCH_CHECK_VALUE(list[i].device() == device, op, ": ", name, "[", i, "] is on ", list[i].device(),
                        ", expected ", device);
}

void check_penalty_op(const char* op, TensorList params, TensorList theta_star, TensorList omega,
                      const at::Device& device) {
  check_params(op, params);
  check_penalty_terms(op, params, theta_star, omega, /*optional=*/false);
  check_on(op, {{"params", params}, {"theta_star", theta_star}, {"omega", omega}}, device);
}

void check_penalty_and_grad_op(const char* op, TensorList params, TensorList grads, TensorList theta_star,
                               TensorList omega, const at::Device& device) {
  check_penalty_op(op, params, theta_star, omega, device);
  check_per_param(op, "grads", grads, params, same_dtype);
  check_on(op, {{"grads", grads}}, device);
}

void check_grad_out(const char* op, const at::Tensor& grad_out) {
  TORCH_CHECK_VALUE(grad_out.numel() == 1, op, ": grad_out must have one element, got shape ", grad_out.sizes());
}

void check_state_op(const char* op, NamedLists lists, const at::Device& device) {
  const auto& [ref_name, ref] = *lists.begin();
  for (size_t i = 0; i < ref.size(); ++i)
    TORCH_CHECK_TYPE(ref[i].scalar_type() == at::kFloat || ref[i].scalar_type() == at::kDouble, op, ": ",
                     ref_name, "[", i, "] is ", ref[i].scalar_type(), "; expected float32 or float64");
  for (const auto& [name, list] : lists) {
    TORCH_CHECK_VALUE(list.size() == ref.size(), op, ": ", name, " has ", list.size(), " tensors, expected ",
                      ref.size(), " (one per ", ref_name, " tensor)");
    check_like(op, name, list, ref_name, ref, same_dtype);
  }
  check_on(op, lists, device);
}

void check_counts(const char* op, int64_t count, int64_t batch_count) {
  TORCH_CHECK_VALUE(count >= 0 && batch_count > 0, op, ": need count >= 0 and batch_count > 0, got ", count,
                    " and ", batch_count);
}

void check_sgd_op(const char* op, TensorList params, TensorList grads, TensorList momentum_buffers,
                  TensorList theta_star, TensorList omega, double momentum, double dampening, bool nesterov,
                  const at::Device& device) {
  TORCH_CHECK_VALUE(momentum != 0 || momentum_buffers.empty(), op,
                    ": momentum_buffers must be empty when momentum is 0");
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0 && dampening == 0), op,
                    ": nesterov needs momentum > 0 and dampening 0");
  if (momentum != 0)
    check_step(op, params, grads, theta_star, omega, {{"momentum_buffers", momentum_buffers}}, device);
  else
    check_step(op, params, grads, theta_star, omega, {}, device);
}

void check_adam_op(const char* op, TensorList params, TensorList grads, TensorList exp_avgs,
                   TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList steps, TensorList theta_star,
                   TensorList omega, bool amsgrad, const at::Device& device) {
  TORCH_CHECK_VALUE(amsgrad || max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs must be empty without amsgrad");
  if (amsgrad)
    check_step(op, params, grads, theta_star, omega,
               {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}, {"max_exp_avg_sqs", max_exp_avg_sqs}},
               device);
  else
    check_step(op, params, grads, theta_star, omega, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}},
               device);
  check_length(op, "steps", steps, params.size());
  for (size_t i = 0; i < steps.size(); ++i)
    TORCH_CHECK_VALUE(steps[i].numel() == 1 && steps[i].device().is_cpu() && steps[i].is_floating_point(), op,
                      ": steps[", i, "] must be a one-element floating-point CPU tensor");
}

void check_per_sample_abs_sum(const char* op, const at::Tensor& delta, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK_VALUE(delta.dim() == 3, op, ": delta must be (B, T, C), got shape ", delta.sizes());
  check_importance_dtype(op, "delta", delta.scalar_type());
  if (!scale.has_value()) return;
  TORCH_CHECK_VALUE(scale->sizes() == delta.sizes(), op, ": scale has shape ", scale->sizes(), ", delta has ",
                    delta.sizes());
  TORCH_CHECK_VALUE(scale->device() == delta.device(), op, ": scale is on ", scale->device(), ", delta on ",
                    delta.device());
  check_importance_dtype(op, "scale", scale->scalar_type());
}

void check_per_sample_abs_matmul(const char* op, const at::Tensor& delta, const at::Tensor& x) {
  TORCH_CHECK_VALUE(delta.dim() == 4, op, ": delta must be (B, G, T, O), got shape ", delta.sizes());
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be (B, G, T, I), got shape ", x.sizes());
  TORCH_CHECK_VALUE(delta.sizes().slice(0, 3) == x.sizes().slice(0, 3), op, ": delta ", delta.sizes(), " and x ",
                    x.sizes(), " differ in (B, G, T)");
  TORCH_CHECK_VALUE(x.device() == delta.device(), op, ": x is on ", x.device(), ", delta on ", delta.device());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"delta", delta}, {"x", x}})
    TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble || t.scalar_type() == at::kFloat ||
                         t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
                     op, ": ", name, " is ", t.scalar_type(), "; supported: float32, float64, bfloat16, float16");
}

}  // namespace mas_fast
