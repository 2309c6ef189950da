// BatchNorm on CPU tensors: the fused bn_fwd / bn_bwd and the four steps of csrc/ops.cpp,
// over x (N, C, *) of any strides, addressed as (N, C, S) (fastreg::Ncs). Two loops do the
// per-element work, both on raw per-channel arrays (no ATen op between them, so a small
// call costs little host time):
//   channel_sums: per channel, with d = x - shift[c], A = sum d and B = sum d * d, or with
//     dy, A = sum dy and B = sum dy * d; partial sums over a fixed split (of the positions,
//     or of N) added in order: deterministic whatever the thread count.
//   affine: out = (x - mean[c]) * coef_x[c] + coef_one[c] (+ dy * coef_dy[c]).
// Each has two loop orders, chosen by the layout: channels-last (C contiguous) walks the
// positions (n, s) and, inside, the channels; otherwise each (n, c) walks its S values.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "fastreg/bn_steps.h"
#include "fastreg/welford.h"
#include "parallel.h"

namespace fastreg {
namespace {

constexpr int64_t kMaxChunks = 64;

bool channels_last(const Ncs& v) { return v.sc == 1 && v.C > 1; }

Ncs ncs_strides(const at::Tensor& t) {
  const auto v = ncs_of(t);
  TORCH_INTERNAL_ASSERT(v.has_value(), "fastreg::bn: spatial dims that do not collapse");
  return *v;
}

template <typename scalar_t, typename acc_t>
void channel_sums(const scalar_t* x, const Ncs& sx, const scalar_t* dy, const Ncs& sdy, const acc_t* shift,
                  acc_t* sum_a, acc_t* sum_b) {
  const int64_t N = sx.N, C = sx.C, S = sx.S, P = N * S;
  const bool by_positions = channels_last(sx);
  const int64_t units = by_positions ? P : N;  // what the chunks split
  const int64_t per_chunk = rows_per_chunk(units, kMaxChunks);
  const int64_t chunks = units == 0 ? 1 : (units + per_chunk - 1) / per_chunk;
  std::vector<acc_t> partial(chunks * 2 * C, acc_t(0));
  at::parallel_for(0, chunks, grain_for(per_chunk * (by_positions ? C : C * S)), [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* a = partial.data() + chunk * 2 * C;
      acc_t* b = a + C;
      const int64_t first = chunk * per_chunk, last = std::min(units, first + per_chunk);
      if (by_positions) {
        for (int64_t p = first; p < last; ++p) {
          const int64_t n = p / S, s = p % S;
          const scalar_t* xr = x + n * sx.sn + s * sx.ss;
          if (dy) {
            const scalar_t* dyr = dy + n * sdy.sn + s * sdy.ss;
            for (int64_t c = 0; c < C; ++c) {
              const acc_t g = static_cast<acc_t>(dyr[c * sdy.sc]);
              a[c] += g;
              b[c] += g * (static_cast<acc_t>(xr[c]) - shift[c]);
            }
          } else {
            for (int64_t c = 0; c < C; ++c) {
              const acc_t d = static_cast<acc_t>(xr[c]) - shift[c];
              a[c] += d;
              b[c] += d * d;
            }
          }
        }
      } else {
        for (int64_t n = first; n < last; ++n) {
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* xr = x + n * sx.sn + c * sx.sc;
            const acc_t shift_c = shift[c];
            acc_t sa = 0, sb = 0;
            if (dy) {
              const scalar_t* dyr = dy + n * sdy.sn + c * sdy.sc;
              for (int64_t s = 0; s < S; ++s) {
                const acc_t g = static_cast<acc_t>(dyr[s * sdy.ss]);
                sa += g;
                sb += g * (static_cast<acc_t>(xr[s * sx.ss]) - shift_c);
              }
            } else {
              for (int64_t s = 0; s < S; ++s) {
                const acc_t d = static_cast<acc_t>(xr[s * sx.ss]) - shift_c;
                sa += d;
                sb += d * d;
              }
            }
            a[c] += sa;
            b[c] += sb;
          }
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {  // over the chunks, in order
    acc_t a = 0, b = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      a += partial[chunk * 2 * C + c];
      b += partial[chunk * 2 * C + C + c];
    }
    sum_a[c] = a;
    sum_b[c] = b;
  }
}

// The per-channel coefficients of affine; coef_dy is nullptr without dy.
template <typename acc_t>
struct Coefs {
  const acc_t *mean, *coef_x, *coef_one, *coef_dy;
};

template <typename scalar_t, typename acc_t>
void affine(const scalar_t* x, const Ncs& sx, const scalar_t* dy, const Ncs& sdy, scalar_t* out, const Ncs& so,
            Coefs<acc_t> k) {
  const int64_t N = so.N, C = so.C, S = so.S;
  if (N * C * S == 0) return;
  if (channels_last(so)) {
    at::parallel_for(0, N * S, std::max<int64_t>(1, 32768 / C), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / S, s = p % S;
        const scalar_t* __restrict xr = x + n * sx.sn + s * sx.ss;
        scalar_t* __restrict outr = out + n * so.sn + s * so.ss;
        if (dy) {
          const scalar_t* __restrict dyr = dy + n * sdy.sn + s * sdy.ss;
          for (int64_t c = 0; c < C; ++c) {
            outr[c] = static_cast<scalar_t>((static_cast<acc_t>(xr[c * sx.sc]) - k.mean[c]) * k.coef_x[c] +
                                            k.coef_one[c] + static_cast<acc_t>(dyr[c * sdy.sc]) * k.coef_dy[c]);
          }
        } else if (sx.sc == 1) {  // the common case, vectorized
          for (int64_t c = 0; c < C; ++c) {
            outr[c] = static_cast<scalar_t>((static_cast<acc_t>(xr[c]) - k.mean[c]) * k.coef_x[c] + k.coef_one[c]);
          }
        } else {
          for (int64_t c = 0; c < C; ++c) {
            outr[c] =
                static_cast<scalar_t>((static_cast<acc_t>(xr[c * sx.sc]) - k.mean[c]) * k.coef_x[c] + k.coef_one[c]);
          }
        }
      }
    });
    return;
  }
  at::parallel_for(0, N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(S, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / C, c = nc % C;
      const scalar_t* __restrict xr = x + n * sx.sn + c * sx.sc;
      const scalar_t* __restrict dyr = dy ? dy + n * sdy.sn + c * sdy.sc : nullptr;
      scalar_t* __restrict outr = out + n * so.sn + c * so.sc;
      const acc_t mc = k.mean[c], kx = k.coef_x[c], k1 = k.coef_one[c], kdy = dy ? k.coef_dy[c] : acc_t(0);
      if (sx.ss == 1 && so.ss == 1 && (!dy || sdy.ss == 1)) {  // unit strides, vectorized
        if (dyr) {
          for (int64_t s = 0; s < S; ++s) {
            outr[s] = static_cast<scalar_t>((static_cast<acc_t>(xr[s]) - mc) * kx + k1 + static_cast<acc_t>(dyr[s]) * kdy);
          }
        } else {
          for (int64_t s = 0; s < S; ++s) outr[s] = static_cast<scalar_t>((static_cast<acc_t>(xr[s]) - mc) * kx + k1);
        }
      } else {
        for (int64_t s = 0; s < S; ++s) {
          acc_t v = (static_cast<acc_t>(xr[s * sx.ss]) - mc) * kx + k1;
          if (dyr) v += static_cast<acc_t>(dyr[s * sdy.ss]) * kdy;
          outr[s * so.ss] = static_cast<scalar_t>(v);
        }
      }
    }
  });
}

// A per-channel tensor's values in the accumulate dtype: its own data when it already is
// contiguous acc_t, else a converted copy kept in `holder`.
template <typename acc_t>
const acc_t* acc_values(const std::optional<at::Tensor>& t, at::Tensor& holder) {
  if (!t.has_value()) return nullptr;
  holder = t->scalar_type() == c10::CppTypeToScalarType<acc_t>::value && t->is_contiguous()
               ? *t
               : t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  return holder.const_data_ptr<acc_t>();
}

// running = (1 - momentum) * running + momentum * value, in running's dtype.
template <typename acc_t>
void update_running(at::Tensor& running, const std::vector<acc_t>& value, double momentum) {
  if (running.scalar_type() == c10::CppTypeToScalarType<acc_t>::value && running.is_contiguous()) {
    acc_t* r = running.mutable_data_ptr<acc_t>();
    const acc_t m = static_cast<acc_t>(momentum), keep = static_cast<acc_t>(1.0 - momentum);
    for (size_t c = 0; c < value.size(); ++c) r[c] = r[c] * keep + value[c] * m;
    return;
  }
  const at::Tensor v = at::from_blob(const_cast<acc_t*>(value.data()), {static_cast<int64_t>(value.size())},
                                     at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
  running.mul_(1.0 - momentum).add_(v.to(running.scalar_type()) * momentum);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_fwd_cpu(const at::Tensor& x_in,
                                                          const std::optional<at::Tensor>& weight,
                                                          const std::optional<at::Tensor>& bias,
                                                          const std::optional<at::Tensor>& running_mean,
                                                          const std::optional<at::Tensor>& running_var,
                                                          bool training, double momentum, double eps,
                                                          const std::optional<at::Tensor>& batches_tracked) {
  check_bn_fwd_args(x_in, weight, bias, running_mean, running_var, training, batches_tracked);
  const at::Tensor x = collapsible(x_in);
  const Ncs sx = ncs_strides(x);
  const int64_t C = sx.C, count = sx.N * sx.S;
  at::Tensor y = at::empty_like(x);
  const Ncs sy = ncs_strides(y);
  const auto stats_options = x.options().dtype(acc_dtype(x));
  at::Tensor mean = at::empty({C}, stats_options), invstd = at::empty({C}, stats_options);
  if (batches_tracked.has_value()) momentum = 1.0 / batches_tracked->item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_fwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    acc_t* mean_c = mean.mutable_data_ptr<acc_t>();
    acc_t* invstd_c = invstd.mutable_data_ptr<acc_t>();
    at::Tensor weight_holder, bias_holder;
    const acc_t* w = acc_values<acc_t>(weight, weight_holder);
    const acc_t* b = acc_values<acc_t>(bias, bias_holder);
    std::vector<acc_t> scale(C), shift(C);
    if (training) {
      // sums of x - x[0, c, 0]: shifted by one value of the channel, so a large mean costs no precision
      for (int64_t c = 0; c < C; ++c) shift[c] = count > 0 ? static_cast<acc_t>(x_data[c * sx.sc]) : acc_t(0);
      std::vector<acc_t> sum_d(C), sum_dd(C);
      channel_sums<scalar_t, acc_t>(x_data, sx, nullptr, sx, shift.data(), sum_d.data(), sum_dd.data());
      const acc_t denominator = static_cast<acc_t>(std::max<int64_t>(count, 1));
      const acc_t unbias = static_cast<acc_t>(static_cast<double>(count) / std::max<int64_t>(count - 1, 1));
      std::vector<acc_t> unbiased(C);
      for (int64_t c = 0; c < C; ++c) {
        const acc_t mean_d = sum_d[c] / denominator;
        acc_t var = sum_dd[c] / denominator - mean_d * mean_d;
        if (var < acc_t(0)) var = 0;  // rounding below 0 clamped; a NaN (non-finite x) kept
        mean_c[c] = shift[c] + mean_d;
        invstd_c[c] = acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
        unbiased[c] = var * unbias;
      }
      if (running_mean.has_value()) {
        at::Tensor running = *running_mean;
        update_running(running, std::vector<acc_t>(mean_c, mean_c + C), momentum);
      }
      if (running_var.has_value()) {
        at::Tensor running = *running_var;
        update_running(running, unbiased, momentum);
      }
    } else {
      at::Tensor mean_holder, var_holder;
      const acc_t* rm = acc_values<acc_t>(running_mean, mean_holder);
      const acc_t* rv = acc_values<acc_t>(running_var, var_holder);
      for (int64_t c = 0; c < C; ++c) {
        mean_c[c] = rm[c];
        invstd_c[c] = acc_t(1) / std::sqrt(rv[c] + static_cast<acc_t>(eps));
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      scale[c] = w ? invstd_c[c] * w[c] : invstd_c[c];
      shift[c] = b ? b[c] : acc_t(0);
    }
    affine<scalar_t, acc_t>(x_data, sx, nullptr, sx, y.mutable_data_ptr<scalar_t>(), sy,
                            {mean_c, scale.data(), shift.data(), nullptr});
  });
  return {x.is_same(x_in) ? y : y.view(x_in.sizes()), mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_bwd_cpu(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                          const std::optional<at::Tensor>& weight,
                                                          const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                                          bool training, std::array<bool, 3> output_mask) {
  check_bn_bwd_args(dy_in, x_in, weight, mean_in, invstd_in);
  const at::Tensor x = collapsible(x_in);
  const at::Tensor dy = collapsible(dy_in.scalar_type() == x.scalar_type() ? dy_in : dy_in.to(x.scalar_type()));
  const Ncs sx = ncs_strides(x), sdy = ncs_strides(dy);
  const int64_t C = sx.C, count = sx.N * sx.S;
  const bool sums = training ? output_mask[0] || output_mask[1] || output_mask[2] : output_mask[1] || output_mask[2];
  at::Tensor dx = output_mask[0] ? at::empty_like(x) : at::Tensor();
  const auto param_options = x.options().dtype(bn_param_dtype(x, weight));
  at::Tensor dweight, dbias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_bwd_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    at::Tensor weight_holder, mean_holder, invstd_holder;
    const acc_t* w = acc_values<acc_t>(weight, weight_holder);
    const acc_t* mean = acc_values<acc_t>(mean_in, mean_holder);
    const acc_t* invstd = acc_values<acc_t>(invstd_in, invstd_holder);
    const scalar_t* x_data = x.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    std::vector<acc_t> sum_dy(C, acc_t(0)), sum_dy_xhat(C, acc_t(0));
    if (sums) {
      channel_sums<scalar_t, acc_t>(x_data, sx, dy_data, sdy, mean, sum_dy.data(), sum_dy_xhat.data());
      for (int64_t c = 0; c < C; ++c) sum_dy_xhat[c] *= invstd[c];
    }
    auto param_grad = [&](const std::vector<acc_t>& values) {
      const auto acc = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
      at::Tensor out = at::empty({C}, param_options);
      if (out.scalar_type() == acc.dtype()) {
        std::copy(values.begin(), values.end(), out.mutable_data_ptr<acc_t>());
      } else {
        out.copy_(at::from_blob(const_cast<acc_t*>(values.data()), {C}, acc));
      }
      return out;
    };
    if (output_mask[1]) dweight = param_grad(sum_dy_xhat);
    if (output_mask[2]) dbias = param_grad(sum_dy);
    if (!output_mask[0]) return;
    std::vector<acc_t> scale(C), coef_x(C, acc_t(0)), coef_one(C, acc_t(0)), zeros(C, acc_t(0));
    for (int64_t c = 0; c < C; ++c) scale[c] = w ? invstd[c] * w[c] : invstd[c];
    const Ncs sdx = ncs_strides(dx);
    if (!training) {  // dx = dy * scale reads no x (a NaN in x stays out of dx, as in torch)
      affine<scalar_t, acc_t>(dy_data, sdy, nullptr, sdy, dx.mutable_data_ptr<scalar_t>(), sdx,
                              {zeros.data(), scale.data(), zeros.data(), nullptr});
      return;
    }
    // dx = (dy - sum_dy / n - xhat * sum_dy_xhat / n) * scale
    const acc_t n = static_cast<acc_t>(std::max<int64_t>(count, 1));
    for (int64_t c = 0; c < C; ++c) {
      coef_x[c] = -scale[c] * invstd[c] * sum_dy_xhat[c] / n;
      coef_one[c] = -scale[c] * sum_dy[c] / n;
    }
    affine<scalar_t, acc_t>(x_data, sx, dy_data, sdy, dx.mutable_data_ptr<scalar_t>(), sdx,
                            {mean, coef_x.data(), coef_one.data(), scale.data()});
  });
  if (dx.defined() && !x.is_same(x_in)) dx = dx.view(x_in.sizes());
  return {dx.defined() ? dx : at::empty({0}, x.options()), dweight.defined() ? dweight : at::empty({0}, param_options),
          dbias.defined() ? dbias : at::empty({0}, param_options)};
}

// ------------------------------------------------------------------ the four steps

std::pair<at::Tensor, at::Tensor> partial_sums_cpu(const at::Tensor& x, const at::Tensor& shift_in,
                                                   const at::Tensor* dy) {
  const auto acc = x.options().dtype(acc_dtype(x));
  at::Tensor sum_a = at::empty({x.size(1)}, acc), sum_b = at::empty({x.size(1)}, acc);
  const at::Tensor shift = shift_in.to(acc_dtype(x)).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_partial_sums_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const Ncs sx = ncs_strides(x);
    channel_sums<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), sx, dy ? dy->const_data_ptr<scalar_t>() : nullptr,
                                  dy ? ncs_strides(*dy) : sx, shift.const_data_ptr<acc_t>(),
                                  sum_a.mutable_data_ptr<acc_t>(), sum_b.mutable_data_ptr<acc_t>());
  });
  return {sum_a, sum_b};
}

