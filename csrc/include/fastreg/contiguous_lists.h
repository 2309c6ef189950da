#pragma once
// The optimizer steps' kernels walk each tensor as numel consecutive elements. A call with
// tensors that are not contiguous runs on contiguous copies of them, and the copies of the
// tensors the step writes are copied back into the originals afterwards: any strides are
// accepted, and contiguous tensors (the usual case) are used as they are.
#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <utility>
#include <vector>

namespace fastreg {

inline bool all_contiguous(std::initializer_list<at::TensorList> lists) {
  for (const at::TensorList& list : lists) {
    for (const at::Tensor& t : list) {
      if (!t.is_contiguous()) return false;
    }
  }
  return true;
}

class ContiguousLists {
 public:
  // (list, whether the step writes it)
  ContiguousLists(std::initializer_list<std::pair<at::TensorList, bool>> lists) {
    for (const auto& [list, written] : lists) {
      std::vector<at::Tensor> copies;
      for (const at::Tensor& t : list) {
        copies.push_back(t.contiguous());
        if (written && !copies.back().is_same(t)) write_back_.emplace_back(t, copies.back());
      }
      lists_.push_back(std::move(copies));
    }
  }
  at::TensorList operator[](size_t i) const { return lists_[i]; }
  void write_back() {
    for (auto& [original, copy] : write_back_) original.copy_(copy);
  }

 private:
  std::vector<std::vector<at::Tensor>> lists_;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back_;  // (original, contiguous copy)
};

}  // namespace fastreg
