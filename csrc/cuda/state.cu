// Ω state updates over many tensors in one launch: merge across tasks and the
// Kahan-compensated running mean of the current task.
#include "cuda/kernels.h"
#include "multi_tensor.cuh"

namespace mas_fast {
namespace cuda {
namespace {

template <typename S>
struct MergeOp {
  S a, b;

  // ptrs: dst, src
  __device__ __forceinline__ double operator()(void** ptrs, int64_t start, int64_t n, bool vec) const {
    S* dst = static_cast<S*>(ptrs[0]) + start;
    const S* src = static_cast<const S*>(ptrs[1]) + start;
    for_each_slot(n, vec, [&](const IlpSlot& s) {
      S d[kILP], x[kILP];
      s.load(d, dst);
      s.load(x, src);
#pragma unroll
      for (int j = 0; j < kILP; ++j)
        if (s.valid(j)) d[j] = a * d[j] + b * x[j];
      s.store(dst, d);
    });
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

  // ptrs: mean, Kahan compensation, batch sum
  __device__ __forceinline__ double operator()(void** ptrs, int64_t start, int64_t n, bool vec) const {
    S* mean = static_cast<S*>(ptrs[0]) + start;
    S* comp = static_cast<S*>(ptrs[1]) + start;
    const S* sum = static_cast<const S*>(ptrs[2]) + start;
    for_each_slot(n, vec, [&](const IlpSlot& s) {
      S m[kILP], c[kILP], x[kILP];
      s.load(m, mean);
      s.load(c, comp);
      s.load(x, sum);
#pragma unroll
      for (int j = 0; j < kILP; ++j)
        if (s.valid(j)) update(m[j], c[j], x[j]);
      s.store(mean, m);
      s.store(comp, c);
    });
    return 0.0;
  }
};

}  // namespace

cudaError_t merge(DType dtype, int64_t n, const int64_t* numel, void* const* dst, void* const* src, double a,
                  double b, cudaStream_t stream) {
  void* const* lists[2] = {dst, src};
  if (dtype == DType::f64) return launch_multi_tensor<2>(n, lists, numel, MergeOp<double>{a, b}, nullptr, stream);
  if (dtype != DType::f32) return cudaErrorInvalidValue;
  return launch_multi_tensor<2>(n, lists, numel, MergeOp<float>{static_cast<float>(a), static_cast<float>(b)},
                                nullptr, stream);
}

cudaError_t running_mean_update(DType dtype, int64_t n, const int64_t* numel, void* const* means,
                                void* const* comps, void* const* batch_sums, int64_t count, int64_t batch_count,
                                cudaStream_t stream) {
  void* const* lists[3] = {means, comps, batch_sums};
  const double inv_total = 1.0 / static_cast<double>(count + batch_count);
  if (dtype == DType::f64) {
    return launch_multi_tensor<3>(n, lists, numel,
                                  RunningMeanOp<double>{static_cast<double>(batch_count), inv_total}, nullptr,
                                  stream);
  }
  if (dtype != DType::f32) return cudaErrorInvalidValue;
  return launch_multi_tensor<3>(
      n, lists, numel, RunningMeanOp<float>{static_cast<float>(batch_count), static_cast<float>(inv_total)},
      nullptr, stream);
}

}  // namespace cuda
}  // namespace mas_fast
