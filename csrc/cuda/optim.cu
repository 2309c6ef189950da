// Multi-tensor optimizer steps on CUDA tensors: fastreg::sgd_step_ and fastreg::adam_step_
// (schemas and contract in csrc/ops.cpp, term by term in fastreg/_reference.py).
//
// Multi-tensor apply over a device table: the host groups the tensors by (param dtype,
// value dtype, max-norm projection), writes one TensorSlot (typed pointers' addresses,
// sizes) per tensor and one WorkItem (tensor, chunk) per block into one buffer, and copies
// it to the device; each group is then one launch whose block b updates the chunk items[b]
// names. A launch per group rather than per tensor, and no limit on the tensors per launch
// (a kernel-argument struct would hold only a few dozen).
//
// No host work per step beyond the launches: the device buffer is kept per set of tensors
// (keyed by their addresses, sizes and dtypes; new or moved tensors build a new one; the
// grads' pointers, often new at each step, are copied alone when they moved), the
// step counts (Adam), GradScaler's scale and its inf flag are read by the kernels on the
// device (found_inf != 0 changes nothing), and the bias corrections 1 - beta^step are formed
// there per tensor in double. A step reads nothing back to the host, so it can be captured
// in a CUDA graph (a buffer used under capture is never evicted).
//
// Elementwise blocks update kChunk elements with kVec-wide vector accesses per thread
// (scalar ones at tails and for unaligned tensors). Projected tensors (max_norm > 0, >= 2
// dims) get blocks owning whole rows: a row is updated and written while its squares are
// summed (a block reduction), then, when its norm exceeds max_norm, each thread re-reads
// the elements it wrote and rescales them.
//
// Arithmetic in float32 (float64 for float64 values) in the reference's order; the float
// scalars are computed in double and rounded once, as torch rounds a Python scalar for a
// float tensor.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "fastreg/contiguous_lists.h"
#include "fastreg/grid.cuh"

