// SGD and Adam/AdamW steps on lists of CPU tensors (multi-tensor), in place: one
// at::parallel_for over (tensor, chunk) work items covering every tensor of the call.
// The update follows fastreg/_reference.py (sgd_step_, adam_step_) operation by operation
// in the accumulate type (float, double for double values), so results agree with it to
// the rounding of that type. Inner loops run on explicit 64-byte vectors with a scalar
// tail through the same templated element code (csrc/cpu/vectorize.h).
//
// The L1 prox and the max-norm projection run in the same pass: a max-norm work item owns
// whole rows, updates a row, then takes its norm and rescales it while it is in cache.
//
// GradScaler's scale and inf flag and Adam's step counts are CPU scalars read here: a set
// inf flag returns before anything is written; the counts are incremented and each
// tensor's bias corrections formed in double as torch.optim forms them in Python.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "fastreg/contiguous_lists.h"
#include "fastreg/welford.h"
#include "parallel.h"
#include "vectorize.h"

namespace fastreg {
namespace {

// Elements per work item: large enough that a parallel_for task outweighs its overhead,
// small enough that 10 tensors still split across the cores.
constexpr int64_t kChunk = 1 << 15;
// Elements updated into scratch (or in place) before the write-back to the rounded
// param: stays in L1.
constexpr int64_t kBlock = 1024;
// The update loops run in the widest vectors (with_widest_vectors): one core's step is
// compute-bound (a sqrt and two divides per element), so wide vectors pay.

// ---------------------------------------------------------------- vector/scalar helpers
// The element code is written once for V = acc_t (the tail) and V = Vec<acc_t>.

template <typename V>
constexpr bool kIsScalar = std::is_arithmetic_v<V>;

template <typename V, typename T>
__attribute__((always_inline)) inline V load_as(const T* p) {
  if constexpr (kIsScalar<V>) {
    return static_cast<V>(*p);
  } else {
    using acc_t = LaneOf<V>;
    if constexpr (std::is_same_v<T, acc_t>) {
      return load<acc_t, sizeof(V)>(p);
    } else {
      V v;
      for (int64_t k = 0; k < kWidth<acc_t, sizeof(V)>; ++k) v[k] = static_cast<acc_t>(p[k]);
      return v;
    }
  }
}

template <typename T, typename V>
__attribute__((always_inline)) inline void store_as(T* p, V v) {
  if constexpr (kIsScalar<V>) {
    *p = static_cast<T>(v);
  } else {
    using acc_t = LaneOf<V>;
    if constexpr (std::is_same_v<T, acc_t>) {
      store(p, v);
    } else {
      for (int64_t k = 0; k < kWidth<acc_t, sizeof(V)>; ++k) p[k] = static_cast<T>(v[k]);
    }
  }
}

template <typename V>
__attribute__((always_inline)) inline V vsqrt(V v) {
  if constexpr (kIsScalar<V>) {
    return std::sqrt(v);
  } else {
    using acc_t = LaneOf<V>;
    for (int64_t k = 0; k < kWidth<acc_t, sizeof(V)>; ++k) v[k] = std::sqrt(v[k]);
    return v;
  }
}

// sign(w) * max(|w| - threshold, 0), as the reference writes it (for threshold >= 0 the
// sign of w == 0 does not matter: the result is zero). A NaN stays NaN, as in torch.
template <typename V, typename acc_t>
__attribute__((always_inline)) inline V l1_prox(V w, acc_t threshold) {
  V shrunk = (w < acc_t(0) ? -w : w) - threshold;
  shrunk = shrunk < acc_t(0) ? V{} : shrunk;
  return w < acc_t(0) ? -shrunk : shrunk;
}

// ---------------------------------------------------------------- the work list

struct WorkItem {
  int64_t tensor, begin, end;  // elements [begin, end) of one tensor
  int64_t row_length;  // > 0: max-norm rows of this length; the range holds whole rows
};

// (tensor, chunk) items covering every tensor; whole rows where max-norm applies.
std::vector<WorkItem> work_items(const at::TensorList params, double max_norm) {
  std::vector<WorkItem> items;
  for (int64_t t = 0; t < static_cast<int64_t>(params.size()); ++t) {
    const int64_t n = params[t].numel();
    if (n == 0) continue;
    if (max_norm > 0 && params[t].dim() >= 2) {
      const int64_t row = n / params[t].size(0);
      const int64_t rows_per_item = std::max<int64_t>(1, kChunk / row);
      for (int64_t begin = 0; begin < n; begin += rows_per_item * row) {
        items.push_back({t, begin, std::min(n, begin + rows_per_item * row), row});
      }
    } else {
      for (int64_t begin = 0; begin < n; begin += kChunk) items.push_back({t, begin, std::min(n, begin + kChunk), 0});
    }
  }
  return items;
}

// What every step shares: the values updated (the params, or their fp32 masters), the
// params to round into when there are masters, and the regularizers after the update.
template <typename param_t, typename value_t>
struct StepTensors {
  static constexpr bool kMasters = !std::is_same_v<param_t, value_t>;
  std::vector<value_t*> values;
  std::vector<param_t*> params;  // written from the values when kMasters
  std::vector<const param_t*> grads;
};

template <typename acc_t>
struct Regularizers {
  acc_t l1_threshold;  // lr * l1
  acc_t max_norm;
  bool l1, project;
};

// The updated values of [begin, end) of tensor t are in dst (acc_t; the value tensor
// itself when values are acc_t). Applies max-norm to whole rows (L1 was applied per
// element), then stores them into the value tensor and the rounded params.
template <typename param_t, typename value_t, typename acc_t>
__attribute__((always_inline)) inline void finish_range(const StepTensors<param_t, value_t>& s,
                                                        const Regularizers<acc_t>& r, int64_t t, int64_t begin,
                                                        int64_t end, acc_t* __restrict dst, int64_t row_length) {
  constexpr int64_t W = kWidth<acc_t>;
  const int64_t n = end - begin;
  if (row_length > 0) {
    for (int64_t row = 0; row < n; row += row_length) {
      acc_t* __restrict w = dst + row;
      const acc_t norm = std::sqrt(vector_sum(w, row_length, [](auto x) { return x * x; }));
      if (norm > r.max_norm) {
        const acc_t scale = r.max_norm / norm;
        int64_t j = 0;
        for (; j + W <= row_length; j += W) store(w + j, load(w + j) * scale);
        for (; j < row_length; ++j) w[j] = w[j] * scale;
      }
    }
  }
  if constexpr (std::is_same_v<value_t, acc_t>) {
    if constexpr (StepTensors<param_t, value_t>::kMasters) {
      param_t* __restrict p = s.params[t] + begin;
      for (int64_t j = 0; j < n; ++j) p[j] = static_cast<param_t>(dst[j]);
    }
  } else {  // low-precision values without masters: dst is scratch
    value_t* __restrict v = s.values[t] + begin;
    for (int64_t j = 0; j < n; ++j) v[j] = static_cast<value_t>(dst[j]);
  }
}

// Runs update(t, begin, end, dst) over the work items, in blocks of whole rows (max-norm)
// or of kBlock elements, then finish_range. dst is the value tensor itself for acc_t
// values, else a scratch block.
template <typename param_t, typename value_t, typename Update>
void run_steps(const StepTensors<param_t, value_t>& s, const Regularizers<acc_type<value_t>>& r,
               const std::vector<WorkItem>& items, Update update) {
  using acc_t = acc_type<value_t>;
  // Threads only for work that outweighs waking them: at least kMinTaskElements each (a
  // step over a few small tensors runs on the calling thread, as torch's fused step does).
  int64_t elements = 0;
  for (const WorkItem& item : items) elements += item.end - item.begin;
  const auto count = static_cast<int64_t>(items.size());
  const int64_t grain = std::max<int64_t>(1, kMinTaskElements * count / std::max<int64_t>(elements, 1));
  at::parallel_for(0, count, grain, [&](int64_t first, int64_t last) {
    std::vector<acc_t> scratch;
    for (int64_t k = first; k < last; ++k) {
      const WorkItem& item = items[k];
      const int64_t block = item.row_length > 0 ? std::max(item.row_length, kBlock / item.row_length * item.row_length)
                                                : kBlock;
      if constexpr (!std::is_same_v<value_t, acc_t>) scratch.resize(std::max<int64_t>(scratch.size(), block));
      for (int64_t begin = item.begin; begin < item.end; begin += block) {
        const int64_t end = std::min(item.end, begin + block);
        acc_t* dst;
        if constexpr (std::is_same_v<value_t, acc_t>) {
          dst = s.values[item.tensor] + begin;
        } else {
          dst = scratch.data();
        }
        update(item.tensor, begin, end, dst);
        if (item.row_length > 0 || s.kMasters || !std::is_same_v<value_t, acc_t>) {
          finish_range(s, r, item.tensor, begin, end, dst, item.row_length);
        }
      }
    }
  });
}

// ---------------------------------------------------------------- checks

void check_list(const char* op, const char* name, at::TensorList list, at::TensorList params, bool may_be_empty,
                c10::optional<at::ScalarType> dtype) {
  if (may_be_empty && list.empty()) return;
  TORCH_CHECK(list.size() == params.size(), "fastreg::", op, ": '", name, "' has ", list.size(),
              " tensors but 'params' has ", params.size(), may_be_empty ? " (it may also be empty)" : "");
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.device() == params[0].device(), "fastreg::", op, ": ", name, "[", i, "] is on ", t.device(),
                " but params[0] is on ", params[0].device(), "; all tensors of one call share a device");
    TORCH_CHECK(t.numel() == params[i].numel(), "fastreg::", op, ": ", name, "[", i, "] has ", t.numel(),
                " elements but params[", i, "] has ", params[i].numel());
    if (dtype.has_value()) {
      TORCH_CHECK(t.scalar_type() == *dtype, "fastreg::", op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                  ", expected ", *dtype);
    }
  }
}

