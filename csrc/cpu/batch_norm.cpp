// BatchNorm on CPU tensors: the four steps of csrc/ops.cpp over x (N, C, S) of any
// strides. Two loop orders, chosen by the layout: channels-last (C contiguous) walks the
// positions (n, s) and, inside, the channels; otherwise each (n, c) walks its S values.
// Reductions are partial sums over a fixed split (of the positions, or of N) reduced in
// order afterwards: deterministic whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fastreg/bn_steps.h"
#include "fastreg/welford.h"

namespace fastreg {
namespace {

constexpr int64_t kMaxChunks = 64;

struct Strides {
  int64_t n, c, s;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

bool channels_last(const at::Tensor& x) { return x.stride(1) == 1 && x.size(1) > 1; }

// Per channel over all positions, with d = x - shift[c]: A = sum d, B = sum d * d, or,
// with dy, A = sum dy, B = sum dy * d. Returns (A, B) in the accumulate dtype.
template <typename scalar_t>
std::pair<at::Tensor, at::Tensor> partial_sums(const at::Tensor& x, const at::Tensor& shift_in,
                                               const at::Tensor* dy) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2), P = N * S;
  const bool by_positions = channels_last(x);
  const int64_t units = by_positions ? P : N;  // what the chunks split
  const int64_t per_chunk = rows_per_chunk(units, kMaxChunks);
  const int64_t chunks = units == 0 ? 1 : (units + per_chunk - 1) / per_chunk;
  const auto acc = x.options().dtype(acc_dtype(x));
  at::Tensor partial_a = at::zeros({chunks, C}, acc), partial_b = at::zeros({chunks, C}, acc);
  const at::Tensor shift = shift_in.to(acc_dtype(x)).contiguous();
  const acc_t* shift_data = shift.const_data_ptr<acc_t>();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_data = dy ? dy->const_data_ptr<scalar_t>() : nullptr;
  const Strides sx = strides_of(x), sdy = dy ? strides_of(*dy) : sx;
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* a = partial_a.mutable_data_ptr<acc_t>() + chunk * C;
      acc_t* b = partial_b.mutable_data_ptr<acc_t>() + chunk * C;
      const int64_t first = chunk * per_chunk, last = std::min(units, first + per_chunk);
      if (by_positions) {
        for (int64_t p = first; p < last; ++p) {
          const int64_t n = p / S, s = p % S;
          const scalar_t* xr = x_data + n * sx.n + s * sx.s;
          if (dy_data) {
            const scalar_t* dyr = dy_data + n * sdy.n + s * sdy.s;
            if (sdy.c == 1) {  // the common case, vectorized
              for (int64_t c = 0; c < C; ++c) {
                const acc_t g = static_cast<acc_t>(dyr[c]);
                a[c] += g;
                b[c] += g * (static_cast<acc_t>(xr[c]) - shift_data[c]);
              }
            } else {
              for (int64_t c = 0; c < C; ++c) {
                const acc_t g = static_cast<acc_t>(dyr[c * sdy.c]);
                a[c] += g;
                b[c] += g * (static_cast<acc_t>(xr[c]) - shift_data[c]);
              }
            }
          } else {
            for (int64_t c = 0; c < C; ++c) {
              const acc_t d = static_cast<acc_t>(xr[c]) - shift_data[c];
              a[c] += d;
              b[c] += d * d;
            }
          }
        }
      } else {
        for (int64_t n = first; n < last; ++n) {
          for (int64_t c = 0; c < C; ++c) {
            const scalar_t* xr = x_data + n * sx.n + c * sx.c;
            const acc_t shift_c = shift_data[c];
            acc_t sum_a = 0, sum_b = 0;
            if (dy_data) {
              const scalar_t* dyr = dy_data + n * sdy.n + c * sdy.c;
              for (int64_t s = 0; s < S; ++s) {
                const acc_t g = static_cast<acc_t>(dyr[s * sdy.s]);
                sum_a += g;
                sum_b += g * (static_cast<acc_t>(xr[s * sx.s]) - shift_c);
              }
            } else {
              for (int64_t s = 0; s < S; ++s) {
                const acc_t d = static_cast<acc_t>(xr[s * sx.s]) - shift_c;
                sum_a += d;
                sum_b += d * d;
              }
            }
            a[c] += sum_a;
            b[c] += sum_b;
          }
        }
      }
    }
  });
  return {partial_a.sum(0), partial_b.sum(0)};  // in chunk order
}

