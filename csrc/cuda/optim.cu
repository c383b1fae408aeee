// Fused SGD / Adam / AdamW steps with the MAS penalty folded into the gradient:
// g ← g + 2λΩ(θ − θ*), then torch.optim's update, in one pass over the tensors the step
// reads anyway; or (proximal) torch.optim's update on g alone, then the penalty's proximal map
// θ ← θ* + (θ' − θ*) / (1 + 2·lr·λΩ) (mas_fast_kernels.h). Parameters MAS does not cover
// pass nullptr for θ*/Ω (a plain step).
// Math in fp32 (fp64 for fp64 parameters), θ* and Ω widened to it on load (lean state too);
// optimizer state is stored in the parameter dtype, like torch.optim. The penalty at the
// parameters before the step is reduced on the side.
#include "cuda/kernels.h"
#include "multi_tensor.cuh"
#include "reduce.cuh"

namespace mas_fast {
namespace cuda {
namespace {

// Adds the penalty gradient to g unless proximal (in M, as reference.py's step) and returns
// Ω d² (in double). θ* and Ω come widened to M (from their lean types, too).
template <typename M>
__device__ __forceinline__ double penalise(M& g, M theta, M star, M omega, M two_lam, bool proximal) {
  if (!proximal) g += two_lam * omega * (theta - star);
  return penalty_term(omega, static_cast<double>(theta) - static_cast<double>(star));
}

// θ* + (θ' − θ*) / (1 + 2·lr·λΩ) at the loss-only step θ', around θ* so that an infinite
// 2·lr·λΩ gives θ*; θ' itself without θ* (covered false) or when not proximal.
template <typename M>
__device__ __forceinline__ M finish(M stepped, bool covered, M star, M omega, M lr_two_lam, bool proximal) {
  if (!proximal || !covered) return stepped;
  return star + (stepped - star) / (M(1) + lr_two_lam * omega);
}

// Element j of a tensor's θ* and Ω registers widened to M (0 for a tensor MAS does not cover).
template <typename M, typename TS, typename OM>
__device__ __forceinline__ void widen_terms(bool covered, const TS& star, const OM& omega, M& star_m, M& omega_m) {
  star_m = covered ? load_as<M>(&star) : M(0);
  omega_m = covered ? load_as<M>(&omega) : M(0);
}

template <typename P, typename TS, typename OM>
struct SgdOp {
  using M = typename MathOf<P>::type;
  M two_lam, lr, momentum, dampening, weight_decay, lr_two_lam;
  bool nesterov, maximize, init_buffers, proximal;

  // ptrs: θ, g, momentum buffer (nullptr without momentum), θ*, Ω (nullptr: not covered by MAS)
  __device__ __forceinline__ double operator()(void** ptrs, int64_t start, int64_t n, bool vec) const {
    P* theta = static_cast<P*>(ptrs[0]) + start;
    const P* grad = static_cast<const P*>(ptrs[1]) + start;
    P* buf = ptrs[2] ? static_cast<P*>(ptrs[2]) + start : nullptr;
    const TS* star = ptrs[3] ? static_cast<const TS*>(ptrs[3]) + start : nullptr;
    const OM* omega = ptrs[4] ? static_cast<const OM*>(ptrs[4]) + start : nullptr;
    double acc = 0.0;
    for_each_slot(n, vec, [&](const IlpSlot& s) {
      P th[kILP], gr[kILP], bf[kILP];
      TS st[kILP];
      OM om[kILP];
      s.load(th, theta);
      s.load(gr, grad);
      if (!init_buffers) s.load(bf, buf);
      s.load(st, star);
      s.load(om, omega);
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        if (!s.valid(j)) continue;
        const M p = load_as<M>(&th[j]);
        M g = load_as<M>(&gr[j]), ts, w;
        widen_terms(star != nullptr, st[j], om[j], ts, w);
        if (star != nullptr) acc += penalise(g, p, ts, w, two_lam, proximal);
        if (maximize) g = -g;
        if (weight_decay != M(0)) g += weight_decay * p;
        if (buf != nullptr) {
          const M b = init_buffers ? g : load_as<M>(&bf[j]) * momentum + (M(1) - dampening) * g;
          bf[j] = from_math<P, M>(b);
          g = nesterov ? g + momentum * b : b;
        }
        th[j] = from_math<P, M>(finish<M>(p - lr * g, star != nullptr, ts, w, lr_two_lam, proximal));
      }
      s.store(buf, bf);
      s.store(theta, th);
    });
    return acc;
  }
};

template <typename P, typename TS, typename OM>
struct AdamOp {
  using M = typename MathOf<P>::type;
  M two_lam, lr, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt, lr_two_lam;
  bool decoupled, maximize, proximal;

