// How the CPU kernels split work across threads.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastreg {

// Elements a parallel_for task should carry at the least: below it, waking a thread
// costs more than the work (a tiny call, or the backward of a small layer, would spend
// tens of microseconds starting the team).
constexpr int64_t kMinTaskElements = 32768;

// The grain of an at::parallel_for over items of `elements_per_item` elements each: a
// range of at most one grain runs inline on the calling thread, so small calls start no
// threads.
inline int64_t grain_for(int64_t elements_per_item, int64_t min_elements = kMinTaskElements) {
  const int64_t per_item = std::max<int64_t>(elements_per_item, 1);
  return std::max<int64_t>(1, (min_elements + per_item - 1) / per_item);
}

}  // namespace fastreg
