// extern "C" entry points over csrc/cuda/mas_cuda.h for ctypes (tests/cuda_emulator/__init__.py).
// Each returns the cudaError_t of the call; emu_failure() says what the emulator caught.
#include "mas_cuda.h"

namespace cu = mas_fast::cuda;

namespace {
cu::DType dtype_of(int code) { return static_cast<cu::DType>(code); }
}  // namespace

extern "C" {

const char* emu_failure() { return emu::failure(); }

int64_t emu_partials_len(int n, const int64_t* numels) { return cu::partials_len(n, numels); }

int64_t emu_per_sample_abs_sum_workspace_len(int64_t B, int64_t C) {
  return cu::per_sample_abs_sum_workspace_len(B, C);
}

int emu_penalty_and_grad(int dtype, int n, void* const* params, void* const* grads, void* const* theta_star,
                         void* const* omega, const int64_t* numels, double lam, double* partials, void* out) {
  emu::reset();
  return cu::penalty_and_grad(dtype_of(dtype), n, params, grads, theta_star, omega, numels, lam, partials, out,
                              nullptr);
}

int emu_penalty_grad(int dtype, int n, void* const* params, void* const* grads, void* const* theta_star,
                     void* const* omega, const int64_t* numels, const double* scale) {
  emu::reset();
  return cu::penalty_grad(dtype_of(dtype), n, params, grads, theta_star, omega, numels, scale, nullptr);
}

int emu_merge(bool is_double, int n, void* const* dst, void* const* src, const int64_t* numels, double a,
              double b) {
  emu::reset();
  return cu::merge(is_double, n, dst, src, numels, a, b, nullptr);
}

int emu_running_mean_update(bool is_double, int n, void* const* mean, void* const* comp, void* const* batch_sum,
                            const int64_t* numels, int64_t count, int64_t batch_count) {
  emu::reset();
  return cu::running_mean_update(is_double, n, mean, comp, batch_sum, numels, count, batch_count, nullptr);
}

int emu_sgd_step(int dtype, const cu::SgdArgs* args) {
  emu::reset();
  return cu::sgd_step(dtype_of(dtype), *args, nullptr);
}

int emu_adam_step(int dtype, const cu::AdamArgs* args) {
  emu::reset();
  return cu::adam_step(dtype_of(dtype), *args, nullptr);
}

int emu_per_sample_abs_sum(int delta_dtype, const void* delta, const int64_t* delta_strides, int scale_dtype,
                           const void* scale, const int64_t* scale_strides, int64_t B, int64_t T, int64_t C,
                           bool out_double, void* out, double* workspace) {
  emu::reset();
  return cu::per_sample_abs_sum(dtype_of(delta_dtype), delta, delta_strides, dtype_of(scale_dtype), scale,
                                scale_strides, B, T, C, out_double, out, workspace, nullptr);
}

}  // extern "C"