namespace fastreg {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;                          // elements per vector access (16 bytes of float32)
constexpr int64_t kChunk = kThreads * kVec * 8;  // elements per elementwise block: 8 vectors per thread
constexpr int64_t kRowElements = 2048;           // about this many elements of whole rows per row block

// One tensor's slice of the device table; the pointers' element types are the group's.
struct TensorSlot {
  void* param;
  void* state0;  // SGD: momentum buffer; Adam: exp_avg (nullptr: unused)
  void* state1;  // Adam: exp_avg_sq
  void* state2;  // Adam: max_exp_avg_sq (amsgrad)
  float* master;  // nullptr: the param is the value updated
  float* step;    // Adam: the step count, incremented before the step launches
  int64_t numel;
  int64_t row_len;        // projected tensors: elements per row (dim 0)
  int32_t rows_per_item;  // projected tensors: rows per block
  int32_t vectorized;     // every pointer but the grad's aligned to a kVec-element vector
};

struct WorkItem {
  int32_t tensor;  // index into the group's slots
  int32_t index;   // elementwise: chunk of kChunk elements; projected: group of rows_per_item rows
};

// The step's scalars in the accumulate type, and its options (uniform branches).
// inv_grad_scale, step_size and bias_correction2_sqrt are set per block on the device
// (from grad_scale and the tensor's step count); lr, beta1 and beta2 come in double for that.
template <typename acc_t>
struct StepScalars {
  acc_t lr, inv_grad_scale, weight_decay, l1_threshold, max_norm;
  acc_t momentum, one_minus_dampening;  // SGD
  acc_t one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bias_correction2_sqrt, decay_factor;  // Adam
  double lr_double, beta1_double, beta2_double;
  bool maximize, has_weight_decay, decoupled, has_momentum, nesterov, first_step, amsgrad, has_l1;
};

// The host's view of the same, in double, before rounding to the accumulate type.
struct StepOptions {
  double lr = 0, weight_decay = 0, l1 = 0, max_norm = 0;
  double momentum = 0, dampening = 0;
  double beta1 = 0, beta2 = 0, eps = 0;
  bool maximize = false, decoupled = false, nesterov = false, first_step = false, amsgrad = false;
};

// GradScaler's scale and inf flag (float32 scalars on the device), or nullptr.
struct AmpScalars {
  const float* grad_scale;
  const float* found_inf;
};

template <typename acc_t>
StepScalars<acc_t> to_scalars(const StepOptions& o) {
  StepScalars<acc_t> s;
  s.lr = static_cast<acc_t>(o.lr);
  s.inv_grad_scale = acc_t(1);
  s.weight_decay = static_cast<acc_t>(o.weight_decay);
  s.l1_threshold = static_cast<acc_t>(o.lr * o.l1);
  s.max_norm = static_cast<acc_t>(o.max_norm);
  s.momentum = static_cast<acc_t>(o.momentum);
  s.one_minus_dampening = static_cast<acc_t>(1 - o.dampening);
  s.one_minus_beta1 = static_cast<acc_t>(1 - o.beta1);
  s.beta2 = static_cast<acc_t>(o.beta2);
  s.one_minus_beta2 = static_cast<acc_t>(1 - o.beta2);
  s.eps = static_cast<acc_t>(o.eps);
  s.step_size = s.lr;
  s.bias_correction2_sqrt = acc_t(1);
  s.decay_factor = static_cast<acc_t>(1 - o.lr * o.weight_decay);
  s.lr_double = o.lr;
  s.beta1_double = o.beta1;
  s.beta2_double = o.beta2;
  s.maximize = o.maximize;
  s.has_weight_decay = o.weight_decay != 0;
  s.decoupled = o.decoupled;
  s.has_momentum = o.momentum != 0;
  s.nesterov = o.nesterov;
  s.first_step = o.first_step;
  s.amsgrad = o.amsgrad;
  s.has_l1 = o.l1 > 0;
  return s;
}

// Which states a step reads and writes.
template <bool kAdam, typename acc_t>
__device__ __forceinline__ bool uses_state0(const StepScalars<acc_t>& s) {
  return kAdam || s.has_momentum;
}
template <bool kAdam, typename acc_t>
__device__ __forceinline__ bool uses_state1(const StepScalars<acc_t>&) {
  return kAdam;
}
template <bool kAdam, typename acc_t>
__device__ __forceinline__ bool uses_state2(const StepScalars<acc_t>& s) {
  return kAdam && s.amsgrad;
}

// One element's step, in fastreg/_reference.py's order: w and g in, the new w out (after
// the L1 proximal step); the states are updated in place, rounded to their type.
template <bool kAdam, typename value_t, typename acc_t>
__device__ __forceinline__ acc_t step_element(acc_t w, acc_t g, value_t& s0, value_t& s1, value_t& s2,
                                              const StepScalars<acc_t>& s) {
  g = g * s.inv_grad_scale;
  if (s.maximize) g = -g;
  if constexpr (kAdam) {
    if (s.has_weight_decay) {
      if (s.decoupled) {
        w = w * s.decay_factor;
      } else {
        g = g + s.weight_decay * w;
      }
    }
    acc_t m = static_cast<acc_t>(s0);
    m = m + s.one_minus_beta1 * (g - m);
    acc_t v = static_cast<acc_t>(s1) * s.beta2 + s.one_minus_beta2 * g * g;
    s0 = static_cast<value_t>(m);
    s1 = static_cast<value_t>(v);
    if (s.amsgrad) {
      const acc_t v_max = static_cast<acc_t>(s2);
      v = v_max > v ? v_max : v;  // NaN in v stays
      s2 = static_cast<value_t>(v);
    }
    const acc_t denom = ::sqrt(v) / s.bias_correction2_sqrt + s.eps;  // IEEE sqrt and division
    w = w - s.step_size * (m / denom);
  } else {
    if (s.has_weight_decay) g = g + s.weight_decay * w;
    if (s.has_momentum) {
      const acc_t b = s.first_step ? g : static_cast<acc_t>(s0) * s.momentum + s.one_minus_dampening * g;
      s0 = static_cast<value_t>(b);
      const acc_t stored = static_cast<acc_t>(s0);  // the buffer as stored, as the reference reads it
      g = s.nesterov ? g + s.momentum * stored : stored;
    }
    w = w - s.lr * g;
  }
  if (s.has_l1) {
    // sign(w) * max(|w| - lr * l1, 0): exact zeros inside the threshold; NaN stays NaN
    w = ::fabs(w) <= s.l1_threshold ? acc_t(0) : w - (w > acc_t(0) ? s.l1_threshold : -s.l1_threshold);
  }
  return w;
}

// A slot's pointers with the group's types. The value updated is the master when there is
// one (value_t is then float), else the param (value_t == param_t).
template <typename param_t, typename value_t>
struct TypedSlot {
  param_t* param;
  const param_t* grad;
  value_t* value;
  value_t* state0;
  value_t* state1;
  value_t* state2;
  bool has_master;

  __device__ TypedSlot(const TensorSlot& slot, const void* grad_pointer)
      : param(static_cast<param_t*>(slot.param)),
        grad(static_cast<const param_t*>(grad_pointer)),
        value(slot.master != nullptr ? reinterpret_cast<value_t*>(slot.master) : static_cast<value_t*>(slot.param)),
        state0(static_cast<value_t*>(slot.state0)),
        state1(static_cast<value_t*>(slot.state1)),
        state2(static_cast<value_t*>(slot.state2)),
        has_master(slot.master != nullptr) {}