// Checks params and grads, and returns the dtype of the values updated (and of the states).
at::ScalarType check_params(const char* op, at::TensorList params, at::TensorList grads, at::TensorList masters) {
  const at::ScalarType dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16 || dtype == at::kHalf,
              "fastreg::", op, ": params must be float32, float64, bfloat16 or float16, got ", dtype);
  check_list(op, "params", params, params, false, dtype);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device().is_cpu(), "fastreg::", op, ": params[", i, "] is on ", params[i].device(),
                ", this is the CPU kernel");
  }
  check_list(op, "grads", grads, params, false, dtype);
  if (masters.empty()) return dtype;
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "fastreg::", op,
              ": 'masters' are float32 copies of bfloat16 or float16 params, but params are ", dtype);
  check_list(op, "masters", masters, params, false, at::kFloat);
  return at::kFloat;
}

// GradScaler's scale and inf flag: float32 scalars on the CPU, read here (no device to wait on).
const float* amp_scalar(const char* op, const char* name, const c10::optional<at::Tensor>& t) {
  if (!t.has_value()) return nullptr;
  TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->numel() == 1, "fastreg::", op, ": '",
              name, "' must be a float32 CPU scalar, got ", t->scalar_type(), " on ", t->device(), " with ",
              t->numel(), " elements");
  return t->const_data_ptr<float>();
}

