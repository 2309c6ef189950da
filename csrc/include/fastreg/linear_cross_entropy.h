#pragma once
// The chunk loop of linear_cross_entropy_fwd, shared by the CPU and CUDA registrations:
// cross-entropy of logits = input @ linear_weight^T + linear_bias without the whole (T, V)
// logits. Per chunk of tokens: the chunk's logits by the backend's matmul into one buffer,
// the backend's cross-entropy row pass turning them into their gradient in place, then
// grad_input = G @ W (written), grad_weight += G^T @ x and grad_bias += sum of G's rows
// (accumulated in float32, float64 for float64). The memory above inputs and outputs is the
// (chunk, V) buffer and, for float16/bfloat16 weights, the float32 accumulators.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <tuple>

#include "fastreg/cross_entropy.h"
#include "fastreg/cross_entropy_args.h"

namespace fastreg {

// Tokens per chunk: as many as make the chunk's (rows, V) logits buffer the size of the
// (T, H) input (T * H / V rows: with V >> H, a buffer a few MiB big that the row pass and the
// two matmuls after it find in cache), in multiples of 32 tokens (a matmul's worth of rows),
// and at most 1/kLinearChunkParts of the tokens and kLinearChunkBytes of logits.
// fp32 at (4096 tokens, H = 1024, V = 32768): 32 chunks of 128 tokens, 16 MiB.
constexpr int64_t kLinearChunkBytes = int64_t(256) << 20;
constexpr int64_t kLinearChunkParts = 5;
constexpr int64_t kLinearChunkMinTokens = 32;

inline int64_t linear_chunk_rows(int64_t tokens, int64_t hidden, int64_t classes, int64_t element_size) {
  const int64_t step = kLinearChunkMinTokens;
  const int64_t input_sized = (tokens * hidden + classes - 1) / std::max<int64_t>(classes, 1);
  int64_t rows = (input_sized + step - 1) / step * step;
  rows = std::min({rows, (tokens + kLinearChunkParts - 1) / kLinearChunkParts,
                   kLinearChunkBytes / std::max<int64_t>(classes * element_size, 1)});
  return std::clamp<int64_t>(std::max(rows, step), 1, std::max<int64_t>(tokens, 1));
}

inline void check_linear_cross_entropy_args(const at::Tensor& input, const at::Tensor& linear_weight,
                                            const std::optional<at::Tensor>& linear_bias, const at::Tensor& target,
                                            const std::optional<at::Tensor>& weight, int64_t reduction,
                                            const std::optional<at::Tensor>& grad_loss) {
  constexpr const char* op = "fastreg::linear_cross_entropy_fwd";
  TORCH_CHECK(input.dim() == 2 && linear_weight.dim() == 2 && input.size(1) == linear_weight.size(1), op,
              ": 'input' (T, H) and 'linear_weight' (V, H) must be 2-D with equal H, got ", input.sizes(), " and ",
              linear_weight.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()) && linear_weight.scalar_type() == input.scalar_type() &&
                  linear_weight.device() == input.device(),
              op, ": 'input' and 'linear_weight' must be floating-point of one dtype and device");
  if (linear_bias.has_value()) {
    TORCH_CHECK(linear_bias->dim() == 1 && linear_bias->size(0) == linear_weight.size(0) &&
                    linear_bias->scalar_type() == input.scalar_type() && linear_bias->device() == input.device(),
                op, ": 'linear_bias' must be (V,) of the input's dtype and device");
  }
  TORCH_CHECK(target.dim() == 1 && target.size(0) == input.size(0) && target.scalar_type() == at::kLong &&
                  target.device() == input.device(),
              op, ": 'target' must be int64 (T,) on the input's device, got ", target.scalar_type(), " ",
              target.sizes());
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == linear_weight.size(0) &&
                    weight->scalar_type() == input.scalar_type() && weight->device() == input.device(),
                op, ": 'weight' must be (V,) of the input's dtype and device");
  }
  TORCH_CHECK(reduction == kReductionNone || reduction == kReductionMean || reduction == kReductionSum, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  if (grad_loss.has_value()) {
    TORCH_CHECK(grad_loss->dim() == 1 && grad_loss->size(0) == input.size(0) && grad_loss->device() == input.device(),
                op, ": 'grad_loss' must be (T,) per-token gradients of the loss");
  }
}

