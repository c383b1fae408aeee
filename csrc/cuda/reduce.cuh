// Deterministic final reduction of per-block partial sums (fixed order, one block).
#pragma once

#include "multi_tensor.cuh"

namespace mas_fast {
namespace cuda {
namespace {  // one copy per .cu file: the kernel is defined in a header

__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const double* partials, int64_t count,
                                                                double scale, double* out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = scale * acc;
}

// *out = scale · Σ partials[0:count) (0 when count == 0).
inline cudaError_t sum_partials(const double* partials, int64_t count, double scale, double* out,
                                cudaStream_t stream) {
  sum_partials_kernel<<<1, kThreads, 0, stream>>>(partials, count, scale, out);
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda
}  // namespace mas_fast