  template <typename acc_t>
  __device__ __forceinline__ void store(int64_t i, acc_t w) const {
    value[i] = static_cast<value_t>(w);
    if (has_master) param[i] = static_cast<param_t>(w);  // rounded once, from the float32 result
  }
};

// Element i's whole step (scalar accesses); returns the value written.
template <bool kAdam, typename param_t, typename value_t, typename acc_t>
__device__ __forceinline__ acc_t step_at(const TypedSlot<param_t, value_t>& t, int64_t i,
                                         const StepScalars<acc_t>& s) {
  value_t s0{}, s1{}, s2{};
  if (uses_state0<kAdam>(s)) s0 = t.state0[i];
  if (uses_state1<kAdam>(s)) s1 = t.state1[i];
  if (uses_state2<kAdam>(s)) s2 = t.state2[i];
  const acc_t w = step_element<kAdam>(static_cast<acc_t>(t.value[i]), static_cast<acc_t>(t.grad[i]), s0, s1, s2, s);
  if (uses_state0<kAdam>(s)) t.state0[i] = s0;
  if (uses_state1<kAdam>(s)) t.state1[i] = s1;
  if (uses_state2<kAdam>(s)) t.state2[i] = s2;
  t.store(i, w);
  return w;
}

template <typename T>
struct alignas(kVec * sizeof(T)) Vec {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* ptr, int64_t i, T (&out)[kVec]) {
  const Vec<T> loaded = *reinterpret_cast<const Vec<T>*>(ptr + i);
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = loaded.v[j];
}

template <typename T>
__device__ __forceinline__ void store_vec(T* ptr, int64_t i, const T (&in)[kVec]) {
  Vec<T> out;
#pragma unroll
  for (int j = 0; j < kVec; ++j) out.v[j] = in[j];
  *reinterpret_cast<Vec<T>*>(ptr + i) = out;
}

// Elements [i, i + kVec) of an aligned tensor, all inside it: vector loads and stores.
template <bool kAdam, typename param_t, typename value_t, typename acc_t>
__device__ __forceinline__ void step_vector_at(const TypedSlot<param_t, value_t>& t, int64_t i,
                                               const StepScalars<acc_t>& s) {
  value_t w[kVec], s0[kVec], s1[kVec], s2[kVec];
  param_t g[kVec];
  // all loads first (ILP: kVec-wide, up to five streams in flight per thread)
  load_vec(t.value, i, w);
  load_vec(t.grad, i, g);
  if (uses_state0<kAdam>(s)) load_vec(t.state0, i, s0);
  if (uses_state1<kAdam>(s)) load_vec(t.state1, i, s1);
  if (uses_state2<kAdam>(s)) load_vec(t.state2, i, s2);
  acc_t result[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    result[j] = step_element<kAdam>(static_cast<acc_t>(w[j]), static_cast<acc_t>(g[j]), s0[j], s1[j], s2[j], s);
  }
  if (uses_state0<kAdam>(s)) store_vec(t.state0, i, s0);
  if (uses_state1<kAdam>(s)) store_vec(t.state1, i, s1);
  if (uses_state2<kAdam>(s)) store_vec(t.state2, i, s2);
  value_t value_out[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) value_out[j] = static_cast<value_t>(result[j]);
  store_vec(t.value, i, value_out);
  if (t.has_master) {
    param_t param_out[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) param_out[j] = static_cast<param_t>(result[j]);
    store_vec(t.param, i, param_out);
  }
}

// The block's scalars: the call's, with 1 / grad_scale and (Adam) the bias corrections of
// this tensor's step count, formed in double and rounded once.
template <bool kAdam, typename acc_t>
__device__ __forceinline__ StepScalars<acc_t> block_scalars(StepScalars<acc_t> s, const TensorSlot& slot,
                                                            AmpScalars amp) {
  if (amp.grad_scale != nullptr) s.inv_grad_scale = static_cast<acc_t>(1.0 / static_cast<double>(*amp.grad_scale));
  if constexpr (kAdam) {
    const double step = static_cast<double>(*slot.step);
    s.step_size = static_cast<acc_t>(s.lr_double / (1.0 - ::pow(s.beta1_double, step)));
    s.bias_correction2_sqrt = static_cast<acc_t>(::sqrt(1.0 - ::pow(s.beta2_double, step)));
  }
  return s;
}

// steps[i] += 1 for the Adam step counts of a call, unless found_inf != 0.
__global__ void increment_steps_kernel(float* const* __restrict__ steps, int64_t count, const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < count) *steps[i] += 1.0f;
}

