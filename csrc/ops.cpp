// Every operator schema of fastreg, in one place. Each op `<op>` has a Triton twin
// `<op>_triton` (in-place ops: `<op>_triton_`) with the same schema: the C++ kernels of
// `<op>` register per dispatch key in csrc/cpu/*.cpp and csrc/cuda/*.cu; the twin's
// kernels are the Triton launchers, registered from Python (fastreg/ops/<family>.py) for
// CUDA tensors and, through the Triton interpreter, CPU tensors. Fake (meta) kernels
// are registered there too.
// (`import fastreg._C` loads this library and so runs these registrations; the Python
// module itself is made in csrc/python_module.cpp.)
#include <torch/library.h>

#include <string>

namespace {

// Defines `name(signature)` and its Triton twin.
void def_with_triton_twin(torch::Library& m, const std::string& name, const std::string& signature) {
  const bool in_place = name.back() == '_';
  const std::string stem = in_place ? name.substr(0, name.size() - 1) : name;
  m.def((name + signature).c_str());
  m.def((stem + "_triton" + (in_place ? "_" : "") + signature).c_str());
}

}  // namespace

TORCH_LIBRARY(fastreg, m) {
  const auto def = [&m](const std::string& name, const std::string& signature) {
    def_with_triton_twin(m, name, signature);
  };
  // Every op takes every tensor argument with any strides: the kernels read them through
  // their strides or through a contiguous copy made once (none of a contiguous tensor).
  // out = residual + (x + bias) * keep * scale over x in row-major order. `seed` is an int64
  // tensor of one element on x's device; element i takes stream position
  // offset + i / inner of the Philox stream (see csrc/include/fastreg/philox.h), so
  // inner > 1 drops whole groups (channel dropout, drop path). Backward is this
  // same op applied to the incoming gradient with the same seed.
  def(
      "dropout", "(Tensor x, Tensor seed, float p, int offset=0, int inner=1, "
      "Tensor? bias=None, Tensor? residual=None) -> Tensor");
  // In-place form of the above without bias and residual.
  def("dropout_", "(Tensor(a!) x, Tensor seed, float p, int offset=0, int inner=1) -> ()");

  // Gaussian noise over the contiguous x: n is the standard normal of element i, drawn by
  // stream position offset + i (Box-Muller on the Philox words; see
  // csrc/include/fastreg/normal.h). multiplicative: out = x * (1 + std * n) (Gaussian
  // dropout); else out = x + std * n. Backward: this op on the gradient (multiplicative),
  // or the gradient itself.
  def("gaussian_noise", "(Tensor x, Tensor seed, float std, bool multiplicative, int offset=0) -> Tensor");
  // out = x * (keep ? scale : 0) + (keep ? keep_shift : drop_shift) over the contiguous x,
  // keep drawn as in `dropout` (one draw per `inner` consecutive elements): torch's alpha
  // dropout with the host's a, b constants. Backward: this op on the gradient with the
  // shifts 0.
  def(
      "alpha_dropout", "(Tensor x, Tensor seed, float p, float scale, float keep_shift, float drop_shift, "
      "int offset=0, int inner=1) -> Tensor");
  def(
      "alpha_dropout_", "(Tensor(a!) x, Tensor seed, float p, float scale, float keep_shift, float drop_shift, "
      "int offset=0, int inner=1) -> ()");

  // DropBlock over x of shape (N, C, *spatial), 2 or 3 spatial dims, contiguous or channels-last
  // (other layouts are copied to contiguous). Seeds: one Bernoulli(gamma) draw (word below
  // round(gamma * 2^32)) per position of the grid (planes, spatial - block_size + 1), a plane
  // being (n, c), or n when shared_mask; grid position g draws stream position g. A seed at
  // grid point s drops the block [s, s + block_size) of its plane. Returns (y, mask, scale):
  // y = x * keep * scale in x's layout, scale = numel / (eps + number kept) as a float64
  // scalar tensor, and mask the keep bits in x's memory order, bit-packed per row (LSB
  // first), a row being a plane (contiguous) or a sample (channels-last): uint8 of shape
  // (rows, ceil(row length / 8)).
  def(
      "drop_block", "(Tensor x, Tensor seed, float gamma, int block_size, float eps, bool shared_mask=False) "
      "-> (Tensor, Tensor, Tensor)");
  // In-place form: x must be contiguous or channels-last.
  def(
      "drop_block_", "(Tensor(a!) x, Tensor seed, float gamma, int block_size, float eps, "
      "bool shared_mask=False) -> ()");
  // x * keep * scale for the mask and scale drop_block returned (the backward): x must have
  // the memory layout of that call's x (its rows: mask.size(0)).
  def("drop_block_apply", "(Tensor x, Tensor mask, Tensor scale) -> Tensor");

  // LayerNorm (is_rms=false) or RMSNorm of the rows of a 2-D x, optionally
  // of h = residual + dropout(x) (when residual or seed is given; dropout on the same
  // stream as `dropout`, element (i, j) at position i * N + j). Returns (y, h, mean, rstd):
  // h is empty unless fused and store_h (backward needs it; inference may not); mean
  // (empty for RMSNorm) and rstd per row, float32 (float64 for float64 x).
  def(
      "norm_fwd", "(Tensor x, Tensor? weight, Tensor? bias, float eps, bool is_rms, Tensor? residual=None, "
      "Tensor? seed=None, float p=0.0, bool residual_in_fp32=False, bool store_h=True) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients with respect to the norm input x (plus dh, the gradient reaching it directly),
  // weight and bias (empty when absent), and, with a seed, dropout(dx) with forward's mask
  // (the gradient of the fused block's x; else empty). Deterministic: no atomics.
  def(
      "norm_bwd", "(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool is_rms, bool has_bias, "
      "Tensor? dh=None, Tensor? seed=None, float p=0.0) -> (Tensor, Tensor, Tensor, Tensor)");

  // BatchNorm over x of shape (N, C, *) with any strides (taken as (N, C, S)), statistics
  // per channel over N and S in float32 (float64 for float64 x), y and dx in x's layout.
  // Returns (y, mean, invstd): y = (x - mean) * invstd * weight + bias. training: mean and
  // the biased variance behind invstd = 1 / sqrt(var + eps) are the batch's, and the running
  // statistics (when given) take torch's update in place, running = (1 - momentum) * running
  // + momentum * batch value, with the unbiased variance; batches_tracked (an int64 scalar on
  // x's device, torch's num_batches_tracked) replaces momentum by 1 / batches_tracked, read
  // on the device (momentum=None: a cumulative average). Else mean and invstd are those of
  // the running statistics, which must be given. Deterministic.
  def(
      "bn_fwd", "(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "bool training, float momentum, float eps, Tensor? batches_tracked=None) -> (Tensor, Tensor, Tensor)");
  // (dx, dweight, dbias) of bn_fwd, each computed when output_mask says so (else empty);
  // dweight and dbias in weight's dtype (x's without weight). training: the gradient
  // through the batch statistics. Deterministic.
  def(
      "bn_bwd", "(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, bool training, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The same BatchNorm in four steps over x (N, C, S), so SyncBatchNorm can reduce across
  // ranks in between. (mean, biased variance) per channel; deterministic.
  def("bn_stats", "(Tensor x) -> (Tensor, Tensor)");
  // y = (x - mean) / sqrt(var + eps) * weight + bias
  def("bn_apply", "(Tensor x, Tensor mean, Tensor var, Tensor? weight, Tensor? bias, float eps) -> Tensor");
  // (sum dy, sum dy * xhat) per channel: dbias and dweight; deterministic.
  def("bn_bwd_reduce", "(Tensor dy, Tensor x, Tensor mean, Tensor var, float eps) -> (Tensor, Tensor)");
  // dx; with the sums, of batch statistics over `count` values, else of fixed statistics.
  def(
      "bn_bwd_apply", "(Tensor dy, Tensor x, Tensor mean, Tensor var, Tensor? weight, float eps, "
      "Tensor? sum_dy=None, Tensor? sum_dy_xhat=None, int count=0) -> Tensor");

  // Optimizer steps over lists of tensors of one device (multi-tensor), updated in place.
  // The value updated is masters[i] when masters is given (float32 copies of low-precision
  // params; params[i] then receives the rounded result), else params[i]; the optimizer
  // states have its dtype, grads have the params' dtype. Arithmetic in float32 (float64
  // for float64 values). After the update, in the same pass:
  //   l1 > 0:       w = sign(w) * max(|w| - lr * l1, 0)                (proximal L1 step)
  //   max_norm > 0: each row (dim 0) of a tensor of >= 2 dims is scaled by
  //                 max_norm / ||row|| where ||row|| > max_norm         (max-norm projection)
  // grad_scale, found_inf: float32 scalars on the params' device (torch.amp.GradScaler's),
  // read by the kernels, not the host: g = grad * (1 / grad_scale); found_inf != 0 leaves
  // every tensor (and step count) as it was. So a step needs no host synchronization.
  // fastreg/_reference.py (sgd_step_, adam_step_) states the update term by term.
  // g negated if maximize; buf = g on first_step, else momentum * buf + (1 - dampening) * g
  // (L2: g += weight_decay * w first).
  def(
      "sgd_step_", "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] masters, "
      "float lr, float momentum, float dampening, float weight_decay, float l1, float max_norm, bool nesterov, "
      "bool maximize, bool first_step, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Adam (decoupled=false: L2 added to g) and AdamW (decoupled=true: w *= 1 - lr * weight_decay);
  // amsgrad when max_exp_avg_sqs is not empty. steps: one float32 scalar per param on the
  // params' device (torch's state["step"]), incremented by the op; the bias corrections
  // 1 - beta^step of the new count are formed per tensor in float64 on the device.
  def(
      "adam_step_", "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] masters, Tensor(f!)[] steps, float lr, float beta1, "
      "float beta2, float eps, float weight_decay, bool decoupled, float l1, float max_norm, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // GroupNorm (and InstanceNorm: groups = C) over x of shape (N, C, S) with any strides,
  // optionally followed by SiLU: y = silu?((x - mean[n, g]) * rstd[n, g] * weight[c] + bias[c]),
  // statistics per (sample, group of C / groups channels) over its channels and S, returned
  // as (N, groups) float32 (float64 for float64 x); y keeps x's layout (empty_like).
  def("gn_fwd", "(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps, bool silu) -> (Tensor, Tensor, Tensor)");
  // (dx in x's layout, dweight, dbias; empty where there is no weight / bias). With silu the
  // pre-activation is recomputed from x. Deterministic: per-sample partial sums in float32
  // (float64) reduced over the samples in order, no atomics.
  def(
      "gn_bwd", "(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, int groups, "
      "bool silu) -> (Tensor, Tensor, Tensor)");

  // Cross-entropy over the class dim of logits `input` (N, C, S) with class-index `target`
  // (N, S) int64 (rows equal to ignore_index count for nothing), class weights `weight` (C,),
  // torch's label smoothing, and z_loss * logsumexp^2 per row (csrc/include/fastreg/cross_entropy.h
  // has the formulas). reduction: 0 none, 1 mean, 2 sum (torch's enum); a mean divides the
  // cross-entropy terms by the total weight of the counted targets and the z-loss terms by
  // their count. Returns (loss, z_term, grad): loss and its z-loss part z_term in input's
  // dtype, 0-dim or (N, S) for none; with compute_grad, the gradient of the loss with respect
  // to input for an incoming gradient of 1 (per row, for none), computed in the same pass,
  // else an empty tensor. Arithmetic in float32 (float64 for float64).
  def(
      "cross_entropy_fwd", "(Tensor input, Tensor target, Tensor? weight, int ignore_index, float label_smoothing, "
      "float z_loss, int reduction, bool compute_grad) -> (Tensor, Tensor, Tensor)");
  // grad *= grad_loss in place: a one-element grad_loss (skipped on the device when it is 1),
  // or (N, S) per-row values broadcast over the class dim of grad (N, C, S).
  def("cross_entropy_bwd_", "(Tensor(a!) grad, Tensor grad_loss) -> ()");
  // cross_entropy_fwd of logits = input @ linear_weight^T + linear_bias for input (T, H),
  // linear_weight (V, H), target (T,), without the (T, V) logits: chunks of tokens through
  // the backend's matmul and row pass. Returns (loss, z_term, grad_input, grad_weight,
  // grad_bias), each gradient empty unless asked for; grad_weight and grad_bias accumulate in
  // float32 (float64). grad_loss (T,): per-token incoming gradients the gradients are
  // scaled by (the backward of reduction none, which recomputes); else as for an incoming 1.
  // chunk_tokens: tokens per chunk (0: at least 5 equal chunks of at most 256 MiB of logits).
  def(
      "linear_cross_entropy_fwd", "(Tensor input, Tensor linear_weight, Tensor? linear_bias, Tensor target, "
      "Tensor? weight, int ignore_index, float label_smoothing, float z_loss, int reduction, Tensor? grad_loss, "
      "bool grad_input, bool grad_weight, bool grad_bias, int chunk_tokens=0) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