// RowPass provides, for its device:
//   logits(out, x, W, bias)                        out = x @ W^T (+ bias), the chunk's logits
//   totals(target, weight_acc, ignore_index, V)   the non-ignored targets' (total weight, count)
//   scale(reduction, totals, acc_options)          (1, 2) (ce_scale, z_scale) of the reduction
//   operator()(logits, target, weight_acc, ignore_index, smoothing, z_loss, scale, ce_rows, z_rows, with_grad)
//                                                  the row pass over (rows, V) logits, in place
//   add_weight_grad(grad_weight_acc, G, x)         grad_weight_acc += G^T @ x when the dtypes differ
//   reduce(ce_rows, z_rows, reduction, totals, loss, z_term)
template <typename RowPass>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_chunks(
    const RowPass& pass, const at::Tensor& input, const at::Tensor& linear_weight,
    const std::optional<at::Tensor>& linear_bias, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    int64_t ignore_index, double smoothing, double z_loss, int64_t reduction,
    const std::optional<at::Tensor>& grad_loss, bool grad_input, bool grad_weight, bool grad_bias,
    int64_t chunk_tokens) {
  check_linear_cross_entropy_args(input, linear_weight, linear_bias, target, weight, reduction, grad_loss);
  const int64_t T = input.size(0), H = input.size(1), V = linear_weight.size(0);
  const at::ScalarType acc_dtype = cross_entropy_acc_dtype(input);
  const auto acc = input.options().dtype(acc_dtype);
  const at::Tensor w = weight.has_value() ? weight->to(acc_dtype).contiguous() : at::Tensor();
  const at::Tensor targets = target.contiguous();
  const auto totals = pass.totals(targets, w, ignore_index, V);
  // per-token scales: the incoming gradient of reduction="none", the same for both terms
  const at::Tensor scale = grad_loss.has_value()
                               ? grad_loss->to(acc_dtype).unsqueeze(1).expand({T, 2}).contiguous()
                               : pass.scale(reduction, totals, acc);
  at::Tensor ce_rows = at::empty({T}, acc), z_rows = at::empty({T}, acc);
  const bool with_grad = grad_input || grad_weight || grad_bias;
  const bool weight_in_acc = input.scalar_type() == acc_dtype;
  at::Tensor d_input = grad_input ? at::empty({T, H}, input.options()) : at::empty({0}, input.options());
  at::Tensor d_weight = grad_weight ? at::zeros({V, H}, acc) : at::empty({0}, input.options());
  at::Tensor d_bias = grad_bias ? at::zeros({V}, acc) : at::empty({0}, input.options());
  TORCH_CHECK(chunk_tokens >= 0, "fastreg::linear_cross_entropy_fwd: chunk_tokens must be >= 0");
  const int64_t chunk = chunk_tokens > 0 ? std::min(chunk_tokens, std::max<int64_t>(T, 1))
                                         : linear_chunk_rows(T, H, V, input.element_size());
  at::Tensor buffer = at::empty({T > 0 ? chunk : 0, V}, input.options());
  for (int64_t start = 0; start < T; start += chunk) {
    const int64_t rows = std::min(chunk, T - start);
    const at::Tensor x = input.narrow(0, start, rows);
    at::Tensor logits = buffer.narrow(0, 0, rows);
    pass.logits(logits, x, linear_weight, linear_bias);
    pass(logits, targets.narrow(0, start, rows), w, ignore_index, smoothing, z_loss,
         scale.size(0) > 1 ? scale.narrow(0, start, rows) : scale, ce_rows.narrow(0, start, rows),
         z_rows.narrow(0, start, rows), with_grad);
    // logits now hold G, the gradient of the chunk's logits
    if (grad_input) {
      at::Tensor d_x = d_input.narrow(0, start, rows);
      at::mm_out(d_x, logits, linear_weight);
    }
    if (grad_weight) {
      if (weight_in_acc) {
        d_weight.addmm_(logits.t(), x);
      } else {
        pass.add_weight_grad(d_weight, logits, x);
      }
    }
    if (grad_bias) d_bias.add_(logits.sum(0, false, acc_dtype));
  }
  auto [loss, z_term] = reduction == kReductionNone
                            ? std::make_tuple(at::empty({T}, input.options()), at::empty({T}, input.options()))
                            : std::make_tuple(at::empty({}, input.options()), at::empty({}, input.options()));
  pass.reduce(ce_rows, z_rows, reduction, totals, loss, z_term);
  if (grad_weight && !weight_in_acc) d_weight = d_weight.to(input.scalar_type());
  if (grad_bias && !weight_in_acc) d_bias = d_bias.to(input.scalar_type());
  return {loss, z_term, d_input, d_weight, d_bias};
}

}  // namespace fastreg