// Block b updates chunk items[b].index (kChunk elements) of tensor items[b].tensor.
template <bool kAdam, typename param_t, typename value_t>
__global__ void __launch_bounds__(kThreads)
    elementwise_step_kernel(const TensorSlot* __restrict__ slots, const void* const* __restrict__ grads,
                            const WorkItem* __restrict__ items,
                            const StepScalars<at::opmath_type<value_t>> call_scalars, const AmpScalars amp) {
  using acc_t = at::opmath_type<value_t>;
  if (amp.found_inf != nullptr && *amp.found_inf != 0.0f) return;  // a skipped step changes nothing
  const WorkItem item = items[blockIdx.x];
  const TensorSlot& slot = slots[item.tensor];
  const StepScalars<acc_t> s = block_scalars<kAdam>(call_scalars, slot, amp);
  const TypedSlot<param_t, value_t> t(slot, grads[item.tensor]);
  const bool vectorized = slot.vectorized && reinterpret_cast<uintptr_t>(t.grad) % (kVec * sizeof(param_t)) == 0;
  const int64_t begin = static_cast<int64_t>(item.index) * kChunk;
  const int64_t end = ::min(begin + kChunk, slot.numel);
  // begin is a multiple of kVec: with aligned pointers every vector below is aligned
  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < end; i += kThreads * kVec) {
    if (vectorized && i + kVec <= end) {
      step_vector_at<kAdam>(t, i, s);
    } else {
      for (int64_t k = i; k < ::min(i + kVec, end); ++k) step_at<kAdam>(t, k, s);
    }
  }
}

// Sum over the block; every thread gets the same total (same order), so branches on it
// stay uniform. `partials` holds one value per warp; reusable right after the call.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t value, acc_t* partials) {
  constexpr int kWarps = kThreads / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) partials[warp] = value;
  __syncthreads();
  acc_t total = 0;
#pragma unroll
  for (int k = 0; k < kWarps; ++k) total += partials[k];
  __syncthreads();  // every thread has read the partials before the next call overwrites them
  return total;
}

// Block b owns rows [index * rows_per_item, ...) of tensor items[b].tensor: each row is
// updated and written, then rescaled to max_norm if its norm is above it. A thread
// re-reads only the elements it wrote itself (same striding), so no barrier is needed
// between the write and the rescale beyond the reduction's.
template <bool kAdam, typename param_t, typename value_t>
__global__ void __launch_bounds__(kThreads)
    row_projected_step_kernel(const TensorSlot* __restrict__ slots, const void* const* __restrict__ grads,
                              const WorkItem* __restrict__ items,
                              const StepScalars<at::opmath_type<value_t>> call_scalars, const AmpScalars amp) {
  using acc_t = at::opmath_type<value_t>;
  __shared__ acc_t partials[kThreads / 32];
  if (amp.found_inf != nullptr && *amp.found_inf != 0.0f) return;  // a skipped step changes nothing
  const WorkItem item = items[blockIdx.x];
  const TensorSlot& slot = slots[item.tensor];
  const StepScalars<acc_t> s = block_scalars<kAdam>(call_scalars, slot, amp);
  const TypedSlot<param_t, value_t> t(slot, grads[item.tensor]);
  const int64_t row_len = slot.row_len;
  const int64_t rows = slot.numel / row_len;
  const int64_t first_row = static_cast<int64_t>(item.index) * slot.rows_per_item;
  const int64_t end_row = ::min(first_row + slot.rows_per_item, rows);
  for (int64_t row = first_row; row < end_row; ++row) {
    const int64_t row_begin = row * row_len;
    acc_t squares = 0;
    for (int64_t col = threadIdx.x; col < row_len; col += kThreads) {
      const acc_t w = step_at<kAdam>(t, row_begin + col, s);
      squares += w * w;
    }
    const acc_t norm = ::sqrt(block_sum(squares, partials));
    if (norm > s.max_norm) {
      const acc_t scale = s.max_norm / norm;
      for (int64_t col = threadIdx.x; col < row_len; col += kThreads) {
        // exact for float32/64 values and masters; a low-precision param without master
        // is rounded twice (written, then rescaled), as in the Triton kernel
        const int64_t i = row_begin + col;
        t.store(i, static_cast<acc_t>(t.value[i]) * scale);
      }
    }
  }
}

// ------------------------------------------------------------------------------ host

struct StateList {
  const char* name;
  at::TensorList tensors;
  bool required;
};

