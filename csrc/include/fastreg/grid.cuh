#pragma once
// CUDA only (included by csrc/cuda/*.cu): the grid of the grid-stride kernels (dropout,
// noise, DropBlock) and the alignment test of the 4-wide vector accesses.
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace fastreg {

// Four consecutive values in one access of 4 * sizeof(scalar_t) bytes.
template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Vec4 {
  scalar_t v[4];
};

inline bool aligned_to(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Multiprocessors of the current device, queried once per device.
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static int counts[kMaxDevices] = {};  // 0: not queried yet (a benign race: same value)
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < kMaxDevices && counts[device] > 0) return counts[device];
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device < kMaxDevices) counts[device] = sms;
  return sms;
}

// Blocks of `threads` for `work` items (one per thread), at most as many as every SM
// holds at once (2048 threads each); the kernels' grid-stride loops take the rest.
inline int grid_stride_blocks(int64_t work, int threads) {
  const int64_t resident = static_cast<int64_t>(sm_count()) * (2048 / threads);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, resident)));
}

}  // namespace fastreg