// (skip the step, 1 / grad_scale in double)
std::pair<bool, double> amp_scaling(const char* op, const c10::optional<at::Tensor>& grad_scale,
                                    const c10::optional<at::Tensor>& found_inf) {
  const float* inf = amp_scalar(op, "found_inf", found_inf);
  const float* scale = amp_scalar(op, "grad_scale", grad_scale);
  return {inf != nullptr && *inf != 0.0f, scale != nullptr ? 1.0 / static_cast<double>(*scale) : 1.0};
}

template <typename param_t, typename value_t>
StepTensors<param_t, value_t> step_tensors(at::TensorList params, at::TensorList grads, at::TensorList masters) {
  StepTensors<param_t, value_t> s;
  for (size_t i = 0; i < params.size(); ++i) {
    s.params.push_back(params[i].mutable_data_ptr<param_t>());
    s.grads.push_back(grads[i].const_data_ptr<param_t>());
    if constexpr (StepTensors<param_t, value_t>::kMasters) {
      s.values.push_back(masters[i].mutable_data_ptr<value_t>());
    } else {
      s.values.push_back(params[i].mutable_data_ptr<value_t>());
    }
  }
  return s;
}

template <typename value_t>
std::vector<value_t*> pointers(at::TensorList list) {
  std::vector<value_t*> out;
  for (const at::Tensor& t : list) out.push_back(t.mutable_data_ptr<value_t>());
  return out;
}

// Calls body<param_t, value_t>() for the params' dtype, with value_t = float for masters.
template <typename Body>
void dispatch_types(at::ScalarType param_dtype, bool masters, Body body) {
  switch (param_dtype) {
    case at::kFloat:
      return body.template operator()<float, float>();
    case at::kDouble:
      return body.template operator()<double, double>();
    case at::kBFloat16:
      return masters ? body.template operator()<at::BFloat16, float>()
                     : body.template operator()<at::BFloat16, at::BFloat16>();
    case at::kHalf:
      return masters ? body.template operator()<at::Half, float>() : body.template operator()<at::Half, at::Half>();
    default:
      TORCH_CHECK(false, "fastreg optimizer step: unsupported dtype ", param_dtype);
  }
}

