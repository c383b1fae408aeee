// Tensor lists in kernel form, for the registrations (cpu/register.cpp, cuda/register.cpp):
// parameters grouped by dtype (with θ*'s and Ω's: one kernel call per group), contiguous working copies whose
// results are written back into non-contiguous originals, and the penalty value in the
// dtype mas_fast/ops/reference.py returns.
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <vector>

#include "mas_fast_kernels.h"

namespace mas_fast {

inline DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kDouble: return DType::f64;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: TORCH_CHECK_TYPE(false, "mas_fast: unsupported dtype ", t);  // validation rejects it before
  }
}

// The tensors `index` of one list as the kernels see them: contiguous, with their data
// pointers (ptrs() is null for an empty list: an absent operand). In-place results on
// non-contiguous tensors go to a contiguous copy that write_back() copies into the original.
class Operand {
 public:
  Operand(at::TensorList list, const std::vector<int64_t>& index) {
    if (list.empty()) return;
    for (int64_t i : index) {
      original_.push_back(list[i]);
      work_.push_back(list[i].contiguous());
      ptrs_.push_back(work_.back().data_ptr());
    }
  }
  Operand(const Operand&) = delete;
  Operand& operator=(const Operand&) = delete;

  void* const* ptrs() const { return original_.empty() ? nullptr : ptrs_.data(); }
  void write_back() {
    for (size_t i = 0; i < work_.size(); ++i)
      if (!work_[i].is_same(original_[i])) original_[i].copy_(work_[i]);
  }

 private:
  std::vector<at::Tensor> original_, work_;
  std::vector<void*> ptrs_;
};

// Indices of `list` grouped by dtype, in a fixed order.
inline std::map<DType, std::vector<int64_t>> group_by_dtype(at::TensorList list) {
  std::map<DType, std::vector<int64_t>> groups;
  for (size_t i = 0; i < list.size(); ++i) groups[kernel_dtype(list[i].scalar_type())].push_back(int64_t(i));
  return groups;
}

// The dtypes of call tensor i: its parameter's, θ*'s and Ω's (full_state without θ*/Ω).
inline DTypes dtypes_at(at::TensorList params, at::TensorList theta_star, at::TensorList omega, size_t i) {
  const DType param = kernel_dtype(params[i].scalar_type());
  if (theta_star.empty()) return full_state(param);
  return {param, kernel_dtype(theta_star[i].scalar_type()), kernel_dtype(omega[i].scalar_type())};
}

// Indices of a call's tensors grouped by their DTypes, in a fixed order.
inline std::map<DTypes, std::vector<int64_t>> group_by_dtypes(at::TensorList params, at::TensorList theta_star,
                                                              at::TensorList omega) {
  std::map<DTypes, std::vector<int64_t>> groups;
  for (size_t i = 0; i < params.size(); ++i) groups[dtypes_at(params, theta_star, omega, i)].push_back(int64_t(i));
  return groups;
}

inline std::vector<int64_t> numels(at::TensorList list, const std::vector<int64_t>& index) {
  std::vector<int64_t> out;
  for (int64_t i : index) out.push_back(list[i].numel());
  return out;
}

// One dtype group of (params, grads, θ*, Ω) as TensorLists; empty lists become null pointers.
class GroupLists {
 public:
  GroupLists(const std::vector<int64_t>& index, at::TensorList params, at::TensorList grads,
             at::TensorList theta_star, at::TensorList omega)
      : numel_(numels(params, index)), params(params, index), grads(grads, index), theta_star(theta_star, index),
        omega(omega, index) {
    lists.n = int64_t(index.size());
    lists.numel = numel_.data();
    lists.params = this->params.ptrs();
    lists.grads = this->grads.ptrs();
    lists.theta_star = this->theta_star.ptrs();
    lists.omega = this->omega.ptrs();
  }
  GroupLists(const GroupLists&) = delete;
  GroupLists& operator=(const GroupLists&) = delete;

 private:
  std::vector<int64_t> numel_;

 public:
  Operand params, grads, theta_star, omega;
  TensorLists lists;
};

// The dtype of a penalty value, as reference.py returns it: float64 when θ*[0] or Ω[0] is,
// else float32 (also for the lean bf16 Ω, and without θ*/Ω).
inline at::ScalarType penalty_dtype(at::TensorList theta_star, at::TensorList omega) {
  for (at::TensorList list : {theta_star, omega})
    if (!list.empty() && list[0].scalar_type() == at::kDouble) return at::kDouble;
  return at::kFloat;
}

// A penalty computed in double, converted as reference.py converts it: a value beyond the
// float32 range becomes inf (never an error).
inline at::Tensor penalty_result(const at::Tensor& value_double, at::TensorList theta_star, at::TensorList omega) {
  return value_double.to(penalty_dtype(theta_star, omega));
}

}  // namespace mas_fast
