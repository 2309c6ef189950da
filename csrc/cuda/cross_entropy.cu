// Cross-entropy on CUDA tensors: cross_entropy_fwd (the loss and, in the same pass, the
// gradient of the logits), cross_entropy_bwd_ and linear_cross_entropy_fwd (chunks of tokens
// through at::mm and the same row pass); formulas in csrc/include/fastreg/cross_entropy.h.
//
// One block per (sample, block of kLanes positions), threads (lane, group): lane a position,
// group a stride over the classes. Rows (classes contiguous) run with one lane and up to 1024
// groups, so a warp reads 32 consecutive classes; columns (positions contiguous) with 32
// lanes and 8 groups, so a warp reads 32 consecutive positions. Each thread keeps an online
// softmax state (max, sum of exp) over its classes; the groups' states merge in shared
// memory (a fixed tree: deterministic); the second sweep writes the gradient (re-reading
// the row from L2). The reductions over rows are torch's (deterministic on CUDA).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "fastreg/cross_entropy.h"
#include "fastreg/cross_entropy_args.h"
#include "fastreg/linear_cross_entropy.h"
#include "fastreg/welford.h"

namespace fastreg {
namespace {

constexpr int kColumnLanes = 32;
constexpr int kColumnGroups = 8;

template <typename scalar_t, typename acc_t = acc_type<scalar_t>>
struct RowPassParams {
  const scalar_t* x;  // logits (N, C, S), strides x_n, x_c, x_s
  scalar_t* grad;  // nullptr: no gradient; else (N, C, S), strides g_n, g_c, g_s (may be x)
  const int64_t* target;  // (N * S,)
  const acc_t* weight;  // (C,) or nullptr
  const acc_t* scale;  // (ce_scale, z_scale) of row r at scale + r * scale_stride
  acc_t* ce;  // (N * S,) out
  acc_t* z;  // (N * S,) out
  int64_t N, C, S, x_n, x_c, x_s, g_n, g_c, g_s, scale_stride, ignore_index;
  acc_t smoothing, z_loss;
};

// Per thread: online softmax state and the smoothing sums, merged over the block's groups.
template <typename acc_t>
struct ThreadState {
  SoftmaxStats<acc_t> stats;
  acc_t smooth_sum, weight_sum;
};

template <typename acc_t>
__device__ __forceinline__ ThreadState<acc_t> merge_states(const ThreadState<acc_t>& a, const ThreadState<acc_t>& b) {
  return {merge_stats(a.stats, b.stats), a.smooth_sum + b.smooth_sum, a.weight_sum + b.weight_sum};
}

// blockDim = (lanes, groups), groups a power of two; dynamic shared memory holds one state
// per thread.
template <typename scalar_t>
__global__ void cross_entropy_kernel(RowPassParams<scalar_t> p) {
  using acc_t = acc_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  auto* states = reinterpret_cast<ThreadState<acc_t>*>(shared_bytes);
  const int lanes = blockDim.x, groups = blockDim.y, lane = threadIdx.x, group = threadIdx.y;
  const int64_t position_blocks = (p.S + lanes - 1) / lanes;
  const int64_t n = blockIdx.x / position_blocks;
  const int64_t s = (blockIdx.x % position_blocks) * lanes + lane;
  const bool in_range = s < p.S;
  const int64_t r = n * p.S + s;
  const int64_t t = in_range ? p.target[r] : p.ignore_index;
  const bool counted = in_range && t != p.ignore_index;
  if (counted) CUDA_KERNEL_ASSERT(t >= 0 && t < p.C);
  const bool active = counted && t >= 0 && t < p.C;
  const scalar_t* x = p.x + n * p.x_n + (in_range ? s : 0) * p.x_s;
  const acc_t shift = active ? static_cast<acc_t>(x[0]) : acc_t(0);
  const acc_t target_logit = active ? static_cast<acc_t>(x[t * p.x_c]) : acc_t(0);

  ThreadState<acc_t> state{{-INFINITY, acc_t(0)}, acc_t(0), acc_t(0)};
  if (active) {
    for (int64_t c = group; c < p.C; c += groups) {
      const acc_t v = static_cast<acc_t>(x[c * p.x_c]);
      if (v > state.stats.max) {  // one exp per logit
        state.stats.sum = state.stats.sum * std::exp(state.stats.max - v) + acc_t(1);
        state.stats.max = v;
      } else if (v != -INFINITY) {
        state.stats.sum += std::exp(v - state.stats.max);
      }
      if (p.smoothing != acc_t(0)) {
        const acc_t w = p.weight ? p.weight[c] : acc_t(1);
        state.smooth_sum += w * (v - shift);
        state.weight_sum += w;
      }
    }
  }
  // merge the groups of each lane: a tree over group indices, in a fixed order
  states[group * lanes + lane] = state;
  __syncthreads();
  for (int half = groups / 2; half > 0; half /= 2) {
    if (group < half) {
      states[group * lanes + lane] = merge_states(states[group * lanes + lane], states[(group + half) * lanes + lane]);
    }
    __syncthreads();
  }
  const ThreadState<acc_t> total = states[lane];
  if (!in_range) return;
  if (!active) {
    if (group == 0) {  // a target out of range (past the assert, when asserts are off): nan
      p.ce[r] = counted ? acc_t(NAN) : acc_t(0);
      p.z[r] = acc_t(0);
    }
    if (p.grad) {
      scalar_t* g = p.grad + n * p.g_n + s * p.g_s;
      const scalar_t fill = counted ? scalar_t(NAN) : scalar_t(0);
      for (int64_t c = group; c < p.C; c += groups) g[c * p.g_c] = fill;
    }
    return;
  }
  const acc_t max = total.stats.max, log_sum = std::log(total.stats.sum);
  const acc_t* scale = p.scale + r * p.scale_stride;
  const acc_t target_weight = p.weight ? p.weight[t] : acc_t(1);
  const RowTerms<acc_t> terms = row_terms<acc_t>(max, log_sum, target_logit, target_weight, shift, total.smooth_sum,
                                                 total.weight_sum, p.smoothing, p.C, p.z_loss, scale[0], scale[1]);
  if (group == 0) {
    p.ce[r] = terms.ce;
    p.z[r] = terms.z;
  }
  if (!p.grad) return;
  scalar_t* g = p.grad + n * p.g_n + s * p.g_s;
  for (int64_t c = group; c < p.C; c += groups) {
    const acc_t v = static_cast<acc_t>(x[c * p.x_c]);
    acc_t value = terms.alpha * std::exp((v - max) - log_sum) - terms.beta * (p.weight ? p.weight[c] : acc_t(1));
    if (c == t) value -= terms.target_term;
    g[c * p.g_c] = static_cast<scalar_t>(value);
  }
}

int row_groups(int64_t C) {
  int groups = 32;
  while (groups < 1024 && groups * 4 < C) groups *= 2;
  return groups;
}

// The row pass: ce_rows, z_rows and, when grad is defined, the gradient (may be x).
void cross_entropy_rows(const at::Tensor& x, const at::Tensor& target, const at::Tensor& weight, int64_t ignore_index,
                        double smoothing, double z_loss, const at::Tensor& scale, const at::Tensor& ce_rows,
                        const at::Tensor& z_rows, const at::Tensor& grad) {
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  if (N * S == 0) return;
  const bool rows = reads_rows(x);
  TORCH_INTERNAL_ASSERT(rows || reads_columns(x));
  const dim3 block = rows ? dim3(1, row_groups(C)) : dim3(kColumnLanes, kColumnGroups);
  const int64_t blocks = N * ((S + block.x - 1) / block.x);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "fastreg::cross_entropy: too many rows for one launch");
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "cross_entropy_rows", [&] {
    using acc_t = acc_type<scalar_t>;
    RowPassParams<scalar_t> p;
    p.x = x.const_data_ptr<scalar_t>();
    p.grad = grad.defined() ? grad.mutable_data_ptr<scalar_t>() : nullptr;
    p.target = target.const_data_ptr<int64_t>();
    p.weight = weight.defined() ? weight.const_data_ptr<acc_t>() : nullptr;
    p.scale = scale.const_data_ptr<acc_t>();
    p.ce = ce_rows.mutable_data_ptr<acc_t>();
    p.z = z_rows.mutable_data_ptr<acc_t>();
    p.N = N;
    p.C = C;
    p.S = S;
    p.x_n = x.stride(0);
    p.x_c = x.stride(1);
    p.x_s = x.stride(2);
    p.g_n = grad.defined() ? grad.stride(0) : 0;
    p.g_c = grad.defined() ? grad.stride(1) : 0;
    p.g_s = grad.defined() ? grad.stride(2) : 0;
    p.scale_stride = scale.size(0) > 1 ? scale.stride(0) : 0;
    p.ignore_index = ignore_index;
    p.smoothing = static_cast<acc_t>(smoothing);
    p.z_loss = static_cast<acc_t>(z_loss);
    const size_t shared = sizeof(ThreadState<acc_t>) * block.x * block.y;
    cross_entropy_kernel<scalar_t><<<static_cast<unsigned>(blocks), block, shared,
                                     c10::cuda::getCurrentCUDAStream()>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The CUDA side of linear_cross_entropy_chunks (csrc/include/fastreg/linear_cross_entropy.h)
// and of cross_entropy_fwd: the totals and scales stay on the device (no host sync).
struct CudaRowPass {
  using Totals = std::pair<at::Tensor, at::Tensor>;  // (total weight, count), acc dtype, 0-dim
  void logits(at::Tensor& out, const at::Tensor& x, const at::Tensor& linear_weight,
              const std::optional<at::Tensor>& linear_bias) const {
    if (linear_bias.has_value()) {
      at::addmm_out(out, *linear_bias, x, linear_weight.t());
    } else {
      at::mm_out(out, x, linear_weight.t());
    }
  }
  Totals totals(const at::Tensor& target, const at::Tensor& weight, int64_t ignore_index, int64_t C) const {
    const at::Tensor counted = target.ne(ignore_index);
    const auto acc = weight.defined() ? weight.scalar_type() : at::kFloat;
    const at::Tensor count = counted.sum(acc);
    if (!weight.defined()) return {count, count};
    const at::Tensor safe = at::where(counted.logical_and(target.ge(0)).logical_and(target.lt(C)), target, 0);
    return {at::where(counted, weight.index_select(0, safe.reshape(-1)).view_as(safe), 0).sum(), count};
  }
  at::Tensor scale(int64_t reduction, const Totals& totals, const at::TensorOptions& acc) const {
    if (reduction != kReductionMean) return at::ones({1, 2}, acc);
    return at::stack({totals.first.reciprocal(), totals.second.reciprocal()}).to(acc).view({1, 2});
  }
  void operator()(const at::Tensor& logits, const at::Tensor& target, const at::Tensor& weight, int64_t ignore_index,
                  double smoothing, double z_loss, const at::Tensor& scale, const at::Tensor& ce_rows,
                  const at::Tensor& z_rows, bool with_grad) const {
    const at::Tensor x = logits.unsqueeze(2);
    cross_entropy_rows(x, target.unsqueeze(1), weight, ignore_index, smoothing, z_loss, scale, ce_rows, z_rows,
                       with_grad ? x : at::Tensor());
  }
  // float16/bfloat16: cuBLAS accumulates the chunk's product in float32 into the float32 sum
  void add_weight_grad(at::Tensor& grad_weight, const at::Tensor& grad_logits, const at::Tensor& x) const {
    at::addmm_out(grad_weight, grad_weight, grad_logits.t(), x, grad_weight.scalar_type());
  }
  void reduce(const at::Tensor& ce_rows, const at::Tensor& z_rows, int64_t reduction, const Totals& totals,
              at::Tensor& loss, at::Tensor& z_term) const {
    if (reduction == kReductionNone) {
      loss.copy_(ce_rows.add(z_rows).view(loss.sizes()));
      z_term.copy_(z_rows.view(z_term.sizes()));
      return;
    }
    at::Tensor ce = ce_rows.sum(), z = z_rows.sum();
    if (reduction == kReductionMean) {  // 0 / 0 = nan when nothing counts, as torch
      ce = ce.div(totals.first);
      z = z.div(totals.second);
    }
    loss.copy_(ce.add(z));
    z_term.copy_(z);
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index,
    double label_smoothing, double z_loss, int64_t reduction, bool compute_grad) {
  check_cross_entropy_args("cross_entropy_fwd", input, target, weight, reduction);
  const CudaRowPass pass;
  const at::Tensor x = readable_logits(input);
  const at::Tensor targets = target.contiguous();
  const auto acc = input.options().dtype(cross_entropy_acc_dtype(input));
  const at::Tensor w = weight.has_value() ? weight->to(acc.dtype().toScalarType()).contiguous() : at::Tensor();
  const auto totals = pass.totals(targets, w, ignore_index, x.size(1));
  const at::Tensor scale = pass.scale(reduction, totals, acc);
  const int64_t rows = x.size(0) * x.size(2);
  at::Tensor ce_rows = at::empty({rows}, acc), z_rows = at::empty({rows}, acc);
  at::Tensor grad = compute_grad ? gradient_like(x) : at::empty({0}, input.options());
  cross_entropy_rows(x, targets, w, ignore_index, label_smoothing, z_loss, scale, ce_rows, z_rows,
                     compute_grad ? grad : at::Tensor());
  auto [loss, z_term] = loss_outputs(x, reduction);
  pass.reduce(ce_rows, z_rows, reduction, totals, loss, z_term);
  return {loss, z_term, grad};
}

// grad *= factor[0] over a dense gradient; every block returns at once when the factor is 1.
template <typename scalar_t, typename factor_t>
__global__ void scale_kernel(scalar_t* grad, const factor_t* factor, int64_t numel) {
  using acc_t = acc_type<scalar_t>;
  const acc_t f = static_cast<acc_t>(*factor);
  if (f == acc_t(1)) return;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < numel;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    grad[i] = static_cast<scalar_t>(static_cast<acc_t>(grad[i]) * f);
  }
}

void cross_entropy_bwd_cuda_(at::Tensor& grad, const at::Tensor& grad_loss) {
  if (grad.numel() == 0) return;
  if (grad_loss.numel() != 1) {
    TORCH_CHECK(grad.dim() == 3 && grad_loss.dim() == 2 && grad_loss.size(0) == grad.size(0) &&
                    grad_loss.size(1) == grad.size(2),
                "fastreg::cross_entropy_bwd_: per-row 'grad_loss' must be (N, S) for a gradient (N, C, S), got ",
                grad_loss.sizes(), " for ", grad.sizes());
    grad.mul_(grad_loss.unsqueeze(1));
    return;
  }
  if (!grad.is_non_overlapping_and_dense()) {
    grad.mul_(grad_loss.reshape({}));
    return;
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((grad.numel() + threads - 1) / threads, 65535);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "cross_entropy_bwd_", [&] {
    using grad_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_loss.scalar_type(), "cross_entropy_bwd_factor",
                                    [&] {
                                      scale_kernel<grad_t, scalar_t>
                                          <<<static_cast<unsigned>(blocks), threads, 0,
                                             c10::cuda::getCurrentCUDAStream()>>>(
                                              grad.mutable_data_ptr<grad_t>(),
                                              grad_loss.const_data_ptr<scalar_t>(), grad.numel());
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_fwd_cuda(
    const at::Tensor& input, const at::Tensor& linear_weight, const std::optional<at::Tensor>& linear_bias,
    const at::Tensor& target, const std::optional<at::Tensor>& weight, int64_t ignore_index, double label_smoothing,
    double z_loss, int64_t reduction, const std::optional<at::Tensor>& grad_loss, bool grad_input, bool grad_weight,
    bool grad_bias, int64_t chunk_tokens) {
  const c10::cuda::CUDAGuard guard(input.device());
  return linear_cross_entropy_chunks(CudaRowPass{}, input, linear_weight, linear_bias, target, weight, ignore_index,
                                     label_smoothing, z_loss, reduction, grad_loss, grad_input, grad_weight,
                                     grad_bias, chunk_tokens);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd_", &cross_entropy_bwd_cuda_);
  m.impl("linear_cross_entropy_fwd", &linear_cross_entropy_fwd_cuda);
}

}  // namespace fastreg