// ---------------------------------------------------------------- SGD

template <typename acc_t>
struct SgdScalars {
  acc_t lr, momentum, one_minus_dampening, weight_decay, inv_grad_scale;
  bool has_momentum, nesterov, maximize, first_step;
};

template <typename V, typename param_t, typename value_t, typename acc_t>
__attribute__((always_inline)) inline void sgd_at(const SgdScalars<acc_t>& c, const Regularizers<acc_t>& r,
                                                  const value_t* value, const param_t* __restrict grad,
                                                  value_t* __restrict buf, acc_t* dst) {
  const V w = load_as<V>(value);
  V g = load_as<V>(grad) * c.inv_grad_scale;
  if (c.maximize) g = -g;
  if (c.weight_decay != 0) g = g + c.weight_decay * w;
  if (c.has_momentum) {
    V b = c.first_step ? g : load_as<V>(buf) * c.momentum + c.one_minus_dampening * g;
    store_as(buf, b);
    if constexpr (!std::is_same_v<value_t, acc_t>) b = load_as<V>(buf);  // as stored
    g = c.nesterov ? g + c.momentum * b : b;
  }
  V updated = w - c.lr * g;
  if (r.l1) updated = l1_prox(updated, r.l1_threshold);
  store_as(dst, updated);
}

// The scalars come by value: local copies cannot alias the tensors stored to, so they stay
// in registers (through a reference, every store to a float could change them).
template <int64_t Bytes, typename param_t, typename value_t>
FASTREG_INLINE inline void sgd_range(const StepTensors<param_t, value_t>& s, value_t* const* bufs,
                                     const SgdScalars<acc_type<value_t>> c, const Regularizers<acc_type<value_t>> r,
                                     int64_t t, int64_t begin, int64_t end, acc_type<value_t>* dst) {
  using acc_t = acc_type<value_t>;
  constexpr int64_t W = kWidth<acc_t, Bytes>;
  const value_t* value = s.values[t];
  const param_t* grad = s.grads[t];
  value_t* buf = c.has_momentum ? bufs[t] : nullptr;
  int64_t j = begin;
  // (no pointer arithmetic on the absent buffer)
  for (; j + W <= end; j += W) {
    sgd_at<Vec<acc_t, Bytes>>(c, r, value + j, grad + j, buf ? buf + j : nullptr, dst + (j - begin));
  }
  for (; j < end; ++j) sgd_at<acc_t>(c, r, value + j, grad + j, buf ? buf + j : nullptr, dst + (j - begin));
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  at::TensorList masters, double lr, double momentum, double dampening, double weight_decay, double l1,
                  double max_norm, bool nesterov, bool maximize, bool first_step,
                  const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf) {
  // any strides: through contiguous copies
  if (!all_contiguous({params, grads, momentum_buffers, masters})) {
    ContiguousLists c({{params, true}, {grads, false}, {momentum_buffers, true}, {masters, true}});
    sgd_step_cpu(c[0], c[1], c[2], c[3], lr, momentum, dampening, weight_decay, l1, max_norm, nesterov, maximize,
                 first_step, grad_scale, found_inf);
    c.write_back();
    return;
  }
  if (params.empty()) {
    TORCH_CHECK(grads.empty() && momentum_buffers.empty() && masters.empty(),
                "fastreg::sgd_step_: 'params' is empty but other lists are not");
    return;
  }
  const at::ScalarType value_dtype = check_params("sgd_step_", params, grads, masters);
  TORCH_CHECK(momentum == 0 || !momentum_buffers.empty(),
              "fastreg::sgd_step_: momentum != 0 needs 'momentum_buffers'");
  check_list("sgd_step_", "momentum_buffers", momentum_buffers, params, momentum == 0, value_dtype);
  const auto [skip, inv_grad_scale] = amp_scaling("sgd_step_", grad_scale, found_inf);
  if (skip) return;
  const std::vector<WorkItem> items = work_items(params, max_norm);
  dispatch_types(params[0].scalar_type(), !masters.empty(), [&]<typename param_t, typename value_t>() {
    using acc_t = acc_type<value_t>;
    const StepTensors<param_t, value_t> s = step_tensors<param_t, value_t>(params, grads, masters);
    const std::vector<value_t*> bufs = pointers<value_t>(momentum_buffers);
    const SgdScalars<acc_t> c{static_cast<acc_t>(lr), static_cast<acc_t>(momentum),
                              static_cast<acc_t>(1 - dampening), static_cast<acc_t>(weight_decay),
                              static_cast<acc_t>(inv_grad_scale), momentum != 0, nesterov, maximize, first_step};
    const Regularizers<acc_t> r{static_cast<acc_t>(lr * l1), static_cast<acc_t>(max_norm), l1 > 0, max_norm > 0};
    run_steps(s, r, items, [&](int64_t t, int64_t begin, int64_t end, acc_t* dst) {
      with_widest_vectors([&](auto bytes) FASTREG_INLINE {
        sgd_range<bytes>(s, bufs.data(), c, r, t, begin, end, dst);
      });
    });
  });
}