void check_list(const char* op, const char* name, at::TensorList tensors, at::TensorList params,
                at::TensorList masters, bool is_state, bool required) {
  if (tensors.empty()) {
    TORCH_CHECK(!required || params.empty(), op, ": ", name, " is empty but ", params.size(),
                " params were given");
    return;
  }
  TORCH_CHECK(tensors.size() == params.size(), op, ": ", name, " has ", tensors.size(), " tensors, params ",
              params.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& tensor = tensors[i];
    const at::Tensor& param = params[i];
    TORCH_CHECK(tensor.device() == param.device(), op, ": ", name, "[", i, "] is on ", tensor.device(),
                ", params[", i, "] on ", param.device());
    TORCH_CHECK(tensor.sizes() == param.sizes(), op, ": ", name, "[", i, "] has shape ", tensor.sizes(),
                ", params[", i, "] ", param.sizes());
    at::ScalarType expected = param.scalar_type();  // grads
    if (name == std::string("masters")) {
      expected = at::kFloat;
    } else if (is_state && !masters.empty()) {
      expected = masters[i].scalar_type();
    }
    TORCH_CHECK(tensor.scalar_type() == expected, op, ": ", name, "[", i, "] has dtype ", tensor.scalar_type(),
                ", expected ", expected);
  }
}

void check_args(const char* op, at::TensorList params, at::TensorList grads, const std::vector<StateList>& states,
                at::TensorList masters) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& param = params[i];
    TORCH_CHECK(param.is_cuda(), op, ": params[", i, "] is on ", param.device(), "; this kernel runs CUDA tensors");
    TORCH_CHECK(param.device() == params[0].device(), op, ": params[", i, "] is on ", param.device(),
                ", params[0] on ", params[0].device(), ": one device per call");
    const auto dtype = param.scalar_type();
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, op,
                ": params[", i, "] has dtype ", dtype, "; supported: Float, Double, Half, BFloat16");
  }
  check_list(op, "masters", masters, params, masters, /*is_state=*/false, /*required=*/false);
  check_list(op, "grads", grads, params, masters, /*is_state=*/false, /*required=*/true);
  for (const StateList& state : states) {
    check_list(op, state.name, state.tensors, params, masters, /*is_state=*/true, state.required);
  }
}

void* pointer_or_null(at::TensorList tensors, size_t i) {
  return tensors.empty() ? nullptr : tensors[i].data_ptr();
}

void check_amp_scalar(const char* op, const char* name, const c10::optional<at::Tensor>& t, const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == device && t->scalar_type() == at::kFloat && t->numel() == 1, op, ": '", name,
              "' must be a float32 scalar on ", device, ", got ", t->scalar_type(), " on ", t->device(), " with ",
              t->numel(), " elements");
}

void check_steps(const char* op, at::TensorList steps, at::TensorList params) {
  TORCH_CHECK(steps.size() == params.size(), op, ": 'steps' has ", steps.size(), " tensors but 'params' has ",
              params.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].device() == params[i].device() && steps[i].scalar_type() == at::kFloat &&
                    steps[i].numel() == 1,
                op, ": steps[", i, "] must be a float32 scalar on the params' device (", params[i].device(), "), got ",
                steps[i].scalar_type(), " on ", steps[i].device(), " with ", steps[i].numel(), " elements");
  }
}

struct Group {
  at::ScalarType param_dtype, value_dtype;
  bool projected = false;
  std::vector<size_t> tensors;
  size_t slots_offset = 0, items_offset = 0;  // bytes into the packed buffer
  size_t grads_offset = 0;                    // index of its first grad pointer in the grads' buffer
  int64_t item_count = 0;
};

// The device buffer of one set of tensors and how to launch over it.
struct Plan {
  std::vector<Group> groups;
  at::Tensor host;    // pinned; kept: a copy captured in a CUDA graph reads it at each replay
  at::Tensor device;  // slots and work items per group, then the step counts' pointers
  size_t steps_offset = 0;
  int64_t step_count = 0;
  bool captured = false;  // used under CUDA graph capture: never evicted
  // The grads' pointers (often new tensors at each step: zero_grad(set_to_none=True)),
  // group by group, copied to the device only when they moved.
  std::vector<const void*> grad_pointers;
  std::vector<std::pair<at::Tensor, at::Tensor>> grad_buffers;  // (pinned host, device); old ones kept once captured

  const void* const* device_grads() const {
    return reinterpret_cast<const void* const*>(grad_buffers.back().second.const_data_ptr<uint8_t>());
  }

