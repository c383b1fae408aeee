// Fused SGD / Adam(W) steps with the MAS penalty: its gradient 2λΩ(θ−θ*) folded into the
// gradient, or (proximal) its proximal map applied to the loss-only step (mas_fast_kernels.h);
// one pass reads θ, g, the optimizer state, θ* and Ω and writes θ and the state. Arithmetic is
// in the accumulation type (fp32 for bf16/fp16 parameters, rounded once when stored), in
// torch.optim's foreach order of operations, so fp32 trajectories agree with torch.optim +
// an autograd penalty to round-off.
#include <cmath>

#include "kernels.h"
#include "multi_tensor.h"

namespace mas_fast {
namespace cpu {

namespace {

// Per-call coefficients in the arithmetic type.
template <typename A>
struct SgdCoeffs {
  A two_lam, lr, wd, momentum, keep, lr_two_lam;  // keep = 1 − dampening, lr_two_lam = lr·2λ
  bool maximize, has_wd, nesterov, init_buffers;
};

template <typename A>
struct AdamCoeffs {
  A two_lam, wd, eps, w1, beta2, w2, decay, lr_two_lam;  // w1 = 1 − β1, w2 = 1 − β2, decay = 1 − lr·wd
  bool maximize, l2, decoupled, small_w1;
};

// torch's lerp: start + w·(end − start) for |w| < 0.5, else end − (end − start)·(1 − w).
template <typename A>
inline A lerp(A start, A end, A w, bool small_weight) {
  return small_weight ? start + w * (end - start) : end - (end - start) * (A(1) - w);
}

// Each chunk is processed in blocks of kBlock elements, in two loops: the first writes the
// gradient g + 2λΩ(θ−θ*) of the block into a buffer (and sums the penalty), the second runs
// the optimizer update from it. One loop touching all of θ, g, θ*, Ω and the state streams
// from 9 arrays at once and runs ~3× slower (measured on AMD EPYC); the buffer stays in L1.
// The proximal step keeps the plain g there, and θ* and 1 + 2·lr·λΩ in two more block rows
// (kRows), so that its update loop too reads no more global arrays than the explicit one.
constexpr int64_t kBlock = 512;
constexpr int64_t kRows = 4;
constexpr int64_t kStarRow = 1, kDenomRow = 2, kSteppedRow = 3;  // the proximal step's rows

// θ* + (θ' − θ*) / (1 + 2·lr·λΩ): the penalty's proximal map at the loss-only step θ', around θ*
// so that an infinite 2·lr·λΩ gives θ*; star and denom are the block rows of penalised_grads.
template <bool kProximal, typename A>
inline A finish(A stepped, const A* __restrict__ block, int64_t j) {
  if constexpr (kProximal) {
    const A star = block[kStarRow * kBlock + j];
    return star + (stepped - star) / block[kDenomRow * kBlock + j];
  } else {
    return stepped;
  }
}

// θ ← finish(θ') over the block, θ' in its kSteppedRow (Adam's proximal step).
template <typename T, typename A>
void proximal_map(T* __restrict__ p, const A* __restrict__ block, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i)
    store(p, i, finish<true>(block[kSteppedRow * kBlock + i - begin], block, i - begin));
}

// Per block [begin, end), returns ΣΩ(θ−θ*)² (0 without kPenalty) and writes buf[i − begin]:
// g + 2λΩ(θ−θ*) (explicit; plain g without kPenalty), or (kProximal) plain g with θ* in row
// kStarRow and 1 + 2·lr·λΩ in row kDenomRow.
// θ* (TS) and Ω (OM) are widened to A on load (lean state: TS = T, OM = bf16).
template <bool kPenalty, bool kProximal, typename T, typename TS, typename OM, typename A>
double penalised_grads(const T* __restrict__ p, const T* __restrict__ g, const TS* __restrict__ ts,
                       const OM* __restrict__ om, int64_t begin, int64_t end, A two_lam, A lr_two_lam,
                       A* __restrict__ buf) {
  if constexpr (kPenalty) {
    return lane_sum(begin, end, [&](int64_t i) {
      const A o = load(om, i), pv = load(p, i), star = load(ts, i);
      if constexpr (kProximal) {
        buf[i - begin] = load(g, i);
        buf[kStarRow * kBlock + i - begin] = star;
        buf[kDenomRow * kBlock + i - begin] = A(1) + lr_two_lam * o;
      } else {
        buf[i - begin] = load(g, i) + two_lam * o * (pv - star);  // in A, as reference.py's step
      }
      return penalty_term(diff(pv, star), o);
    });
  } else {
    for (int64_t i = begin; i < end; ++i) buf[i - begin] = load(g, i);
    return 0.0;
  }
}

// Calls f(penalty, proximal) with both as compile-time flags; proximal only with a penalty.
template <typename F>
auto with_penalty_mode(bool penalty, bool proximal, F&& f) {
  return with_flag(penalty, [&](auto has_penalty) {
    return with_flag(has_penalty && proximal, [&](auto prox) { return f(has_penalty, prox); });
  });
}

// Calls f(block_begin, block_end, gradient_buffer) over [begin, end); returns the sum of its results.
template <typename A, typename F>
double over_blocks(int64_t begin, int64_t end, F&& f) {
  A buf[kRows * kBlock];
  double sum = 0.0;
  for (int64_t b = begin; b < end; b += kBlock) sum += f(b, b + kBlock < end ? b + kBlock : end, buf);
  return sum;
}

// The updates below vectorise because the pointers are __restrict__ (GCC gives up on runtime
// aliasing checks beyond 10 pointer pairs), the coefficients a by-value local, and the flags
// that decide whether an array is touched template parameters.
template <bool kMomentum, bool kProximal, typename T, typename A>
void sgd_update(T* __restrict__ p, const A* __restrict__ grads, T* __restrict__ buf, int64_t begin, int64_t end,
                const SgdCoeffs<A> k) {
  for (int64_t i = begin; i < end; ++i) {
    const A pv = load(p, i);
    A grad = grads[i - begin];
    grad = k.maximize ? -grad : grad;
    grad = k.has_wd ? grad + k.wd * pv : grad;
    if constexpr (kMomentum) {
      const A b = k.init_buffers ? grad : load(buf, i) * k.momentum + k.keep * grad;
      store(buf, i, b);
      grad = k.nesterov ? grad + k.momentum * b : b;
    }
    store(p, i, finish<kProximal>(pv + (-k.lr) * grad, grads, i - begin));
  }
}

// kProximal: θ' goes to `stepped` (the block's kSteppedRow) for proximal_map; the proximal map
// inside this loop keeps GCC from vectorising it (measured: 2× slower).
template <bool kAmsgrad, bool kProximal, typename T, typename A>
void adam_update(T* __restrict__ p, const A* __restrict__ grads, T* __restrict__ m, T* __restrict__ v,
                 T* __restrict__ vmax, A* __restrict__ stepped, int64_t begin, int64_t end, const AdamCoeffs<A> k,
                 const A neg_step, const A bc2_sqrt) {
  for (int64_t i = begin; i < end; ++i) {
    A pv = load(p, i);
    A grad = grads[i - begin];
    grad = k.maximize ? -grad : grad;
    grad = k.l2 ? grad + k.wd * pv : grad;
    pv = k.decoupled ? pv * k.decay : pv;
    const A mv = lerp(load(m, i), grad, k.w1, k.small_w1);
    A vv = load(v, i) * k.beta2 + k.w2 * grad * grad;
    store(m, i, mv);
    store(v, i, vv);
    if constexpr (kAmsgrad) {
      const A vm = load(vmax, i);
      vv = vm > vv ? vm : vv;
      store(vmax, i, vv);
    }
    const A denom = std::sqrt(vv) / bc2_sqrt + k.eps;
    if constexpr (kProximal)
      stepped[i - begin] = pv + neg_step * mv / denom;
    else
      store(p, i, pv + neg_step * mv / denom);
  }
}

}  // namespace

double sgd_step(const DTypes& dtypes, const TensorLists& t, void* const* momentum_buffers, const SgdConfig& c,
                int threads) {
  const double sum = dispatch_dtypes(dtypes, [&](auto param, auto star, auto omega) {
    MAS_FAST_STATE_TYPES(param, star, omega)
    const SgdCoeffs<A> k{A(2.0 * c.lam),         A(c.lr),      A(c.weight_decay),
                         A(c.momentum),          A(1.0 - c.dampening), A(c.lr * 2.0 * c.lam),
                         c.maximize,             c.weight_decay != 0,  c.nesterov,
                         c.init_buffers};
    return with_penalty_mode(t.theta_star != nullptr, c.proximal, [&](auto penalty, auto prox) {
      return with_flag(c.momentum != 0, [&](auto momentum) {
        return sum_over_chunks(t.n, t.numel, threads, [&](const Chunk& ch) {
          const int64_t i = ch.tensor;
          T* p = ptr<T>(t.params, i);
          const T* g = ptr<T>(t.grads, i);
          T* buf = momentum ? ptr<T>(momentum_buffers, i) : nullptr;
          const TS* ts = penalty ? ptr<TS>(t.theta_star, i) : nullptr;
          const OM* om = penalty ? ptr<OM>(t.omega, i) : nullptr;
          return over_blocks<A>(ch.begin, ch.end, [&](int64_t b, int64_t e, A* grads) {
            const double sum = penalised_grads<penalty, prox>(p, g, ts, om, b, e, k.two_lam, k.lr_two_lam, grads);
            sgd_update<momentum, prox>(p, grads, buf, b, e, k);
            return sum;
          });
        });
      });
    });
  });
  return c.lam * sum;
}

double adam_step(const DTypes& dtypes, const TensorLists& t, void* const* exp_avgs, void* const* exp_avg_sqs,
                 void* const* max_exp_avg_sqs, const AdamConfig& c, int threads) {
  const double sum = dispatch_dtypes(dtypes, [&](auto param, auto star, auto omega) {
    MAS_FAST_STATE_TYPES(param, star, omega)
    const AdamCoeffs<A> k{A(2.0 * c.lam),
                          A(c.weight_decay),
                          A(c.eps),
                          A(1.0 - c.beta1),
                          A(c.beta2),
                          A(1.0 - c.beta2),
                          A(1.0 - c.lr * c.weight_decay),
                          A(c.lr * 2.0 * c.lam),
                          c.maximize,
                          c.weight_decay != 0 && !c.decoupled_weight_decay,
                          c.weight_decay != 0 && c.decoupled_weight_decay,
                          std::abs(1.0 - c.beta1) < 0.5};
    return with_penalty_mode(t.theta_star != nullptr, c.proximal, [&](auto penalty, auto prox) {
      return with_flag(c.amsgrad, [&](auto amsgrad) {
        return sum_over_chunks(t.n, t.numel, threads, [&](const Chunk& ch) {
          const int64_t i = ch.tensor;
          T* p = ptr<T>(t.params, i);
          const T* g = ptr<T>(t.grads, i);
          T* m = ptr<T>(exp_avgs, i);
          T* v = ptr<T>(exp_avg_sqs, i);
          T* vmax = amsgrad ? ptr<T>(max_exp_avg_sqs, i) : nullptr;
          const TS* ts = penalty ? ptr<TS>(t.theta_star, i) : nullptr;
          const OM* om = penalty ? ptr<OM>(t.omega, i) : nullptr;
          // torch.optim's bias corrections from the incremented step, in double
          const double step = c.steps[i];
          const A neg_step = A(-(c.lr / (1.0 - std::pow(c.beta1, step))));
          const A bc2_sqrt = A(std::sqrt(1.0 - std::pow(c.beta2, step)));
          return over_blocks<A>(ch.begin, ch.end, [&](int64_t b, int64_t e, A* grads) {
            const double sum = penalised_grads<penalty, prox>(p, g, ts, om, b, e, k.two_lam, k.lr_two_lam, grads);
            adam_update<amsgrad, prox>(p, grads, m, v, vmax, grads + kSteppedRow * kBlock, b, e, k, neg_step,
                                       bc2_sqrt);
            if constexpr (prox) proximal_map(p, grads, b, e);
            return sum;
          });
        });
      });
    });
  });
  return c.lam * sum;
}

}  // namespace cpu
}  // namespace mas_fast
