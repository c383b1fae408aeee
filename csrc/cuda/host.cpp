// Grouping of the CUDA ops' tensors into kernel calls (see host.h).
#include "cuda/host.h"

#include <deque>
#include <map>
#include <utility>
#include <vector>

namespace mas_fast {
namespace cuda {
namespace host {
namespace {

// Tensor indices per (dtypes, step) in a fixed order; step 0 for ops without one. D is DTypes
// (penalty, steps) or DType (state ops).
template <typename D>
using Groups = std::map<std::pair<D, double>, std::vector<int64_t>>;

template <typename D>
Groups<D> make_groups(int64_t n, const D* dtypes, const double* steps) {
  Groups<D> groups;
  for (int64_t i = 0; i < n; ++i) groups[{dtypes[i], steps ? steps[i] : 0.0}].push_back(i);
  return groups;
}

// One group's view of the call's pointer lists (a null list stays null).
class GroupView {
 public:
  explicit GroupView(const std::vector<int64_t>& index) : index_(index) {}

  void* const* gather(void* const* list) {
    if (list == nullptr) return nullptr;
    gathered_.emplace_back();
    for (int64_t i : index_) gathered_.back().push_back(list[i]);
    return gathered_.back().data();
  }
  const int64_t* numel(const int64_t* all) {
    if (numel_.empty())
      for (int64_t i : index_) numel_.push_back(all[i]);
    return numel_.data();
  }
  TensorLists lists(const TensorLists& t) {
    return TensorLists{int64_t(index_.size()), numel(t.numel), gather(t.params), gather(t.grads),
                       gather(t.theta_star), gather(t.omega)};
  }

 private:
  const std::vector<int64_t>& index_;
  std::deque<std::vector<void*>> gathered_;  // a deque: the arrays handed out stay where they are
  std::vector<int64_t> numel_;
};

// Runs call(group, view, partials, value) per group — each group owning a slice of the chunk
// partials and one value slot at the end of the workspace — then sums the values into *out.
template <typename Call>
cudaError_t reduce_groups(const Groups<DTypes>& groups, const int64_t* numel, double* workspace, double* out,
                          cudaStream_t stream, Call&& call) {
  int64_t chunks = 0;
  for (const auto& [key, index] : groups)
    for (int64_t i : index) chunks += partials_len(1, &numel[i]);
  double* values = workspace + chunks;
  int64_t slot = 0;
  double* partials = workspace;
  for (const auto& [key, index] : groups) {
    GroupView view(index);
    const cudaError_t err = call(key, view, partials, values + slot);
    if (err != cudaSuccess) return err;
    for (int64_t i : index) partials += partials_len(1, &numel[i]);
    ++slot;
  }
  return sum(values, slot, out, stream);
}

}  // namespace

int64_t workspace_len(int64_t n, const DTypes* dtypes, const int64_t* numel, const double* steps) {
  return partials_len(n, numel) + int64_t(make_groups(n, dtypes, steps).size());
}

cudaError_t penalty_and_grad(const DTypes* dtypes, const TensorLists& t, double lam, double* workspace, double* out,
                             cudaStream_t stream) {
  return reduce_groups(make_groups(t.n, dtypes, nullptr), t.numel, workspace, out, stream,
                       [&](const auto& key, GroupView& g, double* partials, double* value) {
                         return cuda::penalty_and_grad(key.first, g.lists(t), lam, partials, value, stream);
                       });
}

cudaError_t penalty_grad(const DTypes* dtypes, const TensorLists& t, const double* scale, cudaStream_t stream) {
  for (const auto& [key, index] : make_groups(t.n, dtypes, nullptr)) {
    GroupView g(index);
    const cudaError_t err = cuda::penalty_grad(key.first, g.lists(t), scale, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t merge(const DType* dtypes, int64_t n, const int64_t* numel, void* const* dst, void* const* src,
                  double a, double b, cudaStream_t stream) {
  for (const auto& [key, index] : make_groups(n, dtypes, nullptr)) {
    GroupView g(index);
    const cudaError_t err =
        cuda::merge(key.first, int64_t(index.size()), g.numel(numel), g.gather(dst), g.gather(src), a, b, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t running_mean_update(const DType* dtypes, int64_t n, const int64_t* numel, void* const* means,
                                void* const* comps, void* const* batch_sums, int64_t count, int64_t batch_count,
                                cudaStream_t stream) {
  for (const auto& [key, index] : make_groups(n, dtypes, nullptr)) {
    GroupView g(index);
    const cudaError_t err =
        cuda::running_mean_update(key.first, int64_t(index.size()), g.numel(numel), g.gather(means),
                                  g.gather(comps), g.gather(batch_sums), count, batch_count, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t sgd_step(const DTypes* dtypes, const TensorLists& t, void* const* momentum_buffers, const SgdConfig& c,
                     double* workspace, double* out, cudaStream_t stream) {
  return reduce_groups(make_groups(t.n, dtypes, nullptr), t.numel, workspace, out, stream,
                       [&](const auto& key, GroupView& g, double* partials, double* value) {
                         const TensorLists lists = g.lists(t);
                         return cuda::sgd_step(key.first, lists, g.gather(momentum_buffers), c, partials, value,
                                               stream);
                       });
}

cudaError_t adam_step(const DTypes* dtypes, const TensorLists& t, void* const* exp_avgs, void* const* exp_avg_sqs,
                      void* const* max_exp_avg_sqs, const AdamConfig& c, double* workspace, double* out,
                      cudaStream_t stream) {
  return reduce_groups(make_groups(t.n, dtypes, c.steps), t.numel, workspace, out, stream,
                       [&](const auto& key, GroupView& g, double* partials, double* value) {
                         AdamConfig group_config = c;
                         group_config.steps = &key.second;
                         const TensorLists lists = g.lists(t);
                         return cuda::adam_step(key.first, lists, g.gather(exp_avgs), g.gather(exp_avg_sqs),
                                                g.gather(max_exp_avg_sqs), group_config, partials, value, stream);
                       });
}

}  // namespace host
}  // namespace cuda
}  // namespace mas_fast
