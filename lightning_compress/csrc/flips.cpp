// FlipOut's per-step work. flip_count_: for every weight, compare its sign with the sign
// remembered at the previous step, count a strict change (-1 <-> +1; zeros never flip), and
// remember the new sign, in one pass. masked_noise_: gradient masking and scaled noise, fused.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace lightning_compress {

// int8 pointers may alias anything; __restrict__ lets the compiler vectorize the loop anyway.
template <typename scalar_t>
LC_SIMD_CLONES void flip_count_range(const scalar_t* __restrict__ w, int8_t* __restrict__ s,
                      int32_t* __restrict__ f, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(w[i]);
    const int32_t now = static_cast<int32_t>(v > 0.0f) - static_cast<int32_t>(v < 0.0f);
    const int32_t before = s[i];
    f[i] += static_cast<int32_t>(now * before < 0);
    s[i] = static_cast<int8_t>(now);
  }
}

void flip_count_cpu(const at::Tensor& param, at::Tensor& sign, at::Tensor& flips) {
  TORCH_CHECK(sign.scalar_type() == at::kChar, "flip_count_: `sign` must be int8, got ",
              sign.scalar_type());
  TORCH_CHECK(flips.scalar_type() == at::kInt, "flip_count_: `flips` must be int32, got ",
              flips.scalar_type());
  TORCH_CHECK(param.sizes() == sign.sizes() && param.sizes() == flips.sizes(),
              "flip_count_: `param`, `sign` and `flips` must have the same shape");
  TORCH_CHECK(sign.is_contiguous() && flips.is_contiguous(),
              "flip_count_: `sign` and `flips` must be contiguous");
  const at::Tensor values = param.contiguous();
  const int64_t n = values.numel();
  int8_t* sign_ptr = sign.data_ptr<int8_t>();
  int32_t* flips_ptr = flips.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "flip_count_",
                                  [&] {
    const scalar_t* w_ptr = values.data_ptr<scalar_t>();
    at::parallel_for(0, n, 65536, [&](int64_t begin, int64_t end) {
      flip_count_range(w_ptr + begin, sign_ptr + begin, flips_ptr + begin, end - begin);
    });
  });
}

// FlipOut's gradient noise, fused with gradient masking: g *= keep, then
// g += lambda * ||g||_2 / sqrt(n) * noise * keep. The norm is summed in fixed blocks of
// kBlock elements (in double, blocks added in order), so it does not depend on the number of
// threads: every rank of a run computes the same scale from the same gradient.
constexpr int64_t kBlock = 32768;

// Squares are summed in kLanes float accumulators (so the loop vectorizes without reordering
// a single sum), added in double at the end.
constexpr int kLanes = 16;

template <typename scalar_t>
LC_SIMD_CLONES double mask_and_sumsq(scalar_t* __restrict__ g, const scalar_t* __restrict__ keep,
                                     int64_t n) {
  float acc[kLanes] = {0.0f};
  int64_t i = 0;
  if (keep) {
    for (; i + kLanes <= n; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const float v = static_cast<float>(g[i + j]) * static_cast<float>(keep[i + j]);
        g[i + j] = static_cast<scalar_t>(v);
        acc[j] += v * v;
      }
    }
    for (; i < n; ++i) {
      const float v = static_cast<float>(g[i]) * static_cast<float>(keep[i]);
      g[i] = static_cast<scalar_t>(v);
      acc[0] += v * v;
    }
  } else {
    for (; i + kLanes <= n; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const float v = static_cast<float>(g[i + j]);
        acc[j] += v * v;
      }
    }
    for (; i < n; ++i) {
      const float v = static_cast<float>(g[i]);
      acc[0] += v * v;
    }
  }
  double total = 0.0;
  for (int j = 0; j < kLanes; ++j) total += acc[j];
  return total;
}

template <typename scalar_t>
LC_SIMD_CLONES void add_noise_range(scalar_t* __restrict__ g, const scalar_t* __restrict__ keep,
                     const scalar_t* __restrict__ noise, float scale, int64_t n) {
  if (keep) {
    for (int64_t i = 0; i < n; ++i) {
      g[i] = static_cast<scalar_t>(static_cast<float>(g[i]) + scale * static_cast<float>(noise[i]) *
                                                                   static_cast<float>(keep[i]));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      g[i] = static_cast<scalar_t>(static_cast<float>(g[i]) + scale * static_cast<float>(noise[i]));
    }
  }
}

void masked_noise_cpu(at::Tensor& grad, const std::optional<at::Tensor>& keep,
                        const at::Tensor& noise, double lam) {
  TORCH_CHECK(grad.is_contiguous() && noise.is_contiguous(),
              "masked_noise_: `grad` and `noise` must be contiguous");
  TORCH_CHECK(noise.sizes() == grad.sizes() && noise.scalar_type() == grad.scalar_type(),
              "masked_noise_: `noise` must match `grad` in shape and dtype");
  const bool has_keep = keep.has_value() && keep->defined();
  at::Tensor keep_c;
  if (has_keep) {
    TORCH_CHECK(keep->sizes() == grad.sizes() && keep->scalar_type() == grad.scalar_type(),
                "masked_noise_: `keep` must match `grad` in shape and dtype");
    keep_c = keep->contiguous();
  }
  const int64_t n = grad.numel();
  if (n == 0) return;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "masked_noise_",
                                  [&] {
    scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* k = has_keep ? keep_c.data_ptr<scalar_t>() : nullptr;
    const scalar_t* z = noise.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * kBlock;
        const int64_t len = std::min(kBlock, n - start);
        partial[b] = mask_and_sumsq(g + start, k ? k + start : nullptr, len);
      }
    });
    double sumsq = 0.0;
    for (double p : partial) sumsq += p;
    const double scale = lam * std::sqrt(sumsq) / std::sqrt(static_cast<double>(n));
    if (scale == 0.0) return;
    const float s = static_cast<float>(scale);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t start = b * kBlock;
        const int64_t len = std::min(kBlock, n - start);
        add_noise_range(g + start, k ? k + start : nullptr, z + start, s, len);
      }
    });
  });
}

TORCH_LIBRARY_IMPL(lightning_compress, CPU, m) {
  m.impl("flip_count_", &flip_count_cpu);
  m.impl("masked_noise_", &masked_noise_cpu);
}

}  // namespace lightning_compress