  // ptrs: θ, g, exp_avg, exp_avg_sq, max_exp_avg_sq (nullptr without amsgrad), θ*, Ω (nullptr:
  // not covered by MAS)
  __device__ __forceinline__ double operator()(void** ptrs, int64_t start, int64_t n, bool vec) const {
    P* theta = static_cast<P*>(ptrs[0]) + start;
    const P* grad = static_cast<const P*>(ptrs[1]) + start;
    P* exp_avg = static_cast<P*>(ptrs[2]) + start;
    P* exp_avg_sq = static_cast<P*>(ptrs[3]) + start;
    P* max_sq = ptrs[4] ? static_cast<P*>(ptrs[4]) + start : nullptr;
    const TS* star = ptrs[5] ? static_cast<const TS*>(ptrs[5]) + start : nullptr;
    const OM* omega = ptrs[6] ? static_cast<const OM*>(ptrs[6]) + start : nullptr;
    double acc = 0.0;
    for_each_slot(n, vec, [&](const IlpSlot& s) {
      P th[kILP], gr[kILP], m1[kILP], m2[kILP], mx[kILP];
      TS st[kILP];
      OM om[kILP];
      s.load(th, theta);
      s.load(gr, grad);
      s.load(m1, exp_avg);
      s.load(m2, exp_avg_sq);
      s.load(mx, max_sq);
      s.load(st, star);
      s.load(om, omega);
#pragma unroll
      for (int j = 0; j < kILP; ++j) {
        if (!s.valid(j)) continue;
        M p = load_as<M>(&th[j]);
        M g = load_as<M>(&gr[j]), ts, w;
        widen_terms(star != nullptr, st[j], om[j], ts, w);
        if (star != nullptr) acc += penalise(g, p, ts, w, two_lam, proximal);
        if (maximize) g = -g;
        if (weight_decay != M(0)) {
          if (decoupled) p *= M(1) - lr * weight_decay;
          else g += weight_decay * p;
        }
        const M m_old = load_as<M>(&m1[j]);
        const M m = m_old + (M(1) - beta1) * (g - m_old);
        M v = load_as<M>(&m2[j]) * beta2 + (M(1) - beta2) * g * g;
        m1[j] = from_math<P, M>(m);
        m2[j] = from_math<P, M>(v);
        if (max_sq != nullptr) {
          v = max(load_as<M>(&mx[j]), v);
          mx[j] = from_math<P, M>(v);
        }
        th[j] = from_math<P, M>(
            finish<M>(p - step_size * m / (sqrt(v) / bc2_sqrt + eps), star != nullptr, ts, w, lr_two_lam, proximal));
      }
      s.store(exp_avg, m1);
      s.store(exp_avg_sq, m2);
      s.store(max_sq, mx);
      s.store(theta, th);
    });
    return acc;
  }
};

// Launches `op` over `lists`, then sums the chunks' penalty terms into *out (times λ).
template <int DEPTH, typename Op>
cudaError_t run_with_penalty(const TensorLists& t, void* const* const* lists, Op op, double lam, double* partials,
                             double* out, cudaStream_t stream) {
  const cudaError_t err = launch_multi_tensor<DEPTH>(t.n, lists, t.numel, op, partials, stream);
  return err != cudaSuccess ? err : sum_partials(partials, total_chunks(t.n, t.numel), lam, out, stream);
}

}  // namespace

cudaError_t sgd_step(const DTypes& dtypes, const TensorLists& t, void* const* momentum_buffers, const SgdConfig& c,
                     double* partials, double* out, cudaStream_t stream) {
  void* const* lists[5] = {t.params, t.grads, c.momentum != 0 ? momentum_buffers : nullptr, t.theta_star, t.omega};
  return dispatch_dtypes(dtypes, [&](auto param, auto star, auto omega) {
    using P = typename decltype(param)::type;
    using M = typename MathOf<P>::type;
    const SgdOp<P, typename decltype(star)::type, typename decltype(omega)::type> op{
        static_cast<M>(2.0 * c.lam),     static_cast<M>(c.lr),           static_cast<M>(c.momentum),
        static_cast<M>(c.dampening),     static_cast<M>(c.weight_decay), static_cast<M>(c.lr * 2.0 * c.lam),
        c.nesterov, c.maximize, c.init_buffers, c.proximal};
    return run_with_penalty<5>(t, lists, op, c.lam, partials, out, stream);
  });
}

cudaError_t adam_step(const DTypes& dtypes, const TensorLists& t, void* const* exp_avgs, void* const* exp_avg_sqs,
                      void* const* max_exp_avg_sqs, const AdamConfig& c, double* partials, double* out,
                      cudaStream_t stream) {
  void* const* lists[7] = {t.params,     t.grads,      exp_avgs, exp_avg_sqs, c.amsgrad ? max_exp_avg_sqs : nullptr,
                           t.theta_star, t.omega};
  const double step = t.n > 0 ? c.steps[0] : 1.0;
  const double bc1 = 1.0 - pow(c.beta1, step);
  const double bc2 = 1.0 - pow(c.beta2, step);
  return dispatch_dtypes(dtypes, [&](auto param, auto star, auto omega) {
    using P = typename decltype(param)::type;
    using M = typename MathOf<P>::type;
    const AdamOp<P, typename decltype(star)::type, typename decltype(omega)::type> op{
        static_cast<M>(2.0 * c.lam), static_cast<M>(c.lr),      static_cast<M>(c.beta1),
        static_cast<M>(c.beta2),     static_cast<M>(c.eps),     static_cast<M>(c.weight_decay),
        static_cast<M>(c.lr / bc1),  static_cast<M>(sqrt(bc2)), static_cast<M>(c.lr * 2.0 * c.lam),
        c.decoupled_weight_decay,    c.maximize,                c.proximal};
    return run_with_penalty<7>(t, lists, op, c.lam, partials, out, stream);
  });
}

}  // namespace cuda
}  // namespace mas_fast