at::Tensor affine_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& coef_x, const at::Tensor& coef_one,
                      const at::Tensor* dy, const at::Tensor* coef_dy) {
  at::Tensor out = at::empty_like(x);  // x's strides
  const auto acc = acc_dtype(x);
  const at::Tensor m = mean.to(acc).contiguous(), kx = coef_x.to(acc).contiguous(), k1 = coef_one.to(acc).contiguous(),
                   kdy = coef_dy ? coef_dy->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_affine_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const Ncs sx = ncs_strides(x);
    affine<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), sx, dy ? dy->const_data_ptr<scalar_t>() : nullptr,
                            dy ? ncs_strides(*dy) : sx, out.mutable_data_ptr<scalar_t>(), ncs_strides(out),
                            {m.const_data_ptr<acc_t>(), kx.const_data_ptr<acc_t>(), k1.const_data_ptr<acc_t>(),
                             coef_dy ? kdy.const_data_ptr<acc_t>() : nullptr});
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> bn_stats_cpu(const at::Tensor& x) { return bn_stats_steps(x, partial_sums_cpu); }

at::Tensor bn_apply_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps) {
  return bn_apply_steps(x, mean, var, weight, bias, eps, affine_cpu);
}

std::tuple<at::Tensor, at::Tensor> bn_bwd_reduce_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean,
                                                     const at::Tensor& var, double eps) {
  return bn_bwd_reduce_steps(dy, x, mean, var, eps, partial_sums_cpu);
}

at::Tensor bn_bwd_apply_cpu(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                            const std::optional<at::Tensor>& weight, double eps, const std::optional<at::Tensor>& sum_dy,
                            const std::optional<at::Tensor>& sum_dy_xhat, int64_t count) {
  return bn_bwd_apply_steps(dy, x, mean, var, weight, eps, sum_dy, sum_dy_xhat, count, affine_cpu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreg, CPU, m) {
  m.impl("bn_fwd", &bn_fwd_cpu);
  m.impl("bn_bwd", &bn_bwd_cpu);
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_apply", &bn_apply_cpu);
  m.impl("bn_bwd_reduce", &bn_bwd_reduce_cpu);
  m.impl("bn_bwd_apply", &bn_bwd_apply_cpu);
}

}  // namespace fastreg