  void set_grads(at::TensorList grads, const at::Device& device) {
    std::vector<const void*> pointers;
    for (const Group& group : groups) {
      for (const size_t i : group.tensors) pointers.push_back(grads[i].data_ptr());
    }
    if (!grad_buffers.empty() && pointers == grad_pointers) return;
    const auto bytes = static_cast<int64_t>(std::max<size_t>(pointers.size(), 1) * sizeof(void*));
    at::Tensor host_buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host_buffer.mutable_data_ptr<uint8_t>(), pointers.data(), pointers.size() * sizeof(void*));
    at::Tensor device_buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
    device_buffer.copy_(host_buffer, /*non_blocking=*/true);
    if (!captured) grad_buffers.clear();
    grad_buffers.emplace_back(host_buffer, device_buffer);
    grad_pointers = std::move(pointers);
  }
};

// What a plan depends on: the device, the projection, and the address, sizes and dtype of
// every tensor but the grads (the checks above ran on this call's tensors, grads included,
// so equal keys mean equal plans; the grads' pointers are the plan's to refresh).
using PlanKey = std::vector<int64_t>;

PlanKey plan_key(const std::vector<at::TensorList>& lists, bool project, const at::Device& device) {
  PlanKey key{device.index(), project ? 1 : 0};
  for (const at::TensorList& list : lists) {
    key.push_back(static_cast<int64_t>(list.size()));
    for (const at::Tensor& t : list) {
      key.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
      key.push_back(t.numel());
      key.push_back(t.dim() > 0 ? t.size(0) : -1);
      key.push_back(t.dim());
      key.push_back(static_cast<int64_t>(t.scalar_type()));
    }
  }
  return key;
}

constexpr size_t kPlanCacheSize = 64;

std::shared_ptr<Plan> build_plan(at::TensorList params, at::TensorList state0, at::TensorList state1,
                                 at::TensorList state2, at::TensorList masters, at::TensorList steps, bool project) {
  auto plan = std::make_shared<Plan>();
  std::map<std::tuple<at::ScalarType, at::ScalarType, bool>, size_t> group_of;
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    const at::ScalarType value_dtype = masters.empty() ? params[i].scalar_type() : at::kFloat;
    const bool projected = project && params[i].dim() >= 2;
    const auto key = std::make_tuple(params[i].scalar_type(), value_dtype, projected);
    auto found = group_of.find(key);
    if (found == group_of.end()) {
      found = group_of.emplace(key, plan->groups.size()).first;
      Group group;
      group.param_dtype = params[i].scalar_type();
      group.value_dtype = value_dtype;
      group.projected = projected;
      plan->groups.push_back(group);
    }
    plan->groups[found->second].tensors.push_back(i);
  }

  // Sizes first: per group, its slots then its work items (both 8-byte aligned), then steps.
  size_t bytes = 0, grads = 0;
  for (Group& group : plan->groups) {
    group.grads_offset = grads;
    grads += group.tensors.size();
    group.slots_offset = bytes;
    bytes += group.tensors.size() * sizeof(TensorSlot);
    group.items_offset = bytes;
    for (const size_t i : group.tensors) {
      const int64_t numel = params[i].numel();
      int64_t items;
      if (group.projected) {
        const int64_t rows = params[i].size(0);
        const int64_t row_len = numel / rows;
        const int64_t rows_per_item = std::max<int64_t>(1, kRowElements / row_len);
        items = (rows + rows_per_item - 1) / rows_per_item;
      } else {
        items = (numel + kChunk - 1) / kChunk;
      }
      TORCH_CHECK(items <= std::numeric_limits<int32_t>::max(), "fastreg optimizer step: params[", i,
                  "] is too large (", numel, " elements)");
      group.item_count += items;
    }
    TORCH_CHECK(group.item_count <= std::numeric_limits<int32_t>::max(),
                "fastreg optimizer step: too many blocks in one launch");
    bytes += group.item_count * sizeof(WorkItem);
  }
  plan->steps_offset = bytes;
  plan->step_count = static_cast<int64_t>(steps.size());
  bytes += steps.size() * sizeof(float*);

  plan->host = at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))},
                         at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  uint8_t* base = plan->host.mutable_data_ptr<uint8_t>();
  for (Group& group : plan->groups) {
    auto* slots = reinterpret_cast<TensorSlot*>(base + group.slots_offset);
    auto* items = reinterpret_cast<WorkItem*>(base + group.items_offset);
    int64_t next_item = 0;
    for (size_t k = 0; k < group.tensors.size(); ++k) {
      const size_t i = group.tensors[k];
      TensorSlot slot{};
      slot.param = params[i].data_ptr();
      slot.state0 = pointer_or_null(state0, i);
      slot.state1 = pointer_or_null(state1, i);
      slot.state2 = pointer_or_null(state2, i);
      slot.master = masters.empty() ? nullptr : masters[i].data_ptr<float>();
      slot.step = steps.empty() ? nullptr : steps[i].data_ptr<float>();
      slot.numel = params[i].numel();
      slot.row_len = group.projected ? slot.numel / params[i].size(0) : slot.numel;
      slot.rows_per_item =
          group.projected ? static_cast<int32_t>(std::max<int64_t>(1, kRowElements / slot.row_len)) : 0;
      // vector accesses when every pointer is aligned to kVec of its own elements
      bool vectorized = aligned_to(slot.param, kVec * params[i].element_size());
      const size_t value_size = masters.empty() ? params[i].element_size() : sizeof(float);
      for (const void* state : {static_cast<const void*>(slot.state0), static_cast<const void*>(slot.state1),
                                static_cast<const void*>(slot.state2), static_cast<const void*>(slot.master)}) {
        vectorized = vectorized && aligned_to(state, kVec * value_size);  // nullptr is aligned
      }
      slot.vectorized = vectorized;
      std::memcpy(slots + k, &slot, sizeof(TensorSlot));
      const int64_t units = group.projected ? params[i].size(0) : slot.numel;
      const int64_t per_item = group.projected ? slot.rows_per_item : kChunk;
      for (int64_t index = 0; index * per_item < units; ++index) {
        items[next_item++] = WorkItem{static_cast<int32_t>(k), static_cast<int32_t>(index)};
      }
    }
    TORCH_INTERNAL_ASSERT(next_item == group.item_count);
  }
  auto* step_pointers = reinterpret_cast<float**>(base + plan->steps_offset);
  for (size_t i = 0; i < steps.size(); ++i) step_pointers[i] = steps[i].data_ptr<float>();
  // One host-to-device copy for the plan's lifetime.
  plan->device = at::empty(plan->host.sizes(), at::TensorOptions().dtype(at::kByte).device(params[0].device()));
  plan->device.copy_(plan->host, /*non_blocking=*/true);
  return plan;
}