// ---------------------------------------------------------------- Adam / AdamW

template <typename acc_t>
struct AdamScalars {
  acc_t one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, decay_factor, step_size, bias_correction2_sqrt,
      inv_grad_scale;
  bool decoupled, amsgrad, maximize;
};

template <typename V, typename param_t, typename value_t, typename acc_t>
__attribute__((always_inline)) inline void adam_at(const AdamScalars<acc_t>& c, const Regularizers<acc_t>& r,
                                                   const value_t* value, const param_t* __restrict grad,
                                                   value_t* __restrict exp_avg, value_t* __restrict exp_avg_sq,
                                                   value_t* __restrict max_exp_avg_sq, acc_t* dst) {
  V w = load_as<V>(value);
  V g = load_as<V>(grad) * c.inv_grad_scale;
  if (c.maximize) g = -g;
  if (c.weight_decay != 0) {
    if (c.decoupled) {
      w = w * c.decay_factor;
    } else {
      g = g + c.weight_decay * w;
    }
  }
  V m = load_as<V>(exp_avg);
  m = m + c.one_minus_beta1 * (g - m);
  V v = load_as<V>(exp_avg_sq) * c.beta2 + c.one_minus_beta2 * g * g;
  store_as(exp_avg, m);
  store_as(exp_avg_sq, v);
  if (c.amsgrad) {
    const V previous = load_as<V>(max_exp_avg_sq);
    v = previous > v ? previous : v;
    store_as(max_exp_avg_sq, v);
  }
  const V denom = vsqrt(v) / c.bias_correction2_sqrt + c.eps;
  V updated = w - c.step_size * (m / denom);
  if (r.l1) updated = l1_prox(updated, r.l1_threshold);
  store_as(dst, updated);
}

template <typename value_t>
struct AdamStates {
  std::vector<value_t*> exp_avgs, exp_avg_sqs, max_exp_avg_sqs;
};