// out = (x - mean[c]) * coef_x[c] + dy * coef_dy[c] + coef_one[c] (no dy term without dy),
// in x's dtype and strides.
template <typename scalar_t>
at::Tensor affine(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& coef_x, const at::Tensor& coef_one,
                  const at::Tensor* dy, const at::Tensor* coef_dy) {
  using acc_t = acc_type<scalar_t>;
  at::Tensor out = at::empty_like(x);
  const int64_t N = x.size(0), C = x.size(1), S = x.size(2);
  if (out.numel() == 0) return out;
  const at::Tensor m = mean.to(acc_dtype(x)).contiguous(), kx = coef_x.to(acc_dtype(x)).contiguous(),
                   k1 = coef_one.to(acc_dtype(x)).contiguous(),
                   kdy = coef_dy ? coef_dy->to(acc_dtype(x)).contiguous() : at::Tensor();
  const acc_t *__restrict mean_c = m.const_data_ptr<acc_t>(), *__restrict kx_c = kx.const_data_ptr<acc_t>(),
              *__restrict k1_c = k1.const_data_ptr<acc_t>(),
              *__restrict kdy_c = coef_dy ? kdy.const_data_ptr<acc_t>() : nullptr;
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* dy_data = dy ? dy->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const Strides sx = strides_of(x), sdy = dy ? strides_of(*dy) : sx, so = strides_of(out);
  auto value = [&](acc_t xv, const scalar_t* g, int64_t c) {
    acc_t v = (xv - mean_c[c]) * kx_c[c] + k1_c[c];
    if (g) v += static_cast<acc_t>(*g) * kdy_c[c];
    return static_cast<scalar_t>(v);
  };
  if (channels_last(x)) {
    at::parallel_for(0, N * S, std::max<int64_t>(1, 32768 / C), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / S, s = p % S;
        const scalar_t* __restrict xr = x_data + n * sx.n + s * sx.s;
        const scalar_t* __restrict dyr = dy_data ? dy_data + n * sdy.n + s * sdy.s : nullptr;
        scalar_t* __restrict outr = out_data + n * so.n + s * so.s;
        if (dyr && sdy.c == 1) {
          for (int64_t c = 0; c < C; ++c) {
            outr[c] = static_cast<scalar_t>((static_cast<acc_t>(xr[c]) - mean_c[c]) * kx_c[c] + k1_c[c] +
                                            static_cast<acc_t>(dyr[c]) * kdy_c[c]);
          }
        } else if (!dyr) {
          for (int64_t c = 0; c < C; ++c) {
            outr[c] = static_cast<scalar_t>((static_cast<acc_t>(xr[c]) - mean_c[c]) * kx_c[c] + k1_c[c]);
          }
        } else {
          for (int64_t c = 0; c < C; ++c) outr[c] = value(static_cast<acc_t>(xr[c]), dyr + c * sdy.c, c);
        }
      }
    });
  } else {
    at::parallel_for(0, N * C, std::max<int64_t>(1, 32768 / std::max<int64_t>(S, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t n = nc / C, c = nc % C;
        const scalar_t* __restrict xr = x_data + n * sx.n + c * sx.c;
        const scalar_t* __restrict dyr = dy_data ? dy_data + n * sdy.n + c * sdy.c : nullptr;
        scalar_t* __restrict outr = out_data + n * so.n + c * so.c;
        const acc_t mc = mean_c[c], kxc = kx_c[c], k1c = k1_c[c], kdyc = kdy_c ? kdy_c[c] : acc_t(0);
        if (sx.s == 1 && so.s == 1 && (!dyr || sdy.s == 1)) {
          if (dyr) {
            for (int64_t s = 0; s < S; ++s) {
              outr[s] = static_cast<scalar_t>((static_cast<acc_t>(xr[s]) - mc) * kxc + k1c +
                                              static_cast<acc_t>(dyr[s]) * kdyc);
            }
          } else {
            for (int64_t s = 0; s < S; ++s) outr[s] = static_cast<scalar_t>((static_cast<acc_t>(xr[s]) - mc) * kxc + k1c);
          }
        } else {
          for (int64_t s = 0; s < S; ++s) {
            outr[s * so.s] = value(static_cast<acc_t>(xr[s * sx.s]), dyr ? dyr + s * sdy.s : nullptr, c);
          }
        }
      }
    });
  }
  return out;
}

std::pair<at::Tensor, at::Tensor> partial_sums_cpu(const at::Tensor& x, const at::Tensor& shift, const at::Tensor* dy) {
  std::pair<at::Tensor, at::Tensor> sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_partial_sums_cpu", [&] {
    sums = partial_sums<scalar_t>(x, shift, dy);
  });
  return sums;
}

at::Tensor affine_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& coef_x, const at::Tensor& coef_one,
                      const at::Tensor* dy, const at::Tensor* coef_dy) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fastreg_bn_affine_cpu", [&] {
    out = affine<scalar_t>(x, mean, coef_x, coef_one, dy, coef_dy);
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
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_apply", &bn_apply_cpu);
  m.impl("bn_bwd_reduce", &bn_bwd_reduce_cpu);
  m.impl("bn_bwd_apply", &bn_bwd_apply_cpu);
}

}  // namespace fastreg
