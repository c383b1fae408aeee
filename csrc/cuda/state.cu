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
