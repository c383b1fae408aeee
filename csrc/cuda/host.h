// Host side of the CUDA ops, torch-free: an op call's tensors (any mix of dtypes, and for Adam
// of step counts) split into one kernel call per group, in a fixed order, with the groups'
// penalty values summed on the device. Used by cuda/register.cpp and by the CUDA emulator
// (tests/cuda_emulator), so the emulated tests run this very code.
//
// Every pointer list holds the contiguous device addresses of all n tensors; `dtypes[i]` holds
// tensor i's element types: its parameter's, θ*'s and Ω's (DTypes) for the penalty and the
// steps, its state dtype (DType) for merge / running_mean_update.
// `workspace` holds workspace_len() doubles; *out (a device double) receives λΣΩ(θ−θ*)².
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/kernels.h"

namespace mas_fast {
namespace cuda {
namespace host {

// Doubles of workspace a penalty-reducing call over these tensors needs (steps: Adam's per
// tensor step counts, else null).
int64_t workspace_len(int64_t n, const DTypes* dtypes, const int64_t* numel, const double* steps);

cudaError_t penalty_and_grad(const DTypes* dtypes, const TensorLists& t, double lam, double* workspace, double* out,
                             cudaStream_t stream);
cudaError_t penalty_grad(const DTypes* dtypes, const TensorLists& t, const double* scale, cudaStream_t stream);
cudaError_t merge(const DType* dtypes, int64_t n, const int64_t* numel, void* const* dst, void* const* src,
                  double a, double b, cudaStream_t stream);
cudaError_t running_mean_update(const DType* dtypes, int64_t n, const int64_t* numel, void* const* means,
                                void* const* comps, void* const* batch_sums, int64_t count, int64_t batch_count,
                                cudaStream_t stream);
cudaError_t sgd_step(const DTypes* dtypes, const TensorLists& t, void* const* momentum_buffers, const SgdConfig& c,
                     double* workspace, double* out, cudaStream_t stream);
// c.steps: per tensor, already incremented; one launch per (dtype, step).
cudaError_t adam_step(const DTypes* dtypes, const TensorLists& t, void* const* exp_avgs, void* const* exp_avg_sqs,
                      void* const* max_exp_avg_sqs, const AdamConfig& c, double* workspace, double* out,
                      cudaStream_t stream);

}  // namespace host
}  // namespace cuda
}  // namespace mas_fast
