// Importance epilogues the GEMM kernels do not cover: bias and norm-affine per-sample
// reductions, out[c] = Σ_k |Σ_t δ[k,t,c] · s[k,t,c]|. Threads own columns c (coalesced
// when C is the fastest dimension); blocks along y own interleaved samples and write one
// partial row each; a second kernel sums the rows in fixed order (deterministic).
#include "cuda/kernels.h"
#include "multi_tensor.cuh"

namespace mas_fast {
namespace cuda {
namespace {

constexpr int kCols = 128;        // columns per block
constexpr int kSampleSplits = 64; // at most this many partial rows

int64_t splits_for(int64_t B) { return B < kSampleSplits ? (B > 0 ? B : 1) : kSampleSplits; }

template <typename D, typename Sc>
__global__ void __launch_bounds__(kCols) abs_sum_partials(const D* delta, int64_t ds0, int64_t ds1, int64_t ds2,
                                                          const Sc* scale, int64_t ss0, int64_t ss1, int64_t ss2,
                                                          int64_t B, int64_t T, int64_t C, double* partials) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  if (c >= C) return;
  double acc = 0.0;
  for (int64_t k = blockIdx.y; k < B; k += gridDim.y) {
    float s = 0.f;
    for (int64_t t = 0; t < T; ++t) {
      float v = to_float(delta[k * ds0 + t * ds1 + c * ds2]);
      if (scale != nullptr) v *= to_float(scale[k * ss0 + t * ss1 + c * ss2]);
      s += v;
    }
    acc += fabs(static_cast<double>(s));
  }
  partials[blockIdx.y * C + c] = acc;
}

__global__ void sum_rows(const double* partials, int64_t rows, int64_t C, float* out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double acc = 0.0;
  for (int64_t r = 0; r < rows; ++r) acc += partials[r * C + c];
  out[c] = static_cast<float>(acc);
}

template <typename D, typename Sc>
cudaError_t launch(const void* delta, const int64_t* dst, const void* scale, const int64_t* sst, int64_t B,
                   int64_t T, int64_t C, float* out, double* workspace, cudaStream_t stream) {
  const int64_t splits = splits_for(B);
  const dim3 grid(static_cast<unsigned>((C + kCols - 1) / kCols), static_cast<unsigned>(splits));
  const int64_t zero[3] = {0, 0, 0};
  const int64_t* s = sst ? sst : zero;
  abs_sum_partials<D, Sc><<<grid, kCols, 0, stream>>>(static_cast<const D*>(delta), dst[0], dst[1], dst[2],
                                                      static_cast<const Sc*>(scale), s[0], s[1], s[2], B, T, C,
                                                      workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const unsigned blocks = static_cast<unsigned>((C + 255) / 256);
  sum_rows<<<blocks, 256, 0, stream>>>(workspace, splits, C, out);
  return cudaGetLastError();
}

template <typename D>
cudaError_t with_scale(DType scale_dtype, const void* delta, const int64_t* dst, const void* scale,
                       const int64_t* sst, int64_t B, int64_t T, int64_t C, float* out, double* workspace,
                       cudaStream_t stream) {
  if (scale_dtype == DType::f64) return cudaErrorInvalidValue;
  return dispatch_dtype(scale_dtype, [&](auto type) {
    using Sc = typename decltype(type)::type;
    return launch<D, Sc>(delta, dst, scale, sst, B, T, C, out, workspace, stream);
  });
}

}  // namespace

int64_t per_sample_abs_sum_workspace_len(int64_t B, int64_t C) { return splits_for(B) * C; }

cudaError_t per_sample_abs_sum(DType delta_dtype, const void* delta, const int64_t* delta_strides,
                               DType scale_dtype, const void* scale, const int64_t* scale_strides, int64_t B,
                               int64_t T, int64_t C, float* out, double* workspace, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  if (scale == nullptr) scale_dtype = delta_dtype;
  if (delta_dtype == DType::f64) return cudaErrorInvalidValue;  // fp64 importance stays on the reference backend
  return dispatch_dtype(delta_dtype, [&](auto type) {
    using D = typename decltype(type)::type;
    return with_scale<D>(scale_dtype, delta, delta_strides, scale, scale_strides, B, T, C, out, workspace, stream);
  });
}

}  // namespace cuda
}  // namespace mas_fast
