// In-place updates of MAS state: Ω merge across tasks and the running mean within a task.
#include "kernels.h"
#include "multi_tensor.h"

namespace mas_fast {
namespace cpu {

void merge(DType dtype, int64_t n, const int64_t* numel, void* const* dst, void* const* src, double a,
           double b, int threads) {
  dispatch_acc_dtype(dtype, [&](auto type) {
    using A = typename decltype(type)::type;
    for_each_chunk(n, numel, threads, [&](const Chunk& c) {
      const A fa = A(a), fb = A(b);  // locals (not captures) keep the loop vectorisable
      A* d = ptr<A>(dst, c.tensor);
      const A* s = ptr<A>(src, c.tensor);
#pragma omp simd
      for (int64_t i = c.begin; i < c.end; ++i) d[i] = d[i] * fa + fb * s[i];
    });
  });
}

void running_mean_update(DType dtype, int64_t n, const int64_t* numel, void* const* means, void* const* comps,
                         void* const* batch_sums, int64_t count, int64_t batch_count, int threads) {
  dispatch_acc_dtype(dtype, [&](auto type) {
    using A = typename decltype(type)::type;
    for_each_chunk(n, numel, threads, [&](const Chunk& c) {
      const A nb = A(batch_count), total = A(count + batch_count);
      A* m = ptr<A>(means, c.tensor);
      A* comp = ptr<A>(comps, c.tensor);
      const A* s = ptr<A>(batch_sums, c.tensor);
      // Kahan summation: the compiler must not reassociate (no -ffast-math).
#pragma omp simd
      for (int64_t i = c.begin; i < c.end; ++i) {
        const A delta = (s[i] - nb * m[i]) / total;
        const A y = delta - comp[i];
        const A t = m[i] + y;
        comp[i] = (t - m[i]) - y;
        m[i] = t;
      }
    });
  });
}

}  // namespace cpu
}  // namespace mas_fast