// The plan of these tensors, from a least-recently-used cache (one lookup per step).
std::shared_ptr<Plan> plan_for(at::TensorList params, at::TensorList grads, at::TensorList state0,
                               at::TensorList state1, at::TensorList state2, at::TensorList masters,
                               at::TensorList steps, bool project) {
  static std::mutex mutex;
  static std::list<std::pair<PlanKey, std::shared_ptr<Plan>>> plans;  // most recently used first
  PlanKey key = plan_key({params, state0, state1, state2, masters, steps}, project, params[0].device());
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const std::lock_guard<std::mutex> lock(mutex);
  for (auto it = plans.begin(); it != plans.end(); ++it) {
    if (it->first == key) {
      plans.splice(plans.begin(), plans, it);
      it->second->captured = it->second->captured || capturing;
      it->second->set_grads(grads, params[0].device());
      return it->second;
    }
  }
  auto plan = build_plan(params, state0, state1, state2, masters, steps, project);
  plan->captured = capturing;
  plan->set_grads(grads, params[0].device());
  plans.emplace_front(std::move(key), plan);
  if (plans.size() > kPlanCacheSize) {
    for (auto it = std::prev(plans.end()); it != plans.begin(); --it) {
      if (!it->second->captured) {
        plans.erase(it);
        break;
      }
    }
  }
  return plan;
}

