// Ω state updates over many tensors in one launch: merge across tasks and the
// Kahan-compensated running mean of the current task.
#include "mas_cuda.h"
#include "multi_tensor.cuh"

namespace mas_fast {
namespace cuda {
namespace {

template <typename S>
struct MergeOp {
  S a, b;
  __device__ __forceinline__ double operator()(void** ptrs, int64_t start, int64_t n, bool vec) const {
    S* dst = static_cast<S*>(ptrs[0]) + start;
    const S* src = static_cast<const S*>(ptrs[1]) + start;
    if (vec) {
      for (int64_t i = threadIdx.x * kILP; i < n; i += blockDim.x * kILP) {
        S d[kILP], s[kILP];
        load_ilp(d, dst + i);
        load_ilp(s, src + i);
#pragma unroll
        for (int j = 0; j < kILP; ++j) d[j] = a * d[j] + b * s[j];
        store_ilp(dst + i, d);
      }
    } else {
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = a * dst[i] + b * src[i];
    }
    return 0.0;
  }
};

template <typename S>
struct RunningMeanOp {
  S batch_count, inv_total;
  __device__ __forceinline__ void update(S& m, S& c, S s) const {
    const S delta = (s - batch_count * m) * inv_total;
    const S y = delta - c;
    const S t = m + y;
    c = (t - m) - y;
    m = t;
  }
  __device__ __forceinline__ double operator()(void** ptrs, int64_t start, int64_t n, bool vec) const {
    S* mean = static_cast<S*>(ptrs[0]) + start;
    S* comp = static_cast<S*>(ptrs[1]) + start;
    const S* sum = static_cast<const S*>(ptrs[2]) + start;
    if (vec) {
      for (int64_t i = threadIdx.x * kILP; i < n; i += blockDim.x * kILP) {
        S m[kILP], c[kILP], s[kILP];
        load_ilp(m, mean + i);
        load_ilp(c, comp + i);
        load_ilp(s, sum + i);
#pragma unroll
        for (int j = 0; j < kILP; ++j) update(m[j], c[j], s[j]);
        store_ilp(mean + i, m);
        store_ilp(comp + i, c);
      }
    } else {
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) update(mean[i], comp[i], sum[i]);
    }
    return 0.0;
  }
};

}  // namespace

cudaError_t merge(bool is_double, int n, void* const* dst, void* const* src, const int64_t* numels,
                  double a, double b, cudaStream_t stream) {
  void* const* lists[2] = {dst, src};
  if (is_double) return launch_multi_tensor<2>(n, lists, numels, MergeOp<double>{a, b}, nullptr, stream);
  return launch_multi_tensor<2>(n, lists, numels,
                                MergeOp<float>{static_cast<float>(a), static_cast<float>(b)}, nullptr, stream);
}

cudaError_t running_mean_update(bool is_double, int n, void* const* mean, void* const* comp,
                                void* const* batch_sum, const int64_t* numels, int64_t count,
                                int64_t batch_count, cudaStream_t stream) {
  void* const* lists[3] = {mean, comp, batch_sum};
  const double inv_total = 1.0 / static_cast<double>(count + batch_count);
  if (is_double) {
    return launch_multi_tensor<3>(n, lists, numels,
                                  RunningMeanOp<double>{static_cast<double>(batch_count), inv_total},
                                  nullptr, stream);
  }
  return launch_multi_tensor<3>(
      n, lists, numels,
      RunningMeanOp<float>{static_cast<float>(batch_count), static_cast<float>(inv_total)}, nullptr, stream);
}

}  // namespace cuda
}  // namespace mas_fast
