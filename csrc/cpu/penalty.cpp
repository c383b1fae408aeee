// MAS penalty λΣΩ(θ−θ*)², its gradient 2λΩ(θ−θ*), and both in one pass, for θ*/Ω of the
// accumulation type or lean (widened on load). As in reference.py,
// θ−θ*, each term and each gradient entry are computed in double and rounded once: a huge
// 2λΩ with a small θ−θ* gives the finite gradient the reference gives, not an early inf.
#include "kernels.h"
#include "multi_tensor.h"

namespace mas_fast {
namespace cpu {

double penalty(const DTypes& dtypes, const TensorLists& t, double lam, int threads) {
  return lam * dispatch_dtypes(dtypes, [&](auto param, auto star, auto omega) {
    MAS_FAST_STATE_TYPES(param, star, omega)
    return sum_over_chunks(t.n, t.numel, threads, [&](const Chunk& c) {
      const T* p = ptr<T>(t.params, c.tensor);
      const TS* ts = ptr<TS>(t.theta_star, c.tensor);
      const OM* om = ptr<OM>(t.omega, c.tensor);
      return lane_sum(c.begin, c.end, [&](int64_t i) {
        return penalty_term(diff<A>(load(p, i), load(ts, i)), load(om, i));
      });
    });
  });
}

void penalty_grad(const DTypes& dtypes, const TensorLists& t, double scale, int threads) {
  dispatch_dtypes(dtypes, [&](auto param, auto star, auto omega) {
    MAS_FAST_STATE_TYPES(param, star, omega)
    for_each_chunk(t.n, t.numel, threads, [&](const Chunk& c) {
      const double s = scale;  // locals (not captures) keep the loops vectorisable
      const T* p = ptr<T>(t.params, c.tensor);
      T* g = ptr<T>(t.grads, c.tensor);
      const TS* ts = ptr<TS>(t.theta_star, c.tensor);
      const OM* om = ptr<OM>(t.omega, c.tensor);
#pragma omp simd
      for (int64_t i = c.begin; i < c.end; ++i)
        store(g, i, A(s * double(load(om, i)) * diff<A>(load(p, i), load(ts, i))));
    });
  });
}

double penalty_and_grad(const DTypes& dtypes, const TensorLists& t, double lam, int threads) {
  const double sum = dispatch_dtypes(dtypes, [&](auto param, auto star, auto omega) {
    MAS_FAST_STATE_TYPES(param, star, omega)
    return sum_over_chunks(t.n, t.numel, threads, [&](const Chunk& c) {
      const double two_lam = 2.0 * lam;
      const T* p = ptr<T>(t.params, c.tensor);
      T* g = ptr<T>(t.grads, c.tensor);
      const TS* ts = ptr<TS>(t.theta_star, c.tensor);
      const OM* om = ptr<OM>(t.omega, c.tensor);
      return lane_sum(c.begin, c.end, [&](int64_t i) {
        const A o = load(om, i);  // read before the store to g: no reload, the loop vectorises
        const double d = diff<A>(load(p, i), load(ts, i));
        store(g, i, load(g, i) + A(two_lam * double(o) * d));
        return penalty_term(d, o);
      });
    });
  });
  return lam * sum;
}

}  // namespace cpu
}  // namespace mas_fast