template <bool kAdam, typename param_t, typename value_t>
void launch_group(const Group& group, const uint8_t* device_base, const void* const* device_grads,
                  const StepOptions& options, AmpScalars amp, cudaStream_t stream) {
  using acc_t = at::opmath_type<value_t>;
  const auto* slots = reinterpret_cast<const TensorSlot*>(device_base + group.slots_offset);
  const void* const* grads = device_grads + group.grads_offset;
  const auto* items = reinterpret_cast<const WorkItem*>(device_base + group.items_offset);
  const StepScalars<acc_t> scalars = to_scalars<acc_t>(options);
  const auto blocks = static_cast<unsigned>(group.item_count);
  if (group.projected) {
    row_projected_step_kernel<kAdam, param_t, value_t>
        <<<blocks, kThreads, 0, stream>>>(slots, grads, items, scalars, amp);
  } else {
    elementwise_step_kernel<kAdam, param_t, value_t><<<blocks, kThreads, 0, stream>>>(slots, grads, items, scalars, amp);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kAdam>
void multi_tensor_step(at::TensorList params, at::TensorList grads, at::TensorList state0, at::TensorList state1,
                       at::TensorList state2, at::TensorList masters, at::TensorList steps,
                       const StepOptions& options, AmpScalars amp) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  const std::shared_ptr<Plan> plan =
      plan_for(params, grads, state0, state1, state2, masters, steps, options.max_norm > 0);
  const uint8_t* device_base = plan->device.const_data_ptr<uint8_t>();
  const void* const* device_grads = plan->device_grads();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (plan->step_count > 0) {  // the counts first: the step launches read them
    constexpr int kStepThreads = 128;
    const auto blocks = static_cast<unsigned>((plan->step_count + kStepThreads - 1) / kStepThreads);
    increment_steps_kernel<<<blocks, kStepThreads, 0, stream>>>(
        reinterpret_cast<float* const*>(device_base + plan->steps_offset), plan->step_count, amp.found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  for (const Group& group : plan->groups) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.param_dtype, "fastreg_optimizer_step_cuda", [&] {
      if (group.value_dtype == group.param_dtype) {
        launch_group<kAdam, scalar_t, scalar_t>(group, device_base, device_grads, options, amp, stream);
      } else {
        TORCH_CHECK(group.value_dtype == at::kFloat, "fastreg optimizer step: masters must be float32");
        launch_group<kAdam, scalar_t, float>(group, device_base, device_grads, options, amp, stream);
      }
    });
  }
}

AmpScalars amp_scalars(const char* op, const c10::optional<at::Tensor>& grad_scale,
                       const c10::optional<at::Tensor>& found_inf, const at::Device& device) {
  check_amp_scalar(op, "grad_scale", grad_scale, device);
  check_amp_scalar(op, "found_inf", found_inf, device);
  return {grad_scale.has_value() ? grad_scale->const_data_ptr<float>() : nullptr,
          found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr};
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList masters, double lr, double momentum, double dampening, double weight_decay,
                   double l1, double max_norm, bool nesterov, bool maximize, bool first_step,
                   const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf) {
  // any strides: through contiguous copies
  if (!all_contiguous({params, grads, momentum_buffers, masters})) {
    ContiguousLists c({{params, true}, {grads, false}, {momentum_buffers, true}, {masters, true}});
    sgd_step_cuda(c[0], c[1], c[2], c[3], lr, momentum, dampening, weight_decay, l1, max_norm, nesterov, maximize,
                  first_step, grad_scale, found_inf);
    c.write_back();
    return;
  }
  const char* op = "fastreg::sgd_step_";
  if (params.empty()) return;
  check_args(op, params, grads, {{"momentum_buffers", momentum_buffers, momentum != 0}}, masters);
  const AmpScalars amp = amp_scalars(op, grad_scale, found_inf, params[0].device());
  StepOptions options;
  options.lr = lr;
  options.momentum = momentum;
  options.dampening = dampening;
  options.weight_decay = weight_decay;
  options.l1 = l1;
  options.max_norm = max_norm;
  options.nesterov = nesterov;
  options.maximize = maximize;
  options.first_step = first_step;
  const at::TensorList none;
  multi_tensor_step<false>(params, grads, momentum != 0 ? momentum_buffers : none, none, none, masters, none, options,
                           amp);
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList masters,
                    at::TensorList steps, double lr, double beta1, double beta2, double eps, double weight_decay,
                    bool decoupled, double l1, double max_norm, bool maximize,
                    const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf) {
  // any strides: through contiguous copies
  if (!all_contiguous({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters})) {
    ContiguousLists c({{params, true}, {grads, false}, {exp_avgs, true}, {exp_avg_sqs, true},
                       {max_exp_avg_sqs, true}, {masters, true}});
    adam_step_cuda(c[0], c[1], c[2], c[3], c[4], c[5], steps, lr, beta1, beta2, eps, weight_decay, decoupled, l1, max_norm,
                   maximize, grad_scale, found_inf);
    c.write_back();
    return;
  }
  const char* op = "fastreg::adam_step_";
  if (params.empty()) return;
  check_args(op, params, grads,
             {{"exp_avgs", exp_avgs, true}, {"exp_avg_sqs", exp_avg_sqs, true},
              {"max_exp_avg_sqs", max_exp_avg_sqs, false}},
             masters);
  check_steps(op, steps, params);
  const AmpScalars amp = amp_scalars(op, grad_scale, found_inf, params[0].device());
  StepOptions options;
  options.lr = lr;
  options.beta1 = beta1;
  options.beta2 = beta2;
  options.eps = eps;
  options.weight_decay = weight_decay;
  options.decoupled = decoupled;
  options.l1 = l1;
  options.max_norm = max_norm;
  options.maximize = maximize;
  options.amsgrad = !max_exp_avg_sqs.empty();
  multi_tensor_step<true>(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, options, amp);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("adam_step_", &adam_step_cuda);
}

}  // namespace fastreg
