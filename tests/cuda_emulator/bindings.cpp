// extern "C" entry points over csrc/cuda/kernels.h for ctypes (tests/cuda_emulator/__init__.py):
// flat arguments in, the shared interface structs (mas_fast_kernels.h) built here. Each returns
// the cudaError_t of the call; emu_failure() says what the emulator caught.
#include "kernels.h"

namespace mf = mas_fast;
namespace cu = mas_fast::cuda;

namespace {
mf::DType dtype_of(int code) { return static_cast<mf::DType>(code); }

mf::TensorLists lists(int64_t n, const int64_t* numel, void* const* params, void* const* grads,
                      void* const* theta_star, void* const* omega) {
  return mf::TensorLists{n, numel, params, grads, theta_star, omega};
}
}  // namespace

extern "C" {

const char* emu_failure() { return emu::failure(); }

int64_t emu_partials_len(int64_t n, const int64_t* numel) { return cu::partials_len(n, numel); }

int64_t emu_per_sample_abs_sum_workspace_len(int64_t B, int64_t C) {
  return cu::per_sample_abs_sum_workspace_len(B, C);
}

int emu_penalty_and_grad(int dtype, int64_t n, const int64_t* numel, void* const* params, void* const* grads,
                         void* const* theta_star, void* const* omega, double lam, double* partials, double* out) {
  emu::reset();
  return cu::penalty_and_grad(dtype_of(dtype), lists(n, numel, params, grads, theta_star, omega), lam, partials,
                              out, nullptr);
}

int emu_penalty_grad(int dtype, int64_t n, const int64_t* numel, void* const* params, void* const* grads,
                     void* const* theta_star, void* const* omega, const double* scale) {
  emu::reset();
  return cu::penalty_grad(dtype_of(dtype), lists(n, numel, params, grads, theta_star, omega), scale, nullptr);
}

int emu_merge(int dtype, int64_t n, const int64_t* numel, void* const* dst, void* const* src, double a, double b) {
  emu::reset();
  return cu::merge(dtype_of(dtype), n, numel, dst, src, a, b, nullptr);
}

int emu_running_mean_update(int dtype, int64_t n, const int64_t* numel, void* const* means, void* const* comps,
                            void* const* batch_sums, int64_t count, int64_t batch_count) {
  emu::reset();
  return cu::running_mean_update(dtype_of(dtype), n, numel, means, comps, batch_sums, count, batch_count, nullptr);
}

int emu_sgd_step(int dtype, int64_t n, const int64_t* numel, void* const* params, void* const* grads,
                 void* const* momentum_buffers, void* const* theta_star, void* const* omega,
                 const mf::SgdConfig* config, double* partials, double* out) {
  emu::reset();
  return cu::sgd_step(dtype_of(dtype), lists(n, numel, params, grads, theta_star, omega), momentum_buffers,
                      *config, partials, out, nullptr);
}

int emu_adam_step(int dtype, int64_t n, const int64_t* numel, void* const* params, void* const* grads,
                  void* const* exp_avgs, void* const* exp_avg_sqs, void* const* max_exp_avg_sqs,
                  void* const* theta_star, void* const* omega, const mf::AdamConfig* config, double* partials,
                  double* out) {
  emu::reset();
  return cu::adam_step(dtype_of(dtype), lists(n, numel, params, grads, theta_star, omega), exp_avgs, exp_avg_sqs,
                       max_exp_avg_sqs, *config, partials, out, nullptr);
}

int emu_per_sample_abs_sum(int delta_dtype, const void* delta, const int64_t* delta_strides, int scale_dtype,
                           const void* scale, const int64_t* scale_strides, int64_t B, int64_t T, int64_t C,
                           float* out, double* workspace) {
  emu::reset();
  return cu::per_sample_abs_sum(dtype_of(delta_dtype), delta, delta_strides, dtype_of(scale_dtype), scale,
                                scale_strides, B, T, C, out, workspace, nullptr);
}

}  // extern "C"