template <int64_t Bytes, typename param_t, typename value_t>
FASTREG_INLINE inline void adam_range(const StepTensors<param_t, value_t>& s, const AdamStates<value_t>& states,
                                      const AdamScalars<acc_type<value_t>> c, const Regularizers<acc_type<value_t>> r,
                                      int64_t t, int64_t begin, int64_t end, acc_type<value_t>* dst) {
  using acc_t = acc_type<value_t>;
  constexpr int64_t W = kWidth<acc_t, Bytes>;
  const value_t* value = s.values[t];
  const param_t* grad = s.grads[t];
  value_t* exp_avg = states.exp_avgs[t];
  value_t* exp_avg_sq = states.exp_avg_sqs[t];
  value_t* max_exp_avg_sq = c.amsgrad ? states.max_exp_avg_sqs[t] : nullptr;
  int64_t j = begin;
  for (; j + W <= end; j += W) {
    adam_at<Vec<acc_t, Bytes>>(c, r, value + j, grad + j, exp_avg + j, exp_avg_sq + j,
                               max_exp_avg_sq ? max_exp_avg_sq + j : nullptr, dst + (j - begin));
  }
  for (; j < end; ++j) {
    adam_at<acc_t>(c, r, value + j, grad + j, exp_avg + j, exp_avg_sq + j,
                   max_exp_avg_sq ? max_exp_avg_sq + j : nullptr, dst + (j - begin));
  }
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList masters, at::TensorList steps, double lr, double beta1, double beta2,
                   double eps, double weight_decay, bool decoupled, double l1, double max_norm, bool maximize,
                   const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf) {
  // any strides: through contiguous copies
  if (!all_contiguous({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters})) {
    ContiguousLists c({{params, true}, {grads, false}, {exp_avgs, true}, {exp_avg_sqs, true},
                       {max_exp_avg_sqs, true}, {masters, true}});
    adam_step_cpu(c[0], c[1], c[2], c[3], c[4], c[5], steps, lr, beta1, beta2, eps, weight_decay, decoupled, l1, max_norm,
                  maximize, grad_scale, found_inf);
    c.write_back();
    return;
  }
  if (params.empty()) {
    TORCH_CHECK(grads.empty() && exp_avgs.empty() && exp_avg_sqs.empty() && max_exp_avg_sqs.empty() && masters.empty() &&
                    steps.empty(),
                "fastreg::adam_step_: 'params' is empty but other lists are not");
    return;
  }
  const at::ScalarType value_dtype = check_params("adam_step_", params, grads, masters);
  check_list("adam_step_", "exp_avgs", exp_avgs, params, false, value_dtype);
  check_list("adam_step_", "exp_avg_sqs", exp_avg_sqs, params, false, value_dtype);
  check_list("adam_step_", "max_exp_avg_sqs", max_exp_avg_sqs, params, true, value_dtype);
  TORCH_CHECK(steps.size() == params.size(), "fastreg::adam_step_: 'steps' has ", steps.size(),
              " tensors but 'params' has ", params.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].device().is_cpu() && steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1,
                "fastreg::adam_step_: steps[", i, "] must be a float32 scalar on the params' device (cpu), got ",
                steps[i].scalar_type(), " on ", steps[i].device(), " with ", steps[i].numel(), " elements");
  }
  const auto [skip, inv_grad_scale] = amp_scaling("adam_step_", grad_scale, found_inf);
  if (skip) return;
  // the new step counts, and per tensor its bias corrections in double (as Python's
  // `1 - beta ** step` in torch.optim)
  std::vector<std::pair<double, double>> corrections(steps.size());  // (step size, sqrt(bias correction 2))
  for (size_t i = 0; i < steps.size(); ++i) {
    float* step = steps[i].mutable_data_ptr<float>();
    *step += 1.0f;
    const double count = static_cast<double>(*step);
    corrections[i] = {lr / (1 - std::pow(beta1, count)), std::sqrt(1 - std::pow(beta2, count))};
  }
  const std::vector<WorkItem> items = work_items(params, max_norm);
  dispatch_types(params[0].scalar_type(), !masters.empty(), [&]<typename param_t, typename value_t>() {
    using acc_t = acc_type<value_t>;
    const StepTensors<param_t, value_t> s = step_tensors<param_t, value_t>(params, grads, masters);
    const AdamStates<value_t> states{pointers<value_t>(exp_avgs), pointers<value_t>(exp_avg_sqs),
                                     pointers<value_t>(max_exp_avg_sqs)};
    // scalars formed in double, as the reference's Python floats, then rounded once
    const AdamScalars<acc_t> c{static_cast<acc_t>(1 - beta1),
                               static_cast<acc_t>(beta2),
                               static_cast<acc_t>(1 - beta2),
                               static_cast<acc_t>(eps),
                               static_cast<acc_t>(weight_decay),
                               static_cast<acc_t>(1 - lr * weight_decay),
                               acc_t(0),  // step size and bias correction: per tensor, below
                               acc_t(0),
                               static_cast<acc_t>(inv_grad_scale),
                               decoupled,
                               !max_exp_avg_sqs.empty(),
                               maximize};
    const Regularizers<acc_t> r{static_cast<acc_t>(lr * l1), static_cast<acc_t>(max_norm), l1 > 0, max_norm > 0};
    run_steps(s, r, items, [&](int64_t t, int64_t begin, int64_t end, acc_t* dst) {
      AdamScalars<acc_t> tensor_scalars = c;
      tensor_scalars.step_size = static_cast<acc_t>(corrections[t].first);
      tensor_scalars.bias_correction2_sqrt = static_cast<acc_t>(corrections[t].second);
      with_widest_vectors([&](auto bytes) FASTREG_INLINE {
        adam_range<bytes>(s, states, tensor_scalars, r, t, begin, end, dst);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("sgd_step_", &sgd_step_cpu);
  m.impl("adam_step_", &adam_step_cpu);
}

}  // namespace fastreg
