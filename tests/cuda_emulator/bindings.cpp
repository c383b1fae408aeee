// extern "C" entry points over csrc/cuda/host.h for ctypes (tests/cuda_emulator/__init__.py):
// flat arguments in, the shared interface structs (mas_fast_kernels.h) built here, then the
// same host code as cuda/register.cpp. Each returns the cudaError_t of the call;
// emu_failure() says what the emulator caught.
#include "cuda/host.h"

namespace mf = mas_fast;
namespace cu = mas_fast::cuda;

namespace {
// State ops: one DType code per tensor.
const mf::DType* dtypes_of(const int* codes) { return reinterpret_cast<const mf::DType*>(codes); }
static_assert(sizeof(mf::DType) == sizeof(int));
// Penalty and steps: three codes per tensor (parameter, θ*, Ω), a mas_fast::DTypes.
const mf::DTypes* state_dtypes_of(const int* codes) { return reinterpret_cast<const mf::DTypes*>(codes); }
static_assert(sizeof(mf::DTypes) == 3 * sizeof(int));
}  // namespace

extern "C" {

const char* emu_failure() { return emu::failure(); }

int64_t emu_workspace_len(int64_t n, const int* dtypes, const int64_t* numel, const double* steps) {
  return cu::host::workspace_len(n, state_dtypes_of(dtypes), numel, steps);
}

int64_t emu_per_sample_abs_sum_workspace_len(int64_t B, int64_t C) {
  return cu::per_sample_abs_sum_workspace_len(B, C);
}

int emu_penalty_and_grad(const int* dtypes, const mf::TensorLists* t, double lam, double* workspace, double* out) {
  emu::reset();
  return cu::host::penalty_and_grad(state_dtypes_of(dtypes), *t, lam, workspace, out, nullptr);
}

int emu_penalty_grad(const int* dtypes, const mf::TensorLists* t, const double* scale) {
  emu::reset();
  return cu::host::penalty_grad(state_dtypes_of(dtypes), *t, scale, nullptr);
}

int emu_merge(const int* dtypes, const mf::TensorLists* t, double a, double b) {  // dst: params, src: grads
  emu::reset();
  return cu::host::merge(dtypes_of(dtypes), t->n, t->numel, t->params, t->grads, a, b, nullptr);
}

// means: params, comps: grads, batch sums: theta_star
int emu_running_mean_update(const int* dtypes, const mf::TensorLists* t, int64_t count, int64_t batch_count) {
  emu::reset();
  return cu::host::running_mean_update(dtypes_of(dtypes), t->n, t->numel, t->params, t->grads, t->theta_star, count,
                                       batch_count, nullptr);
}

int emu_sgd_step(const int* dtypes, const mf::TensorLists* t, void* const* momentum_buffers,
                 const mf::SgdConfig* config, double* workspace, double* out) {
  emu::reset();
  return cu::host::sgd_step(state_dtypes_of(dtypes), *t, momentum_buffers, *config, workspace, out, nullptr);
}

int emu_adam_step(const int* dtypes, const mf::TensorLists* t, void* const* exp_avgs, void* const* exp_avg_sqs,
                  void* const* max_exp_avg_sqs, const mf::AdamConfig* config, double* workspace, double* out) {
  emu::reset();
  return cu::host::adam_step(state_dtypes_of(dtypes), *t, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *config, workspace, out,
                             nullptr);
}

int emu_per_sample_abs_sum(int delta_dtype, const void* delta, const int64_t* delta_strides, int scale_dtype,
                           const void* scale, const int64_t* scale_strides, int64_t B, int64_t T, int64_t C,
                           float* out, double* workspace) {
  emu::reset();
  return cu::per_sample_abs_sum(static_cast<mf::DType>(delta_dtype), delta, delta_strides,
                                static_cast<mf::DType>(scale_dtype), scale, scale_strides, B, T, C, out, workspace,
                                nullptr);
}

}  // extern "C"
